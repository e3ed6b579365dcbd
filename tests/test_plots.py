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


def test_a_row_cut_short_is_left_out_and_a_bad_line_is_named(tmp_path):
    """A run killed while writing its last row: the plot draws the rows before it (it failed with a JSON error
    naming no file); a bad line elsewhere, or a file without rows, is a ValueError naming the file (and line)."""
    import pytest

    run = _sft_run(tmp_path / "cut")
    path = run / "metrics.jsonl"
    whole = read_metrics(run)
    path.write_text(path.read_text() + '{"step": 3, "reward_')
    assert read_metrics(run) == whole
    path.write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a JSON row"):
        read_metrics(run)
    path.write_text("")
    with pytest.raises(ValueError, match="no step logged yet"):
        read_metrics(run)


def test_runs_of_the_same_name_get_labels_that_tell_them_apart(tmp_path):
    """compare --seeds writes seed0/pact and seed1/pact: both were labelled 'pact'."""
    from pact_fast.plots import run_labels

    assert run_labels([tmp_path / "seed0" / "pact", tmp_path / "seed1" / "pact"]) == ["seed0/pact", "seed1/pact"]
    assert run_labels([tmp_path / "sft", tmp_path / "pact"]) == ["sft", "pact"]
    run = _sft_run(tmp_path / "a" / "pact")
    assert run_labels([run / "metrics.jsonl", tmp_path / "sft"]) == ["pact", "sft"]  # a file is labelled by its run


def test_plot_of_a_metrics_file_and_an_out_without_suffix(tmp_path):
    """`plot RUN/metrics.jsonl` made RUN/metrics.jsonl/curves.png (a traceback); `--out noext` printed a name
    matplotlib then wrote with .png added."""
    run = _sft_run(tmp_path / "r")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "plot", str(run / "metrics.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == str(run / "curves.png"), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "plot", str(run), "--out", str(tmp_path / "noext")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "noext.png")
    assert (tmp_path / "noext.png").read_bytes()[:4] == b"\x89PNG"
    from pact_fast.plots import plot_runs  # the function too: the written path, with the suffix matplotlib adds

    assert plot_runs([run], tmp_path / "api") == tmp_path / "api.png" and (tmp_path / "api.png").is_file()


def test_metrics_without_a_quantity_to_plot_are_refused_not_drawn_blank(tmp_path):
    """A metrics.jsonl of rows that are not objects, or of objects without any plotted key (another tool's), gave
    an empty curves.png and status 0."""
    import pytest

    run = _run(tmp_path / "other", [{"step": 1, "accuracy": 0.5}])
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "plot", str(run)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "no metrics row has a quantity to plot" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (run / "curves.png").exists()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n[1, 2]\n')
    with pytest.raises(ValueError, match=f"{run / 'metrics.jsonl'}:2: not a JSON object"):
        read_metrics(run)


def test_plot_of_a_comparisons_directory_names_its_runs(tmp_path):
    """`pact-fast plot runs/compare` said "no metrics.jsonl (is it a run directory?)" of the directory holding the
    runs."""
    import pytest

    _sft_run(tmp_path / "cmp" / "sft")
    _sft_run(tmp_path / "cmp" / "pact")
    (tmp_path / "cmp" / "compare.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="a comparison, not a run") as info:
        read_metrics(tmp_path / "cmp")
    assert f"{tmp_path / 'cmp' / 'pact'} {tmp_path / 'cmp' / 'sft'}" in str(info.value)


def test_a_plot_cut_short_keeps_the_previous_picture(tmp_path, monkeypatch):
    """A run killed (or out of disk) while drawing curves.png left a cut PNG in place of the last whole one."""
    import pytest
    from matplotlib.figure import Figure

    run = _sft_run(tmp_path / "r")
    png = run / "curves.png"
    plot_runs([run], png)
    before = png.read_bytes()
    savefig = Figure.savefig

    def cut_short(self, fname, *args, **kwargs):
        savefig(self, fname, *args, **kwargs)
        Path(fname).write_bytes(Path(fname).read_bytes()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(OSError):
        plot_runs([run], png)
    assert png.read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl"]
    monkeypatch.setattr(Figure, "savefig", savefig)
    assert plot_runs([run], tmp_path / "other.svg") and (tmp_path / "other.svg").read_bytes().lstrip().startswith(b"<")
