"""The fused head's row-block plan (``fused_pact_head_launch.plan``): blocks park their own buffers (dX's partial
products, xs, beta, lse, s) in dX's unwritten rows, so the workspace is one block's logits.

- the plan covers the rows in order, within the budget, each block parked where its buffers fit;
- at W-logprob (H=2048) the workspace is exactly 512 rows of logits, 25% of a bf16 dW, and the model puts the
  default within 1.15x three GEMMs (a prediction, bench/roofline.py);
- blocks parked in dX's rows and in the workspace give float64's gradients (interpreter), in shift and
  ordinary mode, with a bias and with a frozen weight;
- what ``run`` allocates beyond its outputs is ``extra_memory_bytes``, byte for byte."""
import itertools
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pact_fast.kernels import fused_pact_head_launch as launch
from pact_fast.kernels.registry import interpreting

from test_fused_pact_head_split import _problem, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import roofline  # noqa: E402
import sass  # noqa: E402

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="runs the Triton kernels under the interpreter")
W = (32768, 151936, 2048)


def _check_plan(N, V, H, dtype, blocks, budget=None, **kw):
    """The blocks tile [0, N) in order; each parks in dX's rows only where its buffers fit there, else in the
    workspace past its logits; the workspace is the largest such need (and within ``budget``)."""
    e = dtype.itemsize
    shift = kw.get("backward", True) and launch.shift_mode(dtype, kw.get("want_entropy", False))
    assert [b.r0 for b in blocks.blocks] == [0] + list(itertools.accumulate(b.r for b in blocks.blocks))[:-1]
    assert sum(b.r for b in blocks.blocks) == N
    need = 0
    for b in blocks.blocks:
        parked = launch.park_bytes(b.r, H, b.splits, e, shift, kw.get("weight_grad", True), kw.get("backward", True))
        logits = -(-b.r * V * e // launch.PARK_ALIGN) * launch.PARK_ALIGN
        room = (N * H * e) // launch.PARK_ALIGN * launch.PARK_ALIGN - \
            -(-(b.r0 + b.r) * H * e // launch.PARK_ALIGN) * launch.PARK_ALIGN
        assert b.parked == ("dx" if kw.get("backward", True) and parked <= room else "workspace")
        need = max(need, logits + (parked if b.parked == "workspace" else 0))
    assert blocks.workspace_bytes == need
    if budget is not None:
        assert need <= budget


def test_the_default_at_w_logprob_is_512_row_blocks_in_25_percent_of_dw():
    """The logits of 512 rows are exactly 25% of dW at H=2,048; everything else parks in dX's rows, and the last
    blocks, where those run out, take fewer rows and park past their logits in the same workspace."""
    N, V, H = W
    blocks = launch.plan(N, V, H, torch.bfloat16)
    _check_plan(N, V, H, torch.bfloat16, blocks, launch.budget_bytes(V, H, torch.bfloat16))
    assert blocks.workspace_bytes == 512 * V * 2 == launch.WORKSPACE_SHARE * V * H * 2
    in_dx = [b for b in blocks.blocks if b.parked == "dx"]
    assert sum(b.r for b in in_dx) >= 0.9 * N and {(b.r, b.splits) for b in in_dx} == {(512, 4)}
    assert all(b.r < 512 for b in blocks.blocks if b.parked == "workspace")  # room past their logits
    # the model's prediction of the plan (H100): within 1.15x three GEMMs; H200 less
    rows = roofline.fused_head_rows("W-logprob-H2048", N, V, H, table=sass.stored())
    default = {r["device"]: r for r in rows if r["op"] == "fused_pact_head fwd+bwd"}
    assert default["H100"]["time_ratio"] <= 1.15 and default["H200"]["time_ratio"] <= default["H100"]["time_ratio"]
    assert default["H100"]["extra_memory_bytes"] == blocks.workspace_bytes


@pytest.mark.parametrize("shape", [W, (32768, 151936, 4096), (3000, 151936, 2048), (32768, 32000, 896),
                                   (500, 32000, 896), (70, 151936, 2048),
                                   # H below ~512: not even one tile row of 128 and what it parks fits the budget
                                   (32768, 32000, 512), (4096, 151936, 384), (127, 32000, 500), (300, 4096, 24)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("kw", [dict(), dict(want_entropy=True), dict(weight_grad=False), dict(backward=False)],
                         ids=["shift", "entropy", "frozen", "forward"])
def test_every_default_plan_is_within_the_budget_and_parked_where_it_fits(shape, dtype, kw):
    N, V, H = shape
    blocks = launch.plan(N, V, H, dtype, **kw)
    _check_plan(N, V, H, dtype, blocks, launch.budget_bytes(V, H, dtype), **kw)
    assert launch.extra_memory_bytes(N, V, H, dtype, **kw) == blocks.workspace_bytes
    multiple = launch.ROW_MULTIPLE if H >= 896 else 1  # whole tile rows where they fit
    assert all(b.r % multiple == 0 or b is blocks.blocks[-1] for b in blocks.blocks)


@pytest.mark.parametrize("sms", [108, 114, 132, 148, 264])
def test_the_budget_holds_at_the_devices_own_sm_count(sms):
    """Planned for the device's SM count (A100, H100 PCIe, H100 / H200 SXM, B200): within the budget, and the
    split dX GEMM of the plan's main block fills its waves at least 85%."""
    N, V, H = W
    blocks = launch.plan(N, V, H, torch.bfloat16, sms=sms)
    _check_plan(N, V, H, torch.bfloat16, blocks, launch.budget_bytes(V, H, torch.bfloat16))
    main = max({(b.r, b.splits) for b in blocks.blocks}, key=lambda k: sum(b.r for b in blocks.blocks
                                                                           if (b.r, b.splits) == k))
    tiles = main[1] * math.ceil(main[0] / 128) * math.ceil(H / 256)
    assert tiles / (math.ceil(tiles / sms) * sms) > 0.85, (sms, main)


def test_named_rows_per_block_are_uniform_with_the_budgets_splits():
    """rows_per_block names uniform blocks (the last ragged); their splits are dx_splits' within the budget
    when the blocks fit it unsplit; ``splits`` applies as given."""
    for N, V, H, dtype in ((500, 32000, 896, torch.float32), (32768, 151936, 2048, torch.bfloat16),
                           (1000, 151936, 2048, torch.bfloat16)):
        blocks = launch.plan(N, V, H, dtype, rows_per_block=192)
        assert [b.r for b in blocks.blocks] == [192] * (N // 192) + ([N % 192] if N % 192 else [])
        assert len({b.splits for b in blocks.blocks}) == 1
        _check_plan(N, V, H, dtype, blocks, launch.budget_bytes(V, H, dtype))
    big = launch.plan(32768, 151936, 2048, torch.bfloat16, rows_per_block=1024)
    assert {b.splits for b in big.blocks} == {launch.dx_splits(1024, 2048, 151936, N=32768)}
    assert {b.splits for b in launch.plan(600, 9000, 64, torch.float32, rows_per_block=64, splits=2).blocks} == {2}
    assert launch.plan(0, 96, 24, torch.float32) == launch.Plan((), 0)


def float64_reference(x, w, b, t, g_logp, g_ent, inv_temp, want_entropy, cap=None):
    """(logp [N], (dX, dW[, db])) in float64 of sum(g_logp * logp) (+ sum(g_ent * entropy)) over the logits
    ``(x w^T + b) * inv_temp``, or ``cap * tanh((x w^T + b) / cap) * inv_temp``."""
    ref = [p.double().requires_grad_() for p in (x, w) + ((b,) if b is not None else ())]
    z = ref[0] @ ref[1].t() + (ref[2] if b is not None else 0)
    z = (cap * torch.tanh(z / cap) if cap else z) * inv_temp
    lp = torch.log_softmax(z, -1)
    logp = lp.gather(1, t[:, None]).squeeze(1)
    out = (g_logp.double() * logp).sum()
    if want_entropy:
        out = out + (g_ent.double() * -(lp.exp() * lp).sum(-1)).sum()
    return logp.detach(), torch.autograd.grad(out, ref)


CASES = [(torch.float32, False, True, True), (torch.bfloat16, False, False, True), (torch.float32, True, True, True),
         (torch.float16, False, True, True), (torch.float32, False, False, False), (torch.float32, True, False, False)]


@needs_interpreter
@pytest.mark.parametrize("dtype,want_entropy,bias,weight_grad", CASES,
                         ids=["fp32-shift-bias", "bf16-shift", "fp32-ordinary-bias", "fp16-ordinary-bias",
                              "fp32-shift-frozen", "fp32-ordinary-frozen"])
def test_blocks_parked_in_dx_rows_and_in_the_workspace_equal_float64(dtype, want_entropy, bias, weight_grad):
    """160 rows in blocks of 16, dX split 2 ways: the first blocks park in dX's rows of later blocks, the last in
    the workspace; every row's dX, dW and db are float64's (and the same as unsplit, unparked blocks' within
    rounding)."""
    N, V, H = 160, 96, 16
    x, w, b, t, g_logp, g_ent = _problem(N, V, H, dtype, 11, bias)
    blocks = launch.plan(N, V, H, dtype, want_entropy, weight_grad=weight_grad, rows_per_block=16, splits=2)
    assert {blk.parked for blk in blocks.blocks} == {"dx", "workspace"}

    def grads(lo, hi, logp, ent):
        return g_logp[lo:hi], g_ent[lo:hi] if want_entropy else None

    logp, ent, dx, dw, db = launch.run(x, w, b, t, 1 / 0.9, want_entropy, grads, rows_per_block=16, splits=2,
                                       weight_grad=weight_grad)
    want_logp, want = float64_reference(x, w, b, t, g_logp, g_ent, 1 / 0.9, want_entropy)
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert rel_err(logp, want_logp) < tol
    assert rel_err(dx, want[0]) < tol
    assert (rel_err(dw, want[1]) < tol) if weight_grad else dw is None
    if bias:
        assert rel_err(db, want[2]) < tol
    # every row of dX written by its own block, none left as a parked buffer: row by row against float64
    row_err = ((dx.double() - want[0]).norm(dim=1) / want[0].norm(dim=1)).max().item()
    assert row_err < 20 * tol


class _Allocations(TorchDispatchMode):
    """Every tensor a factory op (empty, full, zeros, their _like forms) creates when called from the launcher's
    own lines (not the interpreter's copies of a kernel's arguments)."""

    FACTORIES = {"empty", "empty_like", "full", "full_like", "zeros", "zeros_like", "empty_strided", "ones",
                 "new_empty", "new_zeros", "new_full", "clone"}

    def __init__(self):
        super().__init__()
        self.tensors = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.FACTORIES:
            frame = sys._getframe(1)
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename == launch.__file__:
                self.tensors.append(out)
        return out


def allocated_beyond_outputs(call):
    """Bytes the launcher's own lines allocate in ``call()`` (``_Allocations``) beyond the tensors it returns."""
    with _Allocations() as spy:
        outputs = call()
    produced = {o.untyped_storage().data_ptr() for o in outputs if o is not None}
    return sum(a.untyped_storage().nbytes() for a in spy.tensors if a.untyped_storage().data_ptr() not in produced)


@needs_interpreter
@pytest.mark.parametrize("dtype,want_entropy,bias,weight_grad", CASES[:4] + CASES[4:5],
                         ids=["fp32-shift-bias", "bf16-shift", "fp32-ordinary-bias", "fp16-ordinary-bias",
                              "fp32-shift-frozen"])
@pytest.mark.parametrize("rows_per_block", [None, 16], ids=["plan", "R16"])
def test_what_run_allocates_beyond_its_outputs_is_extra_memory_bytes(dtype, want_entropy, bias, weight_grad,
                                                                     rows_per_block):
    N, V, H = 160, 96, 16
    x, w, b, t, g_logp, g_ent = _problem(N, V, H, dtype, 5, bias)
    g_ent = g_ent.float()

    def grads(lo, hi, logp, ent):
        return g_logp[lo:hi], g_ent[lo:hi] if want_entropy else None

    extra = allocated_beyond_outputs(lambda: launch.run(x, w, b, t, 1.0, want_entropy, grads,
                                                        rows_per_block=rows_per_block,
                                                        splits=2 if rows_per_block else None, weight_grad=weight_grad))
    assert extra == launch.extra_memory_bytes(N, V, H, dtype, bias, want_entropy, rows_per_block,
                                              weight_grad=weight_grad, splits=2 if rows_per_block else None) > 0


@pytest.mark.parametrize("dtype,want_entropy,weight_grad", [(torch.bfloat16, False, True), (torch.float32, True, True),
                                                           (torch.float16, False, False)])
def test_parked_buffers_lie_in_rows_no_earlier_block_wrote_and_past_the_logits(dtype, want_entropy, weight_grad):
    """On a GPU the kernels of a block run at once: a parked buffer must not overlap the block's own dX rows (which
    its scaling kernel writes while reading the parts), an earlier block's, its logits or another buffer."""
    N, V, H = 160, 96, 16
    blocks = launch.plan(N, V, H, dtype, want_entropy, weight_grad=weight_grad, rows_per_block=16, splits=3)
    shift = launch.shift_mode(dtype, want_entropy)
    dx = torch.empty((N, H), dtype=dtype)
    workspace = torch.empty(blocks.workspace_bytes, dtype=torch.uint8)
    e = dtype.itemsize
    for blk in blocks.blocks:
        views = launch._parked(blk, workspace, dx, V, H, dtype, shift, weight_grad, True)
        assert set(views) == {"lse", "s", "parts"} | ({"beta"} if shift else set()) | \
            ({"xs"} if shift and weight_grad else set())
        spans = sorted((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in views.values())
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint
        lo, hi = spans[0][0], spans[-1][1]
        if blk.parked == "dx":
            assert lo >= dx.data_ptr() + (blk.r0 + blk.r) * H * e and hi <= dx.data_ptr() + N * H * e
        else:
            assert lo >= workspace.data_ptr() + blk.r * V * e and hi <= workspace.data_ptr() + workspace.numel()
        assert all(v.data_ptr() % launch.PARK_ALIGN == 0 for v in views.values())
    assert {blk.parked for blk in blocks.blocks} == {"dx", "workspace"}
