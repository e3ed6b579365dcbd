"""A frozen lm_head (issue 26 item 3): when ``weight`` does not require grad, ``linear_logprobs`` computes no weight
gradient on any backend (no dW GEMM, no dW buffer: two GEMMs per backward block instead of three), its log-probs,
entropy, dX and db equal the full path's, and the performance model drops exactly the dW GEMMs."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pact_fast.kernels import linear_logprobs_launch as launch
from pact_fast.kernels.registry import interpreting
from pact_fast.ops import linear_logprobs, linear_logprobs_reference
from pact_fast.ops.linear_logprobs import upcast_slab_cols
from conftest import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import roofline  # noqa: E402

N, H, V = 29, 24, 203
# every logit transform the op supports, with and without a bias
VARIANTS = [
    pytest.param({}, False, id="plain"),
    pytest.param({}, True, id="bias"),
    pytest.param(dict(temperature=0.7), True, id="bias-T0.7"),
    pytest.param(dict(logit_scale=0.6), False, id="scale0.6"),
    pytest.param(dict(logit_scale=1.7, softcap=2.0, temperature=1.3), True, id="bias-scale-softcap-T1.3"),
]
# small blocks so the triton backend runs several row blocks x vocabulary slabs (the torch one several chunks)
BLOCKS = dict(chunk_rows=8, vocab_slab=64)
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default, torch.ops.aten.addmm.out,
            torch.ops.aten.addmm_.default, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


class _Recorder(TorchDispatchMode):
    """Every aten op run inside, including those inside the ``pact_fast::`` custom ops (run through their CPU
    implementation with the recorder active): the matmuls, and the shape of every output that is a new buffer
    (not a view of, or the same tensor as, an input)."""

    def __init__(self):
        super().__init__()
        self.matmuls, self.new_buffers = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pact_fast":
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        if func in _MATMULS:
            self.matmuls.append(func)
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in storages:
                self.new_buffers.append(tuple(o.shape))
        return out


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return hidden, weight, bias, targets, g_logp, g_ent


def _run(backend, dtype, transform, use_bias, frozen, record=False):
    """Forward and backward of logp and entropy under random upstream gradients; returns the outputs, the
    gradients (None where not computed) and, with record, the backward's _Recorder."""
    hidden, weight, bias, targets, g_logp, g_ent = _inputs(dtype)
    hidden.requires_grad_()
    weight.requires_grad_(not frozen)
    bias = bias.requires_grad_() if use_bias else None
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend,
                                **transform, **BLOCKS)
    loss = (logp * g_logp).sum() + (ent * g_ent).sum()
    recorder = _Recorder()
    if record:
        with recorder:
            loss.backward()
    else:
        loss.backward()
    grads = (hidden.grad, weight.grad, bias.grad if use_bias else None)
    return (logp.detach(), ent.detach()), grads, recorder


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("transform,use_bias", VARIANTS)
def test_frozen_weight_gets_no_gradient_and_same_logp_and_dx_in_float64(backend, transform, use_bias):
    dtype = torch.float64 if backend == "torch" else torch.float32  # the kernels take 16- and 32-bit floats
    (logp_f, ent_f), (dx_f, dw_f, db_f), _ = _run(backend, dtype, transform, use_bias, frozen=True)
    (logp, ent), (dx, dw, db), _ = _run(backend, dtype, transform, use_bias, frozen=False)
    assert dw_f is None and dw is not None
    assert torch.equal(logp_f, logp) and torch.equal(ent_f, ent)
    assert torch.equal(dx_f, dx)
    if use_bias:
        assert torch.equal(db_f, db)
    # and both are right: against the float64 reference
    hidden, weight, bias, targets, g_logp, g_ent = _inputs(torch.float64)
    hidden.requires_grad_()
    logp_r, ent_r = linear_logprobs_reference(hidden, weight, targets, bias=bias if use_bias else None, **transform)
    ((logp_r * g_logp.double()).sum() + (ent_r * g_ent.double()).sum()).backward()
    assert rel_err(logp_f, logp_r) < 2e-5 and rel_err(ent_f, ent_r) < 2e-5
    assert rel_err(dx_f, hidden.grad) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("transform,use_bias", [VARIANTS[0], VARIANTS[-1]])
def test_frozen_weight_runs_no_dw_gemm_and_makes_no_dw_buffer(backend, dtype, transform, use_bias):
    """The backward's matmuls: per row chunk (torch) or row block x slab (triton), the full path runs the logits'
    recompute, dX and dW (the torch path with 16-bit inputs the first two per fp32 slab of the weight, so it never
    copies the whole weight to fp32); the frozen path the first two only, and makes no [V, H] buffer (the full
    path makes its dW)."""
    _, _, full = _run(backend, dtype, transform, use_bias, frozen=False, record=True)
    _, (dx, dw, _), frozen = _run(backend, dtype, transform, use_bias, frozen=True, record=True)
    assert dw is None and dx is not None
    kept = int((_inputs(dtype)[3] != -100).sum())
    assert kept % BLOCKS["chunk_rows"] == 0  # every chunk has the same rows, so the same slabs
    slabs = 1
    if backend == "torch":
        steps = kept // BLOCKS["chunk_rows"]
        if dtype != torch.float32:
            slabs = -(-V // upcast_slab_cols(V, H, BLOCKS["chunk_rows"]))
            assert slabs > 1
    else:
        steps = kept // BLOCKS["chunk_rows"] * -(-V // BLOCKS["vocab_slab"])
    assert len(full.matmuls) == (2 * slabs + 1) * steps
    assert len(frozen.matmuls) == 2 * slabs * steps
    assert frozen.new_buffers.count((V, H)) == 0
    assert full.new_buffers.count((V, H)) > 0


def test_frozen_weight_with_a_trainable_bias_still_gets_db():
    """A frozen weight next to a trainable bias: db is computed (and right), dW is not."""
    hidden, weight, bias, targets, g_logp, _ = _inputs(torch.float64)
    bias.requires_grad_()
    linear_logprobs(hidden, weight, targets, bias=bias, backend="torch").mul(g_logp).sum().backward()
    assert weight.grad is None
    bias_r = bias.detach().clone().requires_grad_()
    logp_r, _ = linear_logprobs_reference(hidden, weight, targets, bias=bias_r)
    (logp_r * g_logp.double()).sum().backward()
    assert rel_err(bias.grad, bias_r.grad) < 2e-5


@pytest.mark.parametrize("transform", [{}, dict(logit_scale=0.6, softcap=2.0)], ids=["plain", "scale-softcap"])
def test_frozen_weight_compiles_in_one_graph_and_matches_eager(transform):
    """torch.compile(fullgraph=True) around the op with a frozen weight: eager's values and dX, no weight gradient."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, dtype=torch.float64)
    bias = torch.randn(101, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    targets[::5] = -100

    def loss(hidden, weight, bias, targets):
        logp, ent = linear_logprobs(torch.tanh(hidden), weight, targets, bias=bias, temperature=0.7,
                                    return_entropy=True, backend="torch", **transform)
        return (logp.double() * torch.arange(37)).sum() + 0.3 * ent.double().sum()

    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True)(hidden, weight, bias, targets)
    got.backward()
    got_grads = (hidden.grad.clone(), bias.grad.clone())
    hidden.grad = bias.grad = None
    want = loss(hidden, weight, bias, targets)
    want.backward()
    assert weight.grad is None
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, (hidden.grad, bias.grad)):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_frozen_backward_passes_torch_library_opcheck():
    """The backward op's schema and fake implementation with weight_grad False: an empty dW."""
    torch.manual_seed(1)
    hidden, weight = torch.randn(9, 8), torch.randn(33, 8)
    targets = torch.randint(0, 33, (9,))
    targets[2] = -100
    _, lse, ent = torch.ops.pact_fast.linear_logprobs(hidden, weight, None, targets, 1.0, 0.0, -100, "torch", 0, 0)
    args = (hidden, weight, None, targets, lse, ent, torch.randn(9), None, 1.0, 0.0, -100, "torch", 0, 0)
    dx, dw, _ = torch.ops.pact_fast.linear_logprobs_backward(*args, False)
    assert dx.shape == hidden.shape and dw.numel() == 0
    torch.library.opcheck(torch.ops.pact_fast.linear_logprobs_backward.default, (*args, False))


# --- the performance model: what the frozen path executes equals kernel_costs(weight_grad=False) ---------------

CONFIGS = {"interpreter": launch.INTERPRET_CONFIGS, "gpu": launch.GPU_CONFIGS}


@pytest.mark.skipif(not interpreting(), reason="counts what the Triton interpreter executes")
@pytest.mark.parametrize("blocking", [None, launch.Blocking(13, 40)], ids=["plan", "R13-S40"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("n,v,h,has_bias,has_gent", [(37, 203, 48, True, True), (16, 64, 32, False, False)],
                         ids=["N37-V203-H48-bias-ent", "N16-V64-H32"])
def test_frozen_counts_equal_the_formulas(n, v, h, has_bias, has_gent, config, blocking):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / h ** 0.5
    b = torch.randn(v, generator=g) if has_bias else None
    t = torch.randint(0, v, (n,), generator=g)
    with roofline.count_executed() as counts:
        _, lse, ent = launch.forward(x, w, b, t, 1.0, configs=CONFIGS[config], blocking=blocking)
        dx, dw, _ = launch.backward(x, w, b, t, lse, ent, torch.randn(n, generator=g),
                                    torch.randn(n, generator=g) if has_gent else None, 1.0, configs=CONFIGS[config],
                                    blocking=blocking, weight_grad=False)
    assert dw is None and dx.shape == x.shape
    frozen = launch.kernel_costs(n, v, h, torch.float32, has_bias, has_gent, configs=CONFIGS[config],
                                 blocking=blocking, weight_grad=False)
    assert counts.as_tuples() == roofline.aggregate(frozen)
    full = launch.kernel_costs(n, v, h, torch.float32, has_bias, has_gent, configs=CONFIGS[config], blocking=blocking)
    dropped = [c for c in full if c.kernel == "torch.mm[dw]"]
    assert dropped and [c for c in full if c.kernel != "torch.mm[dw]"] == frozen


def test_frozen_model_is_two_gemms_per_backward_block():
    costs = launch.kernel_costs(10, 50, 16, torch.bfloat16, False, True, blocking=launch.Blocking(4, 20),
                                passes=("bwd",), weight_grad=False)
    assert [c.kernel for c in costs] == ["torch.mm[logits]", "linear_logprobs.bwd", "torch.mm[dx]"] * 9
    fwd_only = launch.kernel_costs(10, 50, 16, torch.bfloat16, False, True, passes=("fwd",))
    assert fwd_only == launch.kernel_costs(10, 50, 16, torch.bfloat16, False, True, passes=("fwd",),
                                           weight_grad=False)
