"""The performance model of the fused PACT head cannot drift from the code: its Triton kernels (and the
cuBLAS GEMMs between them) run under the Triton interpreter and the FLOPs and bytes executed must EQUAL
kernels/fused_pact_head_launch.kernel_costs, in both modes of the pass and with rows over the shift limit."""
import sys
from pathlib import Path

import pytest
import torch

from pact_fast.kernels import fused_pact_head_launch as launch
from pact_fast.kernels.registry import interpreting

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import roofline  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts what the Triton interpreter executes")

SHAPES = [  # N, V, H, bias, entropy bonus, dtype
    pytest.param(37, 203, 48, True, False, torch.float32, id="N37-V203-H48-bias"),
    pytest.param(16, 64, 32, False, True, torch.float32, id="N16-V64-H32-ent"),
    pytest.param(21, 301, 40, True, True, torch.float16, id="N21-V301-H40-bias-ent-fp16"),
    pytest.param(5, 517, 24, False, False, torch.bfloat16, id="N5-V517-H24-bf16"),
    pytest.param(19, 77, 264, True, False, torch.bfloat16, id="N19-V77-H264-bias-bf16"),
]
CONFIGS = {"interpreter": launch.INTERPRET_CONFIGS, "gpu": launch.GPU_CONFIGS}
ROWS_PER_BLOCK = {"plan": None, "R6": 6}  # the default (one block at these N) and ragged blocks


def _run(N, V, H, has_bias, want_entropy, dtype, configs, rows_per_block, limit=launch.SHIFT_LIMIT, backward=True,
         cap=None, splits=None):
    """Counts of one launcher call, and the rows over the shift limit per row block."""
    g = torch.Generator().manual_seed(N + V)
    x = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if has_bias else None
    t = torch.randint(0, V, (N,), generator=g)
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)

    def grads(lo, hi, logp, ent):
        return g_logp[lo:hi], g_ent[lo:hi] if want_entropy else None

    with roofline.count_executed() as counts:
        launch.run(x, w, b, t, 1.0, want_entropy, grads if backward else None, rows_per_block=rows_per_block,
                   limit=limit, configs=configs, cap=cap, splits=splits)
    z = (x @ w.t() + (b if has_bias else 0)).float()
    over = (z.max(-1).values - z.gather(1, t[:, None]).squeeze(1)) > limit
    blocks = launch.plan(N, V, H, dtype, want_entropy, cap is not None, rows_per_block=rows_per_block, splits=splits,
                         backward=backward).blocks
    bad = [int(over[blk.r0:blk.r0 + blk.r].sum()) for blk in blocks]
    return counts.as_tuples(), bad


@pytest.mark.parametrize("rows_per_block", list(ROWS_PER_BLOCK))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("N,V,H,has_bias,want_entropy,dtype", SHAPES)
def test_counted_flops_and_bytes_equal_the_formulas(N, V, H, has_bias, want_entropy, dtype, config, rows_per_block):
    R = ROWS_PER_BLOCK[rows_per_block]
    counted, bad = _run(N, V, H, has_bias, want_entropy, dtype, CONFIGS[config], R)
    model = roofline.aggregate(launch.kernel_costs(N, V, H, dtype, has_bias, want_entropy, bad_rows=bad,
                                                   configs=CONFIGS[config], rows_per_block=R))
    shift = launch.shift_mode(dtype, want_entropy)
    second = "fused_pact_head.scale" if shift else "linear_logprobs.bwd"
    assert set(counted) == {"fused_pact_head.pass", second, roofline.TORCH_GEMM}
    assert counted == model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("limit", [1.5, -1.0], ids=["some-over", "all-over"])
def test_rows_over_the_shift_limit_cost_one_more_read_and_write_each(limit, dtype):
    counted, bad = _run(23, 131, 16, True, False, dtype, launch.INTERPRET_CONFIGS, 9, limit=limit)
    assert sum(bad) > 0
    model = launch.kernel_costs(23, 131, 16, dtype, True, False, bad_rows=bad, configs=launch.INTERPRET_CONFIGS,
                                rows_per_block=9)
    assert counted == roofline.aggregate(model)
    none_over = launch.kernel_costs(23, 131, 16, dtype, True, False, configs=launch.INTERPRET_CONFIGS,
                                    rows_per_block=9)
    e = torch.empty((), dtype=dtype).element_size()
    pass_bytes = [roofline.aggregate(costs)["fused_pact_head.pass"][1] for costs in (model, none_over)]
    extra = pass_bytes[0] - pass_bytes[1]
    assert extra == sum(bad) * (2 * 131 - 1) * e  # read + write of the row, less the skipped target store


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_softcap_takes_the_ordinary_epilogue_and_counts_it(config, dtype):
    """With a soft cap ``run`` takes the ordinary epilogue even without an entropy bonus in fp32 / bf16: the
    pass, linear_logprobs' gradient kernel and two GEMMs per block, counted exactly by kernel_costs(softcap=True)
    (the tanh itself moves no byte)."""
    counted, bad = _run(21, 301, 40, True, False, dtype, CONFIGS[config], 6, cap=3.0)
    model = launch.kernel_costs(21, 301, 40, dtype, True, False, bad_rows=bad, configs=CONFIGS[config],
                                rows_per_block=6, softcap=True)
    assert [c.kernel for c in model] == ["torch.mm[logits]", "fused_pact_head.pass", "linear_logprobs.bwd",
                                         "torch.mm[dx]", "torch.mm[dw]"] * 4
    assert set(counted) == {"fused_pact_head.pass", "linear_logprobs.bwd", roofline.TORCH_GEMM}
    assert counted == roofline.aggregate(model)


@pytest.mark.parametrize("dtype,want_entropy", [(torch.bfloat16, False), (torch.float32, True)],
                         ids=["bf16-shift", "fp32-ordinary"])
@pytest.mark.parametrize("V", [96, 203], ids=["V96-even", "V203-remainder"])
def test_split_dx_counts_one_batched_gemm_and_the_parts_read_by_the_scaling_kernel(V, dtype, want_entropy):
    """dX split 3 ways over the vocabulary: one batched GEMM per block (and a small one for the columns past the
    splits), the scaling kernel reading the three partial products, exactly as kernel_costs(splits=3) prices."""
    counted, bad = _run(17, V, 24, True, want_entropy, dtype, launch.INTERPRET_CONFIGS, 6, splits=3)
    model = launch.kernel_costs(17, V, 24, dtype, True, want_entropy, bad_rows=bad,
                                configs=launch.INTERPRET_CONFIGS, rows_per_block=6, splits=3)
    dx = [c for c in model if c.kernel == "torch.mm[dx]"]
    assert len(dx) == 3 * (2 if launch.split_columns(V, 3)[1] else 1)
    assert set(counted) == {"fused_pact_head.pass", "fused_pact_head.scale", roofline.TORCH_GEMM} | (
        {"linear_logprobs.bwd"} if want_entropy else set())
    assert counted == roofline.aggregate(model)
    unsplit = [c for c in launch.kernel_costs(17, V, 24, dtype, True, want_entropy, bad_rows=bad,
                                              configs=launch.INTERPRET_CONFIGS, rows_per_block=6, splits=1)
               if c.kernel == "torch.mm[dx]"]
    assert sum(c.flops for c in unsplit) == sum(c.flops for c in dx)  # the same FLOPs, in more output tiles


def test_forward_only_counts_the_logits_gemm_and_the_statistics():
    counted, _ = _run(30, 150, 20, False, False, torch.float32, launch.INTERPRET_CONFIGS, 8, backward=False)
    model = launch.kernel_costs(30, 150, 20, torch.float32, False, False, configs=launch.INTERPRET_CONFIGS,
                                rows_per_block=8, backward=False)
    assert [c.kernel for c in model] == ["torch.mm[logits]", "fused_pact_head.pass"] * 4
    assert counted == roofline.aggregate(model)


def test_one_kernel_cost_per_launch_in_launch_order():
    shift = launch.kernel_costs(10, 50, 16, torch.bfloat16, True, False, rows_per_block=4)
    assert [c.kernel for c in shift] == ["torch.mm[logits]", "fused_pact_head.pass[shift]", "torch.mm[dx]",
                                         "fused_pact_head.scale", "torch.mm[dw]", "torch.mm[db]"] * 3
    ordinary = launch.kernel_costs(10, 50, 16, torch.bfloat16, False, True, rows_per_block=4)
    assert [c.kernel for c in ordinary] == ["torch.mm[logits]", "fused_pact_head.pass", "linear_logprobs.bwd",
                                            "torch.mm[dx]", "torch.mm[dw]"] * 3
    with pytest.raises(ValueError, match="bad_rows"):
        launch.kernel_costs(10, 50, 16, torch.bfloat16, False, False, bad_rows=[0], rows_per_block=4)


def test_w_logprob_meets_the_targets_by_the_model():
    """Issue 24 (was issue 16's 1.1x at a workspace as large as dW): the default row block's workspace within 25%
    of dW (and 4% of naive's fp32 logits), 6NVH FLOPs exactly, and by the time model fused fwd+bwd (bf16, no
    entropy bonus) within 1.15x of three bare GEMMs on H200 at both widths and on H100 at H=4096. On H100 at
    H=2048 the model has 1.255x: dW's bf16 update of every 384-row block is memory-bound there (the note of
    issue 24 has the trade)."""
    for workload, shape in roofline.W_LOGPROB.items():
        N, H, V = shape["N"], shape["H"], shape["V"]
        costs = launch.kernel_costs(N, V, H, torch.bfloat16, has_bias=False, want_entropy=False)
        assert sum(c.flops for c in costs) == 6 * N * V * H, workload
        assert launch.extra_memory_bytes(N, V, H, torch.bfloat16) <= 0.25 * V * H * 2, workload
        assert launch.extra_memory_bytes(N, V, H, torch.bfloat16) <= 0.04 * N * V * 4, workload
        rows = {r["device"]: r for r in roofline.variant_rows(workload, "head", shape, variants=[
            ("head", "fused_pact_head fwd+bwd", dict(want_entropy=False))])}
        assert rows["H200"]["time_ratio"] <= 1.15, workload
        if H == 4096:
            assert rows["H100"]["time_ratio"] <= 1.15, workload


def test_model_rows_include_the_fused_head():
    rows = roofline.model_rows(devices=("H100",))
    fused = {(r["workload"], r["op"]): r for r in rows if r["op"].startswith("fused_pact_head")}
    assert {w for w, _ in fused} == set(roofline.W_LOGPROB)
    for (workload, op), r in fused.items():
        assert r["ratio"] == pytest.approx(r["predicted_ms"] / r["ideal_ms"])
        ordinary = fused[(workload, "fused_pact_head fwd+bwd (entropy or fp16)")]
        assert fused[(workload, "fused_pact_head fwd+bwd")]["predicted_ms"] < ordinary["predicted_ms"]
