import pytest
import torch

from pact_fast.kernels.tree_attention_launch import visible_tiles
from pact_fast.ops import tree_attention, tree_attention_reference
from pact_fast.ops.tree_attention import build_layout, tree_mask
from pact_fast.packing import pack_tree
from conftest import rel_err
from trees import pact_group, random_tree_sequences

TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


def _packed(seeds_depths):
    """(subtree_end [B, L], position_ids [B, L]) of a batch of packed trees padded to one length with
    trailing single-token chains (each padding token sees only itself, at position 0)."""
    packs = [pack_tree(random_tree_sequences(s, d)) for s, d in seeds_depths]
    L = max(p.num_tokens for p in packs)
    ends, positions = [], []
    for p in packs:
        ends.append(torch.cat([p.subtree_end, torch.arange(p.num_tokens + 1, L + 1)]))
        positions.append(torch.cat([p.position_ids, torch.zeros(L - p.num_tokens, dtype=torch.long)]))
    return torch.stack(ends), torch.stack(positions)


def _layout(seeds_depths):
    """Batch of packed trees padded to one length with trailing single-token chains."""
    return _packed(seeds_depths)[0]


# fp16 runs on the Triton kernels only: the fp16 SDPA/varlen paths are PyTorch's own kernels.
BACKEND_DTYPES = [pytest.param(b, torch.float32, id=f"{b}-fp32") for b in ("sdpa", "varlen", "triton")] + [
    pytest.param("triton", torch.float16, id="triton-fp16")]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("HQ,HKV,D", [(4, 2, 24), (3, 3, 16), (4, 1, 32)], ids=["gqa2-D24", "mha-D16", "mqa-D32"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_matches_float64_reference(backend, dtype, HQ, HKV, D, depth, device):
    subtree_end = _layout([(depth, depth), (depth + 10, depth)]).to(device)
    B, L = subtree_end.shape
    g = torch.Generator().manual_seed(depth)
    q, k, v, do = (torch.randn(B, h, L, D, generator=g) for h in (HQ, HKV, HKV, HQ))
    ours = [t.to(dtype).to(device).clone().requires_grad_() for t in (q, k, v)]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out = tree_attention(*ours, subtree_end, backend=backend)
    out_r = tree_attention_reference(*ref, subtree_end.cpu())
    assert out.dtype == dtype and out.shape == (B, HQ, L, D)
    assert rel_err(out.cpu(), out_r) < TOL[dtype]
    out.backward(do.to(dtype).to(device))
    out_r.backward(do.double())
    for name, o, r in zip("qkv", ours, ref):
        assert rel_err(o.grad.cpu(), r.grad) < TOL[dtype], f"d{name}"


def test_pact_group_layout_with_custom_scale():
    subtree_end = pack_tree(pact_group()).subtree_end[None]
    L = subtree_end.shape[1]
    assert L % 16, "layout should not be a multiple of the interpreter tile"
    q, k, v = (torch.randn(1, 2, L, 16, dtype=torch.float64) for _ in range(3))
    ref = tree_attention_reference(q, k, v, subtree_end, scale=0.3)
    out = tree_attention(q.float(), k.float(), v.float(), subtree_end, scale=0.3, backend="triton")
    assert rel_err(out, ref) < 2e-5


@pytest.mark.parametrize("block_m,block_n", [(4, 4), (16, 16), (8, 16), (16, 4)])
def test_visible_tiles_are_exactly_the_tiles_with_a_visible_pair(block_m, block_n):
    subtree_end = _layout([(1, 3), (2, 4)])
    visible = visible_tiles(subtree_end, block_m, block_n)
    mask = tree_mask(subtree_end)  # [B, L(query), L(key)]
    B, L = subtree_end.shape
    Tm, Tn = -(-L // block_m), -(-L // block_n)
    padded = torch.nn.functional.pad(mask, (0, Tn * block_n - L, 0, Tm * block_m - L))
    expected = padded.view(B, Tm, block_m, Tn, block_n).any(-1).any(2)  # [B, query tile, key tile]
    assert torch.equal(visible, expected)
    assert expected.sum() < Tm * Tn * B, "a tree layout leaves some tiles fully masked"


def test_tile_lists_list_each_visible_tile_once_ascending():
    from pact_fast.kernels.tree_attention_launch import INTERPRET_CONFIGS, tile_lists

    subtree_end = _layout([(1, 3), (2, 4)])
    lists = tile_lists(subtree_end, INTERPRET_CONFIGS)
    fwd, dq, bwd = (INTERPRET_CONFIGS[k].blocks for k in ("fwd", "dq", "dkdv"))
    assert fwd["BLOCK_M"] != dq["BLOCK_M"], "the forward and dq walk lists of different query tiles"
    for count, index, visible in ((lists.q_count, lists.q_index, visible_tiles(subtree_end, fwd["BLOCK_M"], fwd["BLOCK_N"])),
                                  (lists.dq_count, lists.dq_index,
                                   visible_tiles(subtree_end, dq["BLOCK_M"], dq["BLOCK_N"])),
                                  (lists.k_count, lists.k_index,
                                   visible_tiles(subtree_end, bwd["BLOCK_M"], bwd["BLOCK_N"]).transpose(1, 2))):
        for b in range(visible.shape[0]):
            for i in range(visible.shape[1]):
                listed = index[b, i, : count[b, i]].tolist()
                assert listed == visible[b, i].nonzero().flatten().tolist()


@pytest.mark.parametrize("HQ,HKV", [(4, 2), (6, 2), (8, 1), (2, 2)], ids=["gqa2", "gqa3", "mqa8", "mha"])
@pytest.mark.parametrize("dq_mode", ["split", "atomic"])
def test_triton_dq_modes_and_head_stacking_match_float64(HQ, HKV, dq_mode):
    """Every GQA group size (as many query heads per forward / dq program as ``heads_per_program`` stacks, at most
    ``MAX_HEADS``) in both dq modes."""
    subtree_end = _layout([(3, 3), (5, 2)])
    B, L = subtree_end.shape
    g = torch.Generator().manual_seed(HQ * 10 + HKV)
    q, k, v, do = (torch.randn(B, h, L, 16, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV, HQ))
    ours = [t.float().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = tree_attention(*ours, subtree_end, backend="triton", dq_mode=dq_mode)
    out_r = tree_attention_reference(*ref, subtree_end)
    assert rel_err(out.detach(), out_r.detach()) < 2e-5
    out.backward(do.float())
    out_r.backward(do)
    for name, o, r in zip("qkv", ours, ref):
        assert rel_err(o.grad, r.grad) < 2e-5, f"d{name}"


def test_triton_refuses_float64_in_one_line():
    """The kernels take fp32, fp16 and bf16; a float64 call (a layout made for triton, or backend="triton") is
    refused with the backends that take it, not compiled for a dtype the kernels were never gated for."""
    e = pack_tree(pact_group()).subtree_end[None]
    q = torch.randn(1, 2, e.shape[1], 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton' takes fp32, fp16 or bf16 inputs, got torch.float64"):
        tree_attention(q, q, q, e, backend="triton")
    with pytest.raises(TypeError, match="use backend='varlen' or 'sdpa'"):
        tree_attention(q, q, q, layout=build_layout(e, "triton"))


def test_unknown_dq_mode_is_refused():
    e = pack_tree(pact_group()).subtree_end[None]
    q = torch.randn(1, 2, e.shape[1], 16)
    with pytest.raises(ValueError, match="dq_mode"):
        tree_attention(q, q, q, e, backend="triton", dq_mode="fast")


@pytest.mark.parametrize("change,exc,word", [
    (lambda q, k, v, e: (q, k, v, e - 1), ValueError, "subtree_end"),
    (lambda q, k, v, e: (q, k, v, e + 50), ValueError, "subtree_end"),
    (lambda q, k, v, e: (q, k, v, e[:, :-1]), ValueError, "subtree_end"),
    (lambda q, k, v, e: (q, k, v, e.float()), TypeError, "subtree_end"),
    (lambda q, k, v, e: (q[:, :3], k, v, e), ValueError, "multiple"),
    (lambda q, k, v, e: (q, k[..., :8], v, e), ValueError, "k "),
    (lambda q, k, v, e: (q[0], k, v, e), ValueError, "B, H, L, D"),
    (lambda q, k, v, e: (q, k.double(), v, e), TypeError, "dtypes"),
    (lambda q, k, v, e: (q[..., :0], k[..., :0], v[..., :0], e), ValueError, "head dim D must be >= 1"),
    (lambda q, k, v, e: (q[:, :0], k[:, :0], v[:, :0], e), ValueError, "heads Hq, Hkv"),
    # a layout on another device than q (its "auto" backend picked for that device), and one on the meta device,
    # which has no values to build from: both were "Tensor.item() cannot be called on meta tensors"
    (lambda q, k, v, e: (q, k, v, e.to("meta")), ValueError, r"live on different devices: \['cpu', 'meta'\]"),
    (lambda q, k, v, e: (q.to("meta"), k.to("meta"), v.to("meta"), e.to("meta")), ValueError,
     "subtree_end is on the meta device"),
], ids=["end-below-self", "end-past-L", "end-shape", "end-float", "heads", "k-shape", "q-rank", "dtype", "dim-0",
        "heads-0", "end-on-another-device", "meta"])
def test_bad_layout_is_a_clear_error(change, exc, word):
    e = pack_tree(pact_group()).subtree_end[None]
    L = e.shape[1]
    q, k, v = torch.randn(1, 4, L, 16), torch.randn(1, 2, L, 16), torch.randn(1, 2, L, 16)
    with pytest.raises(exc, match=word):
        tree_attention(*change(q, k, v, e), backend="sdpa")


@pytest.mark.parametrize("backend", ["sdpa", "varlen", "triton"])
@pytest.mark.parametrize("B,L", [(1, 0), (0, 5)], ids=["no-token", "no-row"])
def test_an_empty_batch_gives_empty_outputs_and_gradients(backend, B, L):
    """No token (L = 0) or no row (B = 0): every backend returns the empty [B, Hq, L, D] output, and backward
    gives q, k and v empty gradients (varlen failed in torch.cat, or returned an output outside the graph)."""
    q = torch.randn(B, 4, L, 8, requires_grad=True)
    k, v = (torch.randn(B, 2, L, 8, requires_grad=True) for _ in range(2))
    e = torch.arange(1, L + 1).expand(B, L).contiguous()
    o = tree_attention(q, k, v, e, backend=backend)
    assert o.shape == (B, 4, L, 8) and o.requires_grad
    o.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))


@pytest.mark.parametrize("options", [{}, {"window": 4, "softcap": 2.0}], ids=["plain", "window-softcap"])
def test_flex_on_cpu_is_refused(options):
    packed = pack_tree(pact_group())
    e = packed.subtree_end[None]
    q = torch.randn(1, 2, e.shape[1], 16)
    with pytest.raises(ValueError, match="CUDA"):
        tree_attention(q, q, q, e, backend="flex", position_ids=packed.position_ids[None], **options)


@pytest.mark.parametrize("backend", ["triton", "varlen", "sdpa"])
def test_torch_compile_fullgraph_matches_eager(backend):
    """With a layout built outside, tree_attention compiles into one graph (the Triton path is a
    torch.library custom op with a fake implementation) and gives eager's values and gradients."""
    subtree_end = pack_tree(pact_group()).subtree_end[None]
    layout = build_layout(subtree_end, backend)

    def loss(q, k, v):
        return (tree_attention(q, k, v, layout=layout, validate=False) ** 2).sum()

    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1, h, subtree_end.shape[1], 16, generator=g) for h in (4, 2, 2)]
    eager = [t.clone().requires_grad_() for t in inputs]
    compiled = [t.clone().requires_grad_() for t in inputs]
    loss(*eager).backward()
    torch._dynamo.reset()
    out = torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled)
    out.backward()
    assert torch.allclose(out, loss(*eager), rtol=1e-6)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sliding window and logit softcap
# ---------------------------------------------------------------------------------------------

OPTIONS = [
    pytest.param({"window": 3}, id="window3"),
    pytest.param({"window": 2}, id="window2"),
    pytest.param({"softcap": 1.5}, id="softcap"),
    pytest.param({"window": 5, "softcap": 1.5}, id="window5-softcap"),
]


def _inputs(B, L, HQ, HKV, D, seed):
    """Fresh random float64 q, k, v, do."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV, HQ)]


def _check(backend, dtype, options, tol, dq_mode="split", HQ=4, HKV=2, D=16, seeds_depths=((3, 3), (5, 2))):
    """tree_attention under ``options`` against the float64 reference: output and the gradients of q, k, v."""
    ends, positions = _packed(seeds_depths)
    B, L = ends.shape
    assert "window" not in options or options["window"] < max(int(p.max()) for p in positions), \
        "the window must be shorter than the sequences"
    q, k, v, do = _inputs(B, L, HQ, HKV, D, seed=sum(map(ord, repr(options))))
    ours = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = tree_attention(*ours, ends, backend=backend, dq_mode=dq_mode, position_ids=positions, **options)
    out_r = tree_attention_reference(*ref, ends, position_ids=positions, **options)
    assert out.dtype == dtype and rel_err(out.detach(), out_r.detach()) < tol
    out.backward(do.to(dtype))
    out_r.backward(do)
    for name, o, r in zip("qkv", ours, ref):
        assert rel_err(o.grad, r.grad) < tol, f"d{name}"


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_window_and_softcap_match_float64_reference(backend, options):
    _check(backend, torch.float64, options, 1e-12)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dq_mode", ["split", "atomic"])
def test_triton_window_and_softcap_match_float64_reference(dtype, tol, dq_mode, options):
    _check("triton", dtype, options, tol, dq_mode)


def test_triton_window_with_stacked_heads_and_d24():
    """GQA groups of 2 stack two heads per program (the query positions are read per stacked row); D=24 pads."""
    _check("triton", torch.float32, {"window": 4, "softcap": 3.0}, 1e-4, HQ=8, HKV=1, D=24)


def test_window_is_huggingface_sliding_window_of_each_sequence_alone():
    """Packed and windowed, every sequence's rows equal that sequence run alone under Hugging Face's own
    sliding-window causal mask (transformers.masking_utils)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    window = 4
    seqs = random_tree_sequences(11, 3)
    packed = pack_tree(seqs)
    L = packed.num_tokens
    assert max(map(len, seqs)) > 2 * window, "the window must be shorter than the sequences"
    q, k, v, _ = _inputs(1, L, 2, 1, 8, seed=5)
    for backend in ("sdpa", "varlen"):
        out = tree_attention(q, k, v, packed.subtree_end[None], backend=backend,
                             position_ids=packed.position_ids[None], window=window, softcap=2.0)
        for rows in packed.token_index:
            n = len(rows)
            pos = torch.arange(n)
            mask = sliding_window_causal_mask_function(window)(0, 0, pos[:, None], pos[None, :])  # [n, n]
            qs, ks, vs = (t[0, :, rows] for t in (q, k, v))
            s = 2.0 * torch.tanh((qs @ ks.transpose(-1, -2)) / 8 ** 0.5 / 2.0)
            alone = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vs
            assert rel_err(out[0, :, rows], alone) < 1e-12, backend


def test_one_layout_serves_several_windows_building_each_once(monkeypatch):
    """Full and windowed layers share one layout; a window's tile lists are built on first use, then reused."""
    from pact_fast.kernels import tree_attention_launch as launch

    ends, positions = _packed([(3, 3)])
    calls = []
    real = launch.tile_lists
    monkeypatch.setattr(launch, "tile_lists", lambda *a, **kw: calls.append(kw.get("window")) or real(*a, **kw))
    layout = build_layout(ends, "triton", position_ids=positions)
    q, k, v, _ = _inputs(1, ends.shape[1], 2, 2, 16, seed=1)
    q, k, v = q.float(), k.float(), v.float()
    for window in (None, 3, 5, 3, None, 5):
        out = tree_attention(q, k, v, layout=layout, window=window)
        ref = tree_attention_reference(q.double(), k.double(), v.double(), ends, position_ids=positions, window=window)
        assert rel_err(out, ref) < 1e-4
    assert calls == [None, 3, 5]


@pytest.mark.parametrize("block_m,block_n", [(4, 4), (16, 16), (8, 16), (16, 4)])
@pytest.mark.parametrize("window", [2, 5])
def test_windowed_tiles_drop_only_tiles_wholly_outside_the_window(block_m, block_n, window):
    ends, positions = _packed([(1, 3), (2, 4)])
    B, L = ends.shape
    Tm, Tn = -(-L // block_m), -(-L // block_n)
    tree = visible_tiles(ends, block_m, block_n)
    windowed = visible_tiles(ends, block_m, block_n, positions, window)
    mask = tree_mask(ends, positions, window)
    padded = torch.nn.functional.pad(mask, (0, Tn * block_n - L, 0, Tm * block_m - L))
    has_pair = padded.view(B, Tm, block_m, Tn, block_n).any(-1).any(2)
    assert torch.equal(windowed & has_pair, has_pair), "a tile holding a visible pair was dropped"
    assert torch.equal(windowed, windowed & tree)
    q_min = torch.nn.functional.pad(positions, (0, Tm * block_m - L), value=10 ** 6).view(B, Tm, -1).amin(-1)
    k_max = torch.nn.functional.pad(positions, (0, Tn * block_n - L), value=-1).view(B, Tn, -1).amax(-1)
    assert torch.equal(windowed, tree & (q_min[:, :, None] - k_max[:, None, :] < window))
    assert windowed.sum() < tree.sum(), "the window drops some tiles"


@pytest.mark.parametrize("kwargs,exc,word", [
    (lambda pos: {"window": 0, "position_ids": pos}, ValueError, "window must be an integer >= 1"),
    (lambda pos: {"window": 2.5, "position_ids": pos}, ValueError, "window must be an integer >= 1"),
    (lambda pos: {"window": 3}, ValueError, "window needs position_ids"),
    (lambda pos: {"softcap": -1.0}, ValueError, "softcap must be a finite number > 0"),
    (lambda pos: {"softcap": "30"}, ValueError, "softcap must be a finite number > 0"),
    (lambda pos: {"softcap": float("inf")}, ValueError, "softcap must be a finite number > 0"),  # was NaN out
    (lambda pos: {"scale": float("nan")}, ValueError, "`scale` must be a finite number"),
    (lambda pos: {"scale": torch.tensor(0.25, requires_grad=True)}, ValueError, "`scale` is a tensor that requires"),
    (lambda pos: {"window": 3, "position_ids": pos[:, :-1]}, ValueError, "position_ids must be \\[B, L\\]"),
    (lambda pos: {"window": 3, "position_ids": pos.float()}, TypeError, "position_ids must be int"),
], ids=["window0", "window-float", "no-positions", "softcap-negative", "softcap-str", "softcap-inf", "scale-nan",
        "scale-requires-grad", "positions-shape", "positions-float"])
@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_bad_window_or_softcap_is_a_clear_error(kwargs, exc, word, backend):
    packed = pack_tree(pact_group())
    e = packed.subtree_end[None]
    q = torch.randn(1, 2, e.shape[1], 16)
    with pytest.raises(exc, match=word):
        tree_attention(q, q, q, e, backend=backend, **kwargs(packed.position_ids[None]))


@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_a_layout_of_another_batch_is_refused_without_validation(backend):
    # validate=False skips the layout's values, not its shape: varlen filled the second row with uninitialised memory
    e = pack_tree(pact_group()).subtree_end[None]
    q = torch.randn(2, 2, e.shape[1], 16)
    with pytest.raises(ValueError, match="subtree_end must be \\[B=2"):
        tree_attention(q, q, q, layout=build_layout(e, backend), validate=False)


def test_integer_inputs_are_refused():
    e = pack_tree(pact_group()).subtree_end[None]
    q = torch.randint(0, 5, (1, 2, e.shape[1], 16))
    with pytest.raises(TypeError, match="q, k, v must be floating point"):
        tree_attention(q, q, q, e, backend="sdpa")


def test_softcap_zero_is_off_and_positions_with_a_layout_are_refused():
    packed = pack_tree(pact_group())
    e, positions = packed.subtree_end[None], packed.position_ids[None]
    q = torch.randn(1, 2, e.shape[1], 16)
    assert torch.equal(tree_attention(q, q, q, e, backend="sdpa", softcap=0.0), tree_attention(q, q, q, e, backend="sdpa"))
    layout = build_layout(e, "sdpa", position_ids=positions)
    with pytest.raises(ValueError, match="pass position_ids to build_layout"):
        tree_attention(q, q, q, layout=layout, position_ids=positions, window=2)


def test_a_layout_with_its_own_arguments_passed_again_is_refused():
    # a subtree_end (or backend, dq_mode) passed beside a layout was ignored: the layout's mask ran instead
    e = pack_tree(pact_group()).subtree_end[None]
    q = torch.randn(1, 2, e.shape[1], 16)
    layout = build_layout(e, "sdpa")
    chain = torch.full_like(e, e.shape[1])  # one causal chain: another mask
    for kwargs, name in (({"subtree_end": chain}, "subtree_end"), ({"backend": "varlen"}, "backend"),
                         ({"dq_mode": "atomic"}, "dq_mode")):
        with pytest.raises(ValueError, match=f"with a layout, pass {name} to build_layout"):
            tree_attention(q, q, q, layout=layout, **kwargs)


def test_build_layout_of_one_packed_row_without_its_batch_dim_is_a_clear_error():
    with pytest.raises(ValueError, match=r"subtree_end must be \[B, L\], got shape \(\d+,\).*subtree_end\[None\]"):
        build_layout(pack_tree(pact_group()).subtree_end, "varlen")  # was "not enough values to unpack"


@pytest.mark.parametrize("backend", ["varlen", "sdpa"])
def test_every_backend_refuses_positions_that_are_not_trie_depths(backend):
    """flash-attn's window counts key offsets, the other backends compare positions: with positions that do not
    grow by one along every path they gave two different windows (sdpa 1.6 off varlen's), so all refuse them;
    depths shifted per root (a root's position is free) pass."""
    packed = pack_tree(pact_group())
    positions = packed.position_ids.clone()
    positions[5] += 1  # inside the shared prompt: no longer its parent's position + 1
    with pytest.raises(ValueError, match=r"position_ids\[0, 5\] = .*positions grow by one"):
        build_layout(packed.subtree_end[None], backend, position_ids=positions[None])
    with pytest.raises(ValueError, match="positions grow by one"):  # a 0..L-1 arange, the usual mistake
        build_layout(packed.subtree_end[None], backend, position_ids=torch.arange(packed.num_tokens)[None])
    build_layout(packed.subtree_end[None], backend, position_ids=packed.position_ids[None] + 7)


def test_validation_refuses_subtrees_that_do_not_nest():
    """Each bound t + 1 <= subtree_end[t] <= L holds, but token 1 sits in token 0's subtree [0, 2) with its own
    reaching 9: no trie gives that, and the backends would disagree on it. Refused, naming the token; every
    packed trie passes, and the subtree maxima behind the check equal a plain loop's on random layouts."""
    from pact_fast.ops.tree_attention import _subtree_max, validate_subtree_end

    q = k = v = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match=r"subtree_end\[0, 0\] = 2, but a token of that subtree .* end at 9"):
        tree_attention(q, k, v, torch.tensor([[2, 9, 9, 9, 9, 9, 9, 9, 9]]))
    validate_subtree_end(_layout([(3, 3), (7, 2), (11, 4)]))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        L = int(torch.randint(1, 40, (1,), generator=g))
        ends = [int(torch.randint(t + 1, L + 1, (1,), generator=g)) for t in range(L)]
        want = [max(ends[t + 1:ends[t]], default=0) for t in range(L)]
        assert _subtree_max(torch.tensor([ends]))[0].tolist() == want


@pytest.mark.parametrize("backend", ["sdpa", "varlen", "triton"])
@pytest.mark.parametrize("window", [2 ** 31, 2 ** 40, 2 ** 63 - 1])
def test_a_window_past_int32_is_no_window(backend, window):
    """The layout holds positions as int32: a window of 2^31 or more wrapped in the sdpa / varlen masks and hid
    every key (output 100% off, silently), and triton could not take 2^63 - 1. Wider than any trie, it is the
    tree mask alone on every backend."""
    subtree_end, position_ids = _packed([(2, 2), (5, 2)])
    B, L = subtree_end.shape
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, L, 8, generator=g) for h in (2, 1, 1))
    out = tree_attention(q, k, v, subtree_end, backend=backend, window=window, position_ids=position_ids)
    assert rel_err(out, tree_attention_reference(q.double(), k.double(), v.double(), subtree_end)) < TOL[torch.float32]


@pytest.mark.parametrize("options", [{}, {"window": 3, "softcap": 2.0}], ids=["plain", "window-softcap"])
def test_varlen_with_grouped_heads_under_inductor_equals_float64(options):
    """torch.compile (Inductor, CPU) of the varlen backend's per-segment loop with Hq > Hkv gave dk 90% off float64,
    silently (aot_eager, which the fullgraph test uses, did not): a run of lone-token segments (the padding chain)
    each through SDPA. Such a segment's output is its value, now taken without an SDPA call."""
    subtree_end, position_ids = _packed([(2, 2), (5, 2)])
    layout = build_layout(subtree_end, "varlen", position_ids=position_ids)
    B, L = subtree_end.shape
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, h, L, 8, generator=g) for h in (4, 2, 2, 4))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    torch._dynamo.reset()
    out = torch.compile(lambda a, b, c: tree_attention(a, b, c, layout=layout, validate=False, **options))(*ours)
    out.backward(do)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out_r = tree_attention_reference(*ref, subtree_end, position_ids=position_ids, **options)
    out_r.backward(do.double())
    assert rel_err(out, out_r) < TOL[torch.float32]
    for name, o, r in zip("qkv", ours, ref):
        assert rel_err(o.grad, r.grad) < TOL[torch.float32], f"d{name}"
