"""Triton epilogue kernels of the fused lm_head + log-softmax + gather (+ entropy).

The launcher (``linear_logprobs_launch``) walks row blocks x vocabulary slabs. For each it
writes the block's logits ``z_raw = x[rows] @ w[cols].T (+ b[cols])`` into a bounded workspace
``[R, S]`` (input dtype) with a cuBLAS GEMM, then runs one of these kernels over the workspace.
Both are row-block x vocabulary-slab building blocks: they see a workspace, the slab's first
vocabulary column ``v0`` and per-row vectors already offset to the block's first row.

``_slab_stats_kernel`` (forward) keeps, per row, an online log-sum-exp over the slabs in fp32, in base 2
(``u = z * log2(e)``: each logit costs one FFMA and one ``ex2``; with SOFTCAP its ``tanh`` one more ``ex2`` and
an approximate reciprocal, the cap folded into the scale),

    m2 = running max of u,   s = sum 2^(u - m2),   t2 = sum 2^(u - m2) * (u - m2),   z_tgt,

in a ``[4, R]`` fp32 state between slabs, and at the last slab writes ``logp = z_tgt - lse``,
``lse = (m2 + log2 s) ln 2`` and ``entropy = (log2 s - t2 / s) ln 2``. ``z_tgt`` is one load of the row's
target logit per slab (its column clamped into the slab, kept only where the target lies in it), not a compare
over every logit. A tile is BLOCK_R rows x BLOCK_S columns held as SPLIT chunks per thread, so a row's
reductions cross the warp's lanes once per BLOCK_S columns; only the slab's last partial tile masks columns.
The logits are

    z = z_raw * inv_temp,   or with SOFTCAP   z = cap * tanh(z_raw / cap) * inv_temp

(the op folds a model's logit scale into both: ``inv_temp = logit_scale / temperature``,
``cap = softcap / logit_scale``).

``_slab_grad_kernel`` (backward) overwrites the workspace in place with d loss / d z_raw:

    p = exp(z - lse),   dz = g_logp * (onehot(target) - p) + g_ent * p * (E[z] - z),
    E[z] = lse - entropy,   d z_raw = dz * inv_temp   (with SOFTCAP: * (1 - tanh(z_raw / cap)^2)),

in the workspace dtype, ready for the dX and dW GEMMs; with a bias it also adds the column sums
of dz into an fp32 ``db`` (atomics: the order of the additions, and so db's last bits, may vary).
Each element is loaded and then stored by the same program, so the in-place update is safe.
"""
import triton
import triton.language as tl

from .common import _INTERPRETED, exp2_approx, round_to, soft_cap, store_row_stats
from .registry import cost_name

# Below any logit a model produces, yet finite: keeps `(m_old - m_new) * s` free of inf * 0.
_M_INIT = tl.constexpr(-1.0e30)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _rcp(x):
    """1 / x of fp32 ``x``: one ``rcp.approx.ftz`` on a GPU (within 1 ulp) instead of the several that ``/`` emits."""
    if _INTERPRETED:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _tanh_over(z, k):
    """``tanh(z / cap)`` of fp32 ``z`` given ``k = 2 log2(e) / cap``: ``e = 2^(-k |z|)``, ``(1 - e) / (1 + e)`` with
    z's sign (the forward's soft cap; its ``cap`` factor folds into the scale that follows)."""
    e = exp2_approx(-k * tl.abs(z))
    th = (1.0 - e) * _rcp(1.0 + e)
    return tl.where(z < 0, -th, th)


@triton.jit
def _stats_tile(ptrs, load_mask, col_ok, m2, s, t2, c, k, SOFTCAP: tl.constexpr, TAIL: tl.constexpr):
    """One [SPLIT, rows, cols] tile (a row's BLOCK_S columns as SPLIT chunks, so each thread holds SPLIT pieces of
    its row and a row reduction crosses lanes once per tile) of the online log-sum-exp in base 2:
    ``u = y * c - m2`` (y = z_raw, or ``tanh(z_raw / cap)`` with SOFTCAP, k as in ``_tanh_over``; c = the logits'
    scale, inv_temp or with SOFTCAP cap * inv_temp, times log2(e)), ``s = sum 2^u``, ``t2 = sum 2^u u``.
    Only the TAIL tile masks columns (``col_ok``); elsewhere ``load_mask`` is the loop-invariant row mask, and rows
    past the block hold finite garbage that is never stored. A logit of -inf (a -inf bias) makes t2 NaN here
    (p u = 0 * -inf): ``_slab_stats_kernel`` sums such rows' t2 again with ``_entropy_tile``."""
    z = tl.load(ptrs, mask=load_mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        z = _tanh_over(z, k)
    if TAIL:
        z = tl.where(col_ok, z, float("-inf"))
    m_new = tl.maximum(m2, tl.max(tl.max(z, axis=0), axis=1) * c)
    u = z * c - m_new[None, :, None]  # one FFMA per logit; -inf on masked columns
    p = exp2_approx(u)
    pu = p * u
    if TAIL:
        pu = tl.where(col_ok, pu, 0.0)  # 0 * -inf
    alpha = exp2_approx(m2 - m_new)
    t2 = alpha * (t2 + (m2 - m_new) * s) + tl.sum(tl.sum(pu, axis=0), axis=1)
    s = alpha * s + tl.sum(tl.sum(p, axis=0), axis=1)
    return m_new, s, t2


@triton.jit
def _entropy_tile(ptrs, load_mask, col_ok, m2, c, TAIL: tl.constexpr):
    """sum 2^u u over one tile, as ``_stats_tile``'s t2 but against the slab's final max ``m2`` and with u clamped at
    _M_INIT, so a logit of -inf adds 0 (p = 0), not NaN; a NaN logit still gives NaN. No soft cap (none is -inf)."""
    z = tl.load(ptrs, mask=load_mask, other=0.0).to(tl.float32)
    if TAIL:
        z = tl.where(col_ok, z, float("-inf"))
    u = z * c - m2[None, :, None]
    return tl.sum(tl.sum(exp2_approx(u) * tl.maximum(u, _M_INIT), axis=0), axis=1)


@cost_name("linear_logprobs.fwd")
@triton.jit
def _slab_stats_kernel(z_ptr, stride_zr, tgt_ptr, state_ptr, logp_ptr, lse_ptr, ent_ptr,
                       R, S, v0, inv_temp, cap,
                       IS_FIRST: tl.constexpr, IS_LAST: tl.constexpr, SOFTCAP: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT: tl.constexpr):
    """One vocabulary slab of the forward: z [R, S] (workspace), targets [R] int64, state [4, R] fp32
    (m2, s, t2, z_tgt; read unless IS_FIRST, written unless IS_LAST), logp/lse/entropy [R] fp32 (IS_LAST);
    ``cap`` is read only with SOFTCAP."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    # u = z_raw * c, or tanh(z_raw / cap) * c with a soft cap (the cap folded into c), in base 2
    if SOFTCAP:
        scale = cap * inv_temp
        k = 2.0 * _LOG2E / cap
    else:
        scale = inv_temp
        k = 0.0
    c = scale * _LOG2E
    # the target's logit: one load per row (column clamped into the slab, kept only where it lies in it)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1) - v0  # target's column within this slab
    in_slab = (tgt >= 0) & (tgt < S)
    z_t = tl.load(z_ptr + rows * stride_zr + tl.where(in_slab, tgt, 0).to(tl.int32), mask=row_mask,
                  other=0.0).to(tl.float32)
    if SOFTCAP:
        z_t = _tanh_over(z_t, k)
    z_t = tl.where(in_slab, z_t * scale, 0.0)
    if IS_FIRST:
        m2 = tl.full((BLOCK_R,), _M_INIT, dtype=tl.float32)
        s = tl.zeros((BLOCK_R,), dtype=tl.float32)
        t2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
        z_tgt = z_t
    else:
        m2 = tl.load(state_ptr + rows, mask=row_mask, other=0.0)
        s = tl.load(state_ptr + R + rows, mask=row_mask, other=0.0)
        t2 = tl.load(state_ptr + 2 * R + rows, mask=row_mask, other=0.0)
        z_tgt = tl.load(state_ptr + 3 * R + rows, mask=row_mask, other=0.0) + z_t
    # [SPLIT, BLOCK_R, BLOCK_S // SPLIT]: column h * BLOCK_S // SPLIT + k of each row
    chunk_cols = tl.arange(0, SPLIT)[:, None, None] * (BLOCK_S // SPLIT) + tl.arange(0, BLOCK_S // SPLIT)[None, None, :]
    ptrs = z_ptr + rows[None, :, None] * stride_zr + chunk_cols
    row_mask_3d = row_mask[None, :, None]
    m2_in, s_in, t2_in = m2, s, t2
    full = S - S % BLOCK_S
    for c0 in range(0, full, BLOCK_S):
        m2, s, t2 = _stats_tile(ptrs + c0, row_mask_3d, row_mask_3d, m2, s, t2, c, k, SOFTCAP=SOFTCAP, TAIL=False)
    col_ok = full + chunk_cols < S
    if full < S:
        m2, s, t2 = _stats_tile(ptrs + full, row_mask_3d & col_ok, col_ok, m2, s, t2, c, k, SOFTCAP=SOFTCAP,
                                TAIL=True)
    # rows whose t2 went NaN with s finite met a logit of -inf (a -inf bias, a masked vocabulary; a NaN logit makes
    # s NaN too): their t2 is summed again over the slab, the terms of -inf logits 0. Rare, so kept out of the
    # loop above, whose instructions per logit bound the epilogue. A soft cap leaves no logit at -inf (tanh).
    redo = row_mask & (t2 != t2) & (s == s)
    if not SOFTCAP and tl.sum(redo.to(tl.int32), axis=0) > 0:
        t_slab = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, full, BLOCK_S):
            t_slab += _entropy_tile(ptrs + c0, row_mask_3d, row_mask_3d, m2, c, TAIL=False)
        if full < S:
            t_slab += _entropy_tile(ptrs + full, row_mask_3d & col_ok, col_ok, m2, c, TAIL=True)
        alpha = exp2_approx(m2_in - m2)
        t2 = tl.where(redo, alpha * (t2_in + (m2_in - m2) * s_in) + t_slab, t2)
    if IS_LAST:
        store_row_stats(logp_ptr, lse_ptr, ent_ptr, rows, row_mask, m2 * _LN2, s, t2 * _LN2, z_tgt)
    else:
        tl.store(state_ptr + rows, m2, mask=row_mask)
        tl.store(state_ptr + R + rows, s, mask=row_mask)
        tl.store(state_ptr + 2 * R + rows, t2, mask=row_mask)
        tl.store(state_ptr + 3 * R + rows, z_tgt, mask=row_mask)


@cost_name("linear_logprobs.bwd")
@triton.jit
def _slab_grad_kernel(z_ptr, stride_zr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, db_ptr,
                      R, S, v0, inv_temp, cap,
                      HAS_GENT: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """One vocabulary slab of the backward: z [R, S] (workspace) -> d loss / d z_raw in place; targets
    [R] int64; lse, g_logp [R] fp32; entropy, g_ent [R] fp32 (HAS_GENT); db [S] fp32 += column sums (HAS_BIAS);
    ``cap`` is read only with SOFTCAP."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1) - v0
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_logp = tl.load(glogp_ptr + rows, mask=row_mask, other=0.0)
    if HAS_GENT:
        mean_z = lse - tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
    for c0 in range(0, S, BLOCK_S):
        cols = c0 + tl.arange(0, BLOCK_S)
        col_mask = cols < S
        mask = row_mask[:, None] & col_mask[None, :]
        ptrs = z_ptr + rows[:, None] * stride_zr + cols[None, :]
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            z, slope = soft_cap(z, cap)
        z = z * inv_temp
        p = tl.exp(z - lse[:, None])
        onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
        dz = g_logp[:, None] * (onehot - p)
        if HAS_GENT:  # E[z] - z is +inf at a logit of -inf (p = 0 there): clamped, so the term is 0, not NaN
            dz += g_ent[:, None] * p * tl.minimum(mean_z[:, None] - z, -_M_INIT)
        dz = dz * inv_temp
        if SOFTCAP:
            dz = dz * slope
        dz = tl.where(mask, dz, 0.0)
        tl.store(ptrs, round_to(dz, z_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)
