"""Launchers for the linear log-prob op: row blocks x vocabulary slabs over a bounded workspace.

For each block of ``R`` rows and slab of ``S`` vocabulary columns, a cuBLAS GEMM writes the logits
into a workspace ``[R, S]`` in the input dtype and a Triton epilogue (``kernels/linear_logprobs.py``)
consumes it. Forward: GEMM + online-LSE epilogue. Backward: GEMM (recompute) + epilogue that turns
the workspace into d logits in place, then

    dX[rows]  (+)= dz @ w[cols]        (addmm into the returned dX: rounded once per vocabulary slab)
    dW[cols]  (+)= dz.T @ x[rows]      (addmm into the returned dW: rounded once per row block)

in the input dtype (with ``weight_grad`` False, a frozen lm_head, only dX: no dW GEMM and no dW buffer); each
GEMM accumulates over its own reduction dimension (S for dX, R for dW) in
fp32 inside cuBLAS, so no fp32 accumulator tile is re-read from memory. fp32 inputs are exact fp32
throughout; with bf16/fp16 the logits are rounded to the input dtype before the softmax (as the
model's own lm_head output would be), and dW carries ceil(N / R) roundings, dX ceil(V / S).

Building blocks for other ops over the same loop (e.g. a fused loss head): ``plan`` / ``Blocking``,
``blocks``, ``workspace_view``, ``slab_logits``, ``slab_stats``, ``slab_grad``, ``accumulate_grads``.

Every function takes the logits' transform as ``inv_temp`` and ``cap``: the epilogues use
``z = z_raw * inv_temp``, or ``z = cap * tanh(z_raw / cap) * inv_temp`` when ``cap`` is not None (a soft
cap; ``pact_fast.ops.linear_logprobs`` folds a logit scale into both). The soft cap changes no load, store
or GEMM, so ``kernel_costs`` holds with and without it.

The workspace is sized by a memory budget, ``WORKSPACE_FRACTION`` of the weight gradient's bytes,
with at least ``MIN_BLOCK_ROWS`` rows per block (so the GEMMs are compute-bound) where N allows.
"""
import functools
from dataclasses import dataclass

import torch
import triton

from .linear_logprobs import _slab_grad_kernel, _slab_stats_kernel
from . import registry
from .registry import (DEFAULT_SMS, LAUNCH_WORK, TRITON_DTYPE, GateEntry, KernelCost, block_sizes, gemm_cost,
                       gemm_work, interpreting, vocab_variants)

WORKSPACE_FRACTION = 0.05  # workspace bytes <= this share of the weight gradient's bytes (V * H * itemsize)
MIN_BLOCK_ROWS = 2048  # rows per block when N has them: GEMMs of K=R for dW at > 500 FLOP/byte
SLAB_MULTIPLE = 128  # slab widths are multiples of this (tensor-core and vector friendly)

GPU_CONFIGS = registry.GPU_CONFIGS["linear_logprobs"]
INTERPRET_CONFIGS = registry.INTERPRET_CONFIGS["linear_logprobs"]


@dataclass(frozen=True)
class Blocking:
    """Rows per block (R) and vocabulary columns per slab (S) of the workspace [R, S]."""

    rows: int
    slab: int


def _configs():
    return INTERPRET_CONFIGS if interpreting() else GPU_CONFIGS


@functools.lru_cache(maxsize=256)
def plan(N, V, H, sms=DEFAULT_SMS, elem_bytes=2):
    """The Blocking the launcher uses for N rows, vocabulary V, hidden H on a GPU of ``sms`` SMs: min(N,
    MIN_BLOCK_ROWS) rows, and slabs as wide as the workspace allows (WORKSPACE_FRACTION * V * H elements of the
    input dtype, the weight gradient's dtype; at least SLAB_MULTIPLE columns) where that covers V; else, of the
    widths that are multiples of SLAB_MULTIPLE within it, the one whose launches over all blocks and slabs cost
    least (``_work``: waves of cuBLAS tiles, or bytes where those dominate, and a launch overhead each), the widest
    on a tie. At W-logprob (H=2048) that is 6,144 columns (three full waves of logits tiles) where the widest,
    7,552, takes four. ``elem_bytes``: the input dtype's size."""
    budget = int(WORKSPACE_FRACTION * V * H)  # workspace elements
    rows = max(1, min(N, MIN_BLOCK_ROWS))
    widest = max(SLAB_MULTIPLE, budget // rows // SLAB_MULTIPLE * SLAB_MULTIPLE)
    if widest >= V:
        return Blocking(rows, V)
    widths = range(SLAB_MULTIPLE, widest + 1, SLAB_MULTIPLE)
    return Blocking(rows, min(widths, key=lambda s: (_work(N, V, H, rows, s, sms, elem_bytes), -s)))


def _work(N, V, H, rows, slab, sms, e):
    """Planned cost (``registry.gemm_work``) of a forward and backward over blocks of ``rows`` x slabs of
    ``slab``: per block and slab the logits twice, dX and dW accumulated, and the two epilogues' launches (their
    bytes are the same for any blocking)."""
    return sum(n_r * n_s * (2 * gemm_work(r, s, H, 0, e, sms) + gemm_work(r, H, s, r * H, e, sms) +
                            gemm_work(s, H, r, s * H, e, sms) + 2 * LAUNCH_WORK)
               for r, n_r in block_sizes(N, rows) for s, n_s in block_sizes(V, slab))


def _launch(kernel, grid, cfg, *args, **constexprs):
    kernel[grid](*args, **constexprs, **cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def blocks(N, V, blocking):
    """(r0, r, v0, s) for every row block x vocabulary slab, slabs inner: rows [r0, r0 + r), columns
    [v0, v0 + s)."""
    for r0 in range(0, N, blocking.rows):
        r = min(blocking.rows, N - r0)
        for v0 in range(0, V, blocking.slab):
            yield r0, r, v0, min(blocking.slab, V - v0)


def workspace_view(workspace, r, s):
    """A contiguous [r, s] view at the start of a flat workspace of at least r * s elements."""
    return workspace[:r * s].view(r, s)


def slab_logits(x_blk, w, b, v0, out):
    """out [r, s] = x_blk [r, H] @ w[v0:v0+s].T (+ b[v0:v0+s]), one cuBLAS GEMM in the input dtype."""
    s = out.shape[1]
    if b is None:
        torch.mm(x_blk, w[v0:v0 + s].t(), out=out)
    else:
        torch.addmm(b[v0:v0 + s], x_blk, w[v0:v0 + s].t(), out=out)


def slab_stats(z, v0, V, targets, state, logp, lse, ent, inv_temp, cfg, cap=None):
    """Online LSE over one slab: z [r, s] logits of columns [v0, v0 + s); targets [r]; state [4, >= r] fp32
    carried between the slabs of a block; at the last slab (v0 + s == V) writes logp, lse, entropy [r]."""
    r, s = z.shape
    _launch(_slab_stats_kernel, (triton.cdiv(r, cfg.blocks["BLOCK_R"]),), cfg,
            z, z.stride(0), targets, state, logp, lse, ent, r, s, v0, inv_temp, cap or 1.0,
            IS_FIRST=v0 == 0, IS_LAST=v0 + s == V, SOFTCAP=cap is not None)


def slab_grad(z, v0, targets, lse, ent, g_logp, g_ent, db, inv_temp, cfg, cap=None):
    """z [r, s] logits of columns [v0, v0 + s) -> d loss / d logits, in place; targets, lse, g_logp [r];
    ent, g_ent [r] or g_ent None (no entropy gradient); db [s] fp32 += column sums, or None."""
    r, s = z.shape
    _launch(_slab_grad_kernel, (triton.cdiv(r, cfg.blocks["BLOCK_R"]),), cfg,
            z, z.stride(0), targets, lse, ent, g_logp, g_logp if g_ent is None else g_ent,
            lse if db is None else db, r, s, v0, inv_temp, cap or 1.0,
            HAS_GENT=g_ent is not None, HAS_BIAS=db is not None, SOFTCAP=cap is not None)


def slab_grad_cost(r, s, e, has_gent, has_bias, block_r):
    """KernelCost of ``slab_grad`` over r rows x s columns of logits (``e`` bytes each): the rows' targets, lse and
    g_logp (+ entropy and g_ent), the logits read and written, and with a bias the fp32 column sums' atomics (a
    load and a store per column and program of ``block_r`` rows)."""
    row_bytes = (8 + 4 + 4 + (8 if has_gent else 0)) * r
    atomics = 2 * 4 * s * triton.cdiv(r, block_r) if has_bias else 0
    return KernelCost("linear_logprobs.bwd", 0, row_bytes + 2 * r * s * e + atomics)


def accumulate_grads(dz, x_blk, w_slab, dx_blk, dw_slab, first_slab, first_block):
    """dx_blk [r, H] (+)= dz [r, s] @ w_slab [s, H]; dw_slab [s, H] (+)= dz.T @ x_blk [r, H] (no dW GEMM when
    dw_slab is None: a frozen weight): cuBLAS GEMMs in the input dtype that overwrite on a block's first slab /
    a slab's first block and accumulate after."""
    if first_slab:
        torch.mm(dz, w_slab, out=dx_blk)
    else:
        dx_blk.addmm_(dz, w_slab)
    if dw_slab is None:
        return
    if first_block:
        torch.mm(dz.t(), x_blk, out=dw_slab)
    else:
        dw_slab.addmm_(dz.t(), x_blk)


def forward(x, w, b, targets, inv_temp, configs=None, blocking=None, cap=None):
    """x [N,H], w [V,H], b [V]|None, targets [N] int64 in [0,V) -> fp32 (logp [N], lse [N], entropy [N]) of
    the logits ``z_raw * inv_temp`` (``cap`` None) or ``cap * tanh(z_raw / cap) * inv_temp``."""
    N, H = x.shape
    V = w.shape[0]
    logp, lse, ent = (torch.full((N,), float("nan"), device=x.device, dtype=torch.float32) for _ in range(3))
    if N == 0:
        return logp, lse, ent
    cfg = (configs or _configs())["fwd"]
    blocking = blocking or plan(N, V, H, registry.device_sms(x.device), x.element_size())
    workspace = torch.empty(blocking.rows * blocking.slab, device=x.device, dtype=x.dtype)  # [R * S]
    state = torch.empty((4, blocking.rows), device=x.device, dtype=torch.float32)  # m, s, t, z_tgt per row
    for r0, r, v0, s in blocks(N, V, blocking):
        rows = slice(r0, r0 + r)
        z = workspace_view(workspace, r, s)
        slab_logits(x[rows], w, b, v0, z)
        slab_stats(z, v0, V, targets[rows], state, logp[rows], lse[rows], ent[rows], inv_temp, cfg, cap)
    return logp, lse, ent


def backward(x, w, b, targets, lse, ent, g_logp, g_ent, inv_temp, configs=None, blocking=None, cap=None,
             weight_grad=True):
    """Gradients for upstream g_logp [N] (and g_ent [N] or None) -> (dx [N,H], dw [V,H]) in the input
    dtype and db [V] fp32 (None without bias); ``inv_temp`` and ``cap`` as in ``forward``. ``weight_grad``
    False (a frozen lm_head): dw is None, with no dW GEMM and no dW buffer."""
    N, H = x.shape
    V = w.shape[0]
    db = torch.zeros((V,), device=x.device, dtype=torch.float32) if b is not None else None
    if N == 0:
        return torch.zeros_like(x), torch.zeros_like(w) if weight_grad else None, db
    # every row block's first slab writes its rows of dX, every slab's first row block its rows of dW
    dx = torch.empty((N, H), device=x.device, dtype=x.dtype)
    dw = torch.empty((V, H), device=x.device, dtype=w.dtype) if weight_grad else None
    cfg = (configs or _configs())["bwd"]
    blocking = blocking or plan(N, V, H, registry.device_sms(x.device), x.element_size())
    g_logp = g_logp.float().contiguous()
    g_ent = g_ent.float().contiguous() if g_ent is not None else None
    workspace = torch.empty(blocking.rows * blocking.slab, device=x.device, dtype=x.dtype)  # [R * S]
    for r0, r, v0, s in blocks(N, V, blocking):
        rows, cols = slice(r0, r0 + r), slice(v0, v0 + s)
        z = workspace_view(workspace, r, s)
        slab_logits(x[rows], w, b, v0, z)
        slab_grad(z, v0, targets[rows], lse[rows], ent[rows], g_logp[rows],
                  g_ent[rows] if g_ent is not None else None, db[cols] if db is not None else None, inv_temp, cfg,
                  cap)
        accumulate_grads(z, x[rows], w[cols], dx[rows], dw[cols] if dw is not None else None, first_slab=v0 == 0,
                         first_block=r0 == 0)
    return dx, dw, db


def kernel_costs(N, V, H, dtype, has_bias, has_gent, configs=None, blocking=None, passes=("fwd", "bwd"),
                 weight_grad=True):
    """Performance model of ``passes`` (forward and/or backward) over N kept rows: one KernelCost per
    launch, in launch order. ``weight_grad`` False models a frozen lm_head: no ``torch.mm[dw]`` GEMMs (two
    GEMMs per backward block instead of three).

    Triton kernels: bytes of every executed tl.load / tl.store / atomic (masked elements excluded;
    an atomic counts as a load plus a store), no tensor-core FLOPs. cuBLAS GEMMs (``torch.mm[...]``):
    2*M*N*K FLOPs and compulsory bytes (operands, an addmm's C, and the output once).
    ``configs`` / ``blocking`` default to what the launcher uses on a GPU."""
    if not passes or not set(passes) <= {"fwd", "bwd"}:
        raise ValueError(f"kernel_costs: passes must be a subset of ('fwd', 'bwd'), got {passes!r}")
    cfgs = configs or GPU_CONFIGS
    e = torch.empty((), dtype=dtype).element_size()
    blocking = blocking or plan(N, V, H, elem_bytes=e)
    costs = []

    def gemm(tag, m, n, k, c_elems):
        costs.append(gemm_cost(tag, m, n, k, c_elems, e))

    for r0, r, v0, s in blocks(N, V, blocking) if "fwd" in passes else ():
        gemm("logits", r, s, H, s if has_bias else 0)
        first, last = v0 == 0, v0 + s == V
        # targets, state in (after the first slab), the logits, each row's target logit, state or results out
        nbytes = 8 * r + (0 if first else 16 * r) + r * s * e + r * e + (12 * r if last else 16 * r)
        costs.append(KernelCost("linear_logprobs.fwd", 0, nbytes))
    bwd_block_r = cfgs["bwd"].blocks["BLOCK_R"]
    for r0, r, v0, s in blocks(N, V, blocking) if "bwd" in passes else ():
        gemm("logits", r, s, H, s if has_bias else 0)
        costs.append(slab_grad_cost(r, s, e, has_gent, has_bias, bwd_block_r))
        gemm("dx", r, H, s, 0 if v0 == 0 else r * H)
        if weight_grad:
            gemm("dw", s, H, r, 0 if r0 == 0 else s * H)
    return costs


def extra_memory_bytes(N, V, H, dtype, has_bias=False, blocking=None):
    """Bytes the op allocates beyond its outputs and returned gradients (backward's peak): the workspace
    (+ the fp32 db, cast to the bias dtype at the end)."""
    e = torch.empty((), dtype=dtype).element_size()
    blocking = blocking or plan(N, V, H, elem_bytes=e)
    return blocking.rows * blocking.slab * e + (4 * V if has_bias else 0)


# A slab's row stride, width and first column: multiples of 16 with a vocabulary that is (slab widths are
# multiples of SLAB_MULTIPLE, the last one V - v0)
SLAB_SIZES = ("stride_zr", "S", "v0")


def gate_entries():
    """Both epilogues at their GPU configurations, for every dtype and constexpr combination the launchers use
    (first / last slab, bias, entropy gradient, soft cap), each as a 16-divisible vocabulary's build and any
    other's (``registry.vocab_variants``)."""
    entries = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = TRITON_DTYPE[dtype]
        for softcap in (False, True):
            cap_tag = "-softcap" if softcap else ""
            for first in (False, True):
                for last in (False, True):
                    cfg = GPU_CONFIGS["fwd"]
                    entries += vocab_variants(
                        f"linear_logprobs.fwd[{t}{'-first' if first else ''}{'-last' if last else ''}{cap_tag}]",
                        _slab_stats_kernel,
                        {"z_ptr": f"*{t}", "stride_zr": "i32", "tgt_ptr": "*i64", "state_ptr": "*fp32",
                         "logp_ptr": "*fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32", "R": "i32", "S": "i32",
                         "v0": "i32", "inv_temp": "fp32", "cap": "fp32"},
                        {"IS_FIRST": first, "IS_LAST": last, "SOFTCAP": softcap, **cfg.blocks}, cfg,
                        SLAB_SIZES, expects_mma=False)
            for has_bias in (False, True):
                for has_gent in (False, True):
                    cfg = GPU_CONFIGS["bwd"]
                    entries += vocab_variants(
                        f"linear_logprobs.bwd[{t}{'-bias' if has_bias else ''}{'-ent' if has_gent else ''}{cap_tag}]",
                        _slab_grad_kernel,
                        {"z_ptr": f"*{t}", "stride_zr": "i32", "tgt_ptr": "*i64", "lse_ptr": "*fp32",
                         "ent_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32", "db_ptr": "*fp32",
                         "R": "i32", "S": "i32", "v0": "i32", "inv_temp": "fp32", "cap": "fp32"},
                        {"HAS_GENT": has_gent, "HAS_BIAS": has_bias, "SOFTCAP": softcap, **cfg.blocks}, cfg,
                        SLAB_SIZES, expects_mma=False)
    return entries
