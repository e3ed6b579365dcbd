"""@triton.jit helpers shared by the kernels of this folder."""
import triton
import triton.language as tl

from .registry import interpreting

# Triton decides at decoration time whether @triton.jit runs on the interpreter; so does this module.
_INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x cast to ``dtype``, rounded to nearest (ties to even) on every backend.

    On a GPU ``x.to(tl.bfloat16)`` is ``cvt.rn.bf16.f32``. The interpreter's fp32 -> bf16 cast (Triton 3.x)
    truncates the mantissa instead, moving every value toward zero (2^-8.5 relative on average): roundings in
    series then add their biases, e.g. the fused head's U and beta * (U @ w) made its interpreted bf16
    gradients ~2.4x less accurate than a GPU's. Under the interpreter the fp32 value is first rounded to a
    bf16 value by integer arithmetic on its bits, which the truncating cast then keeps exactly; GPU code is
    unchanged (no memory traffic either way)."""
    if _INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def exp2_approx(x):
    """2^x of fp32 ``x``: one ``ex2.approx.ftz`` on a GPU (``tl.exp2`` adds a subnormal range fix-up around it, 3
    more instructions per element, for results below 2^-126 that vanish beside the row's largest term of 1)."""
    if _INTERPRETED:
        return tl.exp2(x)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def nonpositive(x):
    """min(x, 0) that keeps a NaN (``tl.minimum`` lowers to ``min.f32``, which returns the other operand)."""
    return tl.where(x > 0.0, 0.0, x)


@triton.jit
def nonnegative(x):
    """max(x, 0) that keeps a NaN."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def online_softmax_step(m, s, t, z, mask):
    """One tile of a row-wise online log-sum-exp with its entropy accumulator. Per row: running max ``m``,
    ``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)`` (fp32 [rows]), updated by the tile ``z`` [rows, cols]
    (fp32, -inf where ``mask`` is false). Returns the new (m, s, t); then lse = m + log s, entropy = log s - t / s.
    A logit of -inf where ``mask`` is true (a -inf bias) makes t NaN (0 * -inf) while s stays finite: the caller
    sums such rows' t again with ``entropy_terms``."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(z - m_new[:, None])
    zc = tl.where(mask, z - m_new[:, None], 0.0)
    t = alpha * (t + (m - m_new) * s) + tl.sum(p * zc, axis=1)
    s = alpha * s + tl.sum(p, axis=1)
    return m_new, s, t


@triton.jit
def entropy_terms(z, m):
    """sum exp(z - m) (z - m) per row of the tile ``z`` [rows, cols] (fp32) against the row's final max ``m``, a
    term 0 where z is -inf (p = 0; (z - m) clamped so it is not 0 * -inf) and NaN where z is NaN."""
    d = z - m[:, None]
    return tl.sum(tl.exp(d) * tl.maximum(d, -1.0e30), axis=1)


@triton.jit
def online_lse_step(m, s, z):
    """``online_softmax_step`` without the entropy accumulator: (m, s) of a row-wise online log-sum-exp updated
    by the tile ``z`` [rows, cols] (fp32, -inf where masked)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    s = tl.exp(m - m_new) * s + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    return m_new, s


@triton.jit
def store_row_stats(logp_ptr, lse_ptr, ent_ptr, rows, row_mask, m, s, t, z_tgt, ENTROPY: tl.constexpr = True):
    """Write the finished online statistics of rows ``rows``: logp = z_tgt - lse (<= 0), lse = m + log s and,
    with ENTROPY, entropy = log s - t / s (>= 0), fp32. The clamps keep a NaN (``tl.minimum`` would return 0 for
    it: a NaN logit read as log-prob 0). Rows past the block (s = 0) are kept finite and not stored."""
    s = tl.where(row_mask, s, 1.0)
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(logp_ptr + rows, nonpositive(z_tgt - lse), mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if ENTROPY:
        tl.store(ent_ptr + rows, nonnegative(log_s - t / s), mask=row_mask)


@triton.jit
def soft_cap(z, cap):
    """``cap * tanh(z / cap)`` and its derivative ``1 - tanh(z / cap)^2``, elementwise on fp32 ``z`` (``cap`` > 0).

    Both come from one ``e = exp(-2 |z| / cap)``: ``tanh = (1 - e) / (1 + e)`` (sign of z) and
    ``1 - tanh^2 = 4 e / (1 + e)^2``, which keeps the derivative's relative accuracy where tanh saturates
    (``1 - tanh^2`` itself cancels there). z = -inf gives -cap and derivative 0."""
    e = tl.exp(-2.0 * tl.abs(z) / cap)
    one_plus_e = 1.0 + e
    th = (1.0 - e) / one_plus_e
    th = tl.where(z < 0, -th, th)
    return cap * th, 4.0 * e / (one_plus_e * one_plus_e)
