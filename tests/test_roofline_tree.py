"""The tree-attention performance model cannot drift from the code: every kernel runs under the Triton
interpreter on packed trees and the FLOPs and bytes it executes must EQUAL
kernels/tree_attention_launch.kernel_costs, at the interpreter's tiles and at the GPU's."""
import sys
from pathlib import Path

import pytest
import torch

from pact_fast.kernels import tree_attention_launch as launch
from pact_fast.kernels.registry import gpu_configs, interpreting
from pact_fast.ops.tree_attention import build_layout, tree_attention
from pact_fast.packing import pack_tree
from trees import pact_group, random_tree_sequences

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import roofline  # noqa: E402
import sass  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts what the Triton interpreter executes")

CONFIGS = {"interpreter": launch.INTERPRET_CONFIGS, "gpu": launch.GPU_CONFIGS}
ARCH_CONFIGS = {**CONFIGS, "gpu-sm80": gpu_configs("tree_attention", 80)}  # sm_80's own dk/dv tiles


def _batch_with_positions(*packs):
    """([B, L] subtree_end, [B, L] position_ids) of several packed trees, padded to one length with
    single-token chains (each its own root, at position 0)."""
    L = max(p.num_tokens for p in packs)
    ends = torch.stack([torch.cat([p.subtree_end, torch.arange(p.num_tokens + 1, L + 1)]) for p in packs]).int()
    positions = torch.stack([torch.cat([p.position_ids, torch.zeros(L - p.num_tokens, dtype=torch.long)])
                             for p in packs]).int()
    return ends, positions


def _batch(*packs):
    """[B, L] subtree_end of several packed trees, padded to one length with single-token chains."""
    return _batch_with_positions(*packs)[0]


LAYOUTS = {
    "pact-group": lambda: pack_tree(pact_group()).subtree_end[None].int(),
    "ragged-pair": lambda: _batch(pack_tree(random_tree_sequences(4, 3)), pack_tree(random_tree_sequences(7, 2))),
}
# (subtree_end, position_ids, window): windows shorter than the sequences, so whole tiles fall outside them
WINDOWED = {
    "pact-group-window5": lambda: (*_batch_with_positions(pack_tree(pact_group(prompt=33, response=7))), 5),
    "ragged-pair-window3": lambda: (*_batch_with_positions(pack_tree(random_tree_sequences(4, 3)),
                                                           pack_tree(random_tree_sequences(7, 2))), 3),
}


def _count(subtree_end, HQ, HKV, D, dtype, configs, dq_mode, position_ids=None, window=None, softcap=None):
    B, L = subtree_end.shape
    g = torch.Generator().manual_seed(HQ + D)
    q, k, v, do = (torch.randn(B, h, L, D, generator=g).to(dtype) for h in (HQ, HKV, HKV, HQ))
    options = dict(position_ids=position_ids, window=window, softcap=softcap)
    with roofline.count_executed() as counts:
        lists = launch.tile_lists(subtree_end, configs, position_ids, window)
        o, lse, _ = launch.forward(q, k, v, subtree_end, D ** -0.5, lists, configs, **options)
        launch.backward(q, k, v, o, lse, do, subtree_end, lists, D ** -0.5, dq_mode, configs, **options)
    return counts.as_tuples()


@pytest.mark.parametrize("dq_mode", launch.DQ_MODES)
@pytest.mark.parametrize("config", list(ARCH_CONFIGS))
@pytest.mark.parametrize("HQ,HKV,D", [(4, 2, 16), (3, 1, 24), (2, 2, 32)], ids=["gqa2-D16", "gqa3-D24", "mha-D32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_counted_flops_and_bytes_equal_the_formulas(layout, HQ, HKV, D, config, dq_mode):
    ends = LAYOUTS[layout]()
    counted = _count(ends, HQ, HKV, D, torch.float32, ARCH_CONFIGS[config], dq_mode)
    model = roofline.aggregate(launch.kernel_costs(ends, HQ, HKV, D, torch.float32, ARCH_CONFIGS[config],
                                                   dq_mode=dq_mode))
    kernels = {"fwd", "delta", "dkdv"} | ({"dq"} if dq_mode == "split" else {"cast"})
    assert set(counted) == {f"tree_attention.{k}" for k in kernels}
    assert counted == model


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["window", "window-softcap"])
@pytest.mark.parametrize("dq_mode", launch.DQ_MODES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("layout", list(WINDOWED))
def test_windowed_counts_equal_the_formulas(layout, config, dq_mode, softcap):
    """A window's tile lists (and its position reads) are what the kernels execute; a softcap adds no
    matmul or memory traffic."""
    ends, positions, window = WINDOWED[layout]()
    counted = _count(ends, 4, 2, 16, torch.float32, CONFIGS[config], dq_mode, positions, window, softcap)
    model = launch.kernel_costs(ends, 4, 2, 16, torch.float32, CONFIGS[config], dq_mode=dq_mode,
                                position_ids=positions, window=window)
    assert counted == roofline.aggregate(model)
    if layout == "pact-group-window5" and config == "interpreter":  # the window skips some of the tree's tiles
        full = launch.kernel_costs(ends, 4, 2, 16, torch.float32, CONFIGS[config], dq_mode=dq_mode)
        for kernel in ("fwd", "dkdv"):
            windowed, tree = (next(c.flops for c in costs if c.kernel == f"tree_attention.{kernel}")
                              for costs in (model, full))
            assert windowed < tree, kernel


def test_softcap_counts_equal_the_unsoftcapped_formulas():
    ends = LAYOUTS["ragged-pair"]()
    counted = _count(ends, 4, 2, 16, torch.float32, launch.INTERPRET_CONFIGS, "split", softcap=1.5)
    assert counted == roofline.aggregate(launch.kernel_costs(ends, 4, 2, 16, torch.float32, launch.INTERPRET_CONFIGS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_inputs_count_two_bytes_per_element(dtype):
    ends = LAYOUTS["ragged-pair"]()
    counted = _count(ends, 4, 2, 16, dtype, launch.INTERPRET_CONFIGS, "split")
    assert counted == roofline.aggregate(launch.kernel_costs(ends, 4, 2, 16, dtype, launch.INTERPRET_CONFIGS))


def test_forward_and_backward_passes_partition_the_launches():
    ends = LAYOUTS["pact-group"]()
    both = launch.kernel_costs(ends, 4, 2, 64, torch.bfloat16)
    fwd = launch.kernel_costs(ends, 4, 2, 64, torch.bfloat16, passes=("fwd",))
    bwd = launch.kernel_costs(ends, 4, 2, 64, torch.bfloat16, passes=("bwd",))
    assert fwd + bwd == both and [c.kernel for c in fwd] == ["tree_attention.fwd"]
    with pytest.raises(ValueError, match="passes"):
        launch.kernel_costs(ends, 4, 2, 64, torch.bfloat16, passes=("dq",))


def test_the_layout_is_built_once_per_forward_and_reused_by_backward(monkeypatch):
    ends = LAYOUTS["pact-group"]()
    calls = []
    real = launch.tile_lists
    monkeypatch.setattr(launch, "tile_lists", lambda *a, **k: calls.append(1) or real(*a, **k))
    layout = build_layout(ends, "triton")
    q = torch.randn(1, 2, ends.shape[1], 16, requires_grad=True)
    for _ in range(3):  # three layers of one packed forward
        tree_attention(q, q, q, layout=layout, validate=False).sum().backward()
    assert len(calls) == 1


def test_w_group_layer_by_the_model():
    """Issue 24: one W-group layer fwd+bwd at the spill-free tiles executes <= 1.6x the visible-pairs ideal's
    FLOPs, its modelled time (stored sm_90a SASS table) is <= 1.6x the ideal's on H100 and H200, and the default
    split backward is the faster dq mode on H100 by both models."""
    rows = {(r["op"], r["device"]): r for r in roofline._group_rows(("H100", "H200"), table=sass.stored())}
    split, atomic = rows["tree_attention fwd+bwd", "H100"], rows["tree_attention fwd+bwd (dq atomics)", "H100"]
    ends, HQ, HKV, D = roofline.w_group_layout()
    (ideal,) = launch.ideal_costs(ends, HQ, HKV, D, torch.bfloat16)
    work = sum(c.flops for c in launch.kernel_costs(ends, HQ, HKV, D, torch.bfloat16)) / ideal.flops
    assert work <= 1.6
    assert split["time_ratio"] <= 1.6 and rows["tree_attention fwd+bwd", "H200"]["time_ratio"] <= 1.6
    assert split["predicted_ms"] < atomic["predicted_ms"]
    assert split["predicted_time_ms"] < atomic["predicted_time_ms"]
    assert split["shape"]["L"] == 4096 + 2048 + 16 + 2 * 8 * 1024 + 2048


def test_kernel_costs_of_an_architecture_use_its_tiles():
    ends = LAYOUTS["pact-group"]()
    sm80 = launch.kernel_costs(ends, 4, 2, 64, torch.bfloat16, arch=80)
    assert sm80 == launch.kernel_costs(ends, 4, 2, 64, torch.bfloat16, gpu_configs("tree_attention", 80))
    assert sm80 != launch.kernel_costs(ends, 4, 2, 64, torch.bfloat16)  # sm_80's 32-key dk/dv tiles
    with pytest.raises(ValueError, match="arch"):
        launch.kernel_costs(ends, 4, 2, 64, torch.bfloat16, arch=75)


def test_ideal_counts_visible_pairs():
    ends = torch.tensor([[3, 3, 3]], dtype=torch.int32)  # a causal chain of 3: 6 visible pairs
    (ideal,) = launch.ideal_costs(ends, HQ=2, HKV=1, D=8, dtype=torch.float16)
    assert ideal.flops == 7 * 2 * 6 * 8 * 2
    assert ideal.bytes == 4 * 3 * 8 * (2 + 1) * 2


@pytest.mark.parametrize("layout", list(WINDOWED))
def test_ideal_counts_the_pairs_visible_in_the_window(layout):
    from pact_fast.ops.tree_attention import tree_mask

    ends, positions, window = WINDOWED[layout]()
    pairs = int(tree_mask(ends, positions, window).sum())
    assert launch.visible_pairs(ends, positions, window, chunk=7) == pairs < launch.visible_pairs(ends)
    (ideal,) = launch.ideal_costs(ends, HQ=2, HKV=1, D=8, dtype=torch.float16, position_ids=positions, window=window)
    assert ideal.flops == 7 * 2 * pairs * 8 * 2
