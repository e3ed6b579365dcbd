"""Logits that are not finite, on every backend of the log-prob ops.

- A masked vocabulary (a -inf bias on some tokens): each entropy term p log p is 0 there (p = 0), so entropies,
  losses and every gradient are finite and equal float64's; a target inside the mask has log-prob -inf. Before,
  0 * -inf made the entropy NaN (torch) or 0 (triton) and every gradient through it NaN.
- A NaN in a row: that row's log-prob and entropy are NaN, the others exact. Before, triton's final clamp
  (``min.f32`` returns the operand that is not NaN) stored log-prob 0, probability 1, and ``fused_pact_head``
  returned a finite loss with NaN gradients where the torch backend refuses.
"""
import pytest
import torch

from pact_fast.losses import PACTLossConfig
from pact_fast.ops import linear_logprobs, linear_logprobs_reference
from pact_fast.ops.fused_pact_head import fused_pact_head

from conftest import rel_err
from test_fused_pact_head import _as_fp32_batch, _problem, _unfused

BACKENDS = ["torch", "triton"]
N, H, V = 12, 16, 53  # V not a multiple of the tiles: the masked tail columns too


def _masked_inputs(seed=0):
    """fp32 hidden [N, H], weight [V, H], bias [V] with -inf on every third token, targets [N] of which rows 0,
    4 and 8 lie inside the mask."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    bias = torch.randn(V, generator=g)
    bias[::3] = float("-inf")
    targets = 3 * torch.randint(1, V // 3, (N,), generator=g) + 1  # outside the mask
    targets[::4] = 3 * torch.randint(0, V // 3, (3,), generator=g)  # inside it
    return hidden, weight, bias, targets


def test_the_reference_entropy_of_a_masked_vocabulary_is_finite():
    hidden, weight, bias, targets = _masked_inputs()
    logp, ent = linear_logprobs_reference(hidden.double(), weight.double(), targets, bias=bias.double())
    keep = torch.ones(V, dtype=torch.bool)
    keep[::3] = False
    z = hidden.double() @ weight.double().t()[:, keep] + bias.double()[keep]
    p = torch.softmax(z, -1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), rtol=1e-12, atol=0)
    assert torch.isinf(logp[::4]).all() and torch.isfinite(logp[1::4]).all()


@pytest.mark.parametrize("backend, slab, softcap", [("torch", None, None), ("triton", None, None),
                                                    ("triton", 16, None), ("torch", None, 3.0), ("triton", 16, 3.0)],
                         ids=["torch", "triton-one-slab", "triton-slabs-of-16", "torch-softcap", "triton-softcap"])
def test_a_masked_vocabulary_gives_float64_entropies_and_gradients(backend, slab, softcap):
    """(A soft cap maps -inf to -cap: the tokens are no longer masked, and everything is finite.)"""
    hidden, weight, bias, targets = _masked_inputs()
    ours = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ref = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, ent = linear_logprobs(*ours[:2], targets, bias=ours[2], return_entropy=True, backend=backend,
                                vocab_slab=slab, softcap=softcap)
    logp_r, ent_r = linear_logprobs_reference(*ref[:2], targets, bias=ref[2], softcap=softcap)
    inside = torch.zeros(N, dtype=torch.bool)
    if softcap is None:
        inside[::4] = True
    assert torch.isneginf(logp[inside]).all()
    assert rel_err(logp[~inside], logp_r[~inside]) < 2e-5
    assert torch.isfinite(ent).all() and rel_err(ent, ent_r) < 2e-5
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    # a target inside the mask: log-prob -inf, but its gradient (onehot - p) is finite
    torch.autograd.backward([logp, ent], [g_logp, g_ent])
    torch.autograd.backward([logp_r, ent_r], [g_logp.double(), g_ent.double()])
    for name, o, r in zip(("hidden", "weight", "bias"), ours, ref):
        assert torch.isfinite(o.grad).all(), name
        assert rel_err(o.grad, r.grad) < 2e-5, (name, rel_err(o.grad, r.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_row_is_nan_and_the_others_exact(backend):
    hidden, weight, bias, targets = _masked_inputs()
    hidden[5, 3] = float("nan")
    logp, ent = linear_logprobs(hidden, weight, targets + (targets % 3 == 0).long(), return_entropy=True,
                                backend=backend)
    logp_r, ent_r = linear_logprobs_reference(hidden.double(), weight.double(), targets + (targets % 3 == 0).long())
    assert torch.isnan(logp[5]) and torch.isnan(ent[5])
    others = torch.arange(N) != 5
    assert rel_err(logp[others], logp_r[others]) < 2e-5 and rel_err(ent[others], ent_r[others]) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c_ent", [0.0, 0.05], ids=["shift-pass", "entropy-bonus"])
def test_fused_head_on_a_masked_vocabulary_equals_float64(backend, c_ent):
    """The PACT loss fused into a head with -inf bias entries (targets outside them), with and without the
    entropy bonus (triton: its shift pass, then its ordinary pass and gradient epilogue)."""
    config = PACTLossConfig(c_ent=c_ent)
    hidden, weight, bias, targets, rows, batch = _problem(1, dtype=torch.float32, bias=True)
    with torch.no_grad():
        bias[::3] = float("-inf")
    targets = torch.where(targets % 3 == 0, torch.where(targets + 1 < bias.shape[0], targets + 1, targets - 1), targets)
    assert (targets % 3 != 0).all()
    batch = _as_fp32_batch(batch)
    params = [hidden, weight, bias]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_loss, _ = _unfused(*ref_params, targets, rows, batch, config, 0.3, temperature=1.0, old_from_current=False,
                           step=4)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    loss, metrics = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, bias=bias, step=4,
                                    chunk_rows=7, backend=backend)
    grads = torch.autograd.grad(loss, params)
    assert abs(loss.item() - ref_loss.item()) <= 2e-5 * max(1.0, abs(ref_loss.item()))
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < 2e-5, (name, rel_err(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_refuses_a_nan_hidden_row_on_every_backend(backend):
    hidden, weight, _, targets, rows, batch = _problem(1, dtype=torch.float32)
    with torch.no_grad():
        hidden[rows["logp_po"][0, 0]] = float("nan")
    with pytest.raises(ValueError, match="not finite|NaN"):
        fused_pact_head(hidden, weight, targets, rows, _as_fp32_batch(batch), PACTLossConfig(), 0.3, step=4,
                        backend=backend)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=1e-40), r"logit_scale / temperature = 1e\+40 is past float32's range"),
    (dict(logit_scale=1e39), r"logit_scale / temperature = 1e\+39 is past float32's range"),
    (dict(logit_scale=1e-30, softcap=1e30), r"softcap / logit_scale = 1e\+60 is past float32's range"),
])
def test_a_logit_transform_past_float32_is_refused_by_both_ops(kwargs, match):
    """Each factor finite as a Python float, their quotient past float32's range: every log-prob came out NaN
    (the ops compute in float32) where it is now refused in one line; a quotient inside the range is exact."""
    hidden, weight, _, targets, rows, batch = _problem(1, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        linear_logprobs(hidden, weight, targets, backend="torch", **kwargs)
    with pytest.raises(ValueError, match=match):
        fused_pact_head(hidden, weight, targets, rows, _as_fp32_batch(batch), PACTLossConfig(), 0.3, step=4,
                        backend="torch", **kwargs)
    got = linear_logprobs(hidden, weight, targets, backend="torch", temperature=1e-30)
    want = linear_logprobs_reference(hidden.double(), weight.double(), targets, temperature=1e-30)[0]
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5
