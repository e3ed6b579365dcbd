import pytest
import torch

from pact_fast.ops import linear_logprobs, linear_logprobs_reference
from conftest import rel_err

TOL = {torch.float32: 2e-5, torch.float16: 1e-2}
CASES = [
    pytest.param(37, 48, 203, id="N37-H48-V203"),
    pytest.param(16, 32, 64, id="N16-H32-V64"),
    pytest.param(5, 24, 1001, id="N5-H24-V1001"),
]


def _inputs(N, H, V, dtype, device, scale=1.0, n_ignored=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device)
    bias = torch.randn(V, generator=g).to(dtype).to(device)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return hidden, weight, bias, targets.to(device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
@pytest.mark.parametrize("N,H,V", CASES)
def test_matches_float64_reference(backend, dtype, use_bias, temperature, N, H, V, device):
    hidden, weight, bias, targets = _inputs(N, H, V, dtype, device)
    bias = bias if use_bias else None
    inputs = [hidden, weight] + ([bias] if use_bias else [])
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().clone().requires_grad_() for t in inputs]
    logp, ent = linear_logprobs(ours[0], ours[1], targets, bias=ours[2] if use_bias else None,
                                temperature=temperature, return_entropy=True, backend=backend)
    logp_r, ent_r = linear_logprobs_reference(ref[0], ref[1], targets, bias=ref[2] if use_bias else None,
                                              temperature=temperature)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert rel_err(logp, logp_r) < TOL[dtype]
    assert rel_err(ent, ent_r) < TOL[dtype]
    g_logp = torch.randn(N, device=device)
    g_ent = torch.randn(N, device=device)
    (logp * g_logp + ent * g_ent).sum().backward()
    (logp_r * g_logp.double() + ent_r * g_ent.double()).sum().backward()
    for name, o, r in zip(["hidden", "weight", "bias"], ours, ref):
        assert o.grad.dtype == dtype
        assert rel_err(o.grad, r.grad) < TOL[dtype], name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_rows_are_zero_and_get_no_gradient(backend, device):
    hidden, weight, _, targets = _inputs(21, 32, 77, torch.float32, device, n_ignored=5)
    hidden.requires_grad_()
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    ignored = targets == -100
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(logp[~ignored] < 0)
    (logp.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad[ignored] == 0)
    assert torch.all(hidden.grad[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_logits_stay_finite_and_nonpositive(backend, device):
    # logits of magnitude ~1e3
    hidden, weight, _, targets = _inputs(19, 16, 131, torch.float32, device, scale=1.0, n_ignored=0)
    weight = weight * (1e3 / (hidden @ weight.t()).abs().max())
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    logp_r, ent_r = linear_logprobs_reference(hidden.double(), weight.double(), targets)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp <= 0).all() and (ent >= 0).all()
    assert rel_err(logp, logp_r) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_only_gradient(backend, device):
    hidden, weight, _, targets = _inputs(9, 16, 50, torch.float32, device)
    h = hidden.clone().requires_grad_()
    h_r = hidden.double().clone().requires_grad_()
    _, ent = linear_logprobs(h, weight, targets, return_entropy=True, backend=backend)
    ent.sum().backward()
    linear_logprobs_reference(h_r, weight.double(), targets)[1].sum().backward()
    assert rel_err(h.grad, h_r.grad) < 2e-5


def test_chunking_does_not_change_results():
    hidden, weight, _, targets = _inputs(40, 16, 97, torch.float32, "cpu")
    whole = linear_logprobs(hidden, weight, targets, backend="torch", chunk_rows=1000)
    chunked = linear_logprobs(hidden, weight, targets, backend="torch", chunk_rows=7)
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_leading_dims_are_kept():
    hidden, weight, _, targets = _inputs(24, 16, 40, torch.float32, "cpu")
    flat = linear_logprobs(hidden, weight, targets)
    shaped = linear_logprobs(hidden.view(2, 3, 4, 16), weight, targets.view(2, 3, 4))
    assert shaped.shape == (2, 3, 4)
    assert torch.equal(shaped.reshape(-1), flat)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.zeros(6)), TypeError, "targets"),
    (dict(targets=torch.full((6,), 40)), ValueError, "outside"),
    (dict(targets=torch.full((6,), -3)), ValueError, "outside"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(weight=torch.randn(40, 8)), ValueError, "hidden"),
    (dict(weight=torch.randn(40, 16, dtype=torch.float64)), TypeError, "weight"),
    (dict(bias=torch.randn(39)), ValueError, "bias"),
    (dict(weight=torch.randn(40, 16, device="meta")), ValueError, "devices"),
    (dict(backend="cuda"), ValueError, "backend"),
], ids=["targets-shape", "targets-float", "target-too-big", "target-negative", "temp-zero", "temp-negative",
        "hidden-H", "weight-dtype", "bias-shape", "devices", "backend-name"])
def test_bad_input_is_a_clear_error(kwargs, exc, word):
    args = dict(hidden=torch.randn(6, 16), weight=torch.randn(40, 16), targets=torch.zeros(6, dtype=torch.long))
    args.update(kwargs)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(exc, match=word):
        linear_logprobs(hidden, weight, targets, **args)
