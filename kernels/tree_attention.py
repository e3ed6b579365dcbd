"""Triton kernels for tree attention over a DFS-packed token trie.

Key ``k`` is visible to query ``q`` iff ``k <= q < subtree_end[k]`` (SPEC section 2).
The launcher lists, per query tile, the key tiles holding at least one visible pair (and, per key
tile, the query tiles), so no kernel touches a fully masked tile:

- ``_fwd_kernel``: one program per (query tile, batch, block of HEADS query heads that share one
  key/value head): the heads' rows are stacked into one ``[HEADS * BLOCK_M, D]`` operand, so every
  key/value tile loaded serves all of them (the launcher stacks 1: 2 spill at head dim 128); online softmax
  in base 2; writes ``o`` and the row log-sum-exp ``lse`` (base 2, fp32) for backward.
- ``_delta_kernel``: ``delta = rowsum(do * o)`` in fp32, one pass over ``o`` and ``do``.
- ``_dq_kernel``: per query tile (same stacking; its own tiles and tile list), walks its key tiles:
  ``dq = scale * sum ds @ k``.
- ``_dkdv_kernel``: per (key tile, batch, key/value head), walks the query tiles of every query head of
  its group, in transposed tiles ``[keys, queries]`` (``s^T = k @ q^T``, ``dp^T = v @ do^T``: k and v are
  left operands, so each warp holds only its own key rows, and ``p^T``, ``ds^T`` are already the left
  operands of ``dv = sum p^T @ do``, ``dk = scale * sum ds^T @ q``). With ``ATOMIC_DQ`` it also adds
  ``scale * (k^T @ ds^T)^T`` into an fp32 dq buffer with atomics (5 matmuls per visible tile pair instead of
  the split's 4 + 3, in a summation order that varies run to run); ``_cast_kernel`` then writes dq.

with ``p = exp2(s * log2e - lse)``, ``ds = p * (do @ v^T - delta)``. Without ``ATOMIC_DQ`` nothing uses
atomics and every result is deterministic.

Two compile-time options, off by default so that path is unchanged:

- ``WINDOW`` (sliding window): the pair (q, k) also needs ``depth[q] - depth[k] < window``, with ``depth``
  the position ids ``[B, L]`` int32 (trie depths) at ``depth_ptr`` and ``window`` a runtime int (one
  compiled kernel serves every window). The launcher's tile lists already drop tiles wholly outside it.
- ``SOFTCAP`` (logit softcap): the score ``x = scale * q.k`` becomes ``softcap * tanh(x / softcap)``;
  the backward multiplies ``ds`` by ``1 - tanh^2``, recomputing tanh from the raw score.
"""
import triton
import triton.language as tl

from .common import round_to
from .registry import cost_name

_LOG2E = tl.constexpr(1.4426950408889634)
_M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _query_rows(pid_m, h0, BLOCK_M: tl.constexpr, HEADS: tl.constexpr):
    """Rows of a stacked query block: (position [HEADS*BLOCK_M], head [HEADS*BLOCK_M]); row r is head
    ``h0 + r // BLOCK_M`` at position ``pid_m * BLOCK_M + r % BLOCK_M``."""
    r = tl.arange(0, HEADS * BLOCK_M)
    return pid_m * BLOCK_M + r % BLOCK_M, h0 + r // BLOCK_M


@triton.jit
def _tile_mask(row_mask, d_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mask of a [rows, BLOCK_D] tile: the rows' mask, and the head-dim mask ``d_mask`` [BLOCK_D] unless
    BLOCK_D == HEAD_DIM (then [rows, 1], broadcast by the load or store: an all-true column mask costs registers)."""
    if HEAD_DIM == BLOCK_D:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & d_mask[None, :]
    return mask


@triton.jit
def _load_rows(ptrs, row_mask, d_mask, UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A [rows, BLOCK_D] tile, zero outside the rows and the head dimension (fp32 when UPCAST)."""
    x = tl.load(ptrs, mask=_tile_mask(row_mask, d_mask, HEAD_DIM, BLOCK_D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _depths(depth_ptr, offs, mask, WINDOW: tl.constexpr):
    """Position ids (trie depths) at packed indices ``offs`` when WINDOW; else ``offs`` itself, unused."""
    if WINDOW:
        depth = tl.load(depth_ptr + offs, mask=mask, other=0)
    else:
        depth = offs
    return depth


@triton.jit
def _visible(pos_m, offs_n, end, L, depth_m, depth_n, window, WINDOW: tl.constexpr):
    """[rows, BLOCK_N] bool: key n visible to the query at position m (both inside the sequence; with WINDOW,
    their depths less than ``window`` apart)."""
    vis = (offs_n[None, :] <= pos_m[:, None]) & (pos_m[:, None] < end[None, :]) & (pos_m[:, None] < L)
    if WINDOW:
        vis = vis & (depth_m[:, None] - depth_n[None, :] < window)
    return vis


@triton.jit
def _visible_t(pos_m, offs_n, end, L, depth_m, depth_n, window, WINDOW: tl.constexpr):
    """``_visible`` transposed: [BLOCK_N, rows] bool, key n (row) visible to the query at position m (column)."""
    vis = (offs_n[:, None] <= pos_m[None, :]) & (pos_m[None, :] < end[:, None]) & (pos_m[None, :] < L)
    if WINDOW:
        vis = vis & (depth_m[None, :] - depth_n[:, None] < window)
    return vis


@triton.jit
def _tanh(x):
    """tanh of fp32 ``x`` as 1 - 2 / (e^2x + 1): exactly +-1 where e^2x overflows or vanishes."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * _LOG2E)) + 1.0)


@triton.jit
def _scores(q, k, scale, softcap, SOFTCAP: tl.constexpr):
    """(s, t) of a left tile [rows, D] and a right tile [cols, D] (queries and keys, or keys and queries for the
    transposed scores): the scores [rows, cols] in base 2, ``log2e * scale * q.k``
    or with SOFTCAP ``log2e * softcap * t``, where ``t = tanh(scale * q.k / softcap)`` (the backward's chain
    rule needs it; without SOFTCAP t is the raw product and unused)."""
    t = tl.dot(q, tl.trans(k))
    if SOFTCAP:
        t = _tanh(t * (scale / softcap))
        s = t * (softcap * _LOG2E)
    else:
        s = t * (scale * _LOG2E)
    return s, t


@cost_name("tree_attention.fwd")
@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, end_ptr, cnt_ptr, idx_ptr, o_ptr, lse_ptr,
                sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                L, HQ, GROUP, N_QT, N_KT, scale, depth_ptr, window, softcap,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HEADS: tl.constexpr, UPCAST: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // (HQ // HEADS)
    h0 = (pid_bh % (HQ // HEADS)) * HEADS
    hk = h0 // GROUP
    pos, head = _query_rows(pid_m, h0, BLOCK_M, HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = pos < L
    q = _load_rows(q_ptr + b * sqb + head[:, None] * sqh + pos[:, None] * sql + offs_d[None, :], m_mask, d_mask,
                   UPCAST, HEAD_DIM, BLOCK_D)
    depth_m = _depths(depth_ptr + b * L, pos, m_mask, WINDOW)
    m_i = tl.full((HEADS * BLOCK_M,), _M_INIT, dtype=tl.float32)
    l_i = tl.zeros((HEADS * BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((HEADS * BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    list_off = (b * N_QT + pid_m) * N_KT
    n_visible = tl.load(cnt_ptr + b * N_QT + pid_m)
    for t in range(n_visible):
        j = tl.load(idx_ptr + list_off + t)
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        k = _load_rows(k_base + offs_n[:, None] * skl + offs_d[None, :], n_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base + offs_n[:, None] * svl + offs_d[None, :], n_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
        end = tl.load(end_ptr + b * L + offs_n, mask=n_mask, other=0)
        depth_n = _depths(depth_ptr + b * L, offs_n, n_mask, WINDOW)
        s, _ = _scores(q, k, scale, softcap, SOFTCAP)
        s = tl.where(_visible(pos, offs_n, end, L, depth_m, depth_n, window, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tl.store(o_ptr + b * sob + head[:, None] * soh + pos[:, None] * sol + offs_d[None, :],
             round_to(acc, o_ptr.dtype.element_ty), mask=_tile_mask(m_mask, d_mask, HEAD_DIM, BLOCK_D))
    tl.store(lse_ptr + (b * HQ + head) * L + pos, m_i + tl.log2(l_safe), mask=m_mask)


@cost_name("tree_attention.delta")
@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, ROWS,
                  HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[r] = sum_d o[r, d] * do[r, d] in fp32; o, do contiguous [ROWS, HEAD_DIM]."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_mask = offs_r < ROWS
    d_mask = offs_d < HEAD_DIM
    ptrs = offs_r[:, None] * HEAD_DIM + offs_d[None, :]
    o = _load_rows(o_ptr + ptrs, r_mask, d_mask, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(do_ptr + ptrs, r_mask, d_mask, True, HEAD_DIM, BLOCK_D)
    tl.store(delta_ptr + offs_r, tl.sum(o * do, axis=1), mask=r_mask)


@cost_name("tree_attention.dq")
@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, end_ptr, cnt_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
               sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
               L, HQ, GROUP, N_QT, N_KT, scale, depth_ptr, window, softcap,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               HEADS: tl.constexpr, UPCAST: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // (HQ // HEADS)
    h0 = (pid_bh % (HQ // HEADS)) * HEADS
    hk = h0 // GROUP
    pos, head = _query_rows(pid_m, h0, BLOCK_M, HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = pos < L
    # q, do and dq share q's strides (the launcher makes do and dq contiguous like q)
    q_off = b * sqb + head[:, None] * sqh + pos[:, None] * sql + offs_d[None, :]
    q = _load_rows(q_ptr + q_off, m_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
    do = _load_rows(do_ptr + q_off, m_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
    lse = tl.load(lse_ptr + (b * HQ + head) * L + pos, mask=m_mask, other=0.0)
    delta = tl.load(delta_ptr + (b * HQ + head) * L + pos, mask=m_mask, other=0.0)
    depth_m = _depths(depth_ptr + b * L, pos, m_mask, WINDOW)
    dq = tl.zeros((HEADS * BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    list_off = (b * N_QT + pid_m) * N_KT
    n_visible = tl.load(cnt_ptr + b * N_QT + pid_m)
    for t in range(n_visible):
        j = tl.load(idx_ptr + list_off + t)
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        k = _load_rows(k_base + offs_n[:, None] * skl + offs_d[None, :], n_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base + offs_n[:, None] * svl + offs_d[None, :], n_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
        end = tl.load(end_ptr + b * L + offs_n, mask=n_mask, other=0)
        depth_n = _depths(depth_ptr + b * L, offs_n, n_mask, WINDOW)
        s, t = _scores(q, k, scale, softcap, SOFTCAP)
        p = tl.where(_visible(pos, offs_n, end, L, depth_m, depth_n, window, WINDOW), tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(dq_ptr + q_off, round_to(dq * scale, dq_ptr.dtype.element_ty),
             mask=_tile_mask(m_mask, d_mask, HEAD_DIM, BLOCK_D))


@cost_name("tree_attention.dkdv")
@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, end_ptr, cnt_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
                 sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
                 L, HQ, HKV, GROUP, N_KT, N_QT, scale, depth_ptr, window, softcap,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, ATOMIC_DQ: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < L
    k_off = b * skb + hk * skh + offs_n[:, None] * skl + offs_d[None, :]
    v_off = b * svb + hk * svh + offs_n[:, None] * svl + offs_d[None, :]
    k = _load_rows(k_ptr + k_off, n_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
    v = _load_rows(v_ptr + v_off, n_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
    end = tl.load(end_ptr + b * L + offs_n, mask=n_mask, other=0)
    depth_n = _depths(depth_ptr + b * L, offs_n, n_mask, WINDOW)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    list_off = (b * N_KT + pid_n) * N_QT
    n_visible = tl.load(cnt_ptr + b * N_KT + pid_n)
    for g in range(GROUP):
        h = hk * GROUP + g
        for t in range(n_visible):
            i = tl.load(idx_ptr + list_off + t)
            pos, _ = _query_rows(i, h, BLOCK_M, 1)
            m_mask = pos < L
            q_off = b * sqb + h * sqh + pos[:, None] * sql + offs_d[None, :]
            q = _load_rows(q_ptr + q_off, m_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
            do = _load_rows(do_ptr + q_off, m_mask, d_mask, UPCAST, HEAD_DIM, BLOCK_D)
            lse = tl.load(lse_ptr + (b * HQ + h) * L + pos, mask=m_mask, other=0.0)
            delta = tl.load(delta_ptr + (b * HQ + h) * L + pos, mask=m_mask, other=0.0)
            depth_m = _depths(depth_ptr + b * L, pos, m_mask, WINDOW)
            # transposed tiles [keys, queries]: k and v are the left operands (each warp holds only its own key
            # rows), and p^T, ds^T come out in the layout the dk / dv products take
            s_t, t_t = _scores(k, q, scale, softcap, SOFTCAP)
            vis_t = _visible_t(pos, offs_n, end, L, depth_m, depth_n, window, WINDOW)
            p_t = tl.where(vis_t, tl.exp2(s_t - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk = tl.dot(ds_t.to(q.dtype), q, dk)
            if ATOMIC_DQ:  # dq_ptr: fp32 [B, Hq, L, D] with q's strides
                dq_t = tl.dot(tl.trans(k), ds_t.to(k.dtype))  # [BLOCK_D, BLOCK_M]: fewer registers than ds @ k
                tl.atomic_add(dq_ptr + tl.trans(q_off), dq_t * scale,
                              mask=tl.trans(_tile_mask(m_mask, d_mask, HEAD_DIM, BLOCK_D)))
    kv_mask = _tile_mask(n_mask, d_mask, HEAD_DIM, BLOCK_D)
    tl.store(dk_ptr + k_off, round_to(dk * scale, dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + v_off, round_to(dv, dv_ptr.dtype.element_ty), mask=kv_mask)


@cost_name("tree_attention.cast")
@triton.jit
def _cast_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """dst[i] = src[i] in dst's dtype (the atomic mode's fp32 dq to the gradient's dtype)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, round_to(tl.load(src_ptr + offs, mask=mask), dst_ptr.dtype.element_ty), mask=mask)
