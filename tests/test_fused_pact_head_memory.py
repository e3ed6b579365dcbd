"""fused_pact_head's host synchronisations, its backward's buffers, the frozen-weight path and memory_lean.

- one forward + backward synchronises with the host at most once, with one row block or many, on the torch
  backend and the triton one (interpreter);
- the backward scales the gradients formed in forward in place: no second dW- (or dX-) sized tensor is
  allocated, and weight.grad is the buffer the op filled;
- a weight that does not require grad gets no dW: no dW GEMM, no dW-sized tensor, weight.grad None; loss and dX
  equal the full path's (float64);
- memory_lean equals the default path (float64 torch; fp32 / bf16 triton against float64), and the launcher's
  cost model counts it and the frozen path exactly (interpreter)."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pact_fast.kernels import fused_pact_head_launch as launch
from pact_fast.kernels.registry import interpreting
from pact_fast.losses import PACTLossConfig
from pact_fast.ops.fused_pact_head import fused_pact_head

from conftest import rel_err
from sync_count import count_syncs
from test_fused_pact_head import CASES, _as_fp32_batch, _problem, _transform, _unfused

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import roofline  # noqa: E402

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="the triton backend on CPU runs in the interpreter")


def _args(backend, seed=0, bias=False):
    dtype = torch.float64 if backend == "torch" else torch.float32
    hidden, weight, b, targets, rows, batch = _problem(seed, dtype=dtype, bias=bias)
    return hidden, weight, b, targets, rows, _as_fp32_batch(batch) if backend == "triton" else batch


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("cfg", [dict(),
                                 dict(c_ent=0.02, beta_kl=0.1, anchor_mode="mix", loss_agg="seq-mean-token-mean"),
                                 dict(mode="grpo", dual_clip=3.0, kl_ratio_weighted=True, beta_kl=0.1)],
                         ids=["pact-bernoulli", "pact-mix-entropy-kl", "grpo"])
@pytest.mark.parametrize("memory_lean", [False, True], ids=["", "lean"])
def test_one_host_sync_per_call_whatever_the_row_blocks(backend, cfg, memory_lean):
    """52 rows in 1 block and in 13 blocks of 4: each forward + backward reads the device once (the metrics)."""
    config = PACTLossConfig(**cfg)
    totals = []
    for chunk_rows in (None, 4):
        hidden, weight, _, targets, rows, batch = _args(backend)
        with count_syncs() as syncs:
            loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, step=2,
                                      chunk_rows=chunk_rows, memory_lean=memory_lean, backend=backend)
            loss.backward()
        assert hidden.grad is not None and weight.grad is not None
        totals.append(syncs.total)
        assert syncs.total <= 1, (chunk_rows, syncs.calls)
    assert totals[0] == totals[1] == 1


class _NewBuffers(TorchDispatchMode):
    """Every op output of a given element count whose storage is none of the op's inputs' (an allocation)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() == self.numel and o.untyped_storage().data_ptr() not in inputs:
                self.ops.append(str(func))
        return out


class _SpyGemms(TorchDispatchMode):
    """Counts matmul-family ops whose output has a given shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.calls = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_) and \
                isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.calls += 1
        return out


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_backward_scales_in_place_and_hands_dw_over(backend):
    hidden, weight, _, targets, rows, batch = _args(backend, seed=3)
    loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, PACTLossConfig(), 0.3, chunk_rows=9,
                              backend=backend)
    assert weight.numel() != hidden.numel()
    spy_w, spy_x = _NewBuffers(weight.numel()), _NewBuffers(hidden.numel())
    with spy_w, spy_x:
        (2.5 * loss).backward()
    assert spy_w.ops == [] and spy_x.ops == [], (spy_w.ops, spy_x.ops)
    # the incoming gradient 2.5 reached both, in place
    hidden2, weight2, _, targets, rows, batch = _args(backend, seed=3)
    ref, _ = fused_pact_head(hidden2, weight2, targets, rows, batch, PACTLossConfig(), 0.3, chunk_rows=9,
                             backend=backend)
    ref.backward()
    assert torch.allclose(weight.grad, 2.5 * weight2.grad, rtol=1e-6) and torch.allclose(hidden.grad,
                                                                                         2.5 * hidden2.grad, rtol=1e-6)
    with pytest.raises(RuntimeError):  # the gradients were handed over; a second backward is refused, not zero
        loss2, _ = fused_pact_head(hidden2, weight2, targets, rows, batch, PACTLossConfig(), 0.3, backend=backend)
        loss2.backward(retain_graph=True)
        loss2.backward()


@pytest.mark.parametrize("backend,memory_lean", [("torch", False), ("torch", True),
                                                  pytest.param("triton", False, marks=needs_interpreter),
                                                  pytest.param("triton", True, marks=needs_interpreter)],
                         ids=["torch", "torch-lean", "triton", "triton-lean"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_frozen_weight_gets_no_dw_and_the_same_loss_and_dx(backend, memory_lean, bias):
    config = PACTLossConfig(beta_kl=0.1)
    hidden, weight, b, targets, rows, batch = _args(backend, seed=5, bias=bias)
    chunk = 5 if memory_lean else 9  # memory_lean's first-pass blocks of logits fit in dW's rows (H=11 here)
    full, full_m = fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, bias=b, chunk_rows=chunk,
                                   memory_lean=memory_lean, backend=backend)
    full_dx, = torch.autograd.grad(full, [hidden])
    frozen_w = weight.detach()
    spy_alloc, spy_gemm = _NewBuffers(weight.numel()), _SpyGemms(weight.shape)
    with spy_alloc, spy_gemm:
        loss, metrics = fused_pact_head(hidden, frozen_w, targets, rows, batch, config, 0.3, bias=b,
                                        chunk_rows=chunk, memory_lean=memory_lean, backend=backend)
        loss.backward()
    assert spy_alloc.ops == [] and spy_gemm.calls == 0, (spy_alloc.ops, spy_gemm.calls)
    assert frozen_w.grad is None and hidden.grad is not None
    if memory_lean:  # with dW its log-probs come from the default pass, without from linear_logprobs' epilogue
        assert math.isclose(loss.item(), full.item(), rel_tol=1e-6)
        assert all(math.isclose(metrics[k], full_m[k], rel_tol=1e-5, abs_tol=1e-6) for k in full_m)
    else:
        assert loss.item() == full.item() and metrics == full_m
    tol = 1e-13 if backend == "torch" else 1e-6
    assert rel_err(hidden.grad, full_dx) < tol
    # and the full path does run the dW GEMM this spy looks for
    with _SpyGemms(weight.shape) as spy:
        fused_pact_head(hidden, weight, targets, rows, batch, config, 0.3, bias=b, chunk_rows=chunk,
                        memory_lean=memory_lean, backend=backend)
    assert spy.calls > 0


@pytest.mark.parametrize("cfg,progress,opts", CASES)
def test_memory_lean_equals_the_unfused_path_in_float64(cfg, progress, opts):
    config = PACTLossConfig(**cfg)
    transform = _transform(opts)
    old_from_current = opts.get("old_from_current", False)
    hidden, weight, bias, targets, rows, batch = _problem(1, weight_scale=opts.get("weight_scale", 1.0),
                                                          bias=opts.get("bias", False))
    if old_from_current:
        batch.old_logp_tc = batch.old_logp_po = None
    params = [hidden, weight] + ([bias] if bias is not None else [])
    ref_loss, ref_metrics = _unfused(hidden, weight, bias, targets, rows, batch, config, progress,
                                     old_from_current=old_from_current, step=2, **transform)
    ref_grads = torch.autograd.grad(ref_loss, params)
    loss, metrics = fused_pact_head(hidden, weight, targets, rows, batch, config, progress, bias=bias,
                                    old_from_current=old_from_current, step=2, memory_lean=True, **transform)
    grads = torch.autograd.grad(loss, params)
    assert torch.isclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for k in ref_metrics:
        assert math.isclose(metrics[k], ref_metrics[k], rel_tol=1e-9, abs_tol=1e-12), k
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-10


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cfg,progress,opts", [CASES[0], CASES[2], CASES[8], CASES[9]])
def test_triton_memory_lean_over_several_slabs_equals_float64(cfg, progress, opts, dtype, small_lean_plans,
                                                             monkeypatch):
    """First-pass blocks of 4-8 rows keep their logits in dW's last 16 rows; the second pass forms those in slabs
    (V=37, H=11), through the op as a trainer calls it."""
    small_lean_plans()
    plans = []
    planned = launch.lean_plan
    monkeypatch.setattr(launch, "lean_plan", lambda *a, **k: plans.append(planned(*a, **k)) or plans[-1])
    config = PACTLossConfig(**cfg)
    transform = _transform(opts)
    hidden, weight, bias, targets, rows, batch = _problem(1, dtype=dtype, weight_scale=opts.get("weight_scale", 1.0),
                                                          bias=opts.get("bias", False))
    batch = _as_fp32_batch(batch)
    params = [hidden, weight] + ([bias] if bias is not None else [])
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_loss, _ = _unfused(*ref_params[:2], ref_params[2] if bias is not None else None, targets, rows, batch, config,
                           progress, old_from_current=False, step=4, **transform)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, config, progress, bias=bias, step=4,
                              memory_lean=True, backend="triton", **transform)
    grads = torch.autograd.grad(loss, params)
    # fp32: the lean path's statistics come from linear_logprobs' base-2 epilogue, which rounds each logit once
    # more (z * log2 e, error ~|z| eps rather than ~|z - max| eps): 2.03e-5 at the large-logits case's |z| ~ 300,
    # where the fp32 logits themselves already carry ~|z| eps = 1.8e-5
    tol = {torch.float32: 4e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    assert len(plans) == 1 and 0 < plans[0].tail < weight.shape[0] and len(plans[0].tiles) > 1
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item()))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and rel_err(got, want) < tol


@needs_interpreter
@pytest.mark.parametrize("memory_lean,weight_grad", [(True, True), (True, False), (False, False)],
                         ids=["lean", "lean-frozen", "frozen"])
@pytest.mark.parametrize("dtype,has_bias,want_entropy", [(torch.bfloat16, True, False), (torch.float32, False, True)],
                         ids=["bf16-bias", "fp32-ent"])
def test_counted_flops_and_bytes_equal_the_formulas_lean_and_frozen(memory_lean, weight_grad, dtype, has_bias,
                                                                     want_entropy):
    N, V, H = 21, 301, 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if has_bias else None
    t = torch.randint(0, V, (N,), generator=g)
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    # memory_lean without dW: row blocks of 8 x slabs of 128 (blocking); with dW: first-pass blocks of 6 rows
    blocking = launch.lean.Blocking(8, 128) if memory_lean and not weight_grad else None
    with roofline.count_executed() as counts:
        _, _, dx, dw, _ = launch.run(x, w, b, t, 1.0, want_entropy,
                                     lambda lo, hi, lp, en: (g_logp[lo:hi], g_ent[lo:hi] if want_entropy else None),
                                     rows_per_block=6, configs=launch.INTERPRET_CONFIGS, weight_grad=weight_grad,
                                     memory_lean=memory_lean, blocking=blocking)
    assert (dw is None) != weight_grad
    model = launch.kernel_costs(N, V, H, dtype, has_bias, want_entropy, configs=launch.INTERPRET_CONFIGS,
                                rows_per_block=6, memory_lean=memory_lean, weight_grad=weight_grad, blocking=blocking)
    assert counts.as_tuples() == roofline.aggregate(model)
    assert ("torch.mm[dw]" in [c.kernel for c in model]) == weight_grad
    flops = sum(c.flops for c in model)
    db_gemm = 2 * V * N if has_bias and launch.shift_mode(dtype, want_entropy) else 0
    if memory_lean and weight_grad:  # 6NVH, and the tail's columns again (logits and dW): 2 N T H
        tail = launch.lean_plan(N, V, H, dtype, want_entropy, rows_per_block=6).tail
        assert 0 < tail < V
        assert flops == 6 * N * V * H + 2 * N * tail * H + db_gemm
    else:
        assert flops == (3 if memory_lean else 2) * 2 * N * V * H + (0 if memory_lean else db_gemm)


def test_default_row_block_and_memory_lean_meet_their_budgets_at_w_logprob():
    """The model (a prediction, not a measurement): default workspace within 25% of a bf16 dW, lean within 5%;
    FLOPs 6NVH (default), 6NVH + 2NTH (lean: its tail of T columns twice), 4NVH (frozen weight), 6NVH (lean,
    frozen: the logits recomputed)."""
    for shape in roofline.W_LOGPROB.values():
        N, H, V = shape["N"], shape["H"], shape["V"]
        dw_bytes = V * H * 2
        assert launch.extra_memory_bytes(N, V, H, torch.bfloat16) <= 0.25 * dw_bytes
        assert launch.extra_memory_bytes(N, V, H, torch.bfloat16, memory_lean=True) <= 0.05 * dw_bytes
        tail = launch.lean_plan(N, V, H, torch.bfloat16).tail
        assert 0 < tail < V / 2
        for lean_, weight_grad, flops in ((False, True, 6 * N * V * H), (True, True, 6 * N * V * H + 2 * N * tail * H),
                                          (False, False, 4 * N * V * H), (True, False, 6 * N * V * H)):
            costs = launch.kernel_costs(N, V, H, torch.bfloat16, False, False, memory_lean=lean_,
                                        weight_grad=weight_grad)
            assert sum(c.flops for c in costs) == flops
        assert all(b.r % launch.ROW_MULTIPLE == 0 for b in launch.plan(N, V, H, torch.bfloat16).blocks)


def test_memory_lean_must_be_a_bool():
    hidden, weight, _, targets, rows, batch = _args("torch")
    with pytest.raises(TypeError, match="memory_lean"):
        fused_pact_head(hidden, weight, targets, rows, batch, PACTLossConfig(), 0.3, memory_lean="yes")


def test_train_config_refuses_memory_lean_without_the_fused_head():
    from pact_fast.config import TrainConfig

    assert TrainConfig(fused_head=True, fused_head_memory_lean=True).fused_head_memory_lean
    with pytest.raises(ValueError, match="fused_head_memory_lean"):
        TrainConfig(fused_head=False, fused_head_memory_lean=True)
