"""Launchers for the tree-attention kernels: visible-tile lists, output allocation, grids."""
import torch
import triton

from .registry import TRITON_DTYPE, GateEntry, LaunchConfig, interpreting
from .tree_attention import _dkdv_kernel, _dq_kernel, _fwd_kernel

# GPU: square 64x64 tiles (one tile list serves forward, dq and, transposed, dk/dv); 4 warps
# keep the fp32 score tile and the [64, 128] accumulators in registers at head_dim 128.
GPU_CONFIGS = {
    "fwd": LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    "dq": LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    "dkdv": LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
}
INTERPRET_CONFIGS = {name: LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 16}) for name in GPU_CONFIGS}
GATE_HEAD_DIMS = (64, 128)


def _configs():
    return INTERPRET_CONFIGS if interpreting() else GPU_CONFIGS


def tile_lists(subtree_end, block):
    """Visible tile pairs of a tree layout, exactly: tile pair (i, j) is listed iff some key k in
    key tile j and query q in query tile i have k <= q < subtree_end[k].

    subtree_end: [B, L] int. Returns int32 tensors
    (q_count [B, T], q_index [B, T, T]: key tiles per query tile, ascending, first q_count valid;
     k_count [B, T], k_index [B, T, T]: query tiles per key tile), T = ceil(L / block).
    """
    B, L = subtree_end.shape
    T = triton.cdiv(L, block)
    device = subtree_end.device
    ends = torch.nn.functional.pad(subtree_end.long(), (0, T * block - L))  # [B, T*block]; pad keys see nothing
    keys = torch.arange(T * block, device=device)
    q_first = torch.arange(T, device=device) * block  # [T]
    q_last = torch.clamp(q_first + block - 1, max=L - 1)
    # key k sees some query of tile i  <=>  k <= q_last[i] and subtree_end[k] > q_first[i]
    sees = (keys[None, None, :] <= q_last[None, :, None]) & (ends[:, None, :] > q_first[None, :, None])  # [B, T, T*block]
    visible = sees.view(B, T, T, block).any(-1)  # [B, T(query tiles), T(key tiles)]
    q_count = visible.sum(-1).int()
    q_index = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices.int()
    k_count = visible.sum(1).int()
    k_index = torch.sort((~visible).transpose(1, 2).to(torch.int8), dim=-1, stable=True).indices.int()
    return q_count.contiguous(), q_index.contiguous(), k_count.contiguous(), k_index.contiguous()


def _common(q, k):
    B, HQ, L, D = q.shape
    return dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                UPCAST=interpreting() and q.dtype == torch.bfloat16), (B, HQ, k.shape[1], L)


def launch_block():
    """The square tile the launches use: the block of the tile lists (``tile_lists(subtree_end, launch_block())``)."""
    return _configs()["fwd"].blocks["BLOCK_M"]


def forward(q, k, v, subtree_end, scale, lists=None):
    """q [B,Hq,L,D], k/v [B,Hkv,L,D] contiguous, subtree_end [B,L] int32 -> (o [B,Hq,L,D], lse [B,Hq,L] fp32, lists).

    lists: ``tile_lists(subtree_end, launch_block())`` when the caller built them once for several layers."""
    cfg = _configs()["fwd"]
    block = cfg.blocks["BLOCK_M"]
    lists = tile_lists(subtree_end, block) if lists is None else lists
    flags, (B, HQ, HKV, L) = _common(q, k)
    o = torch.full_like(q, float("nan"))
    lse = torch.full((B, HQ, L), float("nan"), device=q.device, dtype=torch.float32)
    T = triton.cdiv(L, block)
    _fwd_kernel[(T, B * HQ)](
        q, k, v, subtree_end, lists[0], lists[1], o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        L, HQ, HQ // HKV, T, scale, **flags, **cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse, lists


def backward(q, k, v, o, lse, do, subtree_end, lists, scale):
    """Gradients (dq, dk, dv) in the layouts of q, k, v (all contiguous)."""
    cfgs = _configs()
    flags, (B, HQ, HKV, L) = _common(q, k)
    T = triton.cdiv(L, cfgs["dq"].blocks["BLOCK_M"])
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, Hq, L]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    cfg = cfgs["dq"]
    _dq_kernel[(T, B * HQ)](
        q, k, v, subtree_end, lists[0], lists[1], do, lse, delta, dq, *strides,
        L, HQ, HQ // HKV, T, scale, **flags, **cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cfg = cfgs["dkdv"]
    _dkdv_kernel[(T, B * HKV)](
        q, k, v, subtree_end, lists[2], lists[3], do, lse, delta, dk, dv, *strides,
        L, HQ, HKV, HQ // HKV, T, scale, **flags, **cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


def gate_entries():
    entries = []
    strides = {n: "i32" for n in ("sqb", "sqh", "sql", "skb", "skh", "skl", "svb", "svh", "svl")}
    sizes = {"L": "i32", "HQ": "i32", "GROUP": "i32", "N_TILES": "i32", "scale": "fp32"}
    for dtype in (torch.bfloat16, torch.float16):
        t = TRITON_DTYPE[dtype]
        for d in GATE_HEAD_DIMS:
            base = {"HEAD_DIM": d, "BLOCK_D": d, "UPCAST": False}
            io = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "end_ptr": "*i32", "cnt_ptr": "*i32",
                  "idx_ptr": "*i32"}
            cfg = GPU_CONFIGS["fwd"]
            entries.append(GateEntry(
                f"tree_attention.fwd[{t}-d{d}]", _fwd_kernel,
                {**io, "o_ptr": f"*{t}", "lse_ptr": "*fp32", **strides, "sob": "i32", "soh": "i32", "sol": "i32",
                 **sizes}, {**base, **cfg.blocks}, cfg))
            grads = {"do_ptr": f"*{t}", "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
            cfg = GPU_CONFIGS["dq"]
            entries.append(GateEntry(
                f"tree_attention.dq[{t}-d{d}]", _dq_kernel,
                {**io, **grads, "dq_ptr": f"*{t}", **strides, **sizes}, {**base, **cfg.blocks}, cfg))
            cfg = GPU_CONFIGS["dkdv"]
            entries.append(GateEntry(
                f"tree_attention.dkdv[{t}-d{d}]", _dkdv_kernel,
                {**io, **grads, "dk_ptr": f"*{t}", "dv_ptr": f"*{t}", **strides, "L": "i32", "HQ": "i32",
                 "HKV": "i32", "GROUP": "i32", "N_TILES": "i32", "scale": "fp32"}, {**base, **cfg.blocks}, cfg))
    return entries
