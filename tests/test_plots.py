"""curves.png and `pact-fast plot`: panels only for quantities with data, runs overlaid, clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

from pact_fast.plots import PANELS, panels_with_data, plot_runs, read_metrics

HERE = Path(__file__).parent


def _run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_run(path):  # an SFT-only run: no RL terms, no ratios, evaluations at steps 0 and 2
    return _run(path, [{"step": 0, "eval/success_rate": 0.0}]
                + [{"step": s, "reward_mean": 0.1 * s, "loss/total": 2.0 / s, "loss/sft": 2.0 / s,
                    "sft_weight/tool_call": 0.8 - 0.1 * s} for s in (1, 2)] + [{"step": 2, "eval/success_rate": 0.5}])


def test_only_quantities_with_data_get_a_panel(tmp_path):
    rows = read_metrics(_sft_run(tmp_path / "sft"))
    titles = [p[0] for p in panels_with_data([rows])]
    assert titles == ["rollout reward", "held-out success (greedy, prompt-only)", "total loss",
                      "trace SFT (per trace token)", "SFT weight by component"]
    assert all(ylabel for _, ylabel, _ in PANELS)  # every panel labels its y axis


def test_plot_command_overlays_runs_and_names_a_missing_one(tmp_path):
    a = _sft_run(tmp_path / "sft")
    b = _run(tmp_path / "pact", [{"step": 1, "reward_mean": 0.5, "loss/rl": 0.1, "tc/ratio_mean": 1.0,
                                  "po/ratio_mean": 1.0, "anchor_frac": 0.25}])
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    out = tmp_path / "both.png"
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "plot", str(a), str(b), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(panels_with_data([read_metrics(a), read_metrics(b)])) == 8
    missing = subprocess.run([sys.executable, "-m", "pact_fast", "plot", str(tmp_path / "nope")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def test_plot_runs_writes_one_png(tmp_path):
    png = plot_runs([_sft_run(tmp_path / "r")], tmp_path / "c.png")
    assert Path(png).stat().st_size > 1000
