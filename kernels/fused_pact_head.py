"""Triton epilogue kernels of the PACT loss fused into the lm_head (``pact_fast.ops.fused_pact_head``).

The launcher (``fused_pact_head_launch``) walks blocks of ``R`` rows. For each, a cuBLAS GEMM writes the
block's logits over the WHOLE vocabulary, ``z_raw = x[rows] @ w.T (+ b)``, into a workspace ``[R, V]`` in
the input dtype; then ``_head_pass_kernel`` reads it once.

``_head_pass_kernel`` keeps, per row, the online log-sum-exp of ``z = z_raw * inv_temp`` in fp32
(running max m, s = sum exp(z - m), with ``ENTROPY`` t = sum exp(z - m) (z - m)) and the target logit z_tgt,
and writes ``logp``, ``lse`` (and ``entropy``); with ``SOFTCAP`` the logits are ``z = cap * tanh(z_raw / cap) *
inv_temp`` (as in ``kernels/linear_logprobs.py``; ``inv_temp`` carries a model's logit scale). With ``WRITE_U`` it also
overwrites the workspace, in the same pass, with

    U[r, v] = exp(z[r, v] - c_r)  (v != target),    U[r, target] = -sum_{v != target} exp(z[r, v] - c_r),

for a per-row shift ``c_r`` fixed BEFORE the pass: ``c_r = z[r, target]`` (one element read first). Then
the gradient of the logits, whatever the upstream gradient ``g_r`` of the row's log-prob (known only
after the pass: it comes from the PACT loss of the whole batch), is a row scaling of U:

    d loss / d z_raw[r, :] = g_r (onehot(target) - softmax(z)) * inv_temp = beta_r U[r, :],
    beta_r = -g_r * inv_temp / s_r,   s_r = sum_v exp(z[r, v] - c_r)   (written to ``s``),

so dX = diag(beta) (U @ w) and dW = U.T @ (diag(beta) x) are cuBLAS GEMMs on U and the workspace is read
and written once (4 bytes per logit in bf16) instead of read for the statistics and read and written
again for the gradient (6). ``U[r, target]`` is accumulated in fp32 without cancellation, as the
ordinary gradient's ``1 - p_target`` would be.

The shift keeps every ``U`` below ``exp(limit)`` while the row's max logit is at most ``limit`` above its
target logit (``-logp_target`` bounds that gap). A row whose gap exceeds ``limit`` (a target the model
finds less likely than about exp(-limit)) is re-shifted by its max in a second loop over that row only,
reading back what the first loop stored: ``U`` (from which ``z = c + log U``) before the tile where the row
went over the limit, the raw logits from there on; its target column and ``s`` are written after that loop,
from the sum of what it wrote. Such rows cost one more read and write of their logits; rows within the limit
none. The first loop does one row reduction per tile (the running max that detects the limit) and keeps
the row sum per lane, reduced once after the loop (``_u_pass``).

Every fp32 -> bf16 store goes through ``round_to`` (kernels/common.py) (round to nearest even, as ``cvt.rn`` on a GPU; the
interpreter's own cast truncates, which biased U and the row scaling alike and made the interpreted bf16
gradients ~2.4x less accurate than the GPU's). In bf16 the shift path's dX and dW then carry about 1.05-1.2x the
error of d logits formed in fp32 and rounded once (up to 1.5x on the tests' tiny V=37 problems, where the
ratio is noisy): its extra roundings are dX's after the row scaling and ``xs = beta x``'s, and, where dX's
GEMM is split over the vocabulary, each partial product's before their fp32 sum (within 1.5x of the unsplit
error in the tests).

``_scale_rows_kernel`` sums the partial products of dX's GEMM (split over the vocabulary when one block's
``[R, H]`` output is too few tiles to fill the GPU: ``fused_pact_head_launch.dx_splits``) and applies
``beta``: ``dx[r, :] = beta_r * (U @ w)[r, :]``, ``xs[r, :] = beta_r x[r, :]`` (the dW GEMM's right operand;
skipped with ``WRITE_XS`` off, for a frozen lm_head) and ``beta`` itself in the input dtype (for the bias
gradient's GEMM). The entropy bonus (its gradient ``p (E[z] - z)`` is not a row scaling of one matrix), fp16
(whose range cannot hold ``U``) and a soft cap run the pass without ``WRITE_U``, then the ordinary gradient
kernel of ``linear_logprobs`` (read and write of the logits). With a soft cap d loss / d z_raw is the row
scaling of ``U * (1 - tanh^2)``, but a re-shifted row recovers its logits from the stored values as
``c + log U``, which that product does not allow; so ``SOFTCAP`` and ``WRITE_U`` never meet.
"""
import triton
import triton.language as tl

from .common import (entropy_terms, exp2_approx, nonpositive, online_lse_step, online_softmax_step, round_to,
                     soft_cap, store_row_stats)
from .registry import cost_name

# Below any logit a model produces, yet finite: keeps `(m_old - m_new) * s` free of inf * 0.
_M_INIT = tl.constexpr(-1.0e30)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
@cost_name("fused_pact_head.pass")
@triton.jit
def _head_pass_kernel(z_ptr, stride_zr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, s_ptr,
                      R, V, inv_temp, limit, cap,
                      WRITE_U: tl.constexpr, SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """One row block over the whole vocabulary: z [R, V] (workspace, raw logits; with WRITE_U overwritten
    by U), targets [R] int64 in [0, V); writes logp, lse [R] fp32, with ENTROPY entropy [R] fp32 (its running
    sum t is not kept otherwise) and, with WRITE_U, s [R] fp32 (the row sum of exp(z - shift) that U is relative
    to). ``cap`` is read only with SOFTCAP (never with WRITE_U)."""
    tl.static_assert(not (WRITE_U and SOFTCAP), "the U pass takes no soft cap")
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=0)
    row_ptr = z_ptr + rows.to(tl.int64) * stride_zr
    if WRITE_U:
        _u_pass(row_ptr, tgt, logp_ptr, lse_ptr, s_ptr, rows, row_mask, V, inv_temp, limit, BLOCK_R, BLOCK_V)
    else:
        _stats_pass(row_ptr, tgt, logp_ptr, lse_ptr, ent_ptr, rows, row_mask, V, inv_temp, cap, SOFTCAP, ENTROPY,
                    BLOCK_R, BLOCK_V)


@triton.jit
def _stats_pass(row_ptr, tgt, logp_ptr, lse_ptr, ent_ptr, rows, row_mask, V, inv_temp, cap, SOFTCAP: tl.constexpr,
                ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """The pass without U: the online log-sum-exp (and entropy) of each row; its target logit is one load."""
    m = tl.full((BLOCK_R,), _M_INIT, dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    z_tgt = tl.load(row_ptr + tgt, mask=row_mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        z_tgt, _dz_tgt = soft_cap(z_tgt, cap)  # not named `_`: the loop below rebinds `_` to a tile
    z_tgt = z_tgt * inv_temp
    for c0 in range(0, V, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < V)[None, :]
        z = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            z, _ = soft_cap(z, cap)
            z = tl.where(mask, z, float("-inf"))
        z = z * inv_temp
        if ENTROPY:
            m, s, t = online_softmax_step(m, s, t, z, mask)
        else:
            m, s = online_lse_step(m, s, z)
    if ENTROPY and not SOFTCAP:  # (a soft cap leaves no logit at -inf)
        # a logit of -inf (a -inf bias) made t NaN with s finite: t again, its terms 0 there (rare, out of the loop)
        redo = row_mask & (t != t) & (s == s)
        if tl.sum(redo.to(tl.int32), axis=0) > 0:
            t_again = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for c0 in range(0, V, BLOCK_V):
                cols = c0 + tl.arange(0, BLOCK_V)
                mask = row_mask[:, None] & (cols < V)[None, :]
                z = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
                t_again += entropy_terms(z * inv_temp, m)
            t = tl.where(redo, t_again, t)
    store_row_stats(logp_ptr, lse_ptr, ent_ptr, rows, row_mask, m, s, t, z_tgt, ENTROPY)


@triton.jit
def _u_pass(row_ptr, tgt, logp_ptr, lse_ptr, s_ptr, rows, row_mask, V, inv_temp, limit, BLOCK_R: tl.constexpr,
            BLOCK_V: tl.constexpr):
    """The pass with U, in base 2: x = (z_raw - c_raw) inv_temp log2(e) per logit, c_raw the row's raw target
    logit (the difference first: exact where the two are close, whatever their size; folding c into one FMA
    left every U with an error of |c| 2^-24 against the target's term). One row reduction per tile (the running
    max ``gap`` of x); the sum over the other columns stays per lane in ``acc`` and is reduced once, after the
    loop. Its terms are 2^(x - ref), ref = max(gap - limit2, 0): 0 while the row is within the limit (then
    they are U itself), past it the row's max less the limit, so no term exceeds 2^limit2 whatever the logits;
    ``acc`` is rescaled when ref moves. The one exponential per logit gives both U and the sum. A target
    logit of -inf (a token the model cannot emit, e.g. under a -inf bias) is measured against 0 instead, its
    own term 0: logp -inf, and the row is finite (re-shifted when its logits go past the limit)."""
    c_raw = tl.load(row_ptr + tgt, mask=row_mask, other=0.0).to(tl.float32)
    c_ref = tl.where(c_raw > float("-inf"), c_raw, 0.0)
    c = c_ref * inv_temp  # natural units: U = exp(z - c); the target's own logit is c_raw * inv_temp
    k = inv_temp * _LOG2E
    limit2 = limit * _LOG2E
    gap = tl.full((BLOCK_R,), _M_INIT, dtype=tl.float32)
    ref = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    switch = tl.full((BLOCK_R,), V, dtype=tl.int32)  # first column stored raw for a row past the limit
    tgt32 = tgt.to(tl.int32)  # V < 2^31: one 32-bit compare per logit, against a constant of the lane
    lanes = tl.arange(0, BLOCK_V)
    for c0 in range(0, V, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < V)[None, :]
        ptrs = row_ptr[:, None] + cols[None, :]
        z_raw = tl.load(ptrs, mask=mask, other=float("-inf"))
        z = z_raw.to(tl.float32)
        x = (z - c_ref[:, None]) * k
        gap = tl.maximum(gap, tl.max(x, axis=1))
        ref_new = tl.maximum(gap - limit2, 0.0)
        bad = ref_new > 0.0  # monotone along the row: once past the limit, raw logits are stored
        switch = tl.where(bad & (switch == V), c0, switch)
        u = exp2_approx(x - ref_new[:, None])
        alpha = tl.where(ref_new == ref, 1.0, exp2_approx(ref - ref_new))  # exactly 1 while ref stays put
        acc = acc * alpha[:, None] + tl.where(lanes[None, :] == (tgt32 - c0)[:, None], 0.0, u)
        ref = ref_new
        # a raw logit goes back unchanged: bf16 / fp32 -> fp32 -> the same dtype is exact
        tl.store(ptrs, round_to(tl.where(bad[:, None], z, u), z_raw.dtype), mask=mask)
    s_other = tl.sum(acc, axis=1)  # sum over v != target of 2^(x - ref)
    shift = ref * _LN2  # natural units: the sums are relative to c + shift
    s = s_other + exp2_approx((c_raw - c_ref) * k - ref)  # the target's own term (0 for a -inf target)
    log_s = tl.log(tl.where(row_mask, s, 1.0))
    tl.store(lse_ptr + rows, c + shift + log_s, mask=row_mask)
    # logp relative to c, not as (target logit) - lse: at logits of size |c| that difference would carry the
    # rounding of lse, |c| 2^-24
    tl.store(logp_ptr + rows, nonpositive((c_raw - c_ref) * inv_temp - shift - log_s), mask=row_mask)
    bad = row_mask & (ref > 0.0)
    good = row_mask & ~bad
    tl.store(row_ptr + tgt, round_to(-s_other, row_ptr.dtype.element_ty), mask=good)
    tl.store(s_ptr + rows, s, mask=good)
    if tl.sum(bad.to(tl.int32), axis=0) > 0:
        tl.debug_barrier()  # the first loop's stores are visible to every thread of the program
        _reshift_rows(row_ptr, tgt, s_ptr + rows, bad, switch, c, c_raw * inv_temp, c + gap * _LN2, V, inv_temp,
                      BLOCK_R, BLOCK_V)


@triton.jit
def _reshift_rows(row_ptr, tgt, s_ptrs, redo, switch, c, z_tgt, m, V, inv_temp, BLOCK_R: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """Rows ``redo`` went past the limit: rewrite them as U relative to their max ``m`` (natural units),
    reading back what the first loop stored: U (from which z = c + log U) before column ``switch``, the raw
    logits from there on; their sum s_m = sum_v exp(z - m) of the values written goes to ``s_ptrs``, and the
    target column (logit ``z_tgt``) becomes ``exp(z_tgt - m) - s_m``."""
    u_tgt = tl.exp(tl.where(redo, z_tgt - m, 0.0))
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for c0 in range(0, V, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = redo[:, None] & (cols < V)[None, :]
        is_tgt = cols[None, :] == tgt[:, None]
        ptrs = row_ptr[:, None] + cols[None, :]
        stored = tl.load(ptrs, mask=mask, other=1.0)
        raw = cols[None, :] >= switch[:, None]
        stored = stored.to(tl.float32)
        z = tl.where(raw, stored * inv_temp, c[:, None] + tl.log(tl.where(raw, 1.0, stored)))
        u = tl.exp(tl.where(mask & ~is_tgt, z - m[:, None], float("-inf")))
        acc += u
        tl.store(ptrs, round_to(u, row_ptr.dtype.element_ty), mask=mask & ~is_tgt)
    s_m = u_tgt + tl.sum(acc, axis=1)
    tl.store(row_ptr + tgt, round_to(u_tgt - s_m, row_ptr.dtype.element_ty), mask=redo)
    tl.store(s_ptrs, s_m, mask=redo)


@cost_name("fused_pact_head.scale")
@triton.jit
def _scale_rows_kernel(dx_ptr, parts_ptr, x_ptr, xs_ptr, beta_ptr, g_ptr, s_ptr, R, H, n_parts, part_stride,
                       inv_temp, SCALE: tl.constexpr, WRITE_XS: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """dx [R, H] = beta * sum_p parts[p] (fp32 sum of the ``n_parts`` partial products of dX's vocabulary-split
    GEMM, ``part_stride`` elements apart, each [R, H]; ``parts`` may be ``dx`` itself when n_parts is 1),
    beta = -g * inv_temp / s for g, s [R] fp32; with WRITE_XS (the weight needs its gradient) xs [R, H] =
    beta * x [R, H]; beta [R] in the input dtype (written by the programs of the first column tile). SCALE False:
    dx = sum_p parts[p] only (the ordinary gradient's dX; g, s, x, xs, beta unread). All row-major, stride H."""
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = row_mask[:, None] & (cols < H)[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    dx = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for p in range(n_parts):
        dx += tl.load(parts_ptr + p * part_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALE:
        beta = -tl.load(g_ptr + rows, mask=row_mask, other=0.0) * inv_temp / tl.load(s_ptr + rows, mask=row_mask,
                                                                                      other=1.0)
        if pid_h == 0:
            tl.store(beta_ptr + rows, round_to(beta, beta_ptr.dtype.element_ty), mask=row_mask)
        dx = dx * beta[:, None]
        if WRITE_XS:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(xs_ptr + offs, round_to(x * beta[:, None], xs_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + offs, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)


# Clamps of the PACT loss's log-ratios (pact_fast.loss_grads.LOG_RATIO_CLAMP, KL_CLAMP)
_LOG_RATIO_CLAMP = tl.constexpr(20.0)
_KL_CLAMP = tl.constexpr(20.0)


@triton.jit
def _surrogate_grad(logp, den, adv, g, low, high, dual_clip, HAS_DEN: tl.constexpr, DUAL: tl.constexpr):
    """``pact_fast.loss_grads.surrogate_grad`` elementwise in fp32: d/d logp of the clipped surrogate's token loss
    at ratio exp(clamp(logp - den, -20, 20)) (den absent: ratio 1), times ``g``; ``low`` / ``high`` = 1 -+ eps."""
    if HAS_DEN:
        raw = logp - den
    else:
        raw = tl.zeros_like(logp)
    ratio = tl.exp(tl.minimum(tl.maximum(raw, -_LOG_RATIO_CLAMP), _LOG_RATIO_CLAMP))
    neg_adv = -adv
    unclipped = neg_adv * ratio
    clipped = neg_adv * tl.minimum(tl.maximum(ratio, low), high)
    if DUAL:
        loss = tl.maximum(unclipped, clipped)
        bound = -adv * dual_clip
        g_min = tl.where(loss > bound, 0.0, tl.where(loss == bound, g / 2, g))
        g = tl.where(adv < 0, g_min, g)
    g_unclipped = tl.where(unclipped < clipped, 0.0, tl.where(unclipped == clipped, g / 2, g))
    g_clipped = tl.where(unclipped > clipped, 0.0, tl.where(unclipped == clipped, g / 2, g))
    g_ratio = g_unclipped * neg_adv + tl.where((ratio >= low) & (ratio <= high), g_clipped * neg_adv, 0.0)
    return tl.where((raw >= -_LOG_RATIO_CLAMP) & (raw <= _LOG_RATIO_CLAMP), g_ratio * ratio, 0.0)


@triton.jit
def _term_grad(logp, w_ptr, adv_ptr, den_ptr, offs, mask, low, high, dual_clip, HAS_DEN: tl.constexpr,
               DUAL: tl.constexpr):
    """One surrogate's (gradient, ratio denominator) at rows ``offs``: its weight, advantage and (HAS_DEN)
    denominator loaded, ``_surrogate_grad`` evaluated; the denominator is ``logp`` itself without HAS_DEN."""
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    den = logp
    if HAS_DEN:
        den = tl.load(den_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return _surrogate_grad(logp, den, adv, w, low, high, dual_clip, HAS_DEN, DUAL), den


@triton.jit
def _kl_terms(logp, ref, EST: tl.constexpr):
    """(d/d logp of ``losses.kl_penalty``, the penalty itself) elementwise; EST 1, 2, 3: estimators k1, k2, k3."""
    log_ratio = logp - ref
    if EST == 1:
        return tl.full(logp.shape, 1.0, tl.float32), log_ratio
    elif EST == 2:
        return log_ratio, 0.5 * log_ratio * log_ratio
    else:
        neg = -log_ratio
        clamped = tl.minimum(neg, _KL_CLAMP)
        grad = -tl.where(neg <= _KL_CLAMP, tl.exp(clamped) - 1.0, 0.0)
        return grad, tl.exp(clamped) - clamped - 1.0


@cost_name("fused_pact_head.grads")
@triton.jit
def _row_grads_kernel(g_ptr, logp_ptr, base_ptr, po_w_ptr, po_adv_ptr, po_den_ptr, kl_w_ptr, ref_ptr, tc_w_ptr,
                      tc_adv_ptr, tc_den_ptr, n, low, high, dual_clip,
                      HAS_BASE: tl.constexpr, HAS_PO: tl.constexpr, PO_DEN: tl.constexpr, KL: tl.constexpr,
                      KL_RATIO: tl.constexpr, HAS_TC: tl.constexpr, TC_DEN: tl.constexpr, DUAL: tl.constexpr,
                      BLOCK: tl.constexpr):
    """d loss / d logp of ``n`` rows, fp32 [n], from their log-probs ``logp`` [n] and per-row constants (any float
    dtype, [n] each; ``pact_fast.loss_grads.SurrogateTerm`` moved to rows): ``base`` (the terms constant in logp:
    SFT) + the prompt-only surrogate (weight, advantage, denominator; KL 1-3: plus the KL penalty's gradient,
    k1-k3, with weight ``kl_w`` and reference ``ref``; KL_RATIO: weighted by the ratio, whose own derivative
    adds kl_w * penalty * ratio) + the trace-conditioned surrogate (weight, advantage, denominator)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:
        g = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_PO:
        g_po, den = _term_grad(logp, po_w_ptr, po_adv_ptr, po_den_ptr, offs, mask, low, high, dual_clip, PO_DEN, DUAL)
        g += g_po
        if KL > 0:
            kl_w = tl.load(kl_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d_kl, penalty = _kl_terms(logp, ref, KL)
            if KL_RATIO:
                raw = tl.zeros_like(logp)
                if PO_DEN:
                    raw = logp - den
                ratio = tl.exp(tl.minimum(tl.maximum(raw, -_LOG_RATIO_CLAMP), _LOG_RATIO_CLAMP))
                d_ratio = tl.where(tl.abs(raw) <= _LOG_RATIO_CLAMP, ratio, 0.0)
                g += d_kl * (kl_w * ratio) + kl_w * penalty * d_ratio
            else:
                g += d_kl * kl_w
    if HAS_TC:
        g_tc, _ = _term_grad(logp, tc_w_ptr, tc_adv_ptr, tc_den_ptr, offs, mask, low, high, dual_clip, TC_DEN, DUAL)
        g += g_tc
    tl.store(g_ptr + offs, g, mask=mask)
