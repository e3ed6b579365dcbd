"""Launchers for the tree-attention kernels: visible-tile lists, grids, and the performance model.

Tiles (``GPU_CONFIGS`` from kernels/registry.py, sm_80's dk/dv tile from its ``ARCH_CONFIGS``), one query head per
program, 4 warps, the largest the compile gate (``python -m pact_fast.compile_gate``) builds with no spill and at
least 2 CTAs per SM on sm_90a and sm_80 at head dims 64 and 128:

- forward: 128-query tiles against 16-key tiles. A key/value tile serves 128 query rows, so the forward reads each
  head's K and V half as often as at 64 rows (the model charges every re-read to HBM).
- dq: 64-query tiles against 32-key tiles (at 128 rows its fp32 dq accumulator spills), walking its own tile list.
- dk/dv: 64-key tiles (sm_80: 32) against 16-query tiles, computed transposed (``k @ q^T``) so k and v are the left
  operands and p^T, ds^T come out in the layout the dk / dv products take: 4 matmuls per 8 KB of q and do.

The backward runs 7 matmuls per visible tile pair (split: dq in its own kernel, deterministic). The
5-matmul alternative (``dq_mode="atomic"``: dq added into an fp32 buffer with atomics from the dk/dv
kernel) moves 8 bytes of atomics per dq element per tile pair, so by the work model, and by the time model on H100,
it is slower (see ``kernel_costs`` and README's roofline table); it is kept for measurement on a GPU, where L2 may
absorb the atomics the model charges to HBM.

A sliding window (``window`` over ``position_ids``) drops from the lists every tile pair wholly outside it
(the smallest query position of the query tile minus the largest key position of the key tile is at least
``window``); the kernels mask the pairs of the remaining tiles one by one. A softcap changes no list.
"""
from typing import NamedTuple

import torch
import triton

from . import registry
from .registry import GATE_ARCHS, TRITON_DTYPE, GateEntry, KernelCost, device_arch, gpu_configs, interpreting
from .tree_attention import _cast_kernel, _delta_kernel, _dkdv_kernel, _dq_kernel, _fwd_kernel

GPU_CONFIGS = registry.GPU_CONFIGS["tree_attention"]  # sm_90a's, the performance model's (H100, H200)
INTERPRET_CONFIGS = registry.INTERPRET_CONFIGS["tree_attention"]
MAX_HEADS = 1  # query heads stacked per forward / dq program (2 spilled at head dim 128, see registry.GPU_CONFIGS)
GATE_HEAD_DIMS = (64, 128)
DQ_MODES = ("split", "atomic")


def _configs(configs=None, device=None):
    """``configs``, or the interpreter's, or those of the architecture of CUDA ``device``."""
    if configs:
        cfgs = configs
    elif interpreting():
        cfgs = INTERPRET_CONFIGS
    else:
        cfgs = gpu_configs("tree_attention", device_arch(device))
    return cfgs


def heads_per_program(group):
    """Query heads stacked in one forward / dq program: the largest power of two <= MAX_HEADS dividing
    the GQA group size (all of them share one key/value head)."""
    heads = 1
    while heads * 2 <= MAX_HEADS and group % (heads * 2) == 0:
        heads *= 2
    return heads


def visible_tiles(subtree_end, block_m, block_n, position_ids=None, window=None):
    """[B, ceil(L / block_m), ceil(L / block_n)] bool: query tile i and key tile j hold a visible pair,
    i.e. some key k of tile j and query q of tile i have k <= q < subtree_end[k]. subtree_end: [B, L].

    With ``window`` (and ``position_ids [B, L]``), also not wholly outside the window: the smallest query
    position in tile i minus the largest key position in tile j is below ``window``."""
    B, L = subtree_end.shape
    Tm, Tn = triton.cdiv(L, block_m), triton.cdiv(L, block_n)
    ends = torch.nn.functional.pad(subtree_end.long(), (0, Tn * block_n - L))  # pad keys see nothing
    keys = torch.arange(Tn * block_n, device=subtree_end.device)
    q_first = torch.arange(Tm, device=subtree_end.device) * block_m
    q_last = torch.clamp(q_first + block_m - 1, max=L - 1)
    # key k sees some query of tile i  <=>  k <= q_last[i] and subtree_end[k] > q_first[i]
    sees = (keys[None, None, :] <= q_last[None, :, None]) & (ends[:, None, :] > q_first[None, :, None])
    visible = sees.view(B, Tm, Tn, block_n).any(-1)
    if window is not None:
        visible &= _near_tiles(position_ids, block_m, block_n, window)
    return visible


def _near_tiles(position_ids, block_m, block_n, window):
    """[B, Tm, Tn] bool: min position of query tile i - max position of key tile j < window."""
    B, L = position_ids.shape
    Tm, Tn = triton.cdiv(L, block_m), triton.cdiv(L, block_n)
    pos = position_ids.long()
    far = 2 * (int(pos.abs().max()) + window)  # beyond any position: padding never sets a min or a max
    q_min = torch.nn.functional.pad(pos, (0, Tm * block_m - L), value=far).view(B, Tm, block_m).amin(-1)
    k_max = torch.nn.functional.pad(pos, (0, Tn * block_n - L), value=-far).view(B, Tn, block_n).amax(-1)
    return (q_min[:, :, None] - k_max[:, None, :]) < window


def _lists(visible):
    """(count [B, T0] int32, index [B, T0, T1] int32): per row of ``visible [B, T0, T1]``, its true columns
    ascending, the first ``count`` entries of ``index`` valid."""
    count = visible.sum(-1).int().contiguous()
    index = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices.int().contiguous()
    return count, index


class TileLists(NamedTuple):
    """The visible tile pairs every launch walks, built once per layout (``tile_lists``)."""

    q_count: torch.Tensor  # [B, Tq] key tiles per query tile (forward tiles)
    q_index: torch.Tensor  # [B, Tq, Tk] those key tiles, ascending
    dq_count: torch.Tensor  # [B, Tq''] key tiles per query tile (dq tiles)
    dq_index: torch.Tensor  # [B, Tq'', Tk''] those key tiles, ascending
    k_count: torch.Tensor  # [B, Tk'] query tiles per key tile (dk/dv tiles)
    k_index: torch.Tensor  # [B, Tk', Tq'] those query tiles, ascending


def tile_lists(subtree_end, configs=None, position_ids=None, window=None):
    """TileLists of ``subtree_end [B, L]`` at the launch tiles (``configs`` default: the launcher's own), under
    ``window`` over ``position_ids [B, L]`` when given (``visible_tiles``)."""
    cfgs = _configs(configs, subtree_end.device)

    def visible(kernel):
        blocks = cfgs[kernel].blocks
        return visible_tiles(subtree_end, blocks["BLOCK_M"], blocks["BLOCK_N"], position_ids, window)

    return TileLists(*_lists(visible("fwd")), *_lists(visible("dq")), *_lists(visible("dkdv").transpose(1, 2)))


def _flags(q):
    D = q.shape[-1]
    return dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                UPCAST=interpreting() and q.dtype == torch.bfloat16)


def _options(subtree_end, position_ids, window, softcap):
    """The kernels' window / softcap arguments: runtime values plus the WINDOW / SOFTCAP flags (off: the
    kernels compile without them; subtree_end then stands in for the unread depth pointer)."""
    if window is not None and position_ids is None:
        raise ValueError("tree_attention: a window needs position_ids [B, L]")
    return dict(depth_ptr=subtree_end if window is None else position_ids, window=window or 0,
                softcap=softcap or 1.0, WINDOW=window is not None, SOFTCAP=softcap is not None)


def _launch(kernel, grid, cfg, *args, **constexprs):
    kernel[grid](*args, **constexprs, **cfg.blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def forward(q, k, v, subtree_end, scale, lists=None, configs=None, position_ids=None, window=None, softcap=None):
    """q [B,Hq,L,D], k/v [B,Hkv,L,D] contiguous, subtree_end [B,L] int32 -> (o [B,Hq,L,D], lse [B,Hq,L] fp32, lists).

    lists: ``tile_lists(subtree_end, position_ids=..., window=...)`` when the caller built them once for several
    layers. position_ids: [B, L] int32 contiguous, read under a window (None: none); softcap: None for none."""
    cfgs = _configs(configs, q.device)
    lists = tile_lists(subtree_end, cfgs, position_ids, window) if lists is None else lists
    B, HQ, L, _ = q.shape
    group = HQ // k.shape[1]
    heads = heads_per_program(group)
    o = torch.full_like(q, float("nan"))
    lse = torch.full((B, HQ, L), float("nan"), device=q.device, dtype=torch.float32)
    n_qt, n_kt = lists.q_index.shape[1:]
    _launch(_fwd_kernel, (n_qt, B * HQ // heads), cfgs["fwd"],
            q, k, v, subtree_end, lists.q_count, lists.q_index, o, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            L, HQ, group, n_qt, n_kt, scale, HEADS=heads, **_flags(q),
            **_options(subtree_end, position_ids, window, softcap))
    return o, lse, lists


def backward(q, k, v, o, lse, do, subtree_end, lists, scale, dq_mode="split", configs=None, position_ids=None,
             window=None, softcap=None):
    """Gradients (dq, dk, dv) in the layouts of q, k, v (all contiguous; do contiguous like q).

    dq_mode: "split" (dq by its own kernel; deterministic) or "atomic" (dq added with fp32 atomics from
    the dk/dv kernel: 5 matmuls per tile pair instead of 7, summation order varies run to run).
    lists, position_ids, window, softcap: the forward's."""
    if dq_mode not in DQ_MODES:
        raise ValueError(f"tree_attention: dq_mode must be one of {DQ_MODES}, got {dq_mode!r}")
    cfgs = _configs(configs, q.device)
    B, HQ, L, D = q.shape
    HKV = k.shape[1]
    group = HQ // HKV
    flags = _flags(q)
    options = _options(subtree_end, position_ids, window, softcap)
    delta = torch.empty((B, HQ, L), device=q.device, dtype=torch.float32)
    rows = B * HQ * L
    _launch(_delta_kernel, (triton.cdiv(rows, cfgs["delta"].blocks["BLOCK_R"]),), cfgs["delta"],
            o, do, delta, rows, HEAD_DIM=D, BLOCK_D=flags["BLOCK_D"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    atomic = dq_mode == "atomic"
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else dq
    if not atomic:
        heads = heads_per_program(group)
        n_qt, n_kt = lists.dq_index.shape[1:]
        _launch(_dq_kernel, (n_qt, B * HQ // heads), cfgs["dq"],
                q, k, v, subtree_end, lists.dq_count, lists.dq_index, do, lse, delta, dq, *strides,
                L, HQ, group, n_qt, n_kt, scale, HEADS=heads, **flags, **options)
    n_kt, n_qt = lists.k_index.shape[1:]
    _launch(_dkdv_kernel, (n_kt, B * HKV), cfgs["dkdv"],
            q, k, v, subtree_end, lists.k_count, lists.k_index, do, lse, delta, dk, dv, dq_acc, *strides,
            L, HQ, HKV, group, n_kt, n_qt, scale, ATOMIC_DQ=atomic, **flags, **options)
    if atomic:
        n = dq.numel()
        _launch(_cast_kernel, (triton.cdiv(n, cfgs["cast"].blocks["BLOCK"]),), cfgs["cast"], dq_acc, dq, n)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Performance model (bench/roofline.py; tests/test_roofline_tree.py holds it equal to the counts)
# ---------------------------------------------------------------------------------------------

def _valid(L, block, tiles):
    """[tiles] int64: positions < L in each tile of ``block``."""
    return torch.clamp(L - torch.arange(tiles) * block, max=block)


def kernel_costs(subtree_end, HQ, HKV, D, dtype, configs=None, passes=("fwd", "bwd"), dq_mode="split",
                 position_ids=None, window=None, arch=90):
    """Performance model of tree attention over ``subtree_end [B, L]``: one KernelCost per launch, in
    launch order (forward; then delta, dq (split) or none, dk/dv, cast (atomic)).

    FLOPs: 2*M*N*K per ``tl.dot`` executed (K = BLOCK_D, the head dim padded to a power of two);
    bytes: every executed tl.load / tl.store (masked elements excluded; an atomic is a load and a store),
    including the tile-list scalars. ``configs`` default to the GPU's of ``arch`` (90: sm_90a, 80: sm_80).
    ``window`` over ``position_ids [B, L]``: the window's tile lists, plus an int32 position read wherever a
    key's subtree_end or a query row is. A softcap changes neither number (elementwise tanh on tiles already in registers)."""
    if not passes or not set(passes) <= {"fwd", "bwd"}:
        raise ValueError(f"kernel_costs: passes must be a subset of ('fwd', 'bwd'), got {passes!r}")
    if dq_mode not in DQ_MODES:
        raise ValueError(f"kernel_costs: dq_mode must be one of {DQ_MODES}, got {dq_mode!r}")
    cfgs = configs or gpu_configs("tree_attention", arch)
    ends = subtree_end.cpu()
    B, L = ends.shape
    e = torch.empty((), dtype=dtype).element_size()
    BD = max(16, triton.next_power_of_2(D))
    heads = heads_per_program(HQ // HKV)
    row = D * e  # bytes of one q/k/v/o row
    depth = 0 if window is None else 4  # an int32 position id per query row and per key, read under a window
    positions = None if position_ids is None else position_ids.cpu()

    def pairs(block_m, block_n, transpose):
        """(tile pairs, sum over pairs of the valid rows of the walked tile, programs) for one tile list."""
        vis = visible_tiles(ends, block_m, block_n, positions, window)
        if transpose:  # walk query tiles per key tile
            vis = vis.transpose(1, 2)
            walked = _valid(L, block_m, vis.shape[2])
        else:
            walked = _valid(L, block_n, vis.shape[2])
        return int(vis.sum()), int((vis.long() * walked).sum()), B * vis.shape[1]

    head_blocks = HQ // heads

    def query_walk(kernel, matmuls):
        """(FLOPs, bytes of the key/value walk) of the forward or dq kernel: per program its count; per pair the
        index, k and v tiles, subtree_end (and positions) of the keys."""
        bm, bn = cfgs[kernel].blocks["BLOCK_M"], cfgs[kernel].blocks["BLOCK_N"]
        n_pairs, walked_keys, programs = pairs(bm, bn, transpose=False)
        flops = head_blocks * n_pairs * matmuls * (2 * heads * bm * bn * BD)
        return flops, head_blocks * (4 * programs + 4 * n_pairs + walked_keys * (2 * row + 4 + depth))

    costs = []
    if "fwd" in passes:
        flops, kv_walk = query_walk("fwd", 2)
        costs.append(KernelCost("tree_attention.fwd", flops,
                                kv_walk + HQ * B * L * (2 * row + 4 + depth)))  # q (and positions); o, lse
    if "bwd" not in passes:
        return costs
    costs.append(KernelCost("tree_attention.delta", 0, B * HQ * L * (2 * row + 4)))
    if dq_mode == "split":
        flops, kv_walk = query_walk("dq", 3)
        costs.append(KernelCost("tree_attention.dq", flops,
                                kv_walk + HQ * B * L * (3 * row + 8 + depth)))  # q, do, lse, delta (positions); dq
    bm, bn = cfgs["dkdv"].blocks["BLOCK_M"], cfgs["dkdv"].blocks["BLOCK_N"]
    n_pairs, walked_queries, programs = pairs(bm, bn, transpose=True)
    dots = 5 if dq_mode == "atomic" else 4
    # q, do, lse, delta (and positions) (+ dq atomics)
    per_query = 2 * row + 8 + depth + (2 * 4 * D if dq_mode == "atomic" else 0)
    # per program: count, k, v, subtree_end (and positions) of its keys, dk, dv; per pair: index, query rows
    nbytes = HKV * (4 * programs + B * L * (4 * row + 4 + depth)) + HQ * (4 * n_pairs + walked_queries * per_query)
    costs.append(KernelCost("tree_attention.dkdv", HQ * n_pairs * dots * 2 * bm * bn * BD, nbytes))
    if dq_mode == "atomic":
        costs.append(KernelCost("tree_attention.cast", 0, B * HQ * L * D * (4 + e)))
    return costs


def visible_pairs(subtree_end, position_ids=None, window=None, chunk=1024):
    """Number of visible (query, key) pairs of ``subtree_end [B, L]`` (under ``window`` over ``position_ids``),
    counted ``chunk`` keys at a time (no [L, L] buffer)."""
    B, L = subtree_end.shape
    ends = subtree_end.long()
    pos = torch.arange(L, device=subtree_end.device)
    if window is None:
        return int((ends - pos).sum())
    positions = position_ids.long()
    total = 0
    for k0 in range(0, L, chunk):
        keys = pos[k0:k0 + chunk]  # [c]
        sees = (keys[:, None] <= pos) & (pos < ends[:, k0:k0 + chunk, None])  # [B, c, L(query)]
        near = positions[:, None, :] - positions[:, k0:k0 + chunk, None] < window
        total += int((sees & near).sum())
    return total


def ideal_costs(subtree_end, HQ, HKV, D, dtype, passes=("fwd", "bwd"), position_ids=None, window=None):
    """The visible-pairs ideal as one KernelCost: 2 matmuls forward and 5 backward of 2*D FLOPs per visible
    (query, key) pair per query head (under ``window`` over ``position_ids`` when given); compulsory bytes
    once (q, k, v, o; and do, dq, dk, dv)."""
    B, L = subtree_end.shape
    visible = visible_pairs(subtree_end, position_ids, window)
    e = torch.empty((), dtype=dtype).element_size()
    matmuls = 7 if "bwd" in passes else 2
    tensors = 4 if "bwd" in passes else 2
    return [KernelCost("ideal", matmuls * 2 * visible * D * HQ, tensors * B * L * D * (HQ + HKV) * e)]


def extra_memory_bytes(subtree_end, HQ, D, configs=None, dq_mode="split", arch=90):
    """Bytes allocated beyond q, k, v, o and the gradients: lse and delta (fp32 per query row), the tile
    lists (int32), and in atomic mode the fp32 dq buffer (``configs`` default: the GPU's of ``arch``)."""
    cfgs = configs or gpu_configs("tree_attention", arch)
    B, L = subtree_end.shape
    lists = 0
    for name, listed_per in (("fwd", "BLOCK_M"), ("dq", "BLOCK_M"), ("dkdv", "BLOCK_N")):  # a count per listed tile
        tm, tn = (triton.cdiv(L, cfgs[name].blocks[k]) for k in ("BLOCK_M", "BLOCK_N"))
        lists += 4 * B * (tm * tn + triton.cdiv(L, cfgs[name].blocks[listed_per]))
    return 2 * 4 * B * HQ * L + lists + (4 * B * HQ * L * D if dq_mode == "atomic" else 0)


# (WINDOW, SOFTCAP) combinations launched: none (most models), window (Mistral, Gemma3's local layers), softcap
# (Gemma2's global layers), both (Gemma2's local layers)
GATE_OPTIONS = ((False, False), (True, False), (False, True), (True, True))


def _option_tag(window, softcap):
    return ("-window" if window else "") + ("-softcap" if softcap else "")


def _gate_entry(name, kernel, signature, constexprs, cfg, archs, **kw):
    """A GateEntry compiled as the launches specialise it: every pointer 16-byte aligned, every stride a multiple
    of the head dim (64 or 128), so divisible by 16; at least 2 CTAs per SM."""
    aligned = tuple(n for n, t in signature.items() if t.startswith("*") or n in _STRIDES)
    return GateEntry(name, kernel, signature, constexprs, cfg, aligned=aligned, min_ctas_per_sm=2, archs=archs, **kw)


_STRIDES = {"sqb", "sqh", "sql", "skb", "skh", "skl", "svb", "svh", "svl", "sob", "soh", "sol"}


def _per_arch(kernel):
    """[(archs, LaunchConfig)]: the gate's architectures grouped by their configuration of ``kernel``."""
    groups = []  # [(archs, cfg)]; LaunchConfig holds a dict, so it is compared, not hashed
    for arch in GATE_ARCHS:
        cfg = gpu_configs("tree_attention", arch)[kernel]
        same = [g for g in groups if g[1] == cfg]
        if same:
            same[0][0].append(arch)
        else:
            groups.append(([arch], cfg))
    return [(tuple(archs), cfg) for archs, cfg in groups]


def gate_entries():
    entries = []
    strides = {n: "i32" for n in ("sqb", "sqh", "sql", "skb", "skh", "skl", "svb", "svh", "svl")}
    options = {"depth_ptr": "*i32", "window": "i32", "softcap": "fp32"}
    for dtype in (torch.bfloat16, torch.float16):
        t = TRITON_DTYPE[dtype]
        io = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "end_ptr": "*i32", "cnt_ptr": "*i32",
              "idx_ptr": "*i32"}
        grads = {"do_ptr": f"*{t}", "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
        walk = {"L": "i32", "HQ": "i32", "GROUP": "i32", "N_QT": "i32", "N_KT": "i32", "scale": "fp32", **options}
        for d in GATE_HEAD_DIMS:
            for window, softcap in GATE_OPTIONS:
                base = {"HEAD_DIM": d, "BLOCK_D": d, "UPCAST": False, "WINDOW": window, "SOFTCAP": softcap}
                tag = _option_tag(window, softcap)
                for heads in range(1, MAX_HEADS + 1):
                    if MAX_HEADS % heads:
                        continue
                    for archs, cfg in _per_arch("fwd"):
                        entries.append(_gate_entry(
                            f"tree_attention.fwd[{t}-d{d}-heads{heads}{tag}]", _fwd_kernel,
                            {**io, "o_ptr": f"*{t}", "lse_ptr": "*fp32", **strides, "sob": "i32", "soh": "i32",
                             "sol": "i32", **walk}, {**base, "HEADS": heads, **cfg.blocks}, cfg, archs))
                    for archs, cfg in _per_arch("dq"):
                        entries.append(_gate_entry(
                            f"tree_attention.dq[{t}-d{d}-heads{heads}{tag}]", _dq_kernel,
                            {**io, **grads, "dq_ptr": f"*{t}", **strides, **walk},
                            {**base, "HEADS": heads, **cfg.blocks}, cfg, archs))
                for atomic in (False, True):
                    for archs, cfg in _per_arch("dkdv"):
                        entries.append(_gate_entry(
                            f"tree_attention.dkdv[{t}-d{d}{'-atomic' if atomic else ''}{tag}]", _dkdv_kernel,
                            {**io, **grads, "dk_ptr": f"*{t}", "dv_ptr": f"*{t}", "dq_ptr": "*fp32", **strides,
                             "L": "i32", "HQ": "i32", "HKV": "i32", "GROUP": "i32", "N_KT": "i32", "N_QT": "i32",
                             "scale": "fp32", **options},
                            {**base, "ATOMIC_DQ": atomic, **cfg.blocks}, cfg, archs))
            for archs, cfg in _per_arch("delta"):
                entries.append(_gate_entry(
                    f"tree_attention.delta[{t}-d{d}]", _delta_kernel,
                    {"o_ptr": f"*{t}", "do_ptr": f"*{t}", "delta_ptr": "*fp32", "ROWS": "i32"},
                    {"HEAD_DIM": d, "BLOCK_D": d, **cfg.blocks}, cfg, archs, expects_mma=False))
        for archs, cfg in _per_arch("cast"):
            entries.append(_gate_entry(f"tree_attention.cast[{t}]", _cast_kernel,
                                       {"src_ptr": "*fp32", "dst_ptr": f"*{t}", "n": "i32"}, dict(cfg.blocks), cfg,
                                       archs, expects_mma=False))
    return entries
