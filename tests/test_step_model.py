"""The whole-step GPU model (bench/step_model.py): its counter, its stream simulation and each part's formula
against hand computations at small workloads; monotonicity and the regimes it should show."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import roofline  # noqa: E402
import step_model as sm  # noqa: E402
from roofline import CLASSES, Device, Launch  # noqa: E402

# A tiny Qwen3-shaped workload (head_dim 64: the roofline's SASS table has tree-attention entries for 64 and 128)
TINY = sm.Workload(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=64, ffn=256, vocab=1000, P=48, T=16, U=4,
                   E=16, G=2, turns=2, model_tokens=6, tool_tokens=4)


def linear_weights(w):
    """Parameters of one decoder layer's linear weights, from the Qwen3 layer's shapes."""
    H, q, kv, F = w.hidden, w.heads * w.head_dim, w.kv_heads * w.head_dim, w.ffn
    return H * q + 2 * H * kv + q * H + 3 * H * F


def gemm_flops(ops):
    return sum(o.launch.flops for o in ops if o.launch is not None and o.launch.kind == "gemm")


# --- the counter ------------------------------------------------------------------------------------------

def test_counter_on_known_ops():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    with sm.KernelCounter() as counter:
        c = a @ b  # mm: one GEMM
        d = c.relu() + 1.0  # two pointwise kernels
        e = d.t()  # a view: no kernel
        s = e.sum().item()  # a reduction and a host synchronisation
    assert isinstance(s, float)
    names = [o.name for o in counter.ops]
    assert names == ["aten.mm.default", "aten.relu.default", "aten.add.Tensor", "aten.sum.default",
                     "aten._local_scalar_dense.default"]
    mm, relu, add, total, item = counter.ops
    assert mm.launch.kind == "gemm" and mm.launch.gemm == (4, 16, 8)
    assert mm.launch.flops == 2 * 4 * 16 * 8 and mm.launch.bytes == (4 * 8 + 8 * 16 + 4 * 16) * 4
    assert relu.launch.bytes == add.launch.bytes == 2 * 64 * 4
    assert total.launch.bytes == (64 + 1) * 4
    assert [o.sync for o in counter.ops] == [False] * 4 + [True]
    assert all(o.host_s == CLASSES.launch_s for o in counter.ops)


def test_embedding_reads_only_its_rows():
    table, ids = torch.randn(1000, 16), torch.tensor([[1, 5, 7]])
    with sm.KernelCounter() as counter:
        torch.nn.functional.embedding(ids, table)
    (op,) = counter.ops
    assert op.launch.bytes == 2 * 3 * 16 * 4 + 3 * 8


@pytest.mark.parametrize("q_len,kv_len", [(5, 5), (3, 5), (6, 4), (1, 9)])
def test_attention_pairs_against_a_mask(q_len, kv_len):
    tril = torch.ones(q_len, kv_len).tril()  # torch's is_causal: top-left aligned
    assert sm.attention_pairs(q_len, kv_len, True) == int(tril.sum())
    assert sm.attention_pairs(q_len, kv_len, False) == q_len * kv_len


def test_sdpa_is_one_kernel():
    B, HQ, HKV, L, D = 2, 4, 2, 5, 8
    q, k, v = torch.randn(B, HQ, L, D), torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    counter = sm.KernelCounter()
    with sm.AttentionAsOneKernel(counter), counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.shape == (B, HQ, L, D)
    (op,) = counter.ops
    assert op.launch.kind == "attention_fwd"
    assert op.launch.flops == 4 * B * HQ * D * (L * (L + 1) // 2)
    assert op.launch.bytes == (2 * B * HQ * L * D + 2 * B * HKV * L * D) * 4


def test_decode_forward_counted_on_the_real_model_class():
    w, B, past = TINY, 3, 10
    ops = sm.count_forward(w, B, 1, past=past)
    # GEMMs: every linear weight of every layer and the lm_head, on B rows each
    assert gemm_flops(ops) == 2 * B * (w.layers * linear_weights(w) + w.vocab * w.hidden)
    # attention: one kernel a layer over past + 1 keys, K/V read once (GQA, no repeat)
    att = [o for o in ops if o.name == "sdpa"]
    assert len(att) == w.layers
    assert all(o.launch.flops == 4 * B * w.heads * w.head_dim * (past + 1) for o in att)
    kv_token = B * w.kv_heads * w.head_dim * 4  # one cached token's K (or V), fp32
    assert all(o.launch.bytes == 2 * B * w.heads * w.head_dim * 4 + 2 * (past + 1) * kv_token for o in att)
    # transformers' DynamicCache grows by torch.cat: K and V copied whole every step (read past + 1, write past + 1)
    cache_cats = [o for o in ops if o.name == "aten.cat.default" and o.launch.bytes == 2 * (past + 1) * kv_token]
    assert len(cache_cats) == 2 * w.layers
    # the padding-mask check is a host synchronisation in every forward
    assert sum(o.sync for o in ops) == 1
    per_layer, outside = sm.kernels_per_layer(w, B, 1, past=past)
    assert per_layer > 20 and sum(o.launch is not None for o in ops) == w.layers * per_layer + outside


def test_decode_bytes_are_affine_in_the_cache_length():
    """The interpolation of decode steps relies on it: every op's FLOPs and bytes affine in the cached length."""
    a, b, c = (sm.count_forward(TINY, 2, 1, past=p) for p in (8, 13, 18))
    assert [o.name for o in a] == [o.name for o in b] == [o.name for o in c]
    for x, y, z in zip(a, b, c):
        if x.launch is not None:
            assert z.launch.bytes - y.launch.bytes == y.launch.bytes - x.launch.bytes
            assert z.launch.flops - y.launch.flops == y.launch.flops - x.launch.flops


def test_interpolated_times_equal_the_counted_steps():
    dev, classes = sm.fp32_device("H100")
    a, mid, b = (sm.count_forward(TINY, 2, 1, past=p) for p in (8, 13, 18))
    first, middle, last = sm.interpolated_times(a, b, [0.0, 0.5, 1.0], dev, classes)
    for got, ops in ((first, a), (middle, mid), (last, b)):
        assert got["total"] == pytest.approx(sm.stream_time(ops, dev, classes)["total"], rel=1e-12)


# --- the stream simulation and units ---------------------------------------------------------------------

SLOW_MEMORY = Device(flops=1e12, bandwidth=1e9, peak_flops=1e12)  # 1 byte = 1 ns


Op = sm.Op


def kernel(nbytes):
    return Op("k", Launch("k", 0, nbytes, "torch"), CLASSES.launch_s)


def test_stream_launch_bound_and_gpu_bound():
    n, ls = 100, CLASSES.launch_s
    tiny = sm.stream_time([kernel(1000)] * n, SLOW_MEMORY)  # 1 us kernels behind 4.5 us launches
    assert tiny["total"] == pytest.approx(n * ls + 1e-6)
    assert tiny["gpu"] == pytest.approx(n * 1e-6) and tiny["host"] == pytest.approx(n * ls)
    big = sm.stream_time([kernel(100_000)] * n, SLOW_MEMORY)  # 100 us kernels: the GPU bounds
    assert big["total"] == pytest.approx(ls + n * 1e-4)


def test_stream_sync_waits_for_the_gpu():
    ls = CLASSES.launch_s
    ops = [kernel(100_000), Op("copy to host", host_s=2e-6, sync=True), kernel(1000)]
    t = sm.stream_time(ops, SLOW_MEMORY)
    # the host waits until the first kernel ends (ls + 100 us), copies for 2 us, launches; the kernel runs 1 us
    assert t["total"] == pytest.approx(ls + 1e-4 + 2e-6 + ls + 1e-6)
    assert t["syncs"] == 1 and t["launches"] == 2


def test_units_agree_with_the_roofline():
    """One launch alone: the stream's seconds are the roofline's time model in ms / 1e3."""
    for launch in (Launch("g", 2 * 4096 ** 3, 3 * 4096 ** 2 * 2, "gemm", gemm=(4096, 4096, 4096)),
                   Launch("t", 0, 2 ** 30, "torch")):
        for device in ("H100", "H200"):
            t = sm.stream_time([Op("x", launch, CLASSES.launch_s)], device)
            assert 1e3 * t["total"] == pytest.approx(roofline.predict_time_ms([launch], device), rel=1e-12)


def test_skinny_gemm_is_memory_bound():
    """A decode GEMM (8 rows) streams its weight: memory, not the big-tile wave model, bounds it."""
    op = sm.gemm_op("w", 8, 6144, 2048, 2)
    compute, memory = sm.op_terms(op, "H100")
    assert memory > compute
    assert memory == pytest.approx((8 * 2048 + 2048 * 6144 + 8 * 6144) * 2 / roofline.DEVICES["H100"].bandwidth)


# --- rollouts ----------------------------------------------------------------------------------------------

def test_workload_defaults_are_w_group():
    w = sm.Workload()
    assert (w.P, w.T, w.U, w.E, w.G, w.R) == (4096, 2048, 16, 2048, 8, 1024)  # SPEC section 6
    assert w.context(0) == 4096 + 16 and w.context(2) == 4112 + 2 * (208 + 64)
    assert w.linear_params() == 28 * linear_weights(w)
    with pytest.raises(ValueError):
        sm.Workload(turns=0)
    with pytest.raises(ValueError):
        sm.Workload(heads=6, kv_heads=4)
    for field in ("heads", "hidden", "head_dim", "kv_heads", "vocab"):  # were ZeroDivisionError / KeyError deep in
        with pytest.raises(ValueError, match=rf"not {field}=0"):
            sm.Workload(**{field: 0})
    assert sm.Workload(U=0, tool_tokens=0).U == 0
    with pytest.raises(ValueError, match=r"head_dim=80 must be one of \(64, 128\)"):  # was a KeyError deep in sass.py
        sm.Workload(head_dim=80)


def test_hf_prefill_recomputes_the_whole_context_each_turn():
    """HF: turn k's prefill runs c_k tokens per row through every linear, and the lm_head over the last position
    only (``logits_to_keep=1``); vLLM with its prefix cache: the tool response and the last sampled token, and
    one lm_head row per request."""
    w, B = TINY, TINY.rollout_rows
    for k in range(w.turns):
        c = w.context(k)
        hf = sm.hf_prefill_ops(w, c)
        assert gemm_flops(hf) == 2 * B * c * w.layers * linear_weights(w) + 2 * B * w.vocab * w.hidden
    new = w.tool_tokens + 1
    vllm = sm.vllm_forward_ops(w, [(new, w.context(1) - new)] * B)
    assert gemm_flops(vllm) == 2 * B * new * w.layers * linear_weights(w) + 2 * B * w.vocab * w.hidden


def test_more_turns_more_hf_rollout_time():
    times = [sm.hf_rollout(replace(TINY, turns=t), "H100") for t in (1, 2, 3)]
    prefill = [t["prefill"]["total"] for t in times]
    decode = [t["decode"]["total"] for t in times]
    assert prefill[0] < prefill[1] < prefill[2] and decode[0] < decode[1] < decode[2]


def test_prefix_caching_removes_the_re_prefill():
    """W-group's model, 2 rows: each HF turn's prefill takes longer than the one before (the whole, longer
    conversation again); a vLLM turn's after the first barely grows (only the tool
    response and the last sampled token go through the model; their attention reads the longer cache)."""
    w = sm.Workload(P=1024, G=2, tool_tokens=256)
    dev, classes = sm.fp32_device("H100")
    hf = [sm.stream_time(sm.hf_prefill_ops(w, w.context(k)), dev, classes)["total"] for k in range(3)]
    new = w.tool_tokens + 1
    vllm = [sm.stream_time(sm.vllm_step_ops(w, [(new, w.context(k) - new)] * w.G, graphs=False), "H100")["total"]
            for k in (1, 2)]
    assert hf[0] < hf[1] < hf[2]
    assert 0 < vllm[1] - vllm[0] < (hf[2] - hf[1]) / 50
    assert vllm[1] < hf[1] / 10


def test_hf_decode_is_launch_bound_at_small_batch():
    """The W-group model, one row, a short context: the HF decode forward's host launches outlast its kernels;
    vLLM's CUDA graph leaves the same step GPU bound."""
    w = sm.Workload(P=64, U=0, G=1)
    dev, classes = sm.fp32_device("H100")
    hf = sm.stream_time(sm.count_forward(w, 1, 1, past=64), dev, classes)
    assert hf["host"] > 2 * hf["gpu"]
    assert hf["total"] < hf["host"] + 0.25 * hf["gpu"]  # most kernels run hidden behind the next launches
    assert hf["launches"] > 20 * w.layers
    step = [o for o in sm.vllm_step_ops(w, [(1, 64)], graphs=True) if o.name != "vllm scheduler (host)"]
    graphs = sm.stream_time(step, "H100")
    assert graphs["gpu"] > graphs["host"]
    eager = sm.stream_time([o for o in sm.vllm_step_ops(w, [(1, 64)], graphs=False)
                            if o.name != "vllm scheduler (host)"], "H100")
    assert eager["launches"] == graphs["launches"] == len(sm.VLLM_LAYER) * w.layers + 3 + \
        sm.CONSTANTS.vllm_sampler_kernels
    assert eager["host"] > graphs["host"]


def test_rollout_memory_in_mib():
    w = sm.Workload()
    hf, vllm = sm.rollout_memory_mib(w, "hf"), sm.rollout_memory_mib(w, "vllm")
    last = 4096 + 16 + 3 * (208 + 64)  # the last turn's context
    assert hf["prefill_logits"] == 8 * 151936 * 4 / 2 ** 20 and vllm["prefill_logits"] == 0  # the last position
    assert hf["kv_cache"] == 8 * (last + 208) * 28 * 2 * 8 * 128 * 4 / 2 ** 20 == 2 * vllm["kv_cache"]
    weights = 2 * w.params() / 2 ** 20  # vLLM's own bf16 copy
    assert vllm["peak"] - vllm["kv_cache"] == hf["peak"] - hf["kv_cache"] - hf["prefill_logits"] + weights
    rows = sm.step_rows(replace(TINY, G=64, P=32768, layers=6, hidden=256, heads=8, kv_heads=8, head_dim=128),
                        devices=("H100",), engines=("hf", "vllm"))
    assert [r["rollout_fits"] for r in rows] == [False, True]  # HF: an fp32 KV cache, 64 x 33k x 6 x 2 x 1024 x 4 B
    assert rows[0]["rollout_kv_cache_MiB"] > 80 * 1024 > rows[1]["rollout_kv_cache_MiB"]


def test_hf_sampling_runs_on_the_device_with_one_small_copy_to_the_host():
    """``pact_fast.rollout._sample`` counted on the meta device: kernels over [rows, V] (no [rows, V] copy to
    the host), then one synchronising copy of the ids and log-probs, 12 bytes a row."""
    w = replace(TINY, G=4)
    ops = sm.hf_sample_ops(w)
    kernels = [o for o in ops if o.launch is not None]
    assert len(kernels) >= 3 and all(o.launch.bytes >= w.rollout_rows * w.vocab * 4 for o in kernels)
    (copy,) = [o for o in ops if o.sync]
    assert copy.host_s == pytest.approx(w.rollout_rows * 12 / sm.CONSTANTS.pcie_bandwidth)
    assert ops[-1] is copy


# --- scoring and update ------------------------------------------------------------------------------------

def test_trie_and_rows_follow_spec():
    w = TINY
    L = sm.trie_layout(tuple(sorted(w.group_spec().items()))).shape[1]
    assert L == w.P + w.T + w.U + 2 * w.G * w.R + w.E  # SPEC section 2's packed count
    assert sm.scored_rows(w) == 2 * w.G * w.R + w.E


def test_body_gemm_flops_forward_and_backward():
    w, table = TINY, sm._issue_table()
    L = w.P + w.T + w.U + 2 * w.G * w.R + w.E
    fwd, _ = sm.body_ops(w, L, backward=False, table=table)
    both, _ = sm.body_ops(w, L, backward=True, table=table)
    body = lambda ops: sum(o.launch.flops for o in ops if o.part == "body GEMMs")  # noqa: E731
    assert body(fwd) == 2 * L * w.layers * linear_weights(w)
    assert body(both) == 6 * L * w.layers * linear_weights(w)
    attention = [o for o in both if o.part == "tree attention"]
    assert {o.launch.kind for o in attention} >= {"attention_fwd", "attention_bwd"}
    assert not any(o.name == "sdpa" for o in both)


def test_score_pass_follows_the_trainer():
    from pact_fast.rollout import RolloutConfig
    from pact_fast.rollout_vllm import is_cap

    assert sm.default_score_pass("hf") == bool(is_cap(RolloutConfig(engine="hf")))
    assert sm.default_score_pass("vllm") == bool(is_cap(RolloutConfig(engine="vllm")))


def test_step_rows_fractions_and_cli(tmp_path):
    out = tmp_path / "step.json"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(TINY).items()]
    sm.main(args + ["--json", str(out)])
    doc = json.loads(out.read_text())
    assert {(r["device"], r["engine"]) for r in doc["rows"]} == {(d, e) for d in ("H100", "H200") for e in sm.ENGINES}
    for r in doc["rows"]:
        assert sum(r[f"{p}_fraction"] for p in sm.PARTS) == pytest.approx(1.0)
        assert r["step_ms"] == pytest.approx(sum(r[f"{p}_ms"] for p in sm.PARTS))
        assert r["label"] == "model prediction" and (r["scoring_ms"] > 0) == (r["engine"] != "hf")
        assert min(r[f"{p}_ms"] for p in ("rollouts", "update")) > 0
    assert doc["workload"]["R"] == TINY.R and "pcie_bandwidth" in doc["sources"]
    assert set(vars(sm.CONSTANTS)) <= set(doc["sources"])


def test_roofline_step_flag_prints_the_whole_step_of_the_w_group(capsys):
    roofline.main(["--stored-sass", "--step"])
    out = capsys.readouterr().out
    assert "Performance model: PREDICTIONS" in out and "Whole-step model: PREDICTIONS" in out
    printed = {(line.split()[0], line.split()[1]): float(line.split()[5]) for line in out.splitlines()
               if line.split()[:1] and line.split()[0] in roofline.DEVICES and line.split()[1] in sm.ENGINES}
    rows = sm.step_rows(sm.Workload())
    assert printed == {(r["device"], r["engine"]): pytest.approx(r["step_ms"], abs=0.05) for r in rows}
