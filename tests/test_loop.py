"""What one training step does, pinned: many vs few micro-batches, update epochs, the CLI's --resume, the data
order's epochs, the lr schedule."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from replay_engine import ReplayEngine
from safetensors.torch import load_file

from pact_fast.config import load_config
from pact_fast.trainer import DataOrder, lr_lambda, train

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=16", "model.intermediate_size=64", "data.train_tasks=24", "data.eval_tasks=2",
        "train.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=10", "rollout.max_turns=2",
        "train.progress=false", "train.tensorboard=false", "train.micro_batch_tokens=700", "train.warmup_steps=1"]
ADAMW = torch.optim.AdamW


@pytest.fixture
def float64():
    """Models built inside the test are float64 (the lm_head log-probs stay fp32, by design)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _recorded_updates(monkeypatch, overrides, out_dir):
    """Train with ``overrides`` through the replay engine; per optimizer step, (lr, [grad of each parameter])."""
    updates = []

    class RecordingAdamW(ADAMW):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            updates.append((self.param_groups[0]["lr"], [p.grad.detach().clone() for p in params]))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    cfg = load_config(None, TINY + overrides + [f"train.out_dir={out_dir}", "train.save_every=0"])
    train(cfg, engine_factory=lambda m, t, c, s: ReplayEngine(m, t, c, s), log=lambda *a: None)
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl") if "reward_mean" in line]
    return updates, rows


def _summary(out):
    """The summary JSON ``pact-fast train`` prints last."""
    return json.loads(out[out.index("{\n"):])


def _max_rel_diff(a, b):
    return max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(a, b))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("fused", ["true", "false"], ids=["fused-head", "unfused"])
def test_many_and_few_micro_batches_make_the_same_update(tmp_path, monkeypatch, float64, agg, fused):
    """The step-wide normaliser makes the micro-batch losses add up to the step's loss: a step split into one
    micro-batch per unit and the same step in one micro-batch give the same gradients (to the fp32 rounding of
    the lm_head log-probs; a wrong share per micro-batch is off by tens of percent)."""
    runs = {}
    for budget in (210, 100_000):
        runs[budget] = _recorded_updates(monkeypatch, [f"train.micro_batch_tokens={budget}", f"loss.loss_agg={agg}",
                                                       f"train.fused_head={fused}", "train.steps=2"],
                                         tmp_path / str(budget))
    (many, many_rows), (few, few_rows) = runs[210], runs[100_000]
    assert [r["micro_batches"] for r in few_rows] == [1, 1]
    assert all(r["micro_batches"] >= 4 for r in many_rows)
    assert len(many) == len(few) == 2
    assert many[0][1][0].dtype == torch.float64
    for (_, g_many), (_, g_few) in zip(many, few):
        assert _max_rel_diff(g_many, g_few) < 1e-5
    for row_many, row_few in zip(many_rows, few_rows):  # the logged step loss does not depend on the split
        assert row_many["loss/total"] == pytest.approx(row_few["loss/total"], rel=1e-5)


def test_two_update_epochs_repeat_the_step_against_the_old_policy(tmp_path, monkeypatch, float64):
    """update_epochs=2: two optimizer updates per step at the step's lr; the first equals the one-epoch update
    (old log-probs from the no-grad pass equal the current ones), the second is taken after the first moved the
    weights, so its ratios leave 1 and its gradient differs."""
    one, one_rows = _recorded_updates(monkeypatch, ["train.steps=2"], tmp_path / "one")
    two, two_rows = _recorded_updates(monkeypatch, ["train.steps=2", "train.update_epochs=2"], tmp_path / "two")
    assert len(one) == 2 and len(two) == 4
    assert [lr for lr, _ in two] == [one[0][0], one[0][0], one[1][0], one[1][0]]  # one schedule step per step
    assert _max_rel_diff(two[0][1], one[0][1]) < 1e-5
    assert _max_rel_diff(two[1][1], two[0][1]) > 1e-3
    assert [r["step"] for r in two_rows] == [1, 2]
    assert one_rows[0]["po/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert two_rows[0]["po/ratio_max"] > 1.0 + 1e-4, "the second epoch's ratios are against the step's old policy"


def test_cli_resume_continues_the_step_counter_and_the_weights(tmp_path, capsys):
    """``pact-fast train ... train.stop_after=2`` then ``pact-fast train --resume DIR``: the run ends at step 4
    with the weights of an uninterrupted 4-step run."""
    from pact_fast.cli import main

    half, full = tmp_path / "half", tmp_path / "full"
    assert main(["train", *TINY, "train.steps=4", "train.stop_after=2", "--out", str(half)]) == 0
    first = json.loads(capsys.readouterr().out)  # stdout holds the summary alone: `pact-fast train > s.json`
    assert first["steps"] == 2
    assert main(["train", "--resume", str(half)]) == 0
    captured = capsys.readouterr()
    assert _summary(captured.out)["steps"] == 4
    assert f"resuming {half} from step_000002 (step 2 of 4)" in captured.err
    rows = [json.loads(line) for line in open(half / "metrics.jsonl") if "reward_mean" in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert main(["train", *TINY, "train.steps=4", "--out", str(full)]) == 0
    a = load_file(str(half / "checkpoints" / "step_000004" / "model.safetensors"))
    b = load_file(str(full / "checkpoints" / "step_000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_order_takes_every_example_once_per_epoch_and_reshuffles():
    order = DataOrder(seed=3, size=5)
    taken = [order.take(3) for _ in range(5)]  # 15 examples: three epochs, two takes cross an epoch's end
    flat = [i for t in taken for i in t]
    epochs = [flat[0:5], flat[5:10], flat[10:15]]
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1, "each epoch draws a new permutation"
    assert (order.epoch, order.index) == (3, 0)
    again = DataOrder(seed=3, size=5)
    assert [again.take(3) for _ in range(5)] == taken
    assert DataOrder(seed=4, size=5).take(5) != epochs[0] or DataOrder(seed=5, size=5).take(5) != epochs[0]


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = load_config(None, ["train.steps=11", "train.warmup_steps=3", "train.min_lr_ratio=0.1", "train.lr=0.002"]).train
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    lrs = []
    for _ in range(13):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = 0.002
    expected = {0: peak / 3, 1: peak * 2 / 3, 2: peak, 3: peak,  # warmup, then the cosine starts at the peak
                5: peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8))),
                7: peak * 0.55,  # half-way through the decay: halfway between the peak and the floor
                11: peak * 0.1, 12: peak * 0.1}  # the floor from the last step on
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-12), step


def test_build_and_train_step_are_the_loop_in_pieces(tmp_path):
    """``build`` gives the components, ``train_step`` one step's StepStats; two steps through them equal the
    first two rows of ``train`` on the same config (same seeds: same numbers)."""
    from pact_fast.trainer import StepStats, build, train_step

    overrides = TINY + ["train.steps=2", "train.save_every=0"]
    engine = lambda m, t, c, s: ReplayEngine(m, t, c, s)  # noqa: E731
    c = build(load_config(None, overrides + [f"train.out_dir={tmp_path / 'parts'}"]), engine_factory=engine,
              log=lambda *a: None)
    assert c.model is c.scorer.model and c.start_step == 0 and c.order.index == 0
    stats = [train_step(c, step) for step in range(2)]
    assert all(isinstance(s, StepStats) for s in stats) and [s.step for s in stats] == [1, 2]
    assert c.order.index == 2 * c.config.train.prompts_per_step  # the data order moved on
    assert c.scheduler.last_epoch == 2 and not stats[0].skipped
    c.writers.close({})
    train(load_config(None, overrides + [f"train.out_dir={tmp_path / 'whole'}"]), engine_factory=engine,
          log=lambda *a: None)
    rows = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl") if "reward_mean" in line]
    for s, row in zip(stats, rows):
        m = s.metrics()
        for key in ("step", "lr", "grad_norm", "loss/total", "loss/rl", "loss/sft", "reward_mean", "micro_batches",
                    "packed_tokens", "anchor_frac"):
            assert m[key] == row[key], key


def test_checkpoint_latest_skips_partial_writes_and_names_its_step(tmp_path):
    from pact_fast import checkpoint

    for name in ("step_000002", "step_000010", ".tmp-step_000011"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert checkpoint.latest(tmp_path).name == "step_000010"
    assert checkpoint.step_of(checkpoint.latest(tmp_path)) == 10 and checkpoint.step_of(tmp_path) is None
    (tmp_path / "checkpoints" / "step_000002" / checkpoint.STATE_FILE).touch()
    assert checkpoint.latest(tmp_path / "checkpoints" / "step_000002").name == "step_000002"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.latest(tmp_path / "checkpoints" / "step_000010")


def test_eval_of_a_run_reproduces_its_final_held_out_evaluation(tmp_path, capsys):
    """``pact-fast eval --run DIR`` loads the latest checkpoint (model and tokenizer written by save_pretrained)
    under the run's config and scores the held-out tasks exactly as the run's own final evaluation did."""
    from pact_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", *TINY, "data.eval_tasks=4", "train.steps=2", "--out", str(run)]) == 0
    after = _summary(capsys.readouterr().out)["eval_after"]
    assert main(["eval", "--run", str(run), "--show", "2"]) == 0
    captured = capsys.readouterr()
    assert f"evaluating {run / 'checkpoints' / 'step_000002'}" in captured.err
    assert json.loads(captured.out) == pytest.approx(after)  # the metrics alone on stdout, the episodes on stderr
    shown = [line for line in captured.err.splitlines() if line.startswith("--- finish:")]  # stdout: JSON alone
    assert len(shown) == 2 and all("expected: '" in line for line in shown)
    # what makes the model is the run's: an override would evaluate another model under the checkpoint's name
    assert main(["eval", "--run", str(run), "model.hidden_size=64"]) == 2
    assert "model.hidden_size is the run's own" in capsys.readouterr().err


def test_eval_of_a_run_whose_data_file_changed_is_refused(tmp_path, capsys, monkeypatch):
    """The run's held-out rows are split off its data file's start: rewritten since (rows reordered), the file's
    start holds rows the run trained on, which `pact-fast eval --run` scored as held-out without a word. Refused
    before the model loads (a large model's load is minutes), unless data.on_error=skip leaves the rows to it."""
    from pact_fast import model_setup
    from pact_fast.cli import main
    from pact_fast.envs import make_tasks

    rows = make_tasks(10, seed=0)
    data, run = tmp_path / "rows.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = [o for o in TINY if not o.startswith("data.train_tasks")]
    assert main(["train", *tiny, "train.steps=1", "--data", str(data), "--out", str(run)]) == 0
    capsys.readouterr()
    data.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    with monkeypatch.context() as m:
        m.setattr(model_setup, "build_policy", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
        assert main(["eval", "--run", str(run)]) == 2
    assert "held out other rows than the 2 its config's data gives now" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "data.on_error=skip"]) == 2  # checked once the rows are prepared
    assert "held out other rows than the 2 its config's data gives now" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), f"data.eval_path={data}"]) == 0  # other held-out tasks, on purpose
    assert f"held-out evaluation: 10 tasks (data.eval_path={data})" in capsys.readouterr().err
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for ckpt in (run / "checkpoints").iterdir():  # an archived run keeps its weights alone: it still evaluates
        (ckpt / "trainer_state.pt").unlink()
    assert main(["eval", "--run", str(run)]) == 0


def test_eval_says_how_many_tasks_it_scores_and_whence(tmp_path, capsys):
    """`pact-fast eval --model DIR --data FILE` scores the held-out split of FILE, at most a fifth of it: its
    metrics said nothing of how many tasks they were over (2 of a 10-row file here)."""
    from pact_fast.cli import main
    from pact_fast.envs import make_tasks

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_tasks(10, seed=0)))
    assert main(["eval", "--data", str(data), *[o for o in TINY if o.startswith(("model.", "data.eval"))]]) == 0
    assert f"held-out evaluation: 2 tasks (the first rows of {data}), one greedy episode each" in \
        capsys.readouterr().err


def test_eval_samples_through_the_engine_the_config_names_and_closes_it(monkeypatch):
    """``evaluate_model`` (``pact-fast eval``) builds the engine ``rollout.engine`` names, as the run's own
    evaluations sampled (it always took the HF engine: a vLLM run was re-evaluated on another engine), and closes
    it after (vLLM's engine process)."""
    from pact_fast import rollout_vllm
    from pact_fast.evaluation import evaluate_model

    made = []

    class Engine(ReplayEngine):
        def close(self):
            made.append("closed")

    def factory(model, tokenizer, config, seed=0):
        made.append(config.engine)
        return Engine(model, tokenizer, config, seed)

    monkeypatch.setattr(rollout_vllm, "make_rollout_engine", factory)
    cfg = load_config(None, TINY + ["rollout.engine=vllm"])
    metrics = evaluate_model(cfg, log=lambda *a: None)
    assert made == ["vllm", "closed"] and metrics["answer_rate"] == 1.0  # the replay engine's episodes


def test_eval_mistakes_are_one_line(tmp_path, capsys):
    from pact_fast.cli import main

    assert main(["eval", "--run", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint (expected" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path), "--model", str(tmp_path)]) == 2
    assert "--model cannot be combined with --run" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--show", "-1"])
    assert "--show takes a count >= 0" in capsys.readouterr().err


def test_resume_refuses_what_it_would_ignore_or_could_not_load(tmp_path, capsys):
    """train.out_dir with --resume was ignored without a word; a model shape option changed on resume stopped with a
    size-mismatch traceback; a damaged checkpoint file with an unpickling one. Each is one line, status 2."""
    from pact_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", *TINY, "train.steps=2", "train.stop_after=1", "--out", str(run)]) == 0
    capsys.readouterr()
    for override, words in (("train.out_dir=elsewhere", "a resumed run stays in its directory; train.out_dir"),
                            ("model.hidden_size=64", "model.hidden_size is the run's own"),
                            ("model.path=/some/model", "model.path is the run's own")):
        assert main(["train", "--resume", str(run), override]) == 2, override
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    state = run / "checkpoints" / "step_000001" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # cut short, as a full disk leaves it
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{state}: cannot be read" in err and "move it aside" in err and "Traceback" not in err, err
    torch.save({"step": 1}, state)  # another program's file under the name: a KeyError: 'order' traceback
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{state}: not a pact_fast trainer state (no 'optimizer')" in err and "Traceback" not in err, err


def test_a_damaged_lora_checkpoint_or_model_directory_is_one_line(tmp_path, capsys):
    """A cut adapter_model.safetensors (--resume, eval --run) and a cut model.safetensors or config.json of a
    model directory (--model) ended in a safetensors or OSError traceback; one line naming the file or
    directory now, status 2."""
    from pact_fast.cli import main

    lora = ["model.lora.enabled=true", "model.lora.r=2"]
    run = tmp_path / "lora"
    assert main(["train", *TINY, *lora, "train.steps=2", "train.stop_after=1", "--out", str(run)]) == 0
    adapter = run / "checkpoints" / "step_000001" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:10])
    capsys.readouterr()
    for args in (["train", "--resume", str(run)], ["eval", "--run", str(run)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"{adapter}: cannot be read" in err and "damaged" in err and "Traceback" not in err, err
    full = tmp_path / "full"
    assert main(["train", *TINY, "train.steps=1", "--out", str(full)]) == 0
    model_dir = full / "checkpoints" / "step_000001"
    for name in ("model.safetensors", "config.json"):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(model_dir, broken)
        (broken / name).write_bytes((broken / name).read_bytes()[:10])
        capsys.readouterr()
        assert main(["eval", "--model", str(broken), "data.eval_tasks=2", "rollout.max_new_tokens=10"]) == 2, name
        err = capsys.readouterr().err
        what = "model" if name == "model.safetensors" else name
        assert f"{broken}: the {what} cannot be read from it" in err and "Traceback" not in err, err


def test_a_checkpoint_write_that_fails_is_one_line_and_leaves_the_disk_as_it_was(tmp_path, capsys, monkeypatch):
    """A full disk under torch.save ended in "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"
    with the half-written .tmp-step directory left to keep the disk full. Now one line naming the checkpoint,
    status 2; the temporary directory removed, the checkpoints before it whole."""
    from pact_fast import checkpoint
    from pact_fast.cli import main

    real, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint's trainer state
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3740672 vs 3740564")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    run = tmp_path / "run"
    assert main(["train", *TINY, "train.steps=3", "train.save_every=1", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / 'step_000002'}: the checkpoint of step 2 could not be written" in err, err
    assert "is the disk full?" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]
    assert (run / "checkpoints" / "step_000001" / checkpoint.STATE_FILE).is_file()

    def bug(obj, f, *args, **kwargs):
        raise RuntimeError("a bug, not the disk")

    monkeypatch.setattr(checkpoint.torch, "save", bug)  # not taken for a full disk: the traceback stays
    with pytest.raises(RuntimeError, match="a bug, not the disk"):
        main(["train", *TINY, "train.steps=1", "--out", str(tmp_path / "other")])


def test_resume_overrides_are_checked_against_the_runs_own_config(tmp_path, capsys):
    """--resume's overrides were checked for unread options against the default config: on a run with a KL term,
    loss.kl_estimator=k2 was refused as "loss.beta_kl=0: there is no KL term". Now against the run's config: what
    it reads is taken, what it does not read is refused."""
    from pact_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", *TINY, "loss.beta_kl=0.1", "train.steps=3", "train.stop_after=1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "loss.switch_progress=0.6"]) == 2
    assert "loss.switch_progress=0.6: loss.mode=pact does not read it" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "loss.kl_estimator=k2", "train.stop_after=2"]) == 0
    assert "changed loss.kl_estimator: 'k3' -> 'k2'" in capsys.readouterr().err


def test_resuming_into_a_model_of_another_shape_is_one_line_from_python_too(tmp_path):
    from pact_fast.checkpoint import CheckpointError

    cfg = load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path}"])
    train(cfg, log=lambda *a: None)
    other = load_config(None, TINY + ["train.steps=2", "model.intermediate_size=96", f"train.out_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match=r"weights do not fit the model \(model\.layers\.0\.mlp\.\w+\.weight: "
                                              r"\(\d+, \d+\) in the checkpoint, \(\d+, \d+\) in the model\): the model "
                                              r"options differ from the run's"):
        train(other, resume=tmp_path, log=lambda *a: None)


def test_summary_and_compare_json_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """summary.json and compare.json were written in place: a full disk or a kill mid-write left a cut file that
    the next compare (or a script) could not read. Now a temporary file renamed over the old one."""
    from pact_fast import files
    from pact_fast.files import write_json

    path = tmp_path / "summary.json"
    write_json(path, {"steps": 1})

    class Full:  # a file on a disk that fills up halfway through the text
        def __init__(self, name, mode):
            self.f = open(name, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "open", Full, raising=False)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"steps": 2})
    assert json.loads(path.read_text()) == {"steps": 1} and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
