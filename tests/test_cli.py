"""Every user mistake on the command line is one line naming it, exit status 2, before any expensive work,
with no run directory left behind; --debug shows the traceback instead."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pact_fast", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)}, cwd=cwd)


@pytest.mark.parametrize("setup,args,message", [
    (None, ["--config", "missing.yaml"], "pact-fast: config error: --config missing.yaml: no such file"),
    ("train: 5\n", ["--config", "run.yaml"], "pact-fast: config error: train: expected a section (a mapping of its "
                                             "keys attn_backend, bf16,"),
    ("train: [\n", ["--config", "run.yaml"], "pact-fast: config error: --config run.yaml: not valid YAML"),
    (None, ["--data", "nope.jsonl"], "pact-fast: data.path=nope.jsonl: no such file"),
    (None, ["rollout.tool_call_format=xml"], "pact-fast: config error: rollout.tool_call_format='xml' is not valid"),
    (None, ["--model", "no/such/dir"], "pact-fast: model directory 'no/such/dir' does not exist"),
], ids=["missing-config", "section-not-mapping", "bad-yaml", "missing-data", "bad-choice", "missing-model"])
def test_user_mistakes_are_one_line_with_status_2_and_leave_no_run_directory(tmp_path, setup, args, message):
    if setup is not None:
        (tmp_path / "run.yaml").write_text(setup)
    proc = _cli("train", *args, "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = _cli("train", "--config", "missing.yaml", "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_compare_reports_missing_data_as_one_line(tmp_path):
    proc = _cli("compare", "--data", "nope.jsonl", "--out", "out", "--modes", "sft", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pact-fast: data.path=nope.jsonl: no such file"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_compare_lists_give_trailing_overrides_back_and_check_their_values(monkeypatch, capsys):
    import pact_fast.cli as cli
    import pact_fast.compare as compare

    seen = {}

    def fake_compare(config, modes, seeds):
        seen.update(modes=modes, seeds=seeds, steps=config.train.steps)

    monkeypatch.setattr(compare, "compare", fake_compare)
    assert cli.main(["compare", "--modes", "sft", "pact", "--seeds", "0", "2", "train.steps=7"]) == 0
    assert seen == {"modes": ["sft", "pact"], "seeds": [0, 2], "steps": 7}
    for argv, word in ((["compare", "--seeds", "x"], "integers"), (["compare", "--modes", "ppo"], "unknown mode")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2 and word in capsys.readouterr().err
