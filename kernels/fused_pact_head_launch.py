"""Launcher of the Triton backend of ``fused_pact_head``: loss, dX and dW in one pass over the logits.

Per block of ``R`` rows (``rows_per_block``, default ``BLOCK_ROWS``):

1. ``torch.mm[logits]``: the block's logits over the whole vocabulary into a workspace ``[R, V]`` (input
   dtype; cuBLAS, with the bias by ``addmm``).
2. ``fused_pact_head.pass`` (``kernels/fused_pact_head.py``): log-probs, lse, entropy of the block's rows,
   and (``shift`` mode) the workspace turned into ``U``, whose row scaling is d loss / d logits.
3. the caller's ``grads(lo, hi)``: the upstream gradients of the block's log-probs (and entropies) from
   the PACT loss, a pointwise function of each token's own values (SPEC section 7, last paragraph).
4. shift mode: ``torch.mm[dx]`` = U @ w into dX's rows, ``fused_pact_head.scale`` (dX rows *= beta,
   xs = beta * x), ``torch.mm[dw]`` = U.T @ xs into dW, ``torch.mm[db]`` = U.T @ beta into db.
   ordinary mode (entropy bonus, fp16, or a soft cap): ``linear_logprobs.bwd`` turns the workspace into
   d logits in place (fp32 bias gradient by atomics), then ``torch.mm[dx]`` and ``torch.mm[dw]``.

6NVH FLOPs, no logit computed twice. dX is rounded to the input dtype once (after its GEMM, again after
the row scaling in shift mode); dW and (shift mode) db accumulate over row blocks in the input dtype, so
they carry ceil(N / R) roundings, as ``linear_logprobs``'s dW does; fp32 inputs are fp32 throughout.
The workspace ``R * V`` elements plus ``R * H`` (xs) are the memory beyond the outputs
(``extra_memory_bytes``); at W-logprob (R=2048, V=151,936, bf16) 622 MB, 3% of naive's fp32 logits.
"""
import torch
import triton

from .fused_pact_head import _head_pass_kernel, _scale_rows_kernel
from .linear_logprobs_launch import slab_grad
from . import registry
from .registry import TRITON_DTYPE, GateEntry, KernelCost, gemm_cost, interpreting

BLOCK_ROWS = 2048  # rows per block: the dW GEMM (K = R) stays compute-bound at H >= 2048
# Rows whose max logit exceeds the target's by more are re-shifted (a target less likely than ~e^-20). Within
# it U <= e^20 and s <= V e^20, so beta = -g / (T s) >= |g| e^-20 / (T V): beta * x in bf16 / fp32 stays far
# above the subnormal range for any upstream gradient a loss produces (g ~ 1e-5 per token of a 32k mean).
SHIFT_LIMIT = 20.0

GPU_CONFIGS = registry.GPU_CONFIGS["fused_pact_head"]
INTERPRET_CONFIGS = registry.INTERPRET_CONFIGS["fused_pact_head"]


def _configs():
    return INTERPRET_CONFIGS if interpreting() else GPU_CONFIGS


def shift_mode(dtype, want_entropy, softcap=False):
    """True when the gradient is a row scaling of the pass's U: no entropy bonus, no soft cap (rows re-shifted
    past the limit recover their logits from U, which U * (1 - tanh^2) would not allow), and a dtype whose
    range holds U (bf16, fp32; fp16 tops out at 65504)."""
    return not want_entropy and not softcap and dtype in (torch.bfloat16, torch.float32)


def row_blocks(N, R):
    """(r0, r) for every block of at most R rows."""
    return [(r0, min(R, N - r0)) for r0 in range(0, N, R)]


def run(x, w, b, targets, inv_temp, want_entropy, grads, *, cap=None, rows_per_block=None, limit=SHIFT_LIMIT,
        configs=None):
    """The fused head over x [N, H], w [V, H], b [V] | None, targets [N] int64 in [0, V), with the logits
    ``z_raw * inv_temp``, or ``cap * tanh(z_raw / cap) * inv_temp`` when ``cap`` is not None (ordinary mode).

    ``grads(lo, hi, logp, ent) -> (g_logp [hi-lo], g_ent [hi-lo] | None)`` fp32 upstream gradients of rows
    [lo, hi), called once per block after that block's log-probs are in ``logp [N]`` (and entropies in
    ``ent [N]``); ``grads=None``: forward only.

    Returns ``(logp [N], ent [N], dx [N, H], dw [V, H], db [V] | None)``: fp32 log-probs and entropies;
    gradients in the input dtype except db (fp32 in ordinary mode); dx, dw, db None without ``grads``."""
    N, H = x.shape
    V = w.shape[0]
    cfgs = configs or _configs()
    R = rows_per_block or BLOCK_ROWS
    shift = grads is not None and shift_mode(x.dtype, want_entropy, softcap=cap is not None)
    if grads is not None and not shift and min(R, N) * V >= 2 ** 31:
        raise ValueError(f"fused_pact_head: rows_per_block={R} x V={V} logits overflow the int32 offsets of "
                         "linear_logprobs' gradient epilogue; use fewer rows per block")
    logp, lse, ent, s = (torch.full((N,), float("nan"), device=x.device, dtype=torch.float32) for _ in range(4))
    dx = dw = db = None
    if grads is not None:
        dx = torch.empty_like(x)
        dw = torch.empty_like(w)
        if b is not None:
            db = torch.empty((V, 1), device=x.device, dtype=x.dtype) if shift else \
                torch.zeros(V, device=x.device, dtype=torch.float32)
    workspace = torch.empty(min(R, N) * V, device=x.device, dtype=x.dtype)  # [R * V]
    xs = torch.empty((min(R, N), H), device=x.device, dtype=x.dtype) if shift else None  # beta * x of a block
    beta = torch.empty((min(R, N), 1), device=x.device, dtype=x.dtype) if shift else None
    pcfg, scfg = cfgs["pass"], cfgs["scale"]
    for r0, r in row_blocks(N, R):
        rows = slice(r0, r0 + r)
        z = workspace[:r * V].view(r, V)
        if b is None:
            torch.mm(x[rows], w.t(), out=z)
        else:
            torch.addmm(b, x[rows], w.t(), out=z)
        _head_pass_kernel[(triton.cdiv(r, pcfg.blocks["BLOCK_R"]),)](
            z, z.stride(0), targets[rows], logp[rows], lse[rows], ent[rows], s[rows], r, V, inv_temp, limit,
            cap or 1.0, WRITE_U=shift, SOFTCAP=cap is not None, **pcfg.blocks, num_warps=pcfg.num_warps,
            num_stages=pcfg.num_stages)
        if grads is None:
            continue
        g_logp, g_ent = grads(r0, r0 + r, logp, ent)
        g_logp = g_logp.float().contiguous()
        first = r0 == 0
        if shift:
            torch.mm(z, w, out=dx[rows])
            _scale_rows_kernel[(triton.cdiv(r, scfg.blocks["BLOCK_R"]), triton.cdiv(H, scfg.blocks["BLOCK_H"]))](
                dx[rows], x[rows], xs[:r], beta[:r], g_logp, s[rows], r, H, inv_temp,
                **scfg.blocks, num_warps=scfg.num_warps, num_stages=scfg.num_stages)
            _accumulate(dw, z.t(), xs[:r], first)
            if db is not None:
                _accumulate(db, z.t(), beta[:r], first)
        else:
            slab_grad(z, 0, targets[rows], lse[rows], ent[rows], g_logp,
                      g_ent.float().contiguous() if g_ent is not None else None, db, inv_temp, cfgs["grad"], cap)
            torch.mm(z, w, out=dx[rows])
            _accumulate(dw, z.t(), x[rows], first)
    if db is not None and shift:
        db = db.view(V)
    return logp, ent, dx, dw, db


def _accumulate(out, a, b, first):
    """out = a @ b on the first row block, out += a @ b after (cuBLAS, fp32 accumulation inside)."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def kernel_costs(N, V, H, dtype, has_bias, want_entropy, bad_rows=None, configs=None, rows_per_block=None,
                 backward=True, softcap=False):
    """Performance model of ``run``: one KernelCost per launch, in launch order.

    Triton kernels: bytes of every executed tl.load / tl.store / atomic (masked elements excluded; an atomic
    counts as a load plus a store), no tensor-core FLOPs. cuBLAS GEMMs (``torch.mm[...]``): 2*M*N*K FLOPs and
    compulsory bytes (operands, an addmm's C, the output once). ``bad_rows``: per row block, how many rows
    the pass re-shifts in its second loop (their max logit over ``limit`` above the target's; data-dependent,
    0 by default); ``backward=False``: forward only (``grads=None``); ``softcap``: ``run`` with a cap (ordinary
    mode; the cap itself moves no byte). ``configs`` / ``rows_per_block`` default to what ``run`` uses on a GPU."""
    cfgs = configs or GPU_CONFIGS
    blocks = row_blocks(N, rows_per_block or BLOCK_ROWS)
    bad_rows = bad_rows or [0] * len(blocks)
    if len(bad_rows) != len(blocks):
        raise ValueError(f"kernel_costs: bad_rows has {len(bad_rows)} entries for {len(blocks)} row blocks")
    e = torch.empty((), dtype=dtype).element_size()
    shift = backward and shift_mode(dtype, want_entropy, softcap)
    costs = []

    def gemm(tag, m, n, k, c_elems):
        costs.append(gemm_cost(tag, m, n, k, c_elems, e))

    for (r0, r), bad in zip(blocks, bad_rows):
        gemm("logits", r, V, H, V if has_bias else 0)
        nbytes = 8 * r + r * V * e + 12 * r  # targets; the logits read once; logp, lse, entropy
        if shift:
            # shift c (target logit); U stored but for the target column; s; target column of good rows;
            # the bad rows' second loop (read and write of their row)
            nbytes += r * e + r * (V - 1) * e + 4 * r + (r - bad) * e + 2 * bad * V * e
        costs.append(KernelCost("fused_pact_head.pass", 0, nbytes))
        if not backward:
            continue
        acc = 0 if r0 == 0 else 1
        if shift:
            gemm("dx", r, H, V, 0)
            h_tiles = triton.cdiv(H, cfgs["scale"].blocks["BLOCK_H"])
            # g and s per (row, column tile); beta once per row; dx read + write, x read, xs write
            costs.append(KernelCost("fused_pact_head.scale", 0, 8 * r * h_tiles + r * e + 4 * r * H * e))
            gemm("dw", V, H, r, acc * V * H)
            if has_bias:
                gemm("db", V, 1, r, acc * V)
        else:
            row_bytes = (8 + 4 + 4 + (8 if want_entropy else 0)) * r  # targets, lse, g_logp (+ entropy, g_ent)
            atomics = 2 * 4 * V * triton.cdiv(r, cfgs["grad"].blocks["BLOCK_R"]) if has_bias else 0
            costs.append(KernelCost("linear_logprobs.bwd", 0, row_bytes + 2 * r * V * e + atomics))
            gemm("dx", r, H, V, 0)
            gemm("dw", V, H, r, acc * V * H)
    return costs


def extra_memory_bytes(N, V, H, dtype, has_bias=False, want_entropy=False, rows_per_block=None, softcap=False):
    """Bytes ``run`` allocates beyond its outputs (log-probs, entropies, dX, dW, db): the logits workspace
    [R, V] and, in shift mode, xs [R, H] and beta [R] (input dtype); fp32 lse and s [N]."""
    R = min(N, rows_per_block or BLOCK_ROWS)
    e = torch.empty((), dtype=dtype).element_size()
    shift = shift_mode(dtype, want_entropy, softcap)
    return R * V * e + (R * H * e + R * e if shift else 0) + 8 * N


def gate_entries():
    """The pass kernel and the row-scaling kernel at their GPU configurations, for every dtype and mode
    ``run`` launches them with (shift mode: bf16, fp32; ordinary: bf16, fp16, fp32, with or without a soft
    cap)."""
    entries = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = TRITON_DTYPE[dtype]
        for write_u, softcap in ((False, False), (True, False), (False, True)):
            if write_u and not shift_mode(dtype, False):
                continue
            cfg = GPU_CONFIGS["pass"]
            entries.append(GateEntry(
                f"fused_pact_head.pass[{t}{'-shift' if write_u else ''}{'-softcap' if softcap else ''}]",
                _head_pass_kernel,
                {"z_ptr": f"*{t}", "stride_zr": "i32", "tgt_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
                 "ent_ptr": "*fp32", "s_ptr": "*fp32", "R": "i32", "V": "i32", "inv_temp": "fp32", "limit": "fp32",
                 "cap": "fp32"},
                {"WRITE_U": write_u, "SOFTCAP": softcap, **cfg.blocks}, cfg, expects_mma=False))
        if shift_mode(dtype, False):
            cfg = GPU_CONFIGS["scale"]
            entries.append(GateEntry(
                f"fused_pact_head.scale[{t}]", _scale_rows_kernel,
                {"dx_ptr": f"*{t}", "x_ptr": f"*{t}", "xs_ptr": f"*{t}", "beta_ptr": f"*{t}", "g_ptr": "*fp32",
                 "s_ptr": "*fp32", "R": "i32", "H": "i32", "inv_temp": "fp32"},
                cfg.blocks, cfg, expects_mma=False))
    return entries
