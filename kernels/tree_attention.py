"""Triton kernels for tree attention over a DFS-packed token trie.

Key ``k`` is visible to query ``q`` iff ``k <= q < subtree_end[k]`` (SPEC section 2).
The launcher lists, per query tile, the key tiles holding at least one visible pair (and the
transpose, per key tile, the query tiles), so no kernel touches a fully masked tile:

- ``_fwd_kernel``: one program per (query tile, batch*q-head); online softmax in base 2;
  writes ``o`` and the row log-sum-exp ``lse`` (base 2, fp32) for backward.
- ``_dq_kernel``: per query tile, walks the same key tiles, ``dq = scale * sum ds @ k``.
- ``_dkdv_kernel``: per (key tile, batch*kv-head), walks the query tiles of every q-head of its
  GQA group; ``dv = sum p^T @ do``, ``dk = scale * sum ds^T @ q``. No atomics anywhere.

with ``p = exp2(s * log2e - lse)``, ``ds = p * (do @ v^T - delta)``, ``delta = rowsum(do * o)``.
"""
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _visible(offs_m, offs_n, end, L):
    """[BLOCK_M, BLOCK_N] bool: key n visible to query m (both inside the sequence)."""
    return (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < end[None, :]) & (offs_m[:, None] < L)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, end_ptr, cnt_ptr, idx_ptr, o_ptr, lse_ptr,
                sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                L, HQ, GROUP, N_TILES, scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                mask=(offs_m[:, None] < L) & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * _LOG2E
    m_i = tl.full((BLOCK_M,), _M_INIT, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    list_off = (b * N_TILES + pid_m) * N_TILES
    n_visible = tl.load(cnt_ptr + b * N_TILES + pid_m)
    for t in range(n_visible):
        j = tl.load(idx_ptr + list_off + t)
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * skl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svl + offs_d[None, :], mask=kv_mask, other=0.0)
        end = tl.load(end_ptr + b * L + offs_n, mask=n_mask, other=0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(_visible(offs_m, offs_n, end, L), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    m_mask = offs_m < L
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + pid_bh * L + offs_m, m_i + tl.log2(l_safe), mask=m_mask)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, end_ptr, cnt_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
               sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
               L, HQ, GROUP, N_TILES, scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < L
    qd_mask = m_mask[:, None] & d_mask[None, :]
    # q and do share q's strides (the launcher makes do contiguous like q's copy)
    q_off = b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + q_off, mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + pid_bh * L + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(delta_ptr + pid_bh * L + offs_m, mask=m_mask, other=0.0)
    qk_scale = scale * _LOG2E
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    list_off = (b * N_TILES + pid_m) * N_TILES
    n_visible = tl.load(cnt_ptr + b * N_TILES + pid_m)
    for t in range(n_visible):
        j = tl.load(idx_ptr + list_off + t)
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * skl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svl + offs_d[None, :], mask=kv_mask, other=0.0)
        end = tl.load(end_ptr + b * L + offs_n, mask=n_mask, other=0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(_visible(offs_m, offs_n, end, L), tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, end_ptr, cnt_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                 sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
                 L, HQ, HKV, GROUP, N_TILES, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < L
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * skl + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svl + offs_d[None, :], mask=kv_mask, other=0.0)
    end = tl.load(end_ptr + b * L + offs_n, mask=n_mask, other=0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = scale * _LOG2E
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    list_off = (b * N_TILES + pid_n) * N_TILES
    n_visible = tl.load(cnt_ptr + b * N_TILES + pid_n)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * HQ + h
        for t in range(n_visible):
            i = tl.load(idx_ptr + list_off + t)
            offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = offs_m < L
            q_off = b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :]
            qd_mask = m_mask[:, None] & d_mask[None, :]
            q = tl.load(q_ptr + q_off, mask=qd_mask, other=0.0)
            do = tl.load(do_ptr + q_off, mask=qd_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(lse_ptr + bh * L + offs_m, mask=m_mask, other=0.0)
            delta = tl.load(delta_ptr + bh * L + offs_m, mask=m_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.where(_visible(offs_m, offs_n, end, L), tl.exp2(s - lse[:, None]), 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)
    tl.store(dk_ptr + b * skb + hk * skh + offs_n[:, None] * skl + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b * svb + hk * svh + offs_n[:, None] * svl + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
