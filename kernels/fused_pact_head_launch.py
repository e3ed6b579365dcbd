"""Launcher of the Triton backend of ``fused_pact_head``: loss, dX and dW in one pass over the logits.

Per block of rows (``plan``: by default the workspace within 25% of dW; ``rows_per_block`` names uniform
blocks):

1. ``torch.mm[logits]``: the block's logits over the whole vocabulary into a workspace ``[R, V]`` (input
   dtype; cuBLAS, with the bias by ``addmm``).
2. ``fused_pact_head.pass`` (``kernels/fused_pact_head.py``): log-probs, lse, entropy of the block's rows,
   and (``shift`` mode) the workspace turned into ``U``, whose row scaling is d loss / d logits.
3. the caller's ``grads(lo, hi)``: the upstream gradients of the block's log-probs (and entropies) from
   the PACT loss, a pointwise function of each token's own values (SPEC section 7, last paragraph).
4. shift mode: ``torch.mm[dx]`` = U @ w into dX's rows, ``fused_pact_head.scale`` (dX rows *= beta,
   xs = beta * x), ``torch.mm[dw]`` = U.T @ xs into dW, ``torch.mm[db]`` = U.T @ beta into db.
   ordinary mode (entropy bonus, fp16, or a soft cap): ``linear_logprobs.bwd`` turns the workspace into
   d logits in place (fp32 bias gradient by atomics), then ``torch.mm[dx]`` and ``torch.mm[dw]``.

6NVH FLOPs, no logit computed twice. dX is rounded to the input dtype once (after its GEMM, again after
the row scaling in shift mode); dW and (shift mode) db accumulate over row blocks in the input dtype, so
they carry ceil(N / R) roundings, as ``linear_logprobs``'s dW does; fp32 inputs are fp32 throughout.
Memory beyond the outputs (``extra_memory_bytes``): one workspace, the logits of the largest block. What else
a block needs (dX's S partial products, xs = beta x, beta, lse and s: ``park_layout``) it parks in dX's rows
past its own, which no block has written yet; the last blocks, where those rows run out, park past their
logits in the workspace, and the plan gives them fewer rows so that fits. The default plan keeps the workspace
within ``WORKSPACE_SHARE`` (25%) of dW's bytes and fills the GPU's waves of GEMM tiles: at W-logprob
(V=151,936, H=2048, bf16) 58 blocks of 512 rows split 4 ways and 8 of 384 split 11 ways, a workspace of 512
rows of logits (148 MiB against dW's 594 MiB, 25.0%).

``weight_grad=False`` (a frozen lm_head): no dW GEMM, no dW, no xs; the scaling kernel only scales dX.

``memory_lean=True`` with dW (``lean_plan``): the same row blocks, their workspace dW's last ``tail`` rows, which
the blocks' dW GEMM leaves out (dW[:V - tail] only); then a second pass forms those rows: per slab of their
vocabulary columns, per tile of rows, the logits again (GEMM), ``linear_logprobs.bwd`` into d logits in place (from
lse [N] kept by the first pass and the upstream gradients of all rows) and the slab's dW GEMM, each tile's logits
parked in dW's rows past its slab (unwritten: their slabs come later) or, where those run out, in a workspace.
Extra memory: that workspace and lse, within ``LEAN_SHARE`` (5%) of dW; 6NVH + 2N tail H FLOPs. At W-logprob the
tail is about a quarter of the vocabulary. Without dW (a frozen weight, or the forward alone) there are no rows of
dW to work in: cut-cross-entropy style, ``linear_logprobs``' blocking (row blocks x vocabulary slabs, workspace
within 5% of dW): its forward (GEMM + online-LSE epilogue per slab), the upstream gradients of all rows, then per
slab the logits again, ``linear_logprobs.bwd`` and dX's GEMM.

``kernel_costs(..., memory_lean, weight_grad)`` and ``extra_memory_bytes(..., memory_lean, weight_grad)`` model
every variant; tests/test_roofline_fused_head.py holds them to what the interpreter executes.
"""
import dataclasses
import functools
import itertools

import torch
import triton

from .fused_pact_head import _head_pass_kernel, _row_grads_kernel, _scale_rows_kernel
from . import linear_logprobs_launch as lean
from .linear_logprobs_launch import slab_grad, slab_grad_cost
from . import registry
from .registry import (DEFAULT_SMS, GEMM_RIDGE, GEMM_TILE, LAUNCH_WORK, TRITON_DTYPE, GateEntry, KernelCost,
                       block_sizes, device_sms, gemm_cost, gemm_work, interpreting, vocab_variants)

BLOCK_ROWS = 2048  # the most rows per block (plan): the dW GEMM (K = R) is compute-bound well before
# default row blocks are multiples of this (but the last): the rows of cuBLAS's output tile (registry.GEMM_TILE),
# as a block of a partial tile row pays for a whole one in its logits and dX GEMMs
ROW_MULTIPLE = GEMM_TILE[0]
FINE_MULTIPLE = 8  # where whole tile rows cannot fit the budget (H below ~512): blocks of multiples of 8 rows
WORKSPACE_SHARE = 0.25  # default: extra memory within this share of dW's bytes (V * H * itemsize)
# Rows whose max logit exceeds the target's by more are re-shifted (a target less likely than ~e^-20). Within
# it U <= e^20 and s <= V e^20, so beta = -g / (T s) >= |g| e^-20 / (T V): beta * x in bf16 / fp32 stays far
# above the subnormal range for any upstream gradient a loss produces (g ~ 1e-5 per token of a 32k mean).
SHIFT_LIMIT = 20.0
# dX's GEMM of a row block has an [R, H] output: at W-logprob (R=384, H=2048) 24 output tiles of cuBLAS's 128x256
# on a GPU of 132 SMs, a fifth of one wave, each tile reducing over the whole vocabulary. ``dx_splits`` splits
# that reduction over the vocabulary into one batched GEMM of S partial products (``_dx_parts``), summed in fp32
# by the row-scaling kernel: S times the tiles, S chosen so they fill whole waves (11 there: two full waves).
MAX_DX_SPLITS = 16
SPLIT_SLACK = 0.05  # dX takes the fewest splits within this share of the least planned cost: each split costs memory
MIN_SPLIT_K = 4096  # vocabulary columns per split at least: each partial GEMM stays a long reduction
SPLIT_ALIGN = 8  # columns per split a multiple of this: 16-byte aligned batch offsets in bf16

# memory_lean runs linear_logprobs' forward epilogue ("lean_fwd") and its backward one ("grad")
GPU_CONFIGS = {**registry.GPU_CONFIGS["fused_pact_head"], "lean_fwd": registry.GPU_CONFIGS["linear_logprobs"]["fwd"]}
INTERPRET_CONFIGS = {**registry.INTERPRET_CONFIGS["fused_pact_head"],
                     "lean_fwd": registry.INTERPRET_CONFIGS["linear_logprobs"]["fwd"]}


def _configs():
    return INTERPRET_CONFIGS if interpreting() else GPU_CONFIGS


def shift_mode(dtype, want_entropy, softcap=False):
    """True when the gradient is a row scaling of the pass's U: no entropy bonus, no soft cap (rows re-shifted
    past the limit recover their logits from U, which U * (1 - tanh^2) would not allow), and a dtype whose
    range holds U (bf16, fp32; fp16 tops out at 65504)."""
    return not want_entropy and not softcap and dtype in (torch.bfloat16, torch.float32)


def dx_splits(R, H, V, sms=DEFAULT_SMS, elem_bytes=2, fits=None, shift=True, N=None):
    """Vocabulary splits of dX's GEMM for row blocks of R rows (of N rows in all; default one block) on a GPU of
    ``sms`` SMs: the fewest S (at most MAX_DX_SPLITS and V // MIN_SPLIT_K) whose planned cost over the blocks
    (``_dx_work``: the batched GEMM and the scaling kernel's read of the S partial products) is within
    SPLIT_SLACK of the least: S partial products fill ceil(S * tiles / sms) waves, each tile reducing over V / S
    columns. ``fits(S)``, when given, bounds S (the workspace budget); ``shift``: the scaling kernel runs
    unsplit too (shift mode)."""
    most = max(1, min(MAX_DX_SPLITS, V // MIN_SPLIT_K))
    options = [S for S in range(1, most + 1) if fits is None or fits(S)] or [1]
    blocks = [(R, 1)] if N is None else block_sizes(N, R)
    work = {S: sum(n * _dx_work(r, H, V, S, sms, elem_bytes, shift) for r, n in blocks) for S in options}
    least = min(work.values())
    return min(S for S in options if work[S] <= (1 + SPLIT_SLACK) * least)


def _dx_work(r, H, V, S, sms, e, shift):
    """Planned cost (``registry.gemm_work``) of a row block's dX: its GEMM split S ways, and the scaling kernel
    that sums the parts (ordinary mode: only when split) or scales dX's rows (shift mode)."""
    if S == 1:
        gemm = gemm_work(r, H, V, 0, e, sms)
    else:
        k, rem = split_columns(V, S)
        gemm = gemm_work(r, H, k, 0, e, sms, batch=S) + (gemm_work(r, H, rem, r * H, e, sms) if rem else 0)
    scale = (S + 1) * r * H * e * GEMM_RIDGE + LAUNCH_WORK if shift or S > 1 else 0  # reads S parts, writes dX
    return gemm + scale


def split_columns(V, S):
    """(k, rem): S splits of k vocabulary columns each (a multiple of SPLIT_ALIGN when S > 1), the last ``rem``
    columns added to the first partial product by one more GEMM."""
    if S == 1:
        return V, 0
    k = V // S // SPLIT_ALIGN * SPLIT_ALIGN
    return k, V - S * k


def _dx_parts(z, w, parts, S):
    """The S partial products of dX = z [r, V] @ w [V, H] over vocabulary splits (``split_columns``), into the
    flat buffer ``parts`` (at least S * r * H elements): one batched GEMM, plus one small GEMM into the first
    part for the columns past S splits. Returns them as [S, r, H], contiguous."""
    r, V = z.shape
    H = w.shape[1]
    k, rem = split_columns(V, S)
    out = parts[:S * r * H].view(S, r, H)
    torch.bmm(z[:, :S * k].view(r, S, k).transpose(0, 1), w[:S * k].view(S, k, H), out=out)
    if rem:
        out[0].addmm_(z[:, S * k:], w[S * k:])
    return out


PARK_ALIGN = 16  # bytes: each parked buffer starts on this boundary (cuBLAS's and the kernels' vector loads)


@dataclasses.dataclass(frozen=True)
class Block:
    """One row block of a ``Plan``: rows [r0, r0 + r), dX's GEMM split ``splits`` ways, and where the block's
    own buffers (``park_layout``: dX's partial products, xs, beta, lse, s) lie: ``"dx"``, in dX's rows past the
    block (unwritten until their own blocks, which come later), or ``"workspace"``, past the block's logits."""

    r0: int
    r: int
    splits: int
    parked: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """Row blocks in launch order and the workspace they share (bytes): the logits of the largest block, and the
    parked buffers of every block whose own buffers do not fit in dX's rows past it."""

    blocks: tuple
    workspace_bytes: int


def _aligned(nbytes):
    return -(-nbytes // PARK_ALIGN) * PARK_ALIGN


def _nbytes(elements, kind, e):
    """Bytes of a parked buffer of ``elements`` of ``kind`` ("fp32", or "in": the input dtype, ``e`` bytes)."""
    return elements * (4 if kind == "fp32" else e)


def park_layout(r, H, S, e, shift, weight_grad, backward=True):
    """{name: (byte offset, elements, dtype)} of a block's own buffers, packed from offset 0 on PARK_ALIGN
    boundaries: ``lse`` and ``s`` [r] fp32; with the backward ``parts`` [S, r, H] (dX's partial products, S > 1)
    and, in shift mode, ``beta`` [r] and ``xs`` [r, H] (with weight_grad), both in the input dtype ``e`` bytes
    an element wide ("in"). The last offset plus its bytes is what the block parks (``park_bytes``)."""
    items = [("lse", r, "fp32"), ("s", r, "fp32")]
    if backward:
        items += [("parts", S * r * H, "in")] if S > 1 else []
        items += ([("beta", r, "in")] + ([("xs", r * H, "in")] if weight_grad else [])) if shift else []
    layout, offset = {}, 0
    for name, elements, kind in items:
        layout[name] = (offset, elements, kind)
        offset = _aligned(offset + _nbytes(elements, kind, e))
    return layout


def park_bytes(r, H, S, e, shift, weight_grad, backward=True):
    """Bytes a block of r rows parks (``park_layout``)."""
    layout = park_layout(r, H, S, e, shift, weight_grad, backward)
    offset, elements, kind = list(layout.values())[-1]
    return offset + _nbytes(elements, kind, e)


def _room(n, H, e, end):
    """Bytes of an [n, H] buffer's rows [end, n) (dX's, or memory_lean's dW) usable for parking: from the first
    PARK_ALIGN boundary on."""
    return max(0, (n * H * e) // PARK_ALIGN * PARK_ALIGN - _aligned(end * H * e))


def _placed(N, V, H, e, shift, weight_grad, backward, blocks):
    """Plan of ``blocks`` [(r0, r, S)]: each block parks in dX's rows past it when they hold its buffers (with the
    backward: dX exists), else in the workspace."""
    placed, workspace = [], 0
    for r0, r, S in blocks:
        need = park_bytes(r, H, S, e, shift, weight_grad, backward)
        in_dx = backward and need <= _room(N, H, e, r0 + r)
        placed.append(Block(r0, r, S, "dx" if in_dx else "workspace"))
        workspace = max(workspace, _aligned(r * V * e) + (0 if in_dx else need))
    return Plan(tuple(placed), workspace)


def _parked(blk, workspace, dx, V, H, dtype, shift, weight_grad, backward):
    """{name: tensor} of a block's own buffers (``park_layout``) as views of where its plan parks them: dX's
    rows past the block, or the workspace past its logits."""
    e = dtype.itemsize
    if blk.parked == "dx":
        flat = dx.view(-1).view(torch.uint8)
        start = _aligned((blk.r0 + blk.r) * H * e)
    else:
        flat, start = workspace, _aligned(blk.r * V * e)
    shapes = {"lse": (blk.r,), "s": (blk.r,), "parts": (-1,), "beta": (blk.r, 1), "xs": (blk.r, H)}
    views = {}
    for name, (offset, elements, kind) in park_layout(blk.r, H, blk.splits, e, shift, weight_grad, backward).items():
        raw = flat[start + offset:start + offset + _nbytes(elements, kind, e)]
        views[name] = raw.view(torch.float32 if kind == "fp32" else dtype).view(shapes[name])
    return views


def plan_summary(blocks):
    """A ``Plan``'s blocks in runs, e.g. "58 x (512 rows, 4 splits, parked in dx) + 8 x (384, 11, workspace)"."""
    runs = []
    for blk in blocks.blocks:
        key = (blk.r, blk.splits, blk.parked)
        if runs and runs[-1][1] == key:
            runs[-1][0] += 1
        else:
            runs.append([1, key])
    return " + ".join(f"{n} x ({r} rows, {S} splits, parked in {where})" if i == 0 else f"{n} x ({r}, {S}, {where})"
                      for i, (n, (r, S, where)) in enumerate(runs))


def budget_bytes(V, H, dtype):
    """The default's extra memory at most: WORKSPACE_SHARE of dW's bytes (V x H in the input dtype)."""
    return int(WORKSPACE_SHARE * V * H * dtype.itemsize)


@functools.lru_cache(maxsize=256)
def plan(N, V, H, dtype, want_entropy=False, softcap=False, weight_grad=True, sms=DEFAULT_SMS, rows_per_block=None,
         splits=None, backward=True):
    """The row blocks ``run`` walks over N rows (``Plan``).

    Default: the blocks whose launches cost least in all (``_block_work``: waves of cuBLAS tiles on ``sms`` SMs,
    or their bytes where those dominate, and a launch overhead each) with the extra memory within
    ``budget_bytes`` (25% of dW). Block sizes are multiples of ROW_MULTIPLE up to BLOCK_ROWS, and the rest of
    the rows at the end; each block's dX split S is its own. Blocks park their own buffers in dX's unwritten
    rows, so the workspace is the logits of one block, except near the end where those rows run out: the last
    blocks take fewer rows (or splits), leaving room in the workspace for what they park. At W-logprob (V =
    151,936, H = 2048, bf16) the workspace is 512 rows of logits, exactly 25% of dW: 58 blocks of 512 rows split
    4 ways, then 8 of 384 rows split 11 ways (``python bench/roofline.py --head-sweep`` prints it). The search is
    a shortest path over the rows left (``_search``); where no blocks of whole tile rows fit the budget (H below
    ~512), blocks of multiples of FINE_MULTIPLE rows, then of any rows; where not even those fit, blocks of as
    many rows as their logits fit, unsplit (over the budget: what they park has no room).

    ``rows_per_block``: blocks of that many rows, each split ``splits`` ways (default ``dx_splits``' S for the
    device, within the budget when the blocks fit it unsplit); ``splits`` alone applies to the default blocks.
    ``backward=False``: forward only (no dX to park in; lse and s park in the workspace)."""
    e = dtype.itemsize
    shift = backward and shift_mode(dtype, want_entropy, softcap)
    if N == 0:
        return Plan((), 0)
    budget = budget_bytes(V, H, dtype)
    if rows_per_block:
        R = min(rows_per_block, N)

        def uniform(S):
            return _placed(N, V, H, e, shift, weight_grad, backward, [(r0, min(R, N - r0), S)
                                                                        for r0 in range(0, N, R)])
        if not splits and backward:
            fits = (lambda S: uniform(S).workspace_bytes <= budget) if uniform(1).workspace_bytes <= budget else None
            splits = dx_splits(R, H, V, sms, e, fits, shift, N)
        return uniform(splits or 1)
    most = max(1, min(MAX_DX_SPLITS, V // MIN_SPLIT_K)) if backward and not splits else 1
    options = [splits] if splits else list(range(1, most + 1))
    for multiple in (ROW_MULTIPLE, FINE_MULTIPLE, 1):  # finer blocks only where whole tile rows cannot fit
        blocks = _search(N, V, H, e, shift, weight_grad, backward, sms, budget, options, multiple)
        if blocks:
            return _placed(N, V, H, e, shift, weight_grad, backward, blocks)
    # not even one row parks within the budget: blocks of as many rows as their logits fit, unsplit
    return plan(N, V, H, dtype, want_entropy, softcap, weight_grad, sms, max(1, min(N, budget // (V * e))), 1,
                backward)


def _search(N, V, H, e, shift, weight_grad, backward, sms, budget, options, multiple, dw_rows=None):
    """``plan``'s shortest path: [(r0, r, S)] of least ``_block_work`` over N rows in blocks of multiples of
    ``multiple`` rows (and the rest of the rows last), each parking in dX's rows past it or past its logits within
    ``budget``; None when no such blocks exist. One state per ``multiple`` rows left. ``dw_rows``: the rows of
    dW the blocks' dW GEMM forms (default V; memory_lean's first pass, fewer)."""
    by_size = {}  # r -> [(parked bytes, least work of the splits parking at most that, S)], by parked bytes

    def choices(r):
        if r not in by_size:
            rows, least = [], None
            for parked, S in sorted((park_bytes(r, H, S, e, shift, weight_grad, backward), S) for S in options):
                cost = round(_block_work(r, V, H, S, e, weight_grad, shift, sms, backward, dw_rows))  # exact: ties
                if least is None or cost < least[0]:
                    least = (cost, S)
                rows.append((parked, *least))
            by_size[r] = rows
        return by_size[r]

    most_rows = min(BLOCK_ROWS, budget // (V * e))  # the logits of more rows exceed the budget by themselves
    best = {0: (0, None)}  # rows left -> (least work over the last rows, the first block of them (r, S))
    for left in range(N % multiple or multiple, N + 1, multiple):
        sizes = list(range(multiple, min(left, most_rows) + 1, multiple))
        sizes += [left] if left <= most_rows and left % multiple else []
        keys = []
        for r in sizes:
            if left - r not in best or _aligned(r * V * e) > budget:
                continue
            room = max(_room(N, H, e, N - left + r) if backward else 0, budget - _aligned(r * V * e))
            fitting = list(itertools.takewhile(lambda row: row[0] <= room, choices(r)))
            if fitting:
                _, cost, S = fitting[-1]
                keys.append((cost + best[left - r][0], -r, S))
        if keys:
            cost, r, S = min(keys)
            best[left] = (cost, (-r, S))
    if N not in best:
        return None
    blocks, left = [], N
    while left:
        r, S = best[left][1]
        blocks.append((N - left, r, S))
        left -= r
    return blocks


def _block_work(r, V, H, S, e, weight_grad, shift, sms, backward=True, dw_rows=None):
    """Planned cost (``registry.gemm_work``) of one row block: logits, the pass (one launch; its bytes are the
    same for any blocking), dX split S ways, dW's first ``dw_rows`` rows (default V; accumulated); forward only
    the logits and the pass."""
    work = gemm_work(r, V, H, 0, e, sms) + LAUNCH_WORK
    if not backward:
        return work
    work += _dx_work(r, H, V, S, sms, e, shift)
    dw_rows = V if dw_rows is None else dw_rows
    return work + (gemm_work(dw_rows, H, r, dw_rows * H, e, sms) if weight_grad and dw_rows else 0)



# memory_lean with dW (a trainable head's backward): no workspace of its own but for the end of the second pass
LEAN_SHARE = 0.05  # memory_lean: extra memory within this share of dW's bytes
MAX_SLAB = 16384  # the widest slab of vocabulary columns the second pass's search tries
LEAN_CANDIDATES = 5  # tails whose first pass the plan's search fills, of those uniform blocks price best
LEAN_STATES = 300  # the second pass's search: about this many states at most (its slab step grows with V)


@dataclasses.dataclass(frozen=True)
class Tile:
    """One recompute of memory_lean's second pass: rows [r0, r0 + r) x vocabulary columns [c0, c0 + s), the logits
    parked in dW's rows past the slab (``"dw"``: unwritten, their slabs come later) or in the workspace."""

    c0: int
    s: int
    r0: int
    r: int
    parked: str


@dataclasses.dataclass(frozen=True)
class LeanPlan:
    """memory_lean with dW: ``head``, the first pass's row blocks (a ``Plan`` whose workspace is dW's last ``tail``
    rows, formed later); ``tiles``, the second pass over those ``tail`` vocabulary columns, slab by slab; and
    ``workspace_bytes``, what the tiles that do not fit in dW's unwritten rows share."""

    head: Plan
    tail: int
    tiles: tuple
    workspace_bytes: int


def lean_budget_bytes(V, H, dtype):
    """memory_lean's extra memory at most: LEAN_SHARE of dW's bytes (V x H in the input dtype)."""
    return int(LEAN_SHARE * V * H * dtype.itemsize)


@functools.lru_cache(maxsize=64)
def lean_plan(N, V, H, dtype, want_entropy=False, softcap=False, sms=DEFAULT_SMS, rows_per_block=None):
    """The two passes of ``run(memory_lean=True)`` with dW (``LeanPlan``).

    First pass: the default mode's row blocks (logits, pass, dX, and dW of all but the last ``tail`` vocabulary
    rows), with dW's last ``tail`` rows as their workspace: no block has formed them yet. Second pass: those
    columns' logits again, slab by slab (``Tile``), each slab's logits parked in dW's rows past it, or where those
    run out in a workspace within ``lean_budget_bytes`` (less the first pass's lse [N] fp32, kept for it), then d
    logits in place (``linear_logprobs.bwd``) and the slab's dW. The tail trades the first pass's blocks (a
    larger block needs more rows of dW) against the second pass's recompute: each candidate (the tail that
    holds blocks of 128, 256, ... BLOCK_ROWS rows) is priced like ``plan`` prices blocks (``_block_work`` and
    ``_slab_work``; the best LEAN_CANDIDATES by uniform blocks get ``plan``'s search and those uniform blocks as
    heads, each with the fewest rows of dW that hold it) and the least taken. At W-logprob (V = 151,936, H =
    2048, bf16): blocks of 512 rows, a tail of 40,960 rows, and 50 tiles, the last in a workspace of 4.98% of dW.
    ``rows_per_block``: first-pass blocks of that many rows (``dx_splits`` each), the tail the fewest rows that
    hold them; refused where dW cannot hold them (more than about H rows)."""
    e = dtype.itemsize
    shift = shift_mode(dtype, want_entropy, softcap)
    if N == 0:
        return LeanPlan(Plan((), 0), 0, (), 0)
    budget = max(0, lean_budget_bytes(V, H, dtype) - 4 * N)
    heads = {}
    if rows_per_block:
        head = _uniform_head(N, V, H, e, shift, sms, min(rows_per_block, N))
        if head.workspace_bytes > _room(V, H, e, 0):
            fits = [r for r in range(min(rows_per_block, N) - 1, 0, -1)
                    if _uniform_head(N, V, H, e, shift, sms, r).workspace_bytes <= _room(V, H, e, 0)]
            raise ValueError(f"fused_pact_head: memory_lean keeps a first-pass block's logits in dW's rows: blocks "
                             f"of {rows_per_block} rows (chunk_rows) need {head.workspace_bytes} bytes, more than "
                             f"dW's {V * H * e}; take at most {fits[0] if fits else 0} rows or leave it unset")
        heads[_tail_rows(head.workspace_bytes, V, H, e)] = head
    else:  # each candidate tail priced with uniform blocks of its rows; the plan's search then fills the best one
        for r in range(ROW_MULTIPLE, BLOCK_ROWS + ROW_MULTIPLE, ROW_MULTIPLE):  # (a block's buffers fit past it)
            r = min(r, N)
            heads.setdefault(_tail_rows(_aligned(r * V * e) + park_bytes(r, H, 1, e, shift, True), V, H, e), r)
    # the second room: where the budget holds no slab (lse [N] alone can exceed it at millions of rows), one tile
    # of at most BLOCK_ROWS rows
    for room in (budget, max(budget, _aligned(min(N, BLOCK_ROWS) * min(V, _slab_step(V)) * e))):
        slabs = _slab_search(N, V, H, e, room, sms, max(heads))
        costs = {T: _head_work(N, V, H, e, shift, sms, T, head) + slabs[T][0] for T, head in heads.items()
                 if T in slabs}
        if costs:
            break
    # the best few candidates filled by the plan's search, and by their uniform blocks (which price a tail's head
    # only roughly), each with the fewest rows of dW that hold it
    filled = {}
    for T in sorted(costs, key=lambda t: (costs[t], t)):
        options = [heads[T]] if isinstance(heads[T], Plan) else [
            _lean_head(N, V, H, e, shift, sms, T), _uniform_head(N, V, H, e, shift, sms, heads[T])]
        for head in options:
            t = _tail_rows(head.workspace_bytes, V, H, e) if head else None
            if t in slabs and _room(V, H, e, V - t) >= head.workspace_bytes:
                cost = _head_work(N, V, H, e, shift, sms, t, head) + slabs[t][0]
                if t not in filled or cost < filled[t][0]:
                    filled[t] = (cost, head)
        if len(filled) >= LEAN_CANDIDATES:
            break
    if not filled:
        raise ValueError(f"fused_pact_head: memory_lean keeps a block's logits in dW's rows, and dW ({V} x {H}) "
                         f"cannot hold one row of logits over V={V} with its buffers; use memory_lean=False")
    T = min(filled, key=lambda t: (filled[t][0], t))
    head = filled[T][1]
    tiles, left = [], T
    while left:
        s, R, parked = slabs[left][1]
        c0 = V - left
        tiles += [Tile(c0, s, r0, min(R, N - r0), parked) for r0 in range(0, N, R)]
        left -= s
    workspace = max((_aligned(t.r * t.s * e) for t in tiles if t.parked == "workspace"), default=0)
    return LeanPlan(head, T, tuple(tiles), workspace)


def _head_work(N, V, H, e, shift, sms, T, head):
    """Planned cost of memory_lean's first pass with a tail of T rows: ``head``'s blocks (a ``Plan``), or uniform
    blocks of ``head`` rows (an int: a candidate, before ``_lean_head`` fills it)."""
    if isinstance(head, Plan):
        blocks = [(b.r, b.splits, 1) for b in head.blocks]
    else:
        S = dx_splits(head, H, V, sms, e, None, shift, N)
        blocks = [(r, S, n) for r, n in block_sizes(N, head)]
    return sum(n * _block_work(r, V, H, S, e, True, shift, sms, True, V - T) for r, S, n in blocks)


def _slab_step(V):
    """The second pass's slabs are multiples of this many columns: ``lean.SLAB_MULTIPLE``, or a multiple of it that
    keeps its search within about LEAN_STATES states (512 at V = 151,936)."""
    step = lean.SLAB_MULTIPLE
    return step * max(1, -(-V // (step * LEAN_STATES)))


def _tail_rows(nbytes, V, H, e):
    """The fewest rows of dW, a multiple of ``_slab_step`` (or V), whose room (``_room``) holds ``nbytes``."""
    step = _slab_step(V)
    rows = min(V, -(-nbytes // (H * e * step)) * step)
    while rows < V and _room(V, H, e, V - rows) < nbytes:
        rows = min(V, rows + step)
    return rows


def _uniform_head(N, V, H, e, shift, sms, R):
    """memory_lean's first-pass ``Plan`` of blocks of R rows (``dx_splits`` each)."""
    S = dx_splits(R, H, V, sms, e, None, shift, N)
    return _placed(N, V, H, e, shift, True, True, [(r0, min(R, N - r0), S) for r0 in range(0, N, R)])


def _lean_head(N, V, H, e, shift, sms, T):
    """memory_lean's first-pass ``Plan`` with dW's last T rows as its workspace (``_search``, as ``plan``), or
    None where no blocks fit them."""
    most = max(1, min(MAX_DX_SPLITS, V // MIN_SPLIT_K))
    for multiple in (ROW_MULTIPLE, FINE_MULTIPLE, 1):
        blocks = _search(N, V, H, e, shift, True, True, sms, _room(V, H, e, V - T), list(range(1, most + 1)),
                         multiple, V - T)
        if blocks:
            return _placed(N, V, H, e, shift, True, True, blocks)
    return None


@functools.lru_cache(maxsize=64)
def _slab_search(N, V, H, e, budget, sms, most):
    """memory_lean's second pass as a shortest path over the vocabulary columns left (the last ``most`` at most,
    in multiples of ``_slab_step``, and V): {columns left: (least planned cost over them, their first
    slab (s, R, parked))}. A slab of s columns takes up to MAX_SLAB, its tiles of R rows parked in dW's rows past
    it or, where those hold less than ``budget`` bytes, in the workspace (``_slab_tiles``); a slab's cost is
    ``_slab_work``'s, once per (s, R)."""
    step = _slab_step(V)
    best, work, rooms = {0: (0, None)}, {}, {0: 0}  # rooms: bytes of dW's rows past a slab with that many left
    for left in list(range(step, most + 1, step)) + ([V] if most == V and V % step else []):
        keys = []
        for s in range(left % step or step, min(left, max(MAX_SLAB, step)) + 1, step):
            if left - s not in best:
                continue
            tiles = _slab_tiles(N, s, e, rooms[left - s], budget)
            if tiles:
                if tiles not in work:
                    work[tiles] = _slab_work(N, H, e, sms, s, tiles[0])
                keys.append((work[tiles] + best[left - s][0], -s, *tiles[:2]))
        rooms[left] = _room(V, H, e, V - left)
        if keys:
            cost, s, R, parked = min(keys)
            best[left] = (cost, (-s, R, parked))
    return best


def _slab_tiles(N, s, e, room, budget):
    """(R, parked, s) of memory_lean's second pass over a slab of s columns with ``room`` bytes of dW's rows past
    it: tiles of R rows, as many as the room holds, balanced, whole tile rows where they fit, parked in those rows
    or, where they hold less than ``budget`` bytes, in the workspace; None where not one row fits."""
    parked, space = ("dw", room) if room >= budget else ("workspace", budget)
    most = min(space // (s * e), (2 ** 31 - 1) // s)  # (the gradient epilogue's offsets are int32)
    if most == 0:
        return None
    R = -(-N // -(-N // most))
    if R >= ROW_MULTIPLE:
        R = min(most, -(-R // ROW_MULTIPLE) * ROW_MULTIPLE)
    return R, parked, s


def _slab_work(N, H, e, sms, s, R):
    """Planned cost (``registry.gemm_work``) of a slab of s columns in tiles of R rows: per tile a logits GEMM,
    the gradient epilogue (its launch; its bytes are the same for any tiling) and the slab's dW GEMM (accumulated
    after the first tile)."""
    return sum(n * (gemm_work(r, s, H, 0, e, sms) + LAUNCH_WORK + gemm_work(s, H, r, s * H, e, sms))
               for r, n in block_sizes(N, R))

def run(x, w, b, targets, inv_temp, want_entropy, grads, *, cap=None, rows_per_block=None, limit=SHIFT_LIMIT,
        configs=None, weight_grad=True, memory_lean=False, blocking=None, splits=None):
    """The fused head over x [N, H], w [V, H], b [V] | None, targets [N] int64 in [0, V), with the logits
    ``z_raw * inv_temp``, or ``cap * tanh(z_raw / cap) * inv_temp`` when ``cap`` is not None (ordinary mode).

    ``grads(lo, hi, logp, ent) -> (g_logp [hi-lo], g_ent [hi-lo] | None)`` upstream gradients (any float dtype)
    of rows [lo, hi), called once per block after that block's log-probs are in ``logp [N]`` (and entropies in
    ``ent [N]``); ``grads=None``: forward only. ``weight_grad=False``: no dW (returned None). ``memory_lean``
    with dW: the two passes of ``lean_plan`` (first-pass blocks of ``rows_per_block`` rows when given), ``grads``
    called once more for all rows before the second; without dW (frozen weight, or forward only): the recompute
    over ``blocking`` (default ``linear_logprobs_launch.plan``, its rows replaced by ``rows_per_block`` when
    given), ``grads`` called once for all rows.

    Returns ``(logp [N], ent [N], dx [N, H], dw [V, H] | None, db [V] | None)``: fp32 log-probs and entropies (NaN
    without want_entropy, but in memory_lean without dW); gradients in the input dtype except db (fp32 in ordinary
    mode and in memory_lean without dW); dx, dw, db None without ``grads``. ``splits``: vocabulary splits of each
    block's dX GEMM (default ``dx_splits`` for the device; not with memory_lean)."""
    N, H = x.shape
    V = w.shape[0]
    cfgs = configs or _configs()
    if memory_lean:
        _lean_options(splits, None)
        if grads is None or not weight_grad:  # no dW to work in: the recompute over a bounded workspace
            if blocking is None:
                planned = lean.plan(N, V, H, device_sms(x.device), x.element_size())
                blocking = lean.Blocking(min(rows_per_block, N), planned.slab) if rows_per_block else planned
            return _run_lean(x, w, b, targets, inv_temp, want_entropy, grads, cap, cfgs, blocking)
        _lean_options(None, blocking)
        if w.dtype != x.dtype:
            raise TypeError("fused_pact_head: memory_lean keeps logits in dW's rows: x and w must share one dtype")
    elif blocking is not None:
        raise ValueError("fused_pact_head: blocking applies to memory_lean; the default mode takes rows_per_block")
    sms = device_sms(x.device)
    shift = grads is not None and shift_mode(x.dtype, want_entropy, softcap=cap is not None)
    if memory_lean:
        lean_blocks = lean_plan(N, V, H, x.dtype, want_entropy, cap is not None, sms, rows_per_block)
        blocks, dw_rows = lean_blocks.head, V - lean_blocks.tail
    else:
        blocks, dw_rows = plan(N, V, H, x.dtype, want_entropy, cap is not None, weight_grad, sms, rows_per_block,
                               splits, backward=grads is not None), V
    R = max((blk.r for blk in blocks.blocks), default=0)
    if grads is not None and not shift and R * V >= 2 ** 31:
        raise ValueError(f"fused_pact_head: rows_per_block={R} x V={V} logits overflow the int32 offsets of "
                         "linear_logprobs' gradient epilogue; use fewer rows per block")
    logp, ent = (torch.full((N,), float("nan"), device=x.device, dtype=torch.float32) for _ in range(2))
    dx = dw = db = None
    if grads is not None:  # dW and db are written by the first row block: zeros when there is none
        dx = torch.empty((N, H), device=x.device, dtype=x.dtype)  # contiguous: blocks park in its rows
        if weight_grad:  # contiguous: memory_lean works in its rows
            dw = torch.empty((V, H), device=x.device, dtype=w.dtype) if N else torch.zeros((V, H), device=x.device,
                                                                                            dtype=w.dtype)
        if b is not None:
            db = torch.zeros((V, 1), device=x.device, dtype=x.dtype) if shift else \
                torch.zeros(V, device=x.device, dtype=torch.float32)
    if memory_lean:  # dW's last rows, which the second pass forms, and lse [N] kept for it
        workspace = dw.view(-1).view(torch.uint8)[_aligned(dw_rows * H * x.element_size()):]
        lse = torch.empty(N, device=x.device, dtype=torch.float32)
    else:  # the largest block's logits, and what the blocks that cannot park in dX's rows park past them
        workspace = torch.empty(blocks.workspace_bytes, device=x.device, dtype=torch.uint8)
        lse = None
    pcfg, scfg = cfgs["pass"], cfgs["scale"]
    for blk in blocks.blocks:
        r0, r, S = blk.r0, blk.r, blk.splits
        rows = slice(r0, r0 + r)
        z = workspace[:r * V * x.element_size()].view(x.dtype).view(r, V)
        own = _parked(blk, workspace, dx, V, H, x.dtype, shift, weight_grad, grads is not None)
        if lse is not None:
            own["lse"] = lse[rows]
        if b is None:
            torch.mm(x[rows], w.t(), out=z)
        else:
            torch.addmm(b, x[rows], w.t(), out=z)
        _head_pass_kernel[(triton.cdiv(r, pcfg.blocks["BLOCK_R"]),)](
            z, z.stride(0), targets[rows], logp[rows], own["lse"], ent[rows], own["s"], r, V, inv_temp, limit,
            cap or 1.0, WRITE_U=shift, SOFTCAP=cap is not None, ENTROPY=want_entropy, **pcfg.blocks,
            num_warps=pcfg.num_warps, num_stages=pcfg.num_stages)
        if grads is None:
            continue
        g_logp, g_ent = _upstream(grads, r0, r0 + r, logp, ent)
        first = r0 == 0
        if not shift:  # d logits in place of the logits
            slab_grad(z, 0, targets[rows], own["lse"], ent[rows], g_logp, g_ent, db, inv_temp, cfgs["grad"], cap)
        src = _dx_parts(z, w, own["parts"], S) if S > 1 else torch.mm(z, w, out=dx[rows])
        xs, beta = own.get("xs"), own.get("beta")
        if shift or S > 1:  # dx = beta * (U @ w) (shift mode), or the partial products summed (ordinary mode)
            _scale_rows_kernel[(triton.cdiv(r, scfg.blocks["BLOCK_R"]), triton.cdiv(H, scfg.blocks["BLOCK_H"]))](
                dx[rows], src, x[rows], xs if xs is not None else dx[rows], beta if shift else dx[rows],
                g_logp, own["s"], r, H, S, r * H, inv_temp, SCALE=shift, WRITE_XS=shift and weight_grad,
                **scfg.blocks, num_warps=scfg.num_warps, num_stages=scfg.num_stages)
        if dw is not None and dw_rows:
            _accumulate(dw[:dw_rows], z[:, :dw_rows].t(), xs if shift else x[rows], first)
        if db is not None and shift:  # (ordinary mode: slab_grad's atomics)
            _accumulate(db, z.t(), beta, first)
    if memory_lean and N:
        _lean_tail(x, w, b, targets, inv_temp, grads, logp, ent, lse, dw, lean_blocks, cap, cfgs)
    if db is not None and shift:
        db = db.view(V)
    return logp, ent, dx, dw, db


def _upstream(grads, lo, hi, logp, ent):
    """The caller's upstream gradients of rows [lo, hi) as the epilogues read them: fp32, contiguous (g_ent None
    without an entropy term)."""
    g_logp, g_ent = grads(lo, hi, logp, ent)
    return g_logp.float().contiguous(), g_ent.float().contiguous() if g_ent is not None else None


def _lean_tail(x, w, b, targets, inv_temp, grads, logp, ent, lse, dw, lean_blocks, cap, cfgs):
    """memory_lean's second pass (``LeanPlan.tiles``): dW's last ``tail`` rows from the logits again, tile by tile,
    each parked in dW's rows past its slab or in the workspace; d logits in place by ``linear_logprobs.bwd`` from
    lse and the upstream gradients of all rows (the first pass formed db and dX whole)."""
    H, e = x.shape[1], x.element_size()
    g_logp, g_ent = _upstream(grads, 0, x.shape[0], logp, ent)
    rows_of_dw = dw.view(-1).view(torch.uint8)
    workspace = torch.empty(lean_blocks.workspace_bytes, device=x.device, dtype=torch.uint8)
    for t in lean_blocks.tiles:
        rows, cols = slice(t.r0, t.r0 + t.r), slice(t.c0, t.c0 + t.s)
        flat = rows_of_dw[_aligned((t.c0 + t.s) * H * e):] if t.parked == "dw" else workspace
        z = flat[:t.r * t.s * e].view(x.dtype).view(t.r, t.s)
        lean.slab_logits(x[rows], w, b, t.c0, z)
        slab_grad(z, t.c0, targets[rows], lse[rows], ent[rows], g_logp[rows],
                  g_ent[rows] if g_ent is not None else None, None, inv_temp, cfgs["grad"], cap)
        _accumulate(dw[cols], z.t(), x[rows], t.r0 == 0)


KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}


def row_grads(logp, base=None, po=None, tc=None, *, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None,
              kl_estimator="k3", kl_ratio_weighted=False, configs=None):
    """d loss / d logp of rows, fp32 [n], in one launch of ``_row_grads_kernel`` (no host synchronisation).

    Args:
        logp: [n] the rows' log-probs.
        base: [n] the part constant in logp (the SFT term's gradient), or None.
        po: the prompt-only surrogate's per-row constants ``(weight, adv, den, kl_weight, ref)``, each [n]
            (``den`` None: ratio 1; ``kl_weight`` / ``ref`` None: no KL term), or None.
        tc: the trace-conditioned surrogate's ``(weight, adv, den)``, or None.
        clip_eps_low, clip_eps_high, dual_clip, kl_estimator, kl_ratio_weighted: as ``PACTLossConfig``.
    """
    n = logp.shape[0]
    out = torch.empty(n, device=logp.device, dtype=torch.float32)
    if n == 0:
        return out
    cfg = (configs or _configs())["grads"]
    po_w, po_adv, po_den, kl_w, ref = po or (None,) * 5
    tc_w, tc_adv, tc_den = tc or (None,) * 3
    kl = KL_ESTIMATORS[kl_estimator] if po is not None and kl_w is not None else 0

    def ptr(t):
        return logp if t is None else t.contiguous()

    _row_grads_kernel[(triton.cdiv(n, cfg.blocks["BLOCK"]),)](
        out, logp, ptr(base), ptr(po_w), ptr(po_adv), ptr(po_den), ptr(kl_w), ptr(ref), ptr(tc_w), ptr(tc_adv),
        ptr(tc_den), n, 1.0 - clip_eps_low, 1.0 + clip_eps_high, dual_clip or 0.0, HAS_BASE=base is not None,
        HAS_PO=po is not None, PO_DEN=po_den is not None, KL=kl, KL_RATIO=kl_ratio_weighted, HAS_TC=tc is not None,
        TC_DEN=tc_den is not None, DUAL=dual_clip is not None, **cfg.blocks, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


def _lean_options(splits, blocking):
    """Refuse what memory_lean does not take: ``splits`` (it plans its own), ``blocking`` where it has dW (the
    ``lean_plan`` passes; ``blocking`` is the slab recompute's, without dW)."""
    if splits is not None:
        raise ValueError("fused_pact_head: splits applies to the default mode's row blocks; memory_lean plans its own")
    if blocking is not None:
        raise ValueError("fused_pact_head: blocking applies to memory_lean without dW (a frozen weight, or the "
                         "forward alone); with dW it plans its own passes (lean_plan)")


def _run_lean(x, w, b, targets, inv_temp, want_entropy, grads, cap, cfgs, blocking):
    """memory_lean without dW (a frozen weight, or the forward alone): linear_logprobs' forward over row blocks x
    vocabulary slabs, the upstream gradients of every row, then per (block, slab) the logits again, d logits in
    place and dX (+)= dz @ w[cols] (rounded once per vocabulary slab, as in linear_logprobs)."""
    N = x.shape[0]
    V = w.shape[0]
    logp, lse, ent = lean.forward(x, w, b, targets, inv_temp, configs={"fwd": cfgs["lean_fwd"]}, blocking=blocking,
                                  cap=cap)
    if grads is None:
        return logp, ent, None, None, None
    dx = torch.zeros_like(x) if N == 0 else torch.empty_like(x)
    db = torch.zeros(V, device=x.device, dtype=torch.float32) if b is not None else None
    if N == 0:
        return logp, ent, dx, None, db
    g_logp, g_ent = _upstream(grads, 0, N, logp, ent)
    workspace = torch.empty(blocking.rows * blocking.slab, device=x.device, dtype=x.dtype)  # [R * S]
    for r0, r, v0, s in lean.blocks(N, V, blocking):
        rows, cols = slice(r0, r0 + r), slice(v0, v0 + s)
        z = lean.workspace_view(workspace, r, s)
        lean.slab_logits(x[rows], w, b, v0, z)
        slab_grad(z, v0, targets[rows], lse[rows], ent[rows], g_logp[rows],
                  g_ent[rows] if g_ent is not None else None, db[cols] if db is not None else None, inv_temp,
                  cfgs["grad"], cap)
        _accumulate(dx[rows], z, w[cols], v0 == 0)
    return logp, ent, dx, None, db


def _accumulate(out, a, b, first):
    """out = a @ b on the first row block, out += a @ b after (cuBLAS, fp32 accumulation inside)."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def kernel_costs(N, V, H, dtype, has_bias, want_entropy, bad_rows=None, configs=None, rows_per_block=None,
                 backward=True, softcap=False, memory_lean=False, weight_grad=True, blocking=None, splits=None):
    """Performance model of ``run``: one KernelCost per launch, in launch order.

    Triton kernels: bytes of every executed tl.load / tl.store / atomic (masked elements excluded; an atomic
    counts as a load plus a store), no tensor-core FLOPs. cuBLAS GEMMs (``torch.mm[...]``): 2*M*N*K FLOPs and
    compulsory bytes (operands, an addmm's C, the output once). ``bad_rows``: per row block, how many rows
    the pass re-shifts in its second loop (their max logit over ``limit`` above the target's; data-dependent,
    0 by default); ``backward=False``: forward only (``grads=None``); ``softcap``: ``run`` with a cap (ordinary
    mode; the cap itself moves no byte); ``weight_grad=False``: a frozen weight (no dW GEMM, no xs; two GEMMs
    per block instead of three); ``memory_lean``: with dW, ``lean_plan``'s two passes (6NVH + 2N tail H FLOPs);
    without, the recompute over ``blocking`` (default ``linear_logprobs_launch.plan``, 6NVH). ``configs`` /
    ``rows_per_block`` / ``splits`` default to
    what ``run`` uses on a GPU of DEFAULT_SMS SMs. dX's GEMM split S ways is one batched GEMM of S [r, H] outputs
    (``gemm_cost``'s ``batch``), plus one for the columns past the splits, and the scaling kernel reads the S
    partial products."""
    cfgs = configs or GPU_CONFIGS
    if memory_lean and not (backward and weight_grad and N):
        lean_cfgs = {"fwd": cfgs["lean_fwd"], "bwd": cfgs["grad"]}
        return lean.kernel_costs(N, V, H, dtype, has_bias, want_entropy, configs=lean_cfgs, blocking=blocking,
                                 passes=("fwd", "bwd") if backward and N else ("fwd",), weight_grad=False)
    if memory_lean:
        _lean_options(splits, blocking)
        lean_blocks = lean_plan(N, V, H, dtype, want_entropy, softcap, rows_per_block=rows_per_block)
        blocks, dw_rows = lean_blocks.head.blocks, V - lean_blocks.tail
    else:
        blocks = plan(N, V, H, dtype, want_entropy, softcap, weight_grad, rows_per_block=rows_per_block,
                      splits=splits, backward=backward).blocks
        dw_rows = V
    bad_rows = bad_rows or [0] * len(blocks)
    if len(bad_rows) != len(blocks):
        raise ValueError(f"kernel_costs: bad_rows has {len(bad_rows)} entries for {len(blocks)} row blocks")
    e = dtype.itemsize
    shift = backward and shift_mode(dtype, want_entropy, softcap)
    h_tiles = triton.cdiv(H, cfgs["scale"].blocks["BLOCK_H"])
    costs = []

    def gemm(tag, m, n, k, c_elems, batch=1):
        costs.append(gemm_cost(tag, m, n, k, c_elems, e, batch))

    for blk, bad in zip(blocks, bad_rows):
        r0, r, S = blk.r0, blk.r, blk.splits
        k_split, rem = split_columns(V, S)
        gemm("logits", r, V, H, V if has_bias else 0)
        # targets; target logits (the shift c in shift mode); logits read once; logp, lse (entropy)
        nbytes = 8 * r + r * e + r * V * e + (12 if want_entropy else 8) * r
        if shift:  # U stored; s; target column of good rows; the bad rows' second loop (read and write of their row)
            nbytes += r * V * e + 4 * r + (r - bad) * e + 2 * bad * V * e
        costs.append(KernelCost("fused_pact_head.pass[shift]" if shift else "fused_pact_head.pass", 0, nbytes))
        if not backward:
            continue
        acc = 0 if r0 == 0 else 1
        if not shift:
            costs.append(slab_grad_cost(r, V, e, want_entropy, has_bias, cfgs["grad"].blocks["BLOCK_R"]))
        if S == 1:
            gemm("dx", r, H, V, 0)
        else:
            gemm("dx", r, H, k_split, 0, batch=S)
            if rem:
                gemm("dx", r, H, rem, r * H)
        if shift:  # g and s per (row, column tile); beta once per row; S parts read, dx written (+ x read, xs written)
            costs.append(KernelCost("fused_pact_head.scale", 0,
                                    8 * r * h_tiles + r * e + (S + 1 + (2 if weight_grad else 0)) * r * H * e))
        elif S > 1:  # the partial products summed into dx
            costs.append(KernelCost("fused_pact_head.scale", 0, (S + 1) * r * H * e))
        if weight_grad and dw_rows:
            gemm("dw", dw_rows, H, r, acc * dw_rows * H)
        if has_bias and shift:
            gemm("db", V, 1, r, acc * V)
    if memory_lean:  # the second pass: per tile the logits, d logits in place, the slab's dW
        for t in lean_blocks.tiles:
            gemm("logits", t.r, t.s, H, t.s if has_bias else 0)
            costs.append(slab_grad_cost(t.r, t.s, e, want_entropy, False, cfgs["grad"].blocks["BLOCK_R"]))
            gemm("dw", t.s, H, t.r, 0 if t.r0 == 0 else t.s * H)
    return costs


def extra_memory_bytes(N, V, H, dtype, has_bias=False, want_entropy=False, rows_per_block=None, softcap=False,
                       memory_lean=False, weight_grad=True, blocking=None, splits=None, sms=DEFAULT_SMS, backward=True):
    """Bytes ``run`` allocates beyond its outputs (log-probs, entropies, dX, dW, db): the workspace of its
    ``plan`` (the largest block's logits [r, V] and what the blocks that cannot park in dX's rows park past
    them: fp32 lse and s [r], dX's partial products [S, r, H] when split and, in shift mode, beta [r] and xs
    [r, H] in the input dtype). memory_lean with dW: ``lean_plan``'s workspace (the second pass's tiles that do
    not fit in dW's unwritten rows) and fp32 lse [N] (the caller's ``grads`` of all rows, [N] each, come on top);
    without dW: the workspace [R, S] of ``blocking``, fp32 lse [N] and the forward's state [4, R]."""
    if memory_lean and backward and weight_grad and N:
        _lean_options(splits, blocking)
        return lean_plan(N, V, H, dtype, want_entropy, softcap, sms, rows_per_block).workspace_bytes + 4 * N
    if memory_lean and N == 0:
        return 0
    if memory_lean:
        e = dtype.itemsize
        blocking = blocking or lean.plan(N, V, H, sms, e)
        return blocking.rows * blocking.slab * e + 4 * N + 16 * blocking.rows
    return plan(N, V, H, dtype, want_entropy, softcap, weight_grad, sms, rows_per_block, splits,
                backward).workspace_bytes


def gate_entries():
    """The pass kernel and the row-scaling kernel at their GPU configurations, for every dtype and mode
    ``run`` launches them with (shift mode: bf16, fp32, with and without xs; ordinary: bf16, fp16, fp32, with or
    without a soft cap, and the scaling kernel summing a split dX), and the upstream-gradient kernel; the pass
    as a 16-divisible vocabulary's build and any other's (``registry.vocab_variants``). memory_lean
    launches linear_logprobs' epilogues at its own gated configurations."""
    entries = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = TRITON_DTYPE[dtype]
        # (U, soft cap, entropy): the shift pass; the ordinary one with an entropy bonus, and without one (fp16, or
        # a soft cap); with a soft cap, both
        for write_u, softcap, entropy in ((True, False, False), (False, False, True), (False, False, False),
                                          (False, True, True), (False, True, False)):
            if write_u and not shift_mode(dtype, False):
                continue
            cfg = GPU_CONFIGS["pass"]
            entries += vocab_variants(
                f"fused_pact_head.pass[{t}{'-shift' if write_u else ''}{'-softcap' if softcap else ''}"
                f"{'-noent' if not (write_u or entropy) else ''}]",
                _head_pass_kernel,
                {"z_ptr": f"*{t}", "stride_zr": "i32", "tgt_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
                 "ent_ptr": "*fp32", "s_ptr": "*fp32", "R": "i32", "V": "i32", "inv_temp": "fp32", "limit": "fp32",
                 "cap": "fp32"},
                {"WRITE_U": write_u, "SOFTCAP": softcap, "ENTROPY": entropy, **cfg.blocks}, cfg,
                ("stride_zr", "V"), expects_mma=False)
        cfg = GPU_CONFIGS["scale"]
        # shift mode: scaled, with xs or (frozen weight) without; ordinary mode: the split dX's parts summed
        variants = ((True, True, ""), (True, False, "-frozen")) if shift_mode(dtype, False) else ()
        for scale, write_xs, tag in variants + ((False, False, "-sum"),):
            entries.append(GateEntry(
                f"fused_pact_head.scale[{t}{tag}]", _scale_rows_kernel,
                {"dx_ptr": f"*{t}", "parts_ptr": f"*{t}", "x_ptr": f"*{t}", "xs_ptr": f"*{t}", "beta_ptr": f"*{t}",
                 "g_ptr": "*fp32", "s_ptr": "*fp32", "R": "i32", "H": "i32", "n_parts": "i32", "part_stride": "i32",
                 "inv_temp": "fp32"},
                {"SCALE": scale, "WRITE_XS": write_xs, **cfg.blocks}, cfg, expects_mma=False))
    cfg = GPU_CONFIGS["grads"]
    # the upstream gradients: the default loss (both surrogates with denominators, SFT) and every term on
    for tag, flags in (("", dict(KL=0, KL_RATIO=False, DUAL=False)), ("-all", dict(KL=3, KL_RATIO=True, DUAL=True))):
        entries.append(GateEntry(
            f"fused_pact_head.grads[fp32{tag}]", _row_grads_kernel,
            {"g_ptr": "*fp32", "logp_ptr": "*fp32", **{f"{k}_ptr": "*fp32" for k in (
                "base", "po_w", "po_adv", "po_den", "kl_w", "ref", "tc_w", "tc_adv", "tc_den")},
             "n": "i32", "low": "fp32", "high": "fp32", "dual_clip": "fp32"},
            {"HAS_BASE": True, "HAS_PO": True, "PO_DEN": True, "HAS_TC": True, "TC_DEN": True, **flags, **cfg.blocks},
            cfg, expects_mma=False))
    return entries
