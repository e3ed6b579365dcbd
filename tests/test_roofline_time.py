"""The time model of bench/roofline.py: a launch's time is the max of its compute, memory and issue terms plus a
launch overhead; the issue term comes from SASS; every torch kernel a public op launches is counted (an op the
harness has no rule for is an error); rows carry work and time ratios separately, in one unit of memory
(MiB = 2^20 bytes)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from pact_fast.kernels import linear_logprobs_launch as launch
from pact_fast.kernels.registry import interpreting

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import roofline  # noqa: E402
import sass  # noqa: E402

# H100 SXM as the model states it, written out here: 132 SMs x 4 schedulers x 1.755 GHz; HBM 3.0 TB/s.
ISSUE_RATE = 132 * 4 * 1.755e9  # warp-instructions per second
LAUNCH_S = 4.5e-6

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="counts what the Triton interpreter executes")


def test_time_is_the_max_of_the_three_terms_plus_a_launch():
    # compute 1 ms at 400 TFLOP/s, memory 2 ms at 3.0 TB/s, issue 2e9 warp-instructions: ~2.158 ms
    k = roofline.Launch("k", flops=4 * 10 ** 11, bytes=6 * 10 ** 9, kind="attention_fwd", elements=10 ** 9,
                        per_element=2.0)
    issue_s = 2e9 / ISSUE_RATE
    assert issue_s > 2e-3
    assert roofline.predict_time_ms([k], "H100") == pytest.approx(1e3 * (issue_s + LAUNCH_S))
    # memory-bound epilogue: 6 GB at 3.0 TB/s (H100) and at 4.3 TB/s (H200); its issue term is smaller
    epi = roofline.Launch("e", flops=0, bytes=6 * 10 ** 9, kind="epilogue", elements=10 ** 9, per_element=0.5)
    assert roofline.predict_time_ms([epi], "H100") == pytest.approx(2.0 + 1e3 * LAUNCH_S)
    assert roofline.predict_time_ms([epi], "H200") == pytest.approx(1e3 * (6e9 / 4.3e12 + LAUNCH_S))
    # two launches add, each with its own overhead
    assert roofline.predict_time_ms([k, epi], "H100") == pytest.approx(1e3 * (issue_s + 2e-3 + 2 * LAUNCH_S))
    with pytest.raises(ValueError, match="FLOPs"):
        roofline.predict_time_ms([roofline.Launch("x", 10, 0, "epilogue")], "H100")


def test_gemm_time_follows_its_waves_of_tiles():
    """A cuBLAS GEMM at 700 of 989 TFLOP/s when its 128x256 output tiles fill whole waves of 132 SMs; one tile
    more starts a second wave that runs nearly empty."""
    m, n, k = 128 * 132, 256, 4096
    full = roofline.Launch("g", 2 * m * n * k, 0, "gemm", gemm=(m, n, k))
    assert roofline.predict_time_ms([full], "H100") == pytest.approx(1e3 * (2 * m * n * k / 700e12 + LAUNCH_S))
    m2 = m + 1  # 133 row tiles: 2 waves for 1 + 1/132 waves of work
    more = roofline.Launch("g", 2 * m2 * n * k, 0, "gemm", gemm=(m2, n, k))
    rate = 700e12 * (m2 * n) / (2 * 132 * 128 * 256)
    assert roofline.predict_time_ms([more], "H100") == pytest.approx(1e3 * (2 * m2 * n * k / rate + LAUNCH_S))


def test_launchers_plan_with_the_models_tile_and_ridge():
    """The launchers size their blocks with the tile and the H100 ridge (FLOPs per byte) the time model prices
    GEMMs with; a GEMM's planned cost is its waves' FLOPs, or its bytes at the ridge where those dominate."""
    from pact_fast.kernels import registry

    h100 = roofline.DEVICES["H100"]
    assert roofline.CLASSES.gemm_tile == registry.GEMM_TILE == (128, 256)
    assert registry.GEMM_RIDGE == pytest.approx(h100.flops / h100.bandwidth)
    assert registry.DEFAULT_SMS == h100.sms
    # 24 tiles x 11 = 264: two full waves; x 12 = 288: a third wave
    assert registry.gemm_waves(384, 2048, 132, batch=11) == 2 and registry.gemm_waves(384, 2048, 132, batch=12) == 3
    # a launch: 4.5 us of host time, priced as the FLOPs 700 TFLOP/s would do in it
    assert registry.LAUNCH_WORK == pytest.approx(roofline.CLASSES.launch_s * h100.flops)
    compute = registry.gemm_work(384, 2048, 151936 // 11, 0, 2, 132, batch=11)
    assert compute == pytest.approx(2 * 2 * 132 * 128 * 256 * (151936 // 11) + registry.LAUNCH_WORK)
    # dW's update at K = 64 rows: 4 bytes of bf16 C per output element (read, write) beside 2*64 FLOPs: memory
    V, H, k = 151936, 2048, 64
    want = (V * k + k * H + V * H + V * H) * 2 * registry.GEMM_RIDGE + registry.LAUNCH_WORK
    assert registry.gemm_work(V, H, k, V * H, 2, 132) == pytest.approx(want)


@pytest.mark.parametrize("N,H", [(32768, 2048), (32768, 4096), (3000, 2048)])
def test_default_blockings_are_the_time_models_best(N, H):
    """The fused head's default (rows per block, dX splits), its memory_lean plan and the log-prob op's default
    slab, planned by the launchers' own few lines, are the best of every blocking the budget allows by the full
    time model, on H100 and H200 (within 1%): the workspace holds whole tile rows (W-logprob, H=2048: 384 rows,
    three tiles of 128, where 448 left half a tile idle in every logits and dX GEMM) and the splits fill whole
    waves; the lean plan against first-pass blocks of every multiple of 128 rows dW holds; a smaller N too."""
    from pact_fast.kernels import fused_pact_head_launch as head

    V = 151936
    shape = {"N": N, "V": V, "H": H}
    table = sass.issue_table()

    def ratios(kwargs, family="head"):
        rows = roofline.variant_rows("W", family, shape, table=table, variants=[(family, "x", kwargs)])
        return [r["time_ratio"] for r in rows]

    budget = head.WORKSPACE_SHARE * V * H * 2
    assert head.extra_memory_bytes(N, V, H, torch.bfloat16) <= budget
    planned = ratios({"want_entropy": False})
    grid = [ratios({"want_entropy": False, "rows_per_block": r, "splits": s})
            for r in range(64, min(N, 2048) + 1, 64) for s in range(1, head.MAX_DX_SPLITS + 1)
            if head.extra_memory_bytes(N, V, H, torch.bfloat16, rows_per_block=r, splits=s) <= budget]
    assert len(grid) > 50
    for device in (0, 1):
        assert planned[device] <= 1.01 * min(g[device] for g in grid)
    lean = {"want_entropy": False, "memory_lean": True}
    planned = ratios(lean)
    grid = []
    for r in range(128, min(N, H) + 1, 128):
        try:
            grid.append(ratios({**lean, "rows_per_block": r}))
        except ValueError:  # blocks whose logits dW cannot hold
            continue
    assert len(grid) >= 3
    for device in (0, 1):
        assert planned[device] <= 1.01 * min(g[device] for g in grid)
    blocking = launch.plan(N, V, H)
    assert blocking.rows * blocking.slab <= launch.WORKSPACE_FRACTION * V * H
    planned = ratios({}, "logprob")
    grid = [ratios({"blocking": launch.Blocking(blocking.rows, s)}, "logprob")
            for s in range(128, int(launch.WORKSPACE_FRACTION * V * H) // blocking.rows + 1, 128)]
    for device in (0, 1):
        assert planned[device] <= 1.01 * min(g[device] for g in grid)


def test_sass_hot_loop_gives_warp_instructions_per_element():
    """A hand-made listing: 3 setup instructions, a loop of 4 (a backward branch closes it), EXIT and the
    trailing self-branch (not a loop)."""
    listing = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   S2R R0, SR_TID.X ;",
        "        /*0020*/                   IMAD R2, R0, 0x4, RZ ;",
        "        /*0030*/                   LDG.E R3, desc[UR4][R2.64] ;",
        "        /*0040*/                   FADD R4, R3, R4 ;",
        "        /*0050*/                   ISETP.GE.AND P0, PT, R2, 0x100, PT ;",
        "        /*0060*/              @!P0 BRA 0x30 ;",
        "        /*0070*/                   EXIT ;",
        "        /*0080*/                   BRA 0x80;",
    ])
    assert sass.loops(listing) == [(3, 6)]
    assert sass.hot_loop(listing) == (4, 9)

    class Entry:  # a GateEntry's fields the profile reads
        name = "linear_logprobs.fwd[bf16]"
        constexprs = {"BLOCK_R": 2, "BLOCK_S": 8}

        class config:
            num_warps = 4

    p = sass.profile(Entry, listing)
    assert p["warp_instructions_per_element"] == 4 * 4 / 16


def test_sass_hot_loop_of_the_pass_is_its_first_loop():
    """The fused head's pass: a main loop of 3 instructions, then a larger one (its re-shift of rows past the
    limit, which runs for none by default). The largest loop elsewhere, the first for the pass."""
    listing = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   LDG.E R3, desc[UR4][R2.64] ;",
        "        /*0020*/                   FADD R4, R3, R4 ;",
        "        /*0030*/              @!P0 BRA 0x10 ;",
        "        /*0040*/                   LDG.E R3, desc[UR4][R2.64] ;",
        "        /*0050*/                   MUFU.LG2 R5, R3 ;",
        "        /*0060*/                   FADD R4, R5, R4 ;",
        "        /*0070*/                   STG.E desc[UR4][R2.64], R4 ;",
        "        /*0080*/              @!P1 BRA 0x40 ;",
        "        /*0090*/                   EXIT ;",
    ])
    assert sass.loops(listing) == [(1, 3), (4, 8)]
    assert sass.hot_loop(listing) == (5, 10) and sass.hot_loop(listing, first=True) == (3, 10)

    class Entry:
        constexprs = {"BLOCK_R": 4, "BLOCK_V": 8}

        class config:
            num_warps = 4

    for name, body in (("fused_pact_head.pass[bf16-shift]", 3), ("linear_logprobs.bwd[bf16]", 5)):
        Entry.name = name
        Entry.constexprs = {"BLOCK_R": 4, "BLOCK_V": 8, "BLOCK_S": 8}
        assert sass.profile(Entry, listing)["loop_instructions"] == body, name


def test_stored_sass_table_covers_every_kernel_the_model_prices():
    table = sass.stored()
    assert all("stored table" in p["source"] for p in table.values())
    for kernel in sass.ELEMENTS:
        assert sass.per_element(table, kernel) > 0, kernel


@needs_interpreter
def test_harness_refuses_a_torch_op_it_does_not_model():
    a = torch.randn(6, 6)
    with pytest.raises(RuntimeError, match="linalg_qr.* is not modelled"):
        with roofline.count_executed(torch_ops=True):
            torch.linalg.qr(a)


@needs_interpreter
def test_harness_counts_elementwise_bytes_launches_and_syncs():
    a, b = torch.randn(10), torch.randn(10)
    with roofline.count_executed(torch_ops=True) as counts:
        c = a + b  # reads 2 x 40 bytes, writes 40
        c.view(2, 5).t()  # views launch nothing
        float(c.sum())  # a reduction (40 + 4 bytes) and a host synchronisation
        c[:2].tolist()  # another, though no aten op runs for it
    assert counts["torch.add"] == [0, 120] and counts.launches["torch.add"] == 1
    assert counts["torch.sum"] == [0, 44]
    assert counts.syncs == 2
    assert not any(name.startswith(("torch.view", "torch.t")) for name in counts)


@needs_interpreter
def test_public_linear_logprobs_launches_exactly_the_modelled_kernels_and_the_stored_torch_ops():
    """Driven through pact_fast.ops.linear_logprobs (forward and backward): its Triton kernels and GEMMs equal
    kernel_costs at its own blocking, and its other torch kernels equal the stored probe table."""
    from pact_fast.ops import linear_logprobs

    N, V, H = 30, 130, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 4).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    grad = torch.randn(N, generator=g)
    with roofline.count_executed(torch_ops=True) as counts:
        logp = linear_logprobs(x, w, t, backend="triton", chunk_rows=16, vocab_slab=64)
        torch.autograd.backward(logp, grad)
    model = roofline.aggregate(launch.kernel_costs(N, V, H, torch.float32, has_bias=False, has_gent=False,
                                                   configs=launch.INTERPRET_CONFIGS, blocking=launch.Blocking(16, 64)))
    modelled = {k: tuple(v) for k, v in counts.items() if not k.startswith("torch.") or k == roofline.TORCH_GEMM}
    assert modelled == model
    stored = roofline.stored_torch_ops()["linear_logprobs fwd+bwd"]
    others = [k for k in counts if k.startswith("torch.") and k != roofline.TORCH_GEMM]
    assert sum(counts.launches[k] for k in others) == stored["per_call"]["launches"]
    assert counts.syncs == stored["per_call"]["syncs"]


@needs_interpreter
def test_stored_torch_op_table_is_current():
    """bench/results/roofline_torch_ops.json equals a fresh count through each public op (refresh it with
    ``TRITON_INTERPRET=1 python bench/roofline.py --probe`` when an op changes what it launches)."""
    stored = roofline.stored_torch_ops()
    assert set(stored) == set(roofline.PROBES)
    for op in roofline.PROBES:
        assert roofline.probe_torch_ops(op) == stored[op], op


def test_rows_include_every_launch_and_their_torch_kernels():
    rows = roofline.model_rows(devices=("H100",), table=sass.stored())
    stored = roofline.stored_torch_ops()
    for r in rows:
        if r["time_ratio"] is None:
            assert "work model only" in r["note"]
            continue
        kernels = {k["kernel"]: k for k in r["kernels"]}
        assert sum(k["launches"] for k in r["kernels"]) == r["launch_count"], r["op"]
        assert kernels[roofline.TORCH_OPS_NAME]["launches"] > 0, r["op"]
        assert sum(k["predicted_time_ms"] for k in r["kernels"]) == pytest.approx(r["predicted_time_ms"])
    head = next(r for r in rows if r["workload"] == "W-logprob-H2048" and r["op"] == "fused_pact_head fwd+bwd")
    from pact_fast.kernels import fused_pact_head_launch

    plan = fused_pact_head_launch.plan(32768, 151936, 2048, torch.bfloat16).blocks
    per_block = stored["fused_pact_head fwd+bwd"]["per_unit"]["launches"]
    torch_ops = next(k for k in head["kernels"] if k["kernel"] == roofline.TORCH_OPS_NAME)
    assert torch_ops["launches"] == pytest.approx(len(plan) * per_block +
                                                  stored["fused_pact_head fwd+bwd"]["per_call"]["launches"], abs=1)
    gemms_and_triton = [k for k in head["kernels"] if k["kernel"] != roofline.TORCH_OPS_NAME]
    # logits, pass, dX (and one GEMM for the columns past S equal splits), scale, dW per block
    assert sum(k["launches"] for k in gemms_and_triton) == sum(
        5 + (1 if fused_pact_head_launch.split_columns(151936, b.splits)[1] else 0) for b in plan)


def test_json_rows_have_work_and_time_fields_and_one_memory_unit(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    roofline.main(["--json", str(out), "--stored-sass"])
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert "MiB = 2^20" in doc["units"] and " MB" not in printed and " GB " not in printed
    timed = 0
    for r in doc["rows"]:
        assert {"workload", "op", "device", "ratio", "extra_memory_bytes", "work_ratio", "predicted_time_ms",
                "ideal_time_ms", "time_ratio"} <= set(r)
        assert r["ratio"] == r["work_ratio"] == pytest.approx(r["predicted_ms"] / r["ideal_ms"])
        if r["time_ratio"] is not None:
            timed += 1
            assert r["time_ratio"] == pytest.approx(r["predicted_time_ms"] / r["ideal_time_ms"])
            assert r["predicted_time_ms"] == pytest.approx(sum(r["time_split_ms"].values()))
    assert timed >= 12
    row = next(r for r in doc["rows"] if r["op"] == "linear_logprobs fwd+bwd" and r["device"] == "H100"
               and r["workload"] == "W-logprob-H2048")
    assert f"{row['extra_memory_bytes'] / 2 ** 20:9.1f}" in printed  # the table's "extra MiB" is 2^20 bytes


def test_print_table_labels_predictions_and_prints_mib():
    row = roofline.model_row("w", "op", "H100", [], 1.0, 5 * 2 ** 19)
    row["predicted_ms"], row["work_ratio"] = 1.0, 1.0
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        roofline.print_table([row])
    text = buf.getvalue()
    assert "PREDICTIONS, not measurements" in text and "extra MiB" in text
    assert "      2.5" in text.splitlines()[-1]


def test_frozen_head_rows_are_priced_against_two_gemms_and_the_lean_row_is_named():
    """A frozen lm_head (weight_grad False) launches no dW GEMM and its ideal is two GEMMs (logits, dX), said in
    the op; the memory_lean fused head has "lean" in its op and the smallest fused-head workspace."""
    rows = roofline.model_rows(devices=("H100",), table=sass.stored())
    N, V, H = 32768, 151936, 2048
    by_op = {r["op"]: r for r in rows if r["workload"] == "W-logprob-H2048"}
    frozen = [op for op in by_op if "frozen head" in op]
    assert {op.split()[0] for op in frozen} == {"linear_logprobs", "fused_pact_head"}
    for op in frozen:
        r = by_op[op]
        assert "ideal 2 GEMMs" in op
        assert r["ideal_ms"] == pytest.approx(roofline.ideal_logprob_ms(N, V, H, "H100", gemms=2))
        assert r["ideal_time_ms"] == pytest.approx(roofline.predict_time_ms(
            roofline.gemm_launches([(N, V, H), (N, H, V)]), "H100"))
        kernels = {k["kernel"] for k in r["kernels"]}
        assert "torch.mm[dw]" not in kernels and "torch.mm[dx]" in kernels, op
        recomputed = op.startswith("linear_logprobs")  # its backward recomputes the logits: 3 GEMMs, not 2
        assert sum(k["flops"] for k in r["kernels"]) == (6 if recomputed else 4) * N * V * H, op
    lean = [op for op in by_op if op.startswith("fused_pact_head") and "lean" in op]
    assert len(lean) == 1
    heads = [r for op, r in by_op.items() if op.startswith("fused_pact_head")]
    assert by_op[lean[0]]["extra_memory_bytes"] == min(r["extra_memory_bytes"] for r in heads)
    assert by_op[lean[0]]["extra_memory_bytes"] <= 0.05 * V * H * 2  # within 5% of a bf16 dW


def test_readme_tables_are_what_the_model_prints():
    """README's performance-model tables (log-prob ops, fused head, tree attention; H100) are the script's
    ``--readme`` output for the current model, so a change of kernel or class shows up there."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = roofline.model_rows(table=sass.stored())
    for name, ops in roofline.README_TABLES.items():
        table = roofline.markdown_table(rows, ops, "H100")
        assert table.count("\n") >= 3, name
        assert table in readme, f"README's {name} table is stale: python bench/roofline.py --readme"


def test_head_block_sweep_flags_the_default_and_the_budget(tmp_path, capsys):
    """``--head-sweep``: the default's plan first, flagged, priced as the table prices it, then uniform (R, S)
    blocks; a row's share of dW is its extra memory over dW's bytes (a 512-row block's logits alone are 512 / H =
    25% at H = 2,048: uniform 512-row blocks go over the budget where their last blocks park past their logits,
    the default's last blocks take fewer rows)."""
    from pact_fast.kernels import fused_pact_head_launch as head

    table = sass.issue_table(compile_here=False)
    sweep = roofline.head_block_sweep(rows=(384, 512), splits=(4, 11), table=table)
    assert [(r["rows"], r["splits"]) for r in sweep] == [("plan", "plan"), (384, 4), (384, 11), (512, 4), (512, 11)]
    V, H = 151936, 2048
    assert [r["default"] for r in sweep] == [True, False, False, False, False]
    assert sweep[0]["blocks"] == head.plan_summary(head.plan(32768, V, H, torch.bfloat16))
    table_row = next(r for r in roofline.fused_head_rows("W-logprob-H2048", 32768, V, H, ("H100",), table)
                     if r["op"] == "fused_pact_head fwd+bwd")
    assert sweep[0]["time_ratio"] == pytest.approx(table_row["time_ratio"])
    for r in sweep:
        assert r["dw_share"] == pytest.approx(r["extra_memory_bytes"] / (V * H * 2))
        assert r["within_budget"] == (r["dw_share"] <= head.WORKSPACE_SHARE)
        R = 512 if r["default"] else r["rows"]
        assert r["extra_memory_bytes"] >= R * V * 2  # the logits workspace at least
    assert not any(r["within_budget"] for r in sweep if r["rows"] == 512)
    out = tmp_path / "sweep.json"
    roofline.main(["--head-sweep", "--stored-sass", "--json", str(out)])
    assert "<- default" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["op"] == "fused_pact_head fwd+bwd" and "predictions" in doc["note"]
    best = min((r for r in doc["rows"] if r["within_budget"]), key=lambda r: r["time_ratio"])
    assert best["default"]  # the default is the fastest blocking the budget allows, by this model
