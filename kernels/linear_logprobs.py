"""Triton epilogue kernels of the fused lm_head + log-softmax + gather (+ entropy).

The launcher (``linear_logprobs_launch``) walks row blocks x vocabulary slabs. For each it
writes the block's logits ``z_raw = x[rows] @ w[cols].T (+ b[cols])`` into a bounded workspace
``[R, S]`` (input dtype) with a cuBLAS GEMM, then runs one of these kernels over the workspace.
Both are row-block x vocabulary-slab building blocks: they see a workspace, the slab's first
vocabulary column ``v0`` and per-row vectors already offset to the block's first row.

``_slab_stats_kernel`` (forward) keeps, per row, an online log-sum-exp over the slabs in fp32,

    m = running max of z,   s = sum exp(z - m),   t = sum exp(z - m) * (z - m),   z_tgt,

in a ``[4, R]`` fp32 state between slabs, and at the last slab writes ``logp = z_tgt - lse``,
``lse = m + log s`` and ``entropy = log s - t / s``. The logits are

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

from .common import online_softmax_step, round_to, soft_cap, store_row_stats
from .registry import cost_name

# Below any logit a model produces, yet finite: keeps `(m_old - m_new) * s` free of inf * 0.
_M_INIT = tl.constexpr(-1.0e30)


@cost_name("linear_logprobs.fwd")
@triton.jit
def _slab_stats_kernel(z_ptr, stride_zr, tgt_ptr, state_ptr, logp_ptr, lse_ptr, ent_ptr,
                       R, S, v0, inv_temp, cap,
                       IS_FIRST: tl.constexpr, IS_LAST: tl.constexpr, SOFTCAP: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """One vocabulary slab of the forward: z [R, S] (workspace), targets [R] int64, state [4, R] fp32
    (m, s, t, z_tgt; read unless IS_FIRST, written unless IS_LAST), logp/lse/entropy [R] fp32 (IS_LAST);
    ``cap`` is read only with SOFTCAP."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1) - v0  # target's column within this slab
    if IS_FIRST:
        m = tl.full((BLOCK_R,), _M_INIT, dtype=tl.float32)
        s = tl.zeros((BLOCK_R,), dtype=tl.float32)
        t = tl.zeros((BLOCK_R,), dtype=tl.float32)
        z_tgt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    else:
        m = tl.load(state_ptr + rows, mask=row_mask, other=0.0)
        s = tl.load(state_ptr + R + rows, mask=row_mask, other=0.0)
        t = tl.load(state_ptr + 2 * R + rows, mask=row_mask, other=0.0)
        z_tgt = tl.load(state_ptr + 3 * R + rows, mask=row_mask, other=0.0)
    for c0 in range(0, S, BLOCK_S):
        cols = c0 + tl.arange(0, BLOCK_S)
        col_mask = cols < S
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_zr + cols[None, :], mask=mask, other=float("-inf"))
        z = z.to(tl.float32)
        if SOFTCAP:
            z, _ = soft_cap(z, cap)
            z = tl.where(mask, z, float("-inf"))
        z = z * inv_temp
        m, s, t = online_softmax_step(m, s, t, z, mask)
        z_tgt += tl.sum(tl.where(mask & (cols[None, :] == tgt[:, None]), z, 0.0), axis=1)
    if IS_LAST:
        store_row_stats(logp_ptr, lse_ptr, ent_ptr, rows, row_mask, m, s, t, z_tgt)
    else:
        tl.store(state_ptr + rows, m, mask=row_mask)
        tl.store(state_ptr + R + rows, s, mask=row_mask)
        tl.store(state_ptr + 2 * R + rows, t, mask=row_mask)
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
        if HAS_GENT:
            dz += g_ent[:, None] * p * (mean_z[:, None] - z)
        dz = dz * inv_temp
        if SOFTCAP:
            dz = dz * slope
        dz = tl.where(mask, dz, 0.0)
        tl.store(ptrs, round_to(dz, z_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)
