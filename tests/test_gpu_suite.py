"""The one-command GPU suite's dry run (bench/gpu_suite.sh --dry-run): the same script end to end on the CPU
at tiny shapes under TRITON_INTERPRET=1, checked for the JSON the GPU run will write."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("check", "logprob", "layer", "group", "head", "model", "train")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ, GPU_SUITE_DIR=str(out_dir / "results"), OUT=str(out_dir / "out"), PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out_dir / "results" / "suite.json").read_text())
    return doc, proc.stdout, out_dir


def test_every_section_wrote_json_with_machine_and_versions(suite):
    doc, stdout, out_dir = suite
    assert set(doc["sections"]) == set(SECTIONS)
    for name, section in doc["sections"].items():
        assert "error" not in section, (name, section)
    for name in SECTIONS:
        assert (out_dir / "out" / f"{name}.json").exists(), f"{name}.json not copied to $OUT"
    for machine in [doc["machine"]] + [s["machine"] for n, s in doc["sections"].items() if n != "model"]:
        assert machine["date"][:2] == "20" and machine["torch"] == torch.__version__ and machine["triton"]
    assert doc["dry_run"] is True
    assert "section" in stdout.splitlines()[-1] or "group" in stdout  # the table is printed last


def test_correctness_cases_ran_and_passed(suite):
    doc, _, _ = suite
    results = doc["sections"]["check"]["results"]
    cases = results["linear_logprobs"]
    assert {c["dtype"] for c in cases} == {"bf16", "fp16"}
    assert any(c.get("bias") for c in cases) and any(c.get("temperature") != 1.0 for c in cases)
    assert any(c["case"] == "large-logits" for c in cases) and any(c["case"].startswith("W-") for c in cases)
    for c in cases:
        assert c["passed"], c
        assert set(c["errors"]) >= {"logp", "entropy", "d_hidden", "d_weight"}
        if c["case"] != "large-logits":
            assert max(c["errors"].values()) < 1e-2
    if (ROOT / "kernels" / "tree_attention_launch.py").exists():
        tree = results["tree_attention"]
        assert isinstance(tree, list) and {c["dtype"] for c in tree} == {"bf16", "fp16"}
        assert any(c["shape"]["HQ"] != c["shape"]["HKV"] for c in tree), "no grouped-query case"
        for c in tree:
            assert c["passed"], c
            assert max(c["errors"].values()) < 1e-2 and set(c["errors"]) == {"out", "dq", "dk", "dv"}
        assert {c.get("options", {}).get("dq_mode", "split") for c in tree} == {"split", "atomic"}
    head = results["fused_pact_head"]
    assert {c["dtype"] for c in head} == {"bf16", "fp16"} and {c["c_ent"] for c in head} == {0.0, 0.01}
    for c in head:
        assert c["passed"], c


def test_each_measured_figure_has_a_prediction_beside_it(suite):
    doc, _, _ = suite
    providers = set()
    for name in ("logprob", "layer", "group", "head"):
        rows = doc["sections"][name]["rows"]
        assert rows, name
        for r in rows:
            providers.add((name, r["provider"], r["mode"]))
            assert isinstance(r["prediction"], str) and r["prediction"], r
            if r["ms"] is None:
                assert r.get("skipped") or r.get("error"), r
                continue
            assert r["ms"] > 0 and r["peak_MiB"] >= 0
            assert isinstance(r["predicted_ms"], float) and r["predicted_ms"] > 0, r
    for p in ("triton", "naive", "liger_flce", "cce", "cublas_gemms"):
        for mode in ("fwd", "fwd+bwd"):
            assert ("logprob", p, mode) in providers
    for p in ("packed-triton", "packed-triton_atomic", "packed-flex", "packed-varlen", "b2b-varlen", "b2b-torch_varlen"):
        assert ("layer", p, "fwd+bwd") in providers
    for p in ("naive", "unfused", "fused", "fused_triton"):
        assert ("head", p, "fwd+bwd") in providers
    measured = {(n, p, m) for n in ("logprob", "layer") for r in doc["sections"][n]["rows"]
                if r["ms"] for p, m in [(r["provider"], r["mode"])]}
    assert ("logprob", "triton", "fwd+bwd") in measured and ("logprob", "naive", "fwd+bwd") in measured
    triton_row = next(r for r in doc["sections"]["logprob"]["rows"]
                      if r["provider"] == "triton" and r["mode"] == "fwd+bwd")
    assert triton_row["prediction"].startswith("roofline: linear_logprobs")
    assert triton_row["predicted_ms"] >= triton_row["ideal_ms"]
    assert doc["sections"]["model"]["rows"], "model rows missing"


def test_check_fails_a_wrong_kernel(monkeypatch):
    """The correctness check is not vacuous: a log-prob op that is 3% off everywhere fails it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    import pact_fast.ops as ops

    true_op = ops.linear_logprobs

    def off_by_three_percent(*args, **kwargs):
        logp, ent = true_op(*args, **{**kwargs, "backend": "torch"})
        return logp * 1.03, ent

    monkeypatch.setattr(ops, "linear_logprobs", off_by_three_percent)
    bad = gpu_check.check_logprob_case("N16-H32-V64", 16, 32, 64, "fp16", torch.device("cpu"))
    assert not bad["passed"] and bad["errors"]["logp"] > 1e-2
    monkeypatch.setattr(ops, "linear_logprobs", lambda *a, **k: true_op(*a, **{**k, "backend": "torch"}))
    good = gpu_check.check_logprob_case("N16-H32-V64", 16, 32, 64, "fp16", torch.device("cpu"))
    assert good["passed"], good
