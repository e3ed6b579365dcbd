"""Launchers for the linear log-prob kernels: tile choice, output allocation, grids."""
import torch
import triton

from .linear_logprobs import _dw_kernel, _dx_kernel, _fwd_kernel
from .registry import TRITON_DTYPE, GateEntry, KernelCost, LaunchConfig, interpreting

# GPU: 64-row tiles fill one Hopper warpgroup MMA (m64); 128 vocabulary columns per tile keep
# the fp32 logits tile at 32 registers/thread with 8 warps. The dW kernel walks rows for a
# fixed vocabulary tile, so it gets the same tile shape transposed in role.
GPU_CONFIGS = {
    "fwd": LaunchConfig({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
    "dx": LaunchConfig({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=2),
    "dw": LaunchConfig({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=2),
}
# Interpreter: the smallest tiles tl.dot accepts, so small test shapes still span several tiles.
INTERPRET_CONFIGS = {
    "fwd": LaunchConfig({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}),
    "dx": LaunchConfig({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}),
    "dw": LaunchConfig({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}),
}


def _configs():
    return INTERPRET_CONFIGS if interpreting() else GPU_CONFIGS


def _flags(dtype):
    """(UPCAST, DOT_PRECISION): upcast bf16 under the interpreter, whose bf16 tl.dot is wrong;
    fp32 inputs use exact fp32 products, never TF32."""
    return interpreting() and dtype == torch.bfloat16, "ieee"


def _launch(kernel, grid, cfg, *args, **constexprs):
    kernel[grid](*args, **constexprs, **cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def forward(x, w, b, targets, inv_temp, configs=None):
    """x [N,H], w [V,H], b [V]|None, targets [N] int64 in [0,V) -> fp32 (logp [N], lse [N], entropy [N])."""
    N, H = x.shape
    V = w.shape[0]
    logp, lse, ent = (torch.full((N,), float("nan"), device=x.device, dtype=torch.float32) for _ in range(3))
    if N == 0:
        return logp, lse, ent
    cfg = (configs or _configs())["fwd"]
    upcast, precision = _flags(x.dtype)
    grid = (triton.cdiv(N, cfg.blocks["BLOCK_N"]),)
    _launch(_fwd_kernel, grid, cfg, x, w, b if b is not None else w, targets, logp, lse, ent,
            N, V, H, x.stride(0), w.stride(0), inv_temp,
            HAS_BIAS=b is not None, UPCAST=upcast, DOT_PRECISION=precision)
    return logp, lse, ent


def backward(x, w, b, targets, lse, ent, g_logp, g_ent, inv_temp, configs=None):
    """Gradients for upstream g_logp [N] (and g_ent [N] or None) -> fp32 (dx [N,H], dw [V,H], db [V]|None)."""
    N, H = x.shape
    V = w.shape[0]
    dx = torch.zeros((N, H), device=x.device, dtype=torch.float32)
    dw = torch.zeros((V, H), device=x.device, dtype=torch.float32)
    db = torch.zeros((V,), device=x.device, dtype=torch.float32) if b is not None else None
    if N == 0:
        return dx, dw, db
    cfgs = configs or _configs()
    upcast, precision = _flags(x.dtype)
    g_logp = g_logp.float().contiguous()
    has_gent = g_ent is not None
    g_ent = g_ent.float().contiguous() if has_gent else g_logp
    common = dict(HAS_BIAS=b is not None, HAS_GENT=has_gent, UPCAST=upcast, DOT_PRECISION=precision)
    b_arg = b if b is not None else w
    _launch(_dx_kernel, (triton.cdiv(N, cfgs["dx"].blocks["BLOCK_N"]),), cfgs["dx"],
            x, w, b_arg, targets, lse, ent, g_logp, g_ent, dx,
            N, V, H, x.stride(0), w.stride(0), dx.stride(0), inv_temp, **common)
    _launch(_dw_kernel, (triton.cdiv(V, cfgs["dw"].blocks["BLOCK_V"]),), cfgs["dw"],
            x, w, b_arg, targets, lse, ent, g_logp, g_ent, dw, db if db is not None else dw,
            N, V, H, x.stride(0), w.stride(0), dw.stride(0), inv_temp, **common)
    return dx, dw, db


def kernel_costs(N, V, H, dtype, has_bias, has_gent, configs=None):
    """Performance model of one fwd+bwd over N kept rows: one KernelCost per kernel launch.

    Bytes count every executed tl.load/tl.store (masked elements excluded), FLOPs 2*M*N*K per tl.dot
    at full tile size; ``configs`` defaults to the GPU tile configurations."""
    cfgs = configs or GPU_CONFIGS
    e = torch.empty((), dtype=dtype).element_size()
    row_stats = 8 + 4 + 4 + 4 + (4 if has_gent else 0)  # targets, lse, entropy, g_logp, g_ent
    costs = []
    for name in ("fwd", "dx", "dw"):
        bn, bv, bh = (cfgs[name].blocks[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
        nb, vb, hb = triton.cdiv(N, bn), triton.cdiv(V, bv), triton.cdiv(H, bh)
        logits_flops = 2 * bn * bv * bh * hb * vb * nb
        if name == "fwd":
            # logits tiles: x once per vocabulary tile, w once per row tile; targets in; logp, lse, entropy out
            nbytes = vb * N * H * e + nb * V * H * e + has_bias * nb * V * e + 8 * N + 12 * N
            costs.append(KernelCost("linear_logprobs.fwd", logits_flops, nbytes))
        elif name == "dx":
            # + w again per (row tile, vocabulary tile), fp32 dX tile loaded and stored per vocabulary tile
            nbytes = (row_stats * N + vb * N * H * e + 2 * nb * V * H * e + has_bias * nb * V * e
                      + vb * N * H * 8)
            costs.append(KernelCost("linear_logprobs.dx", 2 * logits_flops, nbytes))
        else:
            # + x again per (vocabulary tile, row tile), fp32 dW tile loaded and stored per row tile
            nbytes = (vb * row_stats * N + 2 * vb * N * H * e + nb * V * H * e + has_bias * nb * V * e
                      + nb * V * H * 8 + has_bias * V * 4)
            costs.append(KernelCost("linear_logprobs.dw", 2 * logits_flops, nbytes))
    return costs


def extra_memory_bytes(N, V, H, dtype):
    """Bytes the op allocates beyond its outputs and returned gradients: fp32 dX and dW before the cast."""
    return N * H * 4 + V * H * 4


def gate_entries():
    entries = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = TRITON_DTYPE[dtype]
        mma = dtype != torch.float32  # fp32 uses exact ieee products: no tensor cores expected
        for has_bias in (False, True):
            base = {"HAS_BIAS": has_bias, "UPCAST": False, "DOT_PRECISION": "ieee"}
            tag = f"{t}{'-bias' if has_bias else ''}"
            cfg = GPU_CONFIGS["fwd"]
            entries.append(GateEntry(
                f"linear_logprobs.fwd[{tag}]", _fwd_kernel,
                {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "tgt_ptr": "*i64", "logp_ptr": "*fp32",
                 "lse_ptr": "*fp32", "ent_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32",
                 "stride_xn": "i32", "stride_wv": "i32", "inv_temp": "fp32"},
                {**base, **cfg.blocks}, cfg, mma))
            for has_gent in (False, True):
                g = {**base, "HAS_GENT": has_gent}
                gtag = f"{tag}{'-ent' if has_gent else ''}"
                cfg = GPU_CONFIGS["dx"]
                entries.append(GateEntry(
                    f"linear_logprobs.dx[{gtag}]", _dx_kernel,
                    {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "tgt_ptr": "*i64", "lse_ptr": "*fp32",
                     "ent_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32", "dx_ptr": "*fp32",
                     "N": "i32", "V": "i32", "H": "i32", "stride_xn": "i32", "stride_wv": "i32",
                     "stride_dxn": "i32", "inv_temp": "fp32"},
                    {**g, **cfg.blocks}, cfg, mma))
                cfg = GPU_CONFIGS["dw"]
                entries.append(GateEntry(
                    f"linear_logprobs.dw[{gtag}]", _dw_kernel,
                    {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "tgt_ptr": "*i64", "lse_ptr": "*fp32",
                     "ent_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32", "dw_ptr": "*fp32",
                     "db_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", "stride_xn": "i32",
                     "stride_wv": "i32", "stride_dwv": "i32", "inv_temp": "fp32"},
                    {**g, **cfg.blocks}, cfg, mma))
    return entries
