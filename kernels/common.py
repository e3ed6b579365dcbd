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
