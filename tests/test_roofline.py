"""The performance model cannot drift from the code: every log-prob kernel runs under the Triton
interpreter and the FLOPs and bytes it executes must EQUAL kernels/linear_logprobs_launch.kernel_costs."""
import sys
from pathlib import Path

import pytest
import torch

from pact_fast.kernels import linear_logprobs_launch as launch
from pact_fast.kernels.registry import KernelCost, interpreting

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import roofline  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts what the Triton interpreter executes")

SHAPES = [
    pytest.param(37, 203, 48, True, True, id="N37-V203-H48-bias-ent"),
    pytest.param(16, 64, 32, False, False, id="N16-V64-H32"),
    pytest.param(70, 301, 40, True, False, id="N70-V301-H40-bias"),
    pytest.param(5, 1001, 24, False, True, id="N5-V1001-H24-ent"),
]
CONFIGS = {"interpreter": launch.INTERPRET_CONFIGS, "gpu": launch.GPU_CONFIGS}
# None: the launcher's own plan; else ragged row blocks x vocabulary slabs (several of each)
BLOCKINGS = {"plan": None, "R13-S40": launch.Blocking(13, 40)}


def _run(N, V, H, has_bias, has_gent, configs, blocking=None, dtype=torch.float32, seed=0, cap=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if has_bias else None
    t = torch.randint(0, V, (N,), generator=g)
    with roofline.count_executed() as counts:
        _, lse, ent = launch.forward(x, w, b, t, 1.0, configs=configs, blocking=blocking, cap=cap)
        launch.backward(x, w, b, t, lse, ent, torch.randn(N, generator=g),
                        torch.randn(N, generator=g) if has_gent else None, 1.0, configs=configs, blocking=blocking,
                        cap=cap)
    return counts.as_tuples()


@pytest.mark.parametrize("blocking", list(BLOCKINGS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("N,V,H,has_bias,has_gent", SHAPES)
def test_counted_flops_and_bytes_equal_the_formulas(N, V, H, has_bias, has_gent, config, blocking):
    counted = _run(N, V, H, has_bias, has_gent, CONFIGS[config], BLOCKINGS[blocking])
    model = roofline.aggregate(launch.kernel_costs(N, V, H, torch.float32, has_bias, has_gent,
                                                   configs=CONFIGS[config], blocking=BLOCKINGS[blocking]))
    assert set(counted) == {"linear_logprobs.fwd", "linear_logprobs.bwd", roofline.TORCH_GEMM}
    assert counted == model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_softcap_moves_no_extra_byte(config, dtype):
    """A soft cap is arithmetic inside the epilogues (tanh forward, its slope backward): what they execute still
    equals kernel_costs, which has no soft-cap term."""
    blocking = launch.Blocking(13, 40)
    counted = _run(37, 203, 48, True, True, CONFIGS[config], blocking, dtype=dtype, cap=3.0)
    model = roofline.aggregate(launch.kernel_costs(37, 203, 48, dtype, True, True, configs=CONFIGS[config],
                                                   blocking=blocking))
    assert counted == model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_inputs_count_two_bytes_per_element(dtype):
    blocking = launch.Blocking(8, 32)
    counted = _run(21, 77, 32, True, True, launch.INTERPRET_CONFIGS, blocking, dtype=dtype)
    model = roofline.aggregate(launch.kernel_costs(21, 77, 32, dtype, True, True,
                                                   configs=launch.INTERPRET_CONFIGS, blocking=blocking))
    assert counted == model


def test_one_kernel_cost_per_launch_in_launch_order():
    costs = launch.kernel_costs(10, 50, 16, torch.float32, False, True, blocking=launch.Blocking(4, 20))
    n_blocks = 3 * 3  # ceil(10 / 4) row blocks x ceil(50 / 20) slabs
    fwd = [c.kernel for c in costs[:2 * n_blocks]]
    bwd = [c.kernel for c in costs[2 * n_blocks:]]
    assert fwd == ["torch.mm[logits]", "linear_logprobs.fwd"] * n_blocks
    assert bwd == ["torch.mm[logits]", "linear_logprobs.bwd", "torch.mm[dx]", "torch.mm[dw]"] * n_blocks


def test_forward_and_backward_passes_partition_the_launches():
    args = (300, 1000, 64, torch.bfloat16, True, True)
    blocking = launch.Blocking(128, 384)
    both = launch.kernel_costs(*args, blocking=blocking)
    fwd = launch.kernel_costs(*args, blocking=blocking, passes=("fwd",))
    bwd = launch.kernel_costs(*args, blocking=blocking, passes=("bwd",))
    assert fwd + bwd == both and fwd and bwd
    with pytest.raises(ValueError, match="passes"):
        launch.kernel_costs(*args, passes=("dx",))


def test_w_logprob_meets_the_targets_by_the_model():
    """Issue 11: fwd+bwd <= 1.45x three GEMMs on H100 and extra memory <= 5% of the bf16 weight gradient."""
    for workload, shape in roofline.W_LOGPROB.items():
        N, H, V = shape["N"], shape["H"], shape["V"]
        costs = launch.kernel_costs(N, V, H, torch.bfloat16, has_bias=False, has_gent=True)
        assert roofline.predict_ms(costs, "H100") <= 1.45 * roofline.ideal_logprob_ms(N, V, H, "H100"), workload
        assert launch.extra_memory_bytes(N, V, H, torch.bfloat16) <= 0.05 * V * H * 2, workload


def test_predicted_time_is_the_roofline_max():
    cost = KernelCost("k", flops=7 * 10 ** 12, bytes=6 * 10 ** 9)  # 10 ms of FLOPs, 2 ms of bytes on H100
    assert roofline.predict_ms([cost], "H100") == pytest.approx(10.0)
    heavy = KernelCost("k", flops=10 ** 12, bytes=3 * 10 ** 10)  # memory-bound: 10 ms at 3.0 TB/s
    assert roofline.predict_ms([heavy, cost], "H100") == pytest.approx(20.0)
    assert roofline.predict_ms([heavy], "H200") == pytest.approx(1e3 * 3e10 / 4.3e12)


def test_count_harness_counts_torch_gemms_at_compulsory_bytes():
    a, b, c = torch.randn(5, 7), torch.randn(7, 3), torch.randn(5, 3)
    with roofline.count_executed() as counts:
        torch.mm(a, b)
        torch.addmm(c, a, b)
    assert counts.as_tuples() == {roofline.TORCH_GEMM: (2 * 2 * 5 * 3 * 7, 4 * ((35 + 21 + 15) + (15 + 35 + 21 + 15)))}


def test_model_rows_cover_the_workloads():
    rows = roofline.model_rows(devices=("H100",))
    names = {(r["workload"], r["device"]) for r in rows}
    assert {("W-logprob-H2048", "H100"), ("W-logprob-H4096", "H100"), ("W-group-layer", "H100")} <= names
    for r in rows:
        assert {"workload", "op", "device", "predicted_ms", "ideal_ms", "ratio", "extra_memory_bytes"} <= set(r)
    fwd_bwd = next(r for r in rows if r["workload"] == "W-logprob-H2048" and r["op"] == "linear_logprobs fwd+bwd")
    fwd = next(r for r in rows if r["workload"] == "W-logprob-H2048" and r["op"] == "linear_logprobs fwd")
    assert fwd["ideal_ms"] == pytest.approx(fwd_bwd["ideal_ms"] / 3)
    assert fwd_bwd["ratio"] == pytest.approx(fwd_bwd["predicted_ms"] / fwd_bwd["ideal_ms"])


def test_count_harness_refuses_a_changed_interpreter_api(monkeypatch):
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", lambda self, lhs, rhs, acc: None)
    with pytest.raises(RuntimeError, match="create_dot"):
        with roofline.count_executed():
            pass
