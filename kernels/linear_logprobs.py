"""Triton kernels for fused lm_head + log-softmax + gather (+ entropy).

Layout: ``x [N, H]`` (only rows that carry a target: the launcher compacts ignored rows
away, so they cost nothing), ``w [V, H]`` row-major, ``targets [N]`` int64.

Forward walks vocabulary tiles with an online log-sum-exp in fp32; per row it keeps

    m = running max of z,   s = sum exp(z - m),   t = sum exp(z - m) * (z - m)

so that ``lse = m + log s`` and ``entropy = log s - t / s`` (z = logits / temperature).
It saves ``lse`` and ``entropy`` per row; backward recomputes each logits tile from them:

    p = exp(z - lse),   dz = g_logp * (onehot(target) - p) + g_ent * p * (E[z] - z),
    E[z] = lse - entropy,   d logits = dz / temperature.

Backward is two kernels so that every output tile has one owner (no atomics, deterministic):
``_dx_kernel`` runs over row tiles and accumulates dX, ``_dw_kernel`` runs over vocabulary
tiles and accumulates dW (and dbias), both in fp32 and tile by tile; no [N, V] buffer exists.
"""
import triton
import triton.language as tl

from .registry import cost_name

# Below any logit a model produces, yet finite: keeps `(m_old - m_new) * s` free of inf * 0.
_M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_xn, stride_wv, inv_temp,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z = (x[rows] @ w[cols].T + b[cols]) * inv_temp, fp32 [BLOCK_N, BLOCK_V]; masked columns = -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        x = tl.load(x_ptr + rows[:, None] * stride_xn + hs[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + hs[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temp
    return tl.where(col_mask[None, :], z, float("-inf"))


@triton.jit
def _grad_logits_tile(z, cols, col_mask, row_mask, tgt, lse, ent, g_logp, g_ent, inv_temp, HAS_GENT: tl.constexpr):
    """d loss / d logits for one tile, fp32 [BLOCK_N, BLOCK_V]; zero outside valid rows/columns."""
    p = tl.exp(z - lse[:, None])
    p = tl.where(col_mask[None, :], p, 0.0)
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dz = g_logp[:, None] * (onehot - p)
    if HAS_GENT:
        mean_z = lse - ent
        z_finite = tl.where(col_mask[None, :], z, 0.0)  # p is 0 there; avoids 0 * inf
        dz += g_ent[:, None] * p * (mean_z[:, None] - z_finite)
    dz = dz * inv_temp
    return tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)


@cost_name("linear_logprobs.fwd")
@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr,
                N, V, H, stride_xn, stride_wv, inv_temp,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0)
    m = tl.full((BLOCK_N,), _M_INIT, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_xn, stride_wv, inv_temp,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        zc = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
        t = alpha * (t + (m - m_new) * s) + tl.sum(p * zc, axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(logp_ptr + rows, tl.minimum(z_tgt - lse, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(ent_ptr + rows, tl.maximum(log_s - t / s, 0.0), mask=row_mask)


@cost_name("linear_logprobs.dx")
@triton.jit
def _dx_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dx_ptr,
               N, V, H, stride_xn, stride_wv, stride_dxn, inv_temp,
               HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    g_logp = tl.load(glogp_ptr + rows, mask=row_mask, other=0.0)
    if HAS_GENT:
        g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
    else:
        g_ent = g_logp
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_xn, stride_wv, inv_temp,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        dz = _grad_logits_tile(z, cols, col_mask, row_mask, tgt, lse, ent, g_logp, g_ent, inv_temp, HAS_GENT)
        if UPCAST:
            dz_op = dz
        else:
            dz_op = dz.to(x_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            w = tl.load(w_ptr + cols[:, None] * stride_wv + hs[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dx_ptrs = dx_ptr + rows[:, None] * stride_dxn + hs[None, :]
            io_mask = row_mask[:, None] & h_mask[None, :]
            acc = tl.load(dx_ptrs, mask=io_mask, other=0.0)
            acc = tl.dot(dz_op, w, acc, input_precision=DOT_PRECISION)
            tl.store(dx_ptrs, acc, mask=io_mask)


@cost_name("linear_logprobs.dw")
@triton.jit
def _dw_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dw_ptr, db_ptr,
               N, V, H, stride_xn, stride_wv, stride_dwv, inv_temp,
               HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_logp = tl.load(glogp_ptr + rows, mask=row_mask, other=0.0)
        if HAS_GENT:
            g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        else:
            g_ent = g_logp
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_xn, stride_wv, inv_temp,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        dz = _grad_logits_tile(z, cols, col_mask, row_mask, tgt, lse, ent, g_logp, g_ent, inv_temp, HAS_GENT)
        if HAS_BIAS:
            db += tl.sum(dz, axis=0)
        if UPCAST:
            dz_t = tl.trans(dz)
        else:
            dz_t = tl.trans(dz.to(x_ptr.dtype.element_ty))
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            x = tl.load(x_ptr + rows[:, None] * stride_xn + hs[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            dw_ptrs = dw_ptr + cols[:, None] * stride_dwv + hs[None, :]
            io_mask = col_mask[:, None] & h_mask[None, :]
            acc = tl.load(dw_ptrs, mask=io_mask, other=0.0)
            acc = tl.dot(dz_t, x, acc, input_precision=DOT_PRECISION)
            tl.store(dw_ptrs, acc, mask=io_mask)
    if HAS_BIAS:
        tl.store(db_ptr + cols, db, mask=col_mask)
