"""Every user mistake on the command line is one line naming it, exit status 2, before any expensive work,
with no run directory left behind; --debug shows the traceback instead."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pact_fast", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)}, cwd=cwd)


@pytest.mark.parametrize("setup,args,message", [
    (None, ["--config", "missing.yaml"], "pact-fast: config error: --config missing.yaml: no such file"),
    ("train: 5\n", ["--config", "run.yaml"], "pact-fast: config error: --config run.yaml:1: train: expected a section (a "
                                             "mapping of its "
                                             "keys attn_backend, bf16,"),
    ("train: [\n", ["--config", "run.yaml"], "pact-fast: config error: --config run.yaml: not valid YAML"),
    (None, ["--data", "nope.jsonl"], "pact-fast: data.path=nope.jsonl: no such file"),
    (None, ["rollout.tool_call_format=xml"], "pact-fast: config error: rollout.tool_call_format='xml' is not valid"),
    (None, ["--model", "no/such/dir"], "pact-fast: model directory 'no/such/dir' does not exist"),
    (None, ["train.steps=0"], "pact-fast: config error: train.steps=0 must be >= 1"),
    (None, ["train.device=cuda:99"], "pact-fast: train.device=cuda:99: this torch"),
    (None, ["train.liger=true"], "pact-fast: train.liger=true needs"),
    # overrides on both sides of an option are all read, the last one winning
    (None, ["train.steps=3", "--data", "nope.jsonl", "train.steps=0"], "pact-fast: config error: train.steps=0 must"),
    (None, ["--data", ""], "pact-fast: --data was given an empty path"),
    (None, ["train.out_dir=elsewhere"], "pact-fast: config error: --out out and train.out_dir=elsewhere both set "
                                        "train.out_dir; give one"),
    ("x: 1\n", ["--model", "run.yaml"], "pact-fast: model directory 'run.yaml' is a file; give the directory"),
    ("x: 1\n", ["--data", "."], "pact-fast: data.path=.: a directory; give a JSONL file"),
], ids=["missing-config", "section-not-mapping", "bad-yaml", "missing-data", "bad-choice", "missing-model",
        "steps-zero", "no-such-gpu", "liger", "overrides-after-an-option", "empty-path", "flag-and-override",
        "model-a-file",
        "data-a-directory"])
def test_user_mistakes_are_one_line_with_status_2_and_leave_no_run_directory(tmp_path, setup, args, message):
    if setup is not None:
        (tmp_path / "run.yaml").write_text(setup)
    proc = _cli("train", *args, "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_wandb_installed_is_one_line_before_the_model_loads(tmp_path):
    """``train.wandb=true`` without the package: one line and status 2 before anything loads, not an
    ImportError traceback after the model load and held-out evaluation with config.yaml left behind."""
    proc = _cli("train", "train.wandb=true", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pact-fast: train.wandb=true needs wandb"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_data_row_without_tools_trace_answer_or_env_is_refused_before_training(tmp_path):
    """A row of only ``id`` and ``messages`` parses, but would train at loss 0 and reward 0: one line naming the
    file, the line and the first missing field, before any run directory is made."""
    row = {"id": "q1", "messages": [{"role": "user", "content": "what is the employer of hugo ?"}]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    proc = _cli("train", "--data", "rows.jsonl", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pact-fast: rows.jsonl:1: missing 'tools'"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_data_file_too_small_to_split_off_held_out_tasks_is_refused(tmp_path):
    """Three rows give no held-out row (data.eval_tasks come off a file's start, at most a fifth of it): one line
    before any step, not a run whose held-out success reads 0.0."""
    from pact_fast.envs import make_task

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(make_task(k, hops=1)) + "\n" for k in range(3)))
    proc = _cli("train", "--data", "rows.jsonl", "--out", "out", "loss.mode=grpo", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pact-fast: rows.jsonl: no held-out tasks"), proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given,expected", [({}, ["False", "10000", "-"]),
                                            ({"OMP_WAIT_POLICY": "ACTIVE"}, ["False", "-", "ACTIVE"]),
                                            ({"GOMP_SPINCOUNT": "5"}, ["False", "5", "-"])])
def test_the_command_bounds_openmp_spinning_before_torch_loads(given, expected):
    """OpenMP reads its waiting settings once, when torch loads it: the command's module sets a bounded spin
    before any torch import, and a waiting policy or spin count from the environment wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    code = ("import os, sys, pact_fast.__main__; print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT', '-'), "
            "os.environ.get('OMP_WAIT_POLICY', '-'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected


def test_an_unknown_option_among_overrides_is_still_refused(tmp_path):
    """Words left after the overrides are taken as overrides only when they are ``key=value``: an unknown option is
    argparse's error (usage, then the line), before anything runs."""
    proc = _cli("train", "train.steps=3", "--out", "out", "--bogus", "x=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "pact-fast: error: unrecognized arguments: --bogus x=1"
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = _cli("train", "--config", "missing.yaml", "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


@pytest.mark.parametrize("args", [["train", "--config", "a.yaml", "--config", "b.yaml"],
                                  ["train", "--out", "a", "train.steps=1", "--out", "b"],
                                  ["eval", "--show", "1", "--show", "2"]])
def test_an_option_given_twice_is_refused(args, capsys, tmp_path, monkeypatch):
    """argparse kept the last of two: `--config a.yaml --config b.yaml` trained on b.yaml alone (a's options lost,
    not layered), `--out a --out b` wrote to b, without a word."""
    import pact_fast.cli as cli

    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    option, first, second = args[1], args[2], args[-1]
    assert f"error: {option} given twice ({first} and {second}); give it once" in capsys.readouterr().err


def test_compare_reports_missing_data_as_one_line(tmp_path):
    proc = _cli("compare", "--data", "nope.jsonl", "--out", "out", "--modes", "sft", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pact-fast: data.path=nope.jsonl: no such file"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_compare_lists_give_trailing_overrides_back_and_check_their_values(monkeypatch, capsys, tmp_path):
    import pact_fast.cli as cli
    import pact_fast.compare as compare

    seen = {}

    def fake_compare(config, modes, seeds, log):
        seen.update(modes=modes, seeds=seeds, steps=config.train.steps, out=config.train.out_dir)
        return []

    monkeypatch.setattr(compare, "compare", fake_compare)
    assert cli.main(["compare", "--modes", "sft", "pact", "--seeds", "0", "2", "train.steps=7"]) == 0
    # train's default run directory is left to train: the comparison goes to runs/compare
    assert seen == {"modes": ["sft", "pact"], "seeds": [0, 2], "steps": 7, "out": "runs/compare"}
    assert cli.main(["compare", "--modes", "sft", "--out", "elsewhere"]) == 0 and seen["out"] == "elsewhere"
    assert cli.main(["compare", "--modes", "sft", "--out", "runs/pact"]) == 0 and seen["out"] == "runs/pact"
    capsys.readouterr()
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("loss:\n  mode: grpo\n")  # a train config reused: its mode is not what compare trains
    assert cli.main(["compare", "--modes", "sft", "--config", str(run_yaml)]) == 0
    assert "the config's loss.mode=grpo is not used" in capsys.readouterr().err
    run_yaml.write_text("train:\n  seed: 7\n")  # replaced by each seed
    assert cli.main(["compare", "--modes", "sft", "--seeds", "0", "1", "--config", str(run_yaml)]) == 0
    assert "compare --seeds sets train.seed to each seed; the config's are not used" in capsys.readouterr().err
    for argv, word in ((["compare", "--seeds", "x"], "integers"), (["compare", "--modes", "ppo"], "unknown mode"),
                       (["compare", "--modes"], "at least one"), (["compare", "--modes", "sft", "sft"], "twice"),
                       (["compare", "--seeds", "0", "0"], "a seed twice"),
                       (["compare", "--seeds", "0", "99999999999"], "seeds in [0, 4294967295], got 99999999999"),
                       (["compare", "loss.mode=grpo"], "loss.mode is what --modes sets"),
                       (["compare", "--seeds", "0", "1", "train.seed=5"], "train.seed= would be ignored")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2 and word in capsys.readouterr().err


def test_config_of_a_model_directory_that_does_not_exist_is_refused(tmp_path):
    """`pact-fast config --model /nonexistent` (or a directory without config.json) printed a pretrained
    directory's defaults, status 0."""
    proc = _cli("config", "--model", "/nonexistent/model")
    assert proc.returncode == 2 and proc.stderr.strip() == ("pact-fast: --model /nonexistent/model: no such directory "
                                                            "(the defaults shown are a pretrained model directory's)")
    proc = _cli("config", "--model", str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout[:200]
    assert proc.stderr == f"pact-fast: --model {tmp_path}: no config.json (not a Hugging Face model directory)\n"


def test_output_into_a_closed_pipe_ends_quietly():
    """`pact-fast plan ... | head -1` ended in a BrokenPipeError traceback when head left first."""
    proc = subprocess.Popen([sys.executable, "-m", "pact_fast", "plan", "--model", "qwen3-0.6b", "--gpu-memory", "24GB"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    proc.stdout.close()  # the reader leaves before the command prints
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141 and "Traceback" not in err, err


TINY_COMPARE = ["train.steps=1", "train.prompts_per_step=2", "data.eval_tasks=2"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A real `pact-fast compare` of grpo and pact over one seed, with an option only pact reads."""
    cwd = tmp_path_factory.mktemp("compare")
    proc = _cli("compare", "--modes", "grpo", "pact", "--seeds", "1", "--out", "cmp", "loss.anchor_q=0.5",
                *TINY_COMPARE, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_compare_prints_its_table_on_stdout_and_its_log_on_stderr(compared):
    """`pact-fast compare > table.txt` got the trainer's log lines mixed into the table."""
    _, proc = compared
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["mode", "grpo", "pact"], proc.stdout
    assert "[compare] training grpo (seed 1)" in proc.stderr and "held-out before training" in proc.stderr


def test_a_compare_runs_config_yaml_is_a_config_that_trains(compared, tmp_path):
    """The grpo run's config.yaml held loss.seed (and any option only another compared mode reads), which
    `train --config` refuses as unread: each run's file holds its own mode's options, so it trains as given."""
    cwd, _ = compared
    saved = {mode: yaml.safe_load((cwd / "cmp" / "seed1" / mode / "config.yaml").read_text())
             for mode in ("grpo", "pact")}
    assert saved["pact"]["loss"]["seed"] == 1 and saved["pact"]["loss"]["anchor_q"] == 0.5  # pact reads them
    for mode in ("grpo", "pact"):
        (tmp_path / f"{mode}.yaml").write_text((cwd / "cmp" / "seed1" / mode / "config.yaml").read_text())
        proc = _cli("train", "--config", f"{mode}.yaml", "--out", f"again_{mode}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["steps"] == 1


def _fake_train(interrupt_mode, how):
    """A stand-in for ``trainer.train``: a finished run, or, in ``interrupt_mode``, one Ctrl-C'd mid-step
    (``how="step"``: train returns its summary) or one that raises ``how`` (an exception class) before its first
    step."""
    def fake_train(cfg, log):
        if cfg.loss.mode == interrupt_mode and how != "step":
            raise how("before the first step")
        done = cfg.loss.mode != interrupt_mode
        Path(cfg.train.out_dir).mkdir(parents=True)
        (Path(cfg.train.out_dir) / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
        return {"steps": cfg.train.steps if done else 1, "seconds": 1.0, "interrupted": not done, "stopped": None,
                "eval_before": None, "eval_after": {"success_rate": 0.5} if done else None}
    return fake_train


def test_an_interrupted_compare_exits_130_and_says_which_run_was_cut(monkeypatch, tmp_path, capsys):
    """A Ctrl-C'd comparison exited 0 and its compare.json did not say which run had been cut short."""
    import pact_fast.cli as cli
    import pact_fast.compare as compare

    monkeypatch.setattr(compare, "train", _fake_train("grpo", "step"))
    assert cli.main(["compare", "--modes", "sft", "grpo", "pact", "--out", str(tmp_path), "train.steps=3"]) == 130
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["mode"], r["interrupted"]) for r in rows] == [("sft", False), ("grpo", True)]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_compare_interrupted_before_a_runs_first_step_keeps_the_finished_runs_table(error, monkeypatch, tmp_path,
                                                                                      capsys):
    """A Ctrl-C (or an error) while a later run loaded its model left no compare.json of the runs already
    finished."""
    import pact_fast.compare as compare
    from pact_fast.config import load_config

    monkeypatch.setattr(compare, "train", _fake_train("pact", error))
    with pytest.raises(error):
        compare.compare(load_config(None, [f"train.out_dir={tmp_path}", "train.steps=3"]), modes=("sft", "pact"),
                        log=lambda *a: None)
    assert [r["mode"] for r in json.loads((tmp_path / "compare.json").read_text())] == ["sft"]
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["sft", "0.500"]


def test_resume_reads_its_overrides_onto_the_runs_own_config(monkeypatch, tmp_path, capsys):
    """`train --resume RUN data.eval_path=X` was refused ("needs data.path") by a check of the overrides against
    the default config, before the run's own (which holds data.path) was read."""
    import pact_fast.cli as cli
    import pact_fast.trainer as trainer
    from pact_fast.data import write_examples
    from pact_fast.envs import make_tasks

    data, held_out = tmp_path / "tasks.jsonl", tmp_path / "held_out.jsonl"
    write_examples(data, make_tasks(12, seed=5, hops=(1, 2)))
    write_examples(held_out, make_tasks(3, seed=6, hops=(1, 2)))
    tiny = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.head_dim=16", "model.intermediate_size=64", "data.eval_tasks=2", "train.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.max_turns=1", "train.progress=false",
            "train.tensorboard=false"]
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--out", str(run), *tiny, "train.steps=2",
                     "train.stop_after=1"]) == 0
    seen = {}

    def fake_train(config, resume, log):
        seen["eval_path"] = config.data.eval_path
        return {"stopped": None, "interrupted": False}

    monkeypatch.setattr(trainer, "train", fake_train)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), f"data.eval_path={held_out}"]) == 0, \
        capsys.readouterr().err
    assert seen["eval_path"] == str(held_out)


def test_compare_into_a_file_is_one_line(tmp_path, capsys):
    """`compare --out FILE` raised FileExistsError from mkdir (a traceback) after the data had loaded."""
    import pact_fast.cli as cli

    (tmp_path / "taken").write_text("x")
    assert cli.main(["compare", "--modes", "sft", "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a directory" in err[0], err


def test_resume_refuses_another_seed_for_the_built_in_models_kl_reference(tmp_path, capsys):
    """With the built-in model and loss.beta_kl > 0 the reference is the initial weights, drawn from train.seed:
    `--resume RUN train.seed=7` built another reference model without a word."""
    import pact_fast.cli as cli

    tiny = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.head_dim=16", "model.intermediate_size=64", "data.train_tasks=8", "data.eval_tasks=2",
            "train.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.max_turns=1",
            "train.progress=false", "train.tensorboard=false", "loss.beta_kl=0.1"]
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *tiny, "train.steps=2", "train.stop_after=1"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "train.seed=7"]) == 2
    assert "train.seed is the run's own with loss.beta_kl > 0" in capsys.readouterr().err


def _finishing_train(cfg, log):
    """A stand-in for ``trainer.train`` that writes what a finished run writes: metrics, summary and config."""
    from pact_fast.config import save_config

    run = Path(cfg.train.out_dir)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
    summary = {"steps": cfg.train.steps, "seconds": 1.0, "interrupted": False, "stopped": None,
               "eval_before": None, "eval_after": {"success_rate": 0.5}}
    (run / "summary.json").write_text(json.dumps(summary))
    save_config(cfg, run / "config.yaml")
    return summary


def test_compare_refuses_to_put_its_runs_inside_a_training_run(monkeypatch, tmp_path, capsys):
    """`compare --config cmp/pact/config.yaml` (an arm's config reused, its train.out_dir its own run) trained the
    new comparison's runs inside that run's directory."""
    import pact_fast.cli as cli
    import pact_fast.compare as compare

    monkeypatch.setattr(compare, "train", _finishing_train)
    assert cli.main(["compare", "--modes", "sft", "pact", "--out", str(tmp_path / "cmp"), "train.steps=2"]) == 0
    capsys.readouterr()
    arm = tmp_path / "cmp" / "pact"
    assert cli.main(["compare", "--modes", "sft", "--config", str(arm / "config.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"compare: {arm} is the directory of a training run" in err[0], err
    assert not (arm / "sft").exists()
    project = tmp_path / "project"  # a directory holding a config file of the user's own is no run
    project.mkdir()
    (project / "config.yaml").write_text("train:\n  steps: 2\n")
    assert cli.main(["compare", "--modes", "sft", "--config", str(project / "config.yaml"), "--out", str(project)]) == 0
    assert (project / "sft" / "summary.json").is_file()


def test_compare_reads_back_a_run_whose_metrics_were_deleted(monkeypatch, tmp_path, capsys):
    """A finished run read back without its metrics.jsonl made compare.png's reward curve raise a traceback after
    every run had finished; the plot leaves that run out and says so."""
    import pact_fast.compare as compare
    from pact_fast.config import load_config

    monkeypatch.setattr(compare, "train", _finishing_train)
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.steps=2"])
    compare.compare(cfg, modes=("sft", "pact"), log=lambda *a: None)
    (tmp_path / "sft" / "metrics.jsonl").unlink()
    (tmp_path / "compare.png").unlink()
    lines = []
    rows = compare.compare(cfg, modes=("sft", "pact"), log=lines.append)
    assert [r["success_rate"] for r in rows] == [0.5, 0.5] and (tmp_path / "compare.png").exists()
    assert f"[compare] {tmp_path / 'sft'}/metrics.jsonl cannot be read: compare.png leaves its reward curve out" in lines


def test_compare_says_its_progress_on_torchruns_rank_0_before_the_process_group_starts(monkeypatch, tmp_path):
    """The progress lines were gated on the process group's rank, which the first run's train starts: every rank
    said "[compare] training sft ..." under torchrun. torchrun's RANK decides before that."""
    import pact_fast.compare as compare
    from pact_fast.config import load_config

    monkeypatch.setattr(compare, "train", _finishing_train)
    said = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        lines = said[rank] = []
        compare.compare(load_config(None, [f"train.out_dir={tmp_path / rank}", "train.steps=2"]), modes=("sft",),
                        log=lines.append)
    assert any(line.startswith("[compare] training sft") for line in said["0"]) and said["1"] == []


def test_compare_keeps_what_its_runs_print_off_stdout(monkeypatch, tmp_path, capsys):
    """An environment's debugging print inside a compared run went to stdout, into the table a script reads
    (`pact-fast compare > table.txt`); train's own command sends it to stderr, and so does compare now."""
    import pact_fast.compare as compare
    from pact_fast.config import load_config

    def printing_train(cfg, log):
        print("env debug: step")
        return _finishing_train(cfg, log)

    monkeypatch.setattr(compare, "train", printing_train)
    compare.compare(load_config(None, [f"train.out_dir={tmp_path}", "train.steps=2"]), modes=("sft", "pact"),
                    log=lambda *a: None)
    out, err = capsys.readouterr()
    assert "env debug" not in out and err.count("env debug: step") == 2
    assert out.splitlines()[0].split()[:2] == ["mode", "success"]


def test_compare_reports_on_rank_0_only(monkeypatch, tmp_path, capsys):
    """Under torchrun every rank printed the table (one copy per rank on stdout) and wrote compare.json."""
    import pact_fast.compare as compare
    import pact_fast.distributed as dist
    from pact_fast.config import load_config

    monkeypatch.setattr(compare, "train", _finishing_train)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setenv("RANK", "1")
    lines = []
    rows = compare.compare(load_config(None, [f"train.out_dir={tmp_path}", "train.steps=2"]), modes=("sft",),
                           log=lines.append)
    assert [r["mode"] for r in rows] == ["sft"]
    assert capsys.readouterr().out == "" and not (tmp_path / "compare.json").exists()
    assert lines == []  # "[compare] training sft for 2 steps" came once per rank


@pytest.mark.parametrize("override", ["train.steps=5", "loss.anchor_q=0.5", "rollout.greedy=false",
                                      "rollout.temperature=0.5", "scoring.check=false", "model.freeze_lm_head=true",
                                      "data.train_tasks=5"])
def test_eval_refuses_an_override_it_does_not_read(override, capsys):
    """`pact-fast eval train.steps=5` (or a sampling temperature: the evaluation is greedy) ran and printed metrics
    as if the option had been applied."""
    import pact_fast.cli as cli

    assert cli.main(["eval", override, "data.eval_tasks=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = override.split("=")[0]
    assert len(err) == 1 and err[0].startswith(f"pact-fast: config error: {key}: the evaluation does not read it")


def test_eval_refuses_an_override_its_data_leaves_unread(tmp_path, capsys):
    """`eval --data F data.seed=3` (the seed orders the training rows alone) and `eval --run RUN data.hops=[2]` of a
    run on a data file (the built-in tasks' option) ran and printed the metrics of the same rows, as if applied."""
    import pact_fast.cli as cli
    from pact_fast.config import ConfigError, load_config, save_config
    from pact_fast.evaluation import run_config

    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n")
    assert cli.main(["eval", "--data", str(rows), "data.seed=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pact-fast: config error: data.seed: the evaluation does not read it")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "step_000001" / "trainer_state.pt").write_bytes(b"")
    save_config(load_config(None, [f"data.path={rows}"]), run / "config.yaml")
    with pytest.raises(ConfigError, match=r"^data.hops=\[2\]: with data.path the built-in tasks' options are not read"):
        run_config(run, ["data.hops=[2]"])


def test_eval_of_a_run_refuses_to_split_off_rows_the_run_trained_on(tmp_path):
    """`eval --run RUN data.eval_tasks=4` of a run that held out the first 2 rows of its data file (and trained on
    the rest) scored rows 3 and 4, which it trained on, as held-out, without a word. Fewer rows, or as many as the
    file's fifth the run's split was capped at, are its own held-out rows."""
    from pact_fast.config import ConfigError, load_config, save_config
    from pact_fast.envs import make_tasks
    from pact_fast.evaluation import run_config

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in make_tasks(20, seed=0)))
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    save_config(load_config(None, [f"data.path={rows}", "data.eval_tasks=2"]), run / "config.yaml")
    with pytest.raises(ConfigError, match=rf"^data.eval_tasks=4 holds out the first 4 rows of {rows}, but the run held "
                                          "out its first 2 and trained on the rest"):
        run_config(run, ["data.eval_tasks=4"])
    assert run_config(run, ["data.eval_tasks=1"])[0].data.eval_tasks == 1
    save_config(load_config(None, [f"data.path={rows}", "data.eval_tasks=6"]), run / "config.yaml")  # 4: a fifth
    assert run_config(run, ["data.eval_tasks=8"])[0].data.eval_tasks == 8


def test_eval_uses_train_threads_on_the_cpu(capsys):
    """`pact-fast eval train.threads=1` was accepted and ran on all of torch's threads; the built-in model it
    evaluates without model.path (or --run) is untrained, and it says so."""
    import torch

    import pact_fast.cli as cli

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["eval", "train.threads=1", "train.device=cpu", "data.eval_tasks=2"]) == 0
        assert torch.get_num_threads() == 1
        out, err = capsys.readouterr()
        assert json.loads(out)["success_rate"] is not None
        # a run's config.yaml as --config of a built-in model's run is that model untrained, not the run's: said
        assert "evaluating the built-in model untrained" in err
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("args,name", [
    (["train", "--resume", ""], "--resume"), (["eval", "--run", ""], "--run"), (["eval", "--config", ""], "--config"),
    (["plan", "--model", "qwen3-0.6b", "--gpu-memory", "8GB", "--config", ""], "--config"),
    (["export", "", "--merge", "out"], "the run directory"), (["export", "run", "--merge", ""], "--merge"),
    (["plot", "a", ""], "a run directory"), (["fetch-model", "smollm2-135m", ""], "the destination")])
def test_an_empty_path_is_refused_not_read_as_not_given(args, name, tmp_path):
    """`train --resume "$RUN"` with RUN unset started a fresh run, `eval --run ""` evaluated the untrained built-in
    model, `plan --config ""` planned without the config: each as if the option had not been given."""
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == f"pact-fast: {name} was given an empty path (an unset shell variable?)\n"
    assert list(tmp_path.iterdir()) == []


def test_plot_into_a_directory_that_does_not_exist_names_it(tmp_path):
    """`plot RUN --out missing/x.png` ended in "[Errno 2] No such file or directory" after reading the runs."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
    proc = _cli("plot", "run", "--out", "missing/x.png", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == "pact-fast: --out missing/x.png: no directory missing\n"
    proc = _cli("plot", "missing/run", cwd=tmp_path)  # no --out given: the run is what is missing
    assert proc.returncode == 2 and "missing/run: no metrics.jsonl" in proc.stderr, proc.stderr


def test_a_runs_relative_data_path_is_saved_absolute_and_an_older_runs_is_named(tmp_path, monkeypatch, capsys):
    """A run started with `--data tasks.jsonl` kept that relative path in its config.yaml: `eval --run` or `--resume`
    from another directory could not find the data. It is saved absolute now; an older run's relative path not found
    from here is one line naming the run's config and why (it said "data.path=tasks.jsonl: no such file")."""
    import yaml

    import pact_fast.cli as cli
    from pact_fast.envs import make_task
    from test_trainer import tiny_for

    started, run = tmp_path / "started", tmp_path / "run"
    started.mkdir()
    (started / "tasks.jsonl").write_text("".join(json.dumps(make_task(k, hops=1)) + "\n" for k in range(30)))
    monkeypatch.chdir(started)
    assert cli.main(["train", "--data", "tasks.jsonl", "--out", str(run), *tiny_for(data_path=True),
                     "train.steps=1"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["path"] == str(started / "tasks.jsonl")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--run", str(run)]) == 0
    assert cli.main(["train", "--resume", str(run), "train.steps=2"]) == 0
    capsys.readouterr()
    saved["data"]["path"] = "tasks.jsonl"  # as a run written before paths were saved absolute has it
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    for argv in (["eval", "--run", str(run)], ["train", "--resume", str(run), "train.steps=3"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{run / 'config.yaml'}: data.path=tasks.jsonl is relative to the directory the " \
            "run was started in" in err[0], err
    assert cli.main(["eval", "--run", str(run), f"data.path={started / 'tasks.jsonl'}"]) == 0


def test_a_section_given_whole_cannot_change_what_resume_and_eval_run_keep(tmp_path, capsys):
    """`--resume RUN 'model.lora={enabled: true, r: 4, dropout: 0.5}'` (a section as one YAML mapping) passed the
    check of the LoRA options by key: the run went on with another dropout, and `eval --run` with another adapter
    evaluated that one under the run's name."""
    import pact_fast.cli as cli

    tiny = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.head_dim=16", "model.intermediate_size=64", "data.train_tasks=8", "data.eval_tasks=2",
            "train.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.max_turns=1",
            "train.progress=false", "train.tensorboard=false", "model.lora.enabled=true", "model.lora.r=4"]
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *tiny, "train.steps=2", "train.stop_after=1"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "model.lora={enabled: true, r: 4, dropout: 0.5}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"model\.lora\.\w+ is the run's own", err[0]), err
    assert not (run / "checkpoints" / "step_000002").exists()
    other = tmp_path / "other"
    assert cli.main(["train", "--out", str(other), *tiny, "train.steps=1", "train.lr=0.5"]) == 0
    capsys.readouterr()
    adapter = other / "checkpoints" / "step_000001"
    assert cli.main(["eval", "--run", str(run), f"model.lora={{enabled: true, r: 4, adapter: {adapter}}}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"model\.lora\.\w+ is the run's own", err[0]), err
    assert cli.main(["eval", "--run", str(run), "data.on_error=skip"]) == 0  # the run itself evaluates


def test_liger_on_a_cuda_machine_refuses_a_run_on_its_cpu(monkeypatch):
    """``train.liger=true train.device=cpu`` on a machine with CUDA patched liger-kernel's Triton kernels into a
    model that runs on the CPU (it checked the machine, not the run's device): one line naming the device."""
    import torch

    from pact_fast.models import ModelError, apply_liger

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ModelError, match=r"^train.liger=true needs the run on CUDA .* it runs on cpu \(train.device\)"):
        apply_liger(torch.nn.Linear(2, 2), torch.device("cpu"))
