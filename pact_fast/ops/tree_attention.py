"""Attention over a DFS-packed token trie: key ``k`` is visible to query ``q`` iff
``k <= q < subtree_end[k]`` (a query sees its ancestors' segments and its own segment causally).

Two options every backend applies, forward and backward, as Hugging Face models define them:

- sliding window (``window``, e.g. Mistral, Gemma's local layers): key ``k`` is visible only if also
  ``position_ids[q] - position_ids[k] < window``, with ``position_ids`` the trie depths (each token's
  position along its own path, ``pack_tree(...).position_ids``). Along one path this is exactly the
  windowed causal mask of that sequence alone.
- logit softcap (``softcap``, Gemma2's ``attn_logit_softcapping``): scores ``s = scale * q.k`` become
  ``softcap * tanh(s / softcap)`` before masking and softmax.

Backends (SPEC section 3):

- ``triton``: block-sparse flash kernels in ``pact_fast.kernels.tree_attention``; no fully
  masked tile is ever computed, nor a tile wholly outside the window. CUDA, or the CPU under
  ``TRITON_INTERPRET=1``.
- ``sdpa``: a dense boolean ``[L, L]`` mask through ``scaled_dot_product_attention`` (with a softcap,
  which SDPA cannot apply, the same mask over explicitly computed scores).
- ``varlen``: each segment attends to its gathered ancestors' keys/values plus itself causally,
  through flash-attn's ``flash_attn_varlen_func`` (its ``window_size`` and ``softcap``) when installed,
  else SDPA per segment.
- ``flex``: FlexAttention with a ``mask_mod`` over ``subtree_end`` and the positions, a ``score_mod``
  for the softcap (CUDA only: no CPU backward).

A layout (``build_layout``) serves every window of one forward (Gemma alternates full and windowed
layers): what depends on the window (triton tile lists, flex block masks) is built on its first use
and cached on the layout.
"""
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import resolve_backend
from ._custom import custom_op

BACKENDS = ("auto", "triton", "sdpa", "varlen", "flex")


def tree_mask(subtree_end, position_ids=None, window=None):
    """Dense visibility ``[B, L, L]`` bool (query, key) from ``subtree_end [B, L]``; with ``window``, also
    ``position_ids[q] - position_ids[k] < window`` (``position_ids [B, L]``)."""
    L = subtree_end.shape[-1]
    pos = torch.arange(L, device=subtree_end.device)
    q = pos[:, None]
    k = pos[None, :]
    mask = (k <= q) & (q < subtree_end[:, None, :])
    if window is not None:
        mask &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    return mask


def check_options(window, softcap, position_ids):
    """Raise ValueError on a window below 1 or without position ids, or a negative softcap; returns
    (window, softcap) normalised: None when off (a softcap of 0 is off)."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"tree_attention: window must be an integer >= 1 (or None for no window), got {window!r}")
        if position_ids is None:
            raise ValueError("tree_attention: a window needs position_ids [B, L] (pack_tree(...).position_ids), "
                             "passed to tree_attention or build_layout")
        # the layout's positions are int32: a window past int32 wrapped in the sdpa / varlen masks (2^31 hid every
        # key), and no two tokens of a trie are that far apart, so it is the widest int32 window, exactly
        window = min(int(window), torch.iinfo(torch.int32).max)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not 0 <= softcap < math.inf:
            raise ValueError(f"tree_attention: softcap must be a finite number > 0 (None or 0 for no softcap), "
                             f"got {softcap!r}")
        softcap = float(softcap) or None
    return window, softcap


def _scale(scale):
    """``scale`` as a float: a finite real number, or a one-element tensor that does not require grad."""
    if isinstance(scale, torch.Tensor):
        if scale.requires_grad:
            raise ValueError("tree_attention: `scale` is a tensor that requires grad; the op takes it as a constant "
                             "(pass float(t) or t.detach())")
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"tree_attention: `scale` must be a finite number, got a {scale.dtype} tensor of shape "
                             f"{tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"tree_attention: `scale` must be a finite number (None: 1 / sqrt(D)), got {scale!r}")
    return float(scale)


def validate_position_ids(position_ids, subtree_end):
    """Raise unless ``position_ids`` is an integer ``[B, L]`` tensor like ``subtree_end`` that grows by one from
    each token to its children (a root's position is free): the trie depths, what a window is measured in. Other
    positions would give each backend another window (varlen counts key offsets, the others compare positions)."""
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tree_attention: position_ids must be int32 or int64, got {position_ids.dtype}")
    if position_ids.shape != subtree_end.shape:
        raise ValueError(f"tree_attention: position_ids must be [B, L] = {list(subtree_end.shape)} like subtree_end, "
                         f"got {list(position_ids.shape)}")
    B, L = subtree_end.shape
    if not L:
        return
    # depth[t] = the tokens whose subtree holds t: +1 after each token, -1 at its subtree's end
    ends = subtree_end.long()
    delta = torch.zeros(B, L + 1, dtype=torch.long, device=ends.device)
    delta[:, 1:] += 1
    delta.scatter_add_(1, ends, torch.full_like(ends, -1))
    depth = delta.cumsum(1)[:, :L]
    idx = torch.arange(L, device=ends.device).expand(B, L)
    root = torch.where(depth == 0, idx, torch.zeros_like(idx)).cummax(1).values  # the root of each token's tree
    expected = position_ids.long().gather(1, root) + depth
    if not torch.equal(position_ids.long(), expected):
        b, t = (int(x) for x in (position_ids.long() != expected).nonzero()[0])
        raise ValueError(f"tree_attention: position_ids[{b}, {t}] = {int(position_ids[b, t])}, expected {int(expected[b, t])}:"
                         " positions grow by one from each token to its children along the trie (its depths, "
                         "pack_tree(...).position_ids)")


def validate_layout(q, k, v, subtree_end):
    """Raise ValueError on shapes or a subtree_end that no token trie produces."""
    validate_shapes(q, k, v, subtree_end)
    validate_subtree_end(subtree_end)


def validate_shapes(q, k, v, subtree_end):
    """Raise on shapes, dtypes or devices of q, k, v and subtree_end that do not fit together (no host sync)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"tree_attention: q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, HQ, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != L or k.shape[3] != D:
        raise ValueError(f"tree_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={B}, Hkv, L={L}, D={D}]")
    if min(HQ, k.shape[1], D) < 1:
        raise ValueError(f"tree_attention: heads Hq, Hkv and head dim D must be >= 1; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if HQ % k.shape[1]:
        raise ValueError(f"tree_attention: query heads Hq={HQ} must be a multiple of key/value heads Hkv={k.shape[1]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"tree_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"tree_attention: q, k, v must be floating point, got {q.dtype}")
    if tuple(subtree_end.shape) != (B, L):
        raise ValueError(f"tree_attention: subtree_end must be [B={B}, L={L}], got {tuple(subtree_end.shape)}")
    devices = {t.device for t in (q, k, v, subtree_end)}
    if len(devices) > 1:  # the layout (and the backend "auto" picks) follows subtree_end's device
        raise ValueError(f"tree_attention: q, k, v and subtree_end live on different devices: "
                         f"{sorted(map(str, devices))}")


def validate_subtree_end(subtree_end):
    """Raise unless ``subtree_end [B, L]`` is integer with ``t + 1 <= subtree_end[b, t] <= L`` and subtrees that
    nest, as a token trie's do: every token u of t's subtree (t < u < subtree_end[b, t]) has
    ``subtree_end[b, u] <= subtree_end[b, t]``."""
    if subtree_end.dim() != 2:
        raise ValueError(f"tree_attention: subtree_end must be [B, L], got shape {tuple(subtree_end.shape)} (one "
                         "packed row, pack_tree(...).subtree_end [L], is subtree_end[None])")
    L = subtree_end.shape[-1]
    if subtree_end.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tree_attention: subtree_end must be int32 or int64, got {subtree_end.dtype}")
    if subtree_end.is_meta:
        raise ValueError("tree_attention: subtree_end is on the meta device; the layout is built from its values "
                         "(pass real tensors)")
    own = torch.arange(1, L + 1, device=subtree_end.device)
    out_of_range = (subtree_end < own) | (subtree_end > L)
    inside = _subtree_max(subtree_end)
    if bool((out_of_range | (inside > subtree_end)).any()):  # one host synchronisation for both checks
        if bool(out_of_range.any()):
            b, t = (int(x) for x in out_of_range.nonzero()[0])
            raise ValueError(f"tree_attention: subtree_end[{b}, {t}] = {int(subtree_end[b, t])} must lie in "
                             f"[{t + 1}, {L}] (at least one past the token itself, at most L)")
        b, t = (int(x) for x in (inside > subtree_end).nonzero()[0])
        raise ValueError(f"tree_attention: subtree_end[{b}, {t}] = {int(subtree_end[b, t])}, but a token of that "
                         f"subtree has its own subtree end at {int(inside[b, t])}: subtrees must nest, as a token "
                         "trie's do (pact_fast.packing.pack_tree)")


def _subtree_max(subtree_end):
    """[B, L] the largest subtree_end of the tokens strictly inside each token's subtree (0 for a leaf): range
    maxima over [t + 1, subtree_end[t]) from a sparse table (level j: the max of each window of 2^j tokens)."""
    e = subtree_end.long()
    B, L = e.shape
    levels = [e]
    while 2 ** len(levels) <= L:
        w = 2 ** (len(levels) - 1)
        levels.append(torch.maximum(levels[-1][:, :-w], levels[-1][:, w:]))
    start = torch.arange(1, L + 1, device=e.device).expand(B, L)
    size = e - start  # tokens below t in its subtree
    inside = torch.zeros_like(e)
    for j, level in enumerate(levels):
        w, last = 2 ** j, level.shape[1] - 1
        both = torch.maximum(level.gather(1, start.clamp(max=last)), level.gather(1, (e - w).clamp(0, last)))
        inside = torch.where((size >= w) & (size < 2 * w), both, inside)
    return inside


def _repeat_kv(q, k, v):
    """k, v [B, Hkv, L, D] repeated to q's Hq heads (each key/value head serves Hq / Hkv query heads)."""
    group = q.shape[1] // k.shape[1]
    return (k, v) if group == 1 else (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


def _explicit(q, k, v, mask, scale, softcap):
    """softmax(cap(scale * q @ k^T) masked) @ v computed step by step; q [..., M, D], k, v [..., N, D] (heads
    already repeated), mask broadcastable to [..., M, N] bool, cap = softcap * tanh(. / softcap) or none."""
    s = (q @ k.transpose(-1, -2)) * scale  # [..., M, N]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _attend(q, k, v, mask, scale, softcap):
    """Masked attention through PyTorch's SDPA, or explicitly when a softcap is set (SDPA has none)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return _explicit(q, k, v, mask, scale, softcap)


def tree_attention_reference(q, k, v, subtree_end, scale=None, *, position_ids=None, window=None, softcap=None):
    """Plain softmax attention under the tree mask (and the window, and the softcap), in the inputs' dtype
    (run it in float64 for tests). Arguments as ``tree_attention``'s."""
    window, softcap = check_options(window, softcap, position_ids)
    k, v = _repeat_kv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _explicit(q, k, v, tree_mask(subtree_end, position_ids, window)[:, None], scale, softcap)


def _sdpa(q, k, v, layout, scale, window, softcap):
    """The dense-mask backend: PyTorch's SDPA under the [B, 1, L, L] mask."""
    k, v = _repeat_kv(q, k, v)
    return _attend(q, k, v, tree_mask(layout.subtree_end, layout.position_ids, window)[:, None], scale, softcap)


def segments(subtree_end):
    """Split a layout [L] into trie segments: returns a list of (start, stop, ancestors [n] long).

    Tokens t and t+1 share a segment iff t+1 is t's only child: subtree_end[t] > t + 1 and
    subtree_end[t+1] == subtree_end[t]. The ancestors of a segment are the keys before its start
    whose subtree contains it."""
    ends = subtree_end.tolist()
    L = len(ends)
    out, start = [], 0
    for t in range(L):
        if t + 1 == L or not (ends[t] > t + 1 and ends[t + 1] == ends[t]):
            anc = [j for j in range(start) if ends[j] > start]
            out.append((start, t + 1, torch.tensor(anc, dtype=torch.long, device=subtree_end.device)))
            start = t + 1
    return out


@dataclass
class VarlenRow:
    """One batch row of a layout for the varlen backend: every segment attends to its gathered keys."""

    bounds: list  # [(start, stop)] of each segment, python ints
    cu_k: list  # [S + 1] offsets of each segment's keys in kv_index, python ints
    kv_index: torch.Tensor  # [sum_k] long: each segment's ancestor keys, then its own tokens
    cu_q_dev: torch.Tensor  # [S + 1] int32 on the device (flash-attn)
    cu_k_dev: torch.Tensor  # [S + 1] int32 on the device
    kv_pos: Optional[torch.Tensor] = None  # [sum_k] position ids of the gathered keys (None: no position ids)


@dataclass
class TreeAttentionLayout:
    """What every attention layer of one packed forward needs, built once (``build_layout``): all host
    synchronisation of a forward happens there, none inside the layer loop, except once per window value on
    the window's first use (its triton tile lists or flex block mask, then cached in ``masks``)."""

    subtree_end: torch.Tensor  # [B, L] int32
    backend: str  # resolved: triton, sdpa, varlen or flex
    position_ids: Optional[torch.Tensor] = None  # [B, L] int32 trie depths; needed by a window
    dq_mode: str = "split"  # triton backward: "split" (deterministic) or "atomic" (see the launcher)
    varlen: Optional[list] = None  # varlen: a VarlenRow per batch row
    flash_varlen: Optional[object] = None  # varlen on CUDA: flash-attn's flash_attn_varlen_func when installed
    # triton: window -> kernels/tree_attention_launch.TileLists; flex: window -> BlockMask (None: no window)
    masks: dict = field(default_factory=dict)

    def masks_for(self, window):
        """The triton tile lists or flex block mask under ``window`` (None: the tree alone), built on first use."""
        if window not in self.masks:
            if self.backend == "triton":
                from ..kernels import tree_attention_launch as launch

                self.masks[window] = launch.tile_lists(self.subtree_end, position_ids=self.position_ids,
                                                       window=window)
            else:
                self.masks[window] = _flex_block_mask(self.subtree_end, self.position_ids, window)
        return self.masks[window]


def build_layout(subtree_end, backend="auto", *, validate=True, dq_mode="split", position_ids=None, dtype=None):
    """The layout of ``subtree_end [B, L]`` for ``backend``: validated, with the tile lists (triton), the
    segments and their key gathers (varlen) or the block mask (flex) built now, once. ``dq_mode`` picks the
    triton backward's dq path: "split" (deterministic, the default: faster by the performance model) or
    "atomic" (fp32 atomics, 5 matmuls per tile pair; summation order varies). ``position_ids [B, L]`` int
    (the trie depths, ``pack_tree(...).position_ids``) are what a sliding window is measured in; the varlen
    backend needs them to grow by one along every path (flash-attn's window counts key offsets). ``dtype``: the
    inputs' dtype when known (``"auto"`` takes varlen for float64, ``"triton"`` refuses it)."""
    if validate:
        validate_subtree_end(subtree_end)
        if position_ids is not None:
            validate_position_ids(position_ids, subtree_end)
    ends = subtree_end.to(torch.int32).contiguous()
    positions = None if position_ids is None else position_ids.to(torch.int32).contiguous()
    # auto on CPU: per-segment attention beats a dense [L, L] mask (bench/results/group_w-cpu.json)
    backend = resolve_backend("tree_attention", backend, ends.device, BACKENDS, "varlen", dtype)
    if dq_mode not in ("split", "atomic"):
        raise ValueError(f"tree_attention: dq_mode must be 'split' or 'atomic', got {dq_mode!r}")
    layout = TreeAttentionLayout(ends, backend, positions, dq_mode=dq_mode)
    if backend in ("triton", "flex"):
        layout.masks_for(None)
    elif backend == "varlen":
        layout.varlen = [_varlen_row(ends[b], None if positions is None else positions[b])
                         for b in range(ends.shape[0])] if ends.shape[1] else []
        layout.flash_varlen = _flash_varlen() if ends.is_cuda else None
    return layout


def _varlen_row(ends, positions):
    """VarlenRow of one row's ``ends [L]`` (and ``positions [L]`` or None)."""
    segs = segments(ends)
    device = ends.device
    kv = [torch.cat([anc, torch.arange(s, e, device=device)]) for s, e, anc in segs]
    cu_k = [0]
    for idx in kv:
        cu_k.append(cu_k[-1] + len(idx))
    cu_q = [0] + [e for _, e, _ in segs]
    kv_index = torch.cat(kv)  # [sum_k]
    kv_pos = None
    if positions is not None:
        kv_pos = positions.index_select(0, kv_index)  # [sum_k]
        lens = torch.tensor([len(idx) for idx in kv], device=device)
        first = torch.tensor(cu_k[:-1], device=device)
        offset = torch.arange(len(kv_index), device=device) - first.repeat_interleave(lens)
        if not torch.equal(kv_pos, kv_pos[first].repeat_interleave(lens) + offset):
            raise ValueError("tree_attention: position_ids must grow by one from each token to the next along every "
                             "trie path (the trie depths, pack_tree(...).position_ids) for backend='varlen'")
    return VarlenRow([(s, e) for s, e, _ in segs], cu_k, kv_index,
                     torch.tensor(cu_q, device=device, dtype=torch.int32),
                     torch.tensor(cu_k, device=device, dtype=torch.int32), kv_pos)


def _flash_varlen():
    """flash-attn's ``flash_attn_varlen_func``, or None when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _varlen(q, k, v, layout, scale, window, softcap):
    """Per segment: keys = gathered ancestors + own tokens, causal aligned to the bottom right. Their positions
    are consecutive (checked by build_layout), so the window is one on key offsets, as flash-attn applies it."""
    if q.numel() == 0:  # no token (L = 0) or no row (B = 0): an empty output, still in the autograd graph
        return q + 0 * (k.sum() + v.sum())
    flash_attn_varlen_func = layout.flash_varlen
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for b, row in enumerate(layout.varlen):
        kk, vv = k[b].index_select(1, row.kv_index), v[b].index_select(1, row.kv_index)  # [Hkv, sum_k, D]: one gather
        if flash_attn_varlen_func is not None:
            lens_k = [b_ - a for a, b_ in zip(row.cu_k[:-1], row.cu_k[1:])]
            options = {}  # passed only when set: flash-attn before 2.6 has no softcap argument
            if window is not None:
                options["window_size"] = (window - 1, 0)  # keys up to window - 1 positions back, none ahead
            if softcap is not None:
                options["softcap"] = softcap
            o = flash_attn_varlen_func(
                q[b].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), row.cu_q_dev, row.cu_k_dev,
                max(e - s for s, e in row.bounds), max(lens_k), softmax_scale=scale, causal=True, **options)
            out[b] = o.transpose(0, 1)
            continue
        for i, (s, e) in enumerate(row.bounds):
            k0, k1 = row.cu_k[i], row.cu_k[i + 1]
            ks = kk[:, k0:k1].repeat_interleave(group, dim=0)  # [Hq, n_anc + len, D]
            vs = vv[:, k0:k1].repeat_interleave(group, dim=0)
            if k1 - k0 == 1:  # a lone token that sees only itself: softmax over one key is 1, its output its value.
                # Exact, and no SDPA call: Inductor (CPU) compiled a row of such calls with grouped heads into key
                # gradients 90% off, silently
                out[b, :, s:e] = vs
                continue
            n_anc = k1 - k0 - (e - s)
            qpos = torch.arange(e - s, device=q.device)[:, None]
            kpos = torch.arange(k1 - k0, device=q.device)[None, :]
            mask = kpos <= qpos + n_anc  # [len, n_anc + len], causal aligned bottom right
            if window is not None:
                pos = row.kv_pos[k0:k1]  # [n_anc + len]; the segment's own tokens last
                mask = mask & (pos[n_anc:, None] - pos[None, :] < window)
            out[b, :, s:e] = _attend(q[b, :, s:e], ks, vs, mask, scale, softcap)
    return out


def _flex_block_mask(subtree_end, position_ids, window):
    if subtree_end.device.type != "cuda":
        raise ValueError("tree_attention: backend='flex' needs CUDA tensors (FlexAttention has no CPU backward)")
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = subtree_end.shape
    ends = subtree_end.long()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < ends[b, kv_idx])

    def window_mask_mod(b, h, q_idx, kv_idx):
        near = position_ids[b, q_idx] - position_ids[b, kv_idx] < window
        return (kv_idx <= q_idx) & (q_idx < ends[b, kv_idx]) & near

    return create_block_mask(mask_mod if window is None else window_mask_mod, B, None, L, L,
                             device=subtree_end.device)


def _flex(q, k, v, layout, scale, window, softcap):
    from torch.nn.attention.flex_attention import flex_attention

    def capped(score, b, h, q_idx, kv_idx):  # score is already scale * q.k
        return softcap * torch.tanh(score / softcap)

    return flex_attention(q, k, v, score_mod=None if softcap is None else capped, block_mask=layout.masks_for(window),
                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# The Triton path as two torch.library custom ops (pact_fast/ops/_custom.py) with fake (shape-only)
# implementations, so torch.compile keeps them whole in one graph (fullgraph=True works) instead of breaking
# at kernel launches. The tile lists travel as tensors; scale, dq_mode, window (0: none) and softcap (0.0: none)
# as plain arguments.

def _triton_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, subtree_end: torch.Tensor,
                     position_ids: Optional[torch.Tensor], q_count: torch.Tensor, q_index: torch.Tensor,
                     dq_count: torch.Tensor, dq_index: torch.Tensor, k_count: torch.Tensor, k_index: torch.Tensor,
                     scale: float, dq_mode: str, window: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, Hq, L, D], lse [B, Hq, L] fp32, base 2) of contiguous q, k, v. dq_mode is read by backward."""
    from ..kernels import tree_attention_launch as launch

    lists = launch.TileLists(q_count, q_index, dq_count, dq_index, k_count, k_index)
    o, lse, _ = launch.forward(q, k, v, subtree_end, scale, lists,
                               position_ids=position_ids, window=window or None, softcap=softcap or None)
    return o, lse


def _triton_fwd_fake(q, k, v, subtree_end, position_ids, q_count, q_index, dq_count, dq_index, k_count, k_index, scale,
                     dq_mode, window, softcap):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _triton_bwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                     do: torch.Tensor, subtree_end: torch.Tensor, position_ids: Optional[torch.Tensor],
                     q_count: torch.Tensor, q_index: torch.Tensor, dq_count: torch.Tensor, dq_index: torch.Tensor,
                     k_count: torch.Tensor, k_index: torch.Tensor, scale: float, dq_mode: str, window: int,
                     softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the layouts of q, k, v; do contiguous like q."""
    from ..kernels import tree_attention_launch as launch

    lists = launch.TileLists(q_count, q_index, dq_count, dq_index, k_count, k_index)
    return launch.backward(q, k, v, o, lse, do, subtree_end, lists, scale, dq_mode, position_ids=position_ids,
                           window=window or None, softcap=softcap or None)


def _triton_bwd_fake(q, k, v, o, lse, do, subtree_end, position_ids, q_count, q_index, dq_count, dq_index, k_count,
                     k_index, scale, dq_mode, window, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _triton_setup_context(ctx, inputs, output):
    q, k, v, subtree_end, position_ids, *lists, scale, dq_mode, window, softcap = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, subtree_end, position_ids, *lists)
    ctx.options = scale, dq_mode, window, softcap
    ctx.set_materialize_grads(False)  # lse carries no gradient: no zeros [B, Hq, L] allocated per layer


def _triton_backward(ctx, do, _grad_lse):
    q, k, v, o, lse, subtree_end, position_ids, *lists = ctx.saved_tensors
    dq, dk, dv = _triton_bwd(q, k, v, o, lse, do.contiguous(), subtree_end, position_ids, *lists, *ctx.options)
    return (dq, dk, dv) + (None,) * (2 + len(lists) + len(ctx.options))  # subtree_end, position_ids, lists, options


_triton_bwd = custom_op("tree_attention_backward", _triton_bwd_impl, fake=_triton_bwd_fake)
_triton_fwd = custom_op("tree_attention", _triton_fwd_impl, fake=_triton_fwd_fake, backward=_triton_backward,
                        setup_context=_triton_setup_context)


def tree_attention(q, k, v, subtree_end=None, *, scale=None, backend="auto", validate=True, layout=None,
                   dq_mode="split", position_ids=None, window=None, softcap=None):
    """Softmax attention in which query ``q`` sees key ``k`` iff ``k <= q < subtree_end[k]`` (and, with a
    window, ``position_ids[q] - position_ids[k] < window``).

    Args:
        q: ``[B, Hq, L, D]`` queries (fp32/fp16/bf16).
        k, v: ``[B, Hkv, L, D]`` keys and ``[B, Hkv, L, Dv]`` values; ``Hq % Hkv == 0`` (grouped-query attention).
            Values of another head dim than the keys' (multi-head latent attention: DeepSeek-V2/V3's and MiniCPM3's
            192 and 128) are attended zero-padded to the wider of the two (keys and queries padded when the values
            are wider: their dot products are unchanged), the output cut back to ``Dv``.
        subtree_end: ``[B, L]`` int32/int64; one past the last token of each token's subtree
            (``pact_fast.packing.pack_tree`` produces it).
        scale: softmax scale, a finite number (a tensor that requires grad is refused: no gradient reaches it);
            None means ``1 / sqrt(D)``.
        backend: ``"auto"`` (triton on CUDA, varlen on CPU), ``"triton"``, ``"sdpa"``, ``"varlen"`` or ``"flex"``.
        validate: check the layout's values (one host sync); callers that validated the layout once, e.g. per
            packed forward, pass False in every layer. Shapes, dtypes and devices are checked on every call.
        layout: a ``build_layout(subtree_end, backend, position_ids=...)`` made once for several calls (every
            layer of a packed forward): no host synchronisation then happens in the call (but on a window's
            first use); ``subtree_end``, ``backend``, ``dq_mode`` and ``position_ids`` are taken from it (passing
            them too is refused).
        dq_mode: the triton backward's dq path when no layout is given (``build_layout``).
        position_ids: ``[B, L]`` int, each token's position along its own path (the trie depth,
            ``pack_tree(...).position_ids``) when no layout is given; needed by ``window``.
        window: sliding window; None means none. Key ``k`` stays visible to query ``q`` only while
            ``position_ids[q] - position_ids[k] < window`` (Hugging Face's ``sliding_window``); an int >= 1.
        softcap: attention logit softcap; None or 0 means none. Scores ``s = scale * q.k`` become
            ``softcap * tanh(s / softcap)`` before masking and softmax (Gemma2's ``attn_logit_softcapping``).

    Returns:
        ``[B, Hq, L, Dv]`` in the dtype of ``q``; exact gradients for q, k and v.
    """
    if (q.dim() == k.dim() == v.dim() == 4 and k.shape[:3] == v.shape[:3] and q.shape[3] == k.shape[3]
            and min(k.shape[3], v.shape[3]) > 0 and v.shape[3] != k.shape[3]):
        width, dv = max(k.shape[3], v.shape[3]), v.shape[3]
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale  # of the queries' own head dim
        q, k, v = (F.pad(t, (0, width - t.shape[3])) for t in (q, k, v))
        return tree_attention(q, k, v, subtree_end, scale=scale, backend=backend, validate=validate, layout=layout,
                              dq_mode=dq_mode, position_ids=position_ids, window=window, softcap=softcap)[..., :dv]
    if layout is None:
        if subtree_end is None:
            raise ValueError("tree_attention: pass subtree_end or a layout from build_layout")
        window, softcap = check_options(window, softcap, position_ids)
        validate_shapes(q, k, v, subtree_end)
        if validate:
            validate_subtree_end(subtree_end)
            if position_ids is not None:
                validate_position_ids(position_ids, subtree_end)
        layout = build_layout(subtree_end, backend, validate=False, dq_mode=dq_mode, position_ids=position_ids,
                              dtype=q.dtype)
    else:
        given = [name for name, unset in (("subtree_end", subtree_end is None), ("position_ids", position_ids is None),
                                          ("backend", backend == "auto"), ("dq_mode", dq_mode == "split")) if not unset]
        if given:  # the layout's own would be used in their place
            raise ValueError(f"tree_attention: with a layout, pass {', '.join(given)} to build_layout, not to "
                             "tree_attention")
        window, softcap = check_options(window, softcap, layout.position_ids)
        validate_shapes(q, k, v, layout.subtree_end)  # every call: a layout of another batch or length is refused
        if validate:
            validate_subtree_end(layout.subtree_end)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else _scale(scale)
    if layout.backend == "triton":
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # a layout is made before any dtype
            raise TypeError(f"tree_attention: backend='triton' takes fp32, fp16 or bf16 inputs, got {q.dtype}; "
                            "use backend='varlen' or 'sdpa'")
        o, _ = _triton_fwd(q.contiguous(), k.contiguous(), v.contiguous(), layout.subtree_end,
                           layout.position_ids if window else None, *layout.masks_for(window), scale, layout.dq_mode,
                           window or 0, softcap or 0.0)
        return o
    return {"sdpa": _sdpa, "varlen": _varlen, "flex": _flex}[layout.backend](q, k, v, layout, scale, window, softcap)
