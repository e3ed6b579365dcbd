import pytest
import torch

from pact_fast.kernels.tree_attention_launch import visible_tiles
from pact_fast.ops import tree_attention, tree_attention_reference
from pact_fast.ops.tree_attention import build_layout, tree_mask
from pact_fast.packing import pack_tree
from conftest import rel_err
from trees import pact_group, random_tree_sequences

TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


def _layout(seeds_depths):
    """Batch of packed trees padded to one length with trailing single-token chains."""
    packs = [pack_tree(random_tree_sequences(s, d)) for s, d in seeds_depths]
    L = max(p.num_tokens for p in packs)
    ends = []
    for p in packs:
        pad = torch.arange(p.num_tokens + 1, L + 1)  # padding tokens each see only themselves
        ends.append(torch.cat([p.subtree_end, pad]))
    return torch.stack(ends)


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
    fwd, bwd = INTERPRET_CONFIGS["fwd"].blocks, INTERPRET_CONFIGS["dkdv"].blocks
    for count, index, visible in ((lists.q_count, lists.q_index, visible_tiles(subtree_end, fwd["BLOCK_M"], fwd["BLOCK_N"])),
                                  (lists.k_count, lists.k_index,
                                   visible_tiles(subtree_end, bwd["BLOCK_M"], bwd["BLOCK_N"]).transpose(1, 2))):
        for b in range(visible.shape[0]):
            for i in range(visible.shape[1]):
                listed = index[b, i, : count[b, i]].tolist()
                assert listed == visible[b, i].nonzero().flatten().tolist()


@pytest.mark.parametrize("HQ,HKV", [(4, 2), (6, 2), (8, 1), (2, 2)], ids=["gqa2", "gqa3", "mqa8", "mha"])
@pytest.mark.parametrize("dq_mode", ["split", "atomic"])
def test_triton_dq_modes_and_head_stacking_match_float64(HQ, HKV, dq_mode):
    """Every GQA group size (stacked 2 heads per program for 2, 8; 1 for 3 and MHA) in both dq modes."""
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
], ids=["end-below-self", "end-past-L", "end-shape", "end-float", "heads", "k-shape", "q-rank", "dtype"])
def test_bad_layout_is_a_clear_error(change, exc, word):
    e = pack_tree(pact_group()).subtree_end[None]
    L = e.shape[1]
    q, k, v = torch.randn(1, 4, L, 16), torch.randn(1, 2, L, 16), torch.randn(1, 2, L, 16)
    with pytest.raises(exc, match=word):
        tree_attention(*change(q, k, v, e), backend="sdpa")


def test_flex_on_cpu_is_refused():
    e = pack_tree(pact_group()).subtree_end[None]
    q = torch.randn(1, 2, e.shape[1], 16)
    with pytest.raises(ValueError, match="CUDA"):
        tree_attention(q, q, q, e, backend="flex")


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
