import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pact_fast.config import ConfigError, load_config
from pact_fast.trainer import train

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=16", "model.intermediate_size=64", "data.train_tasks=24", "data.eval_tasks=2",
        "train.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=10", "rollout.max_turns=2",
        "train.progress=false", "train.tensorboard=false", "train.micro_batch_tokens=700", "train.warmup_steps=1"]
HERE = Path(__file__).parent


def tiny_for(*, data_path=False, eval_path=False, model_path=False, evaluation=False):
    """TINY less the options that a data file, a held-out file or a pretrained model leave unread (refused
    beside them): the built-in tasks' count, the split's size, the built-in model's shape; with ``evaluation``,
    less the training's own (`pact-fast eval` refuses them)."""
    drop = (("data.train_tasks",) if data_path else ()) + (("data.eval_tasks",) if eval_path else ()) + \
        (("model.",) if model_path else ()) + \
        (("train.prompts_per_step", "rollout.group_size", "train.progress", "train.tensorboard",
          "train.warmup_steps", "data.train_tasks") if evaluation else ())
    return [o for o in TINY if not o.startswith(drop)]


def _weights(run_dir):
    ckpt = sorted((Path(run_dir) / "checkpoints").glob("step_*"))[-1]
    return ckpt, load_file(str(ckpt / "model.safetensors"))


def _initial_weights():
    from pact_fast.model_setup import build_model_and_tokenizer

    cfg = load_config(None, TINY)
    model, _ = build_model_and_tokenizer(cfg.model, torch.device("cpu"), cfg.train.seed)
    return model.state_dict()


def test_resume_gives_identical_parameters(tmp_path):
    full = load_config(None, TINY + ["train.steps=4", f"train.out_dir={tmp_path / 'full'}"])
    summary = train(full, log=lambda *a: None)
    assert summary["steps"] == 4 and summary["eval_after"] is not None
    half = load_config(None, TINY + ["train.steps=4", "train.stop_after=2", f"train.out_dir={tmp_path / 'half'}"])
    assert train(half, log=lambda *a: None)["steps"] == 2
    resumed = load_config(None, TINY + ["train.steps=4", f"train.out_dir={tmp_path / 'half'}"])
    assert train(resumed, resume=tmp_path / "half", log=lambda *a: None)["steps"] == 4
    (ckpt_a, a), (ckpt_b, b) = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    assert ckpt_a.name == ckpt_b.name == "step_000004"
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "N steps and N/2 + resume + N/2 must agree exactly"
    initial = _initial_weights()
    assert any(not torch.equal(a[k], initial[k]) for k in a), "training must move the weights"
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss/total", "loss/sft", "loss/rl", "tokens_per_second", "peak_memory_mb", "po/clip_frac_low"):
        assert key in steps[0], key
    assert (tmp_path / "full" / "config.yaml").exists() and (tmp_path / "full" / "summary.json").exists()
    assert (tmp_path / "full" / "curves.png").exists()


def test_a_resume_trains_at_the_learning_rate_and_weight_decay_its_config_says(tmp_path):
    """--resume with train.lr, train.weight_decay or train.steps changed said "changed ..." and trained on at the
    checkpoint's own rate and decay (the loaded optimizer and scheduler state kept them). Now the schedule of the
    resumed config, at the checkpoint's step, and its weight decay."""
    from pact_fast.trainer import lr_lambda

    first = load_config(None, TINY + ["train.steps=4", "train.stop_after=2", f"train.out_dir={tmp_path}"])
    train(first, log=lambda *a: None)
    changed = ["train.steps=6", "train.lr=0.002", "train.weight_decay=0.25", "train.warmup_steps=2"]
    resumed = load_config(None, TINY + changed + [f"train.out_dir={tmp_path}"])
    train(resumed, resume=tmp_path, log=lambda *a: None)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    lrs = {r["step"]: r["lr"] for r in rows if "reward_mean" in r}
    schedule = lr_lambda(resumed.train)
    for step in (3, 4, 5, 6):
        assert lrs[step] == pytest.approx(0.002 * schedule(step - 1), rel=1e-9), (step, lrs)
    state = torch.load(tmp_path / "checkpoints" / "step_000006" / "trainer_state.pt", weights_only=False)
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.25}


@pytest.mark.parametrize("key", ["attn_backend", "logprob_backend"])
def test_a_triton_backend_on_the_cpu_is_refused_before_the_model_loads(tmp_path, monkeypatch, key):
    """train.attn_backend=triton on a CPU failed in the scoring check as "Qwen3ForCausalLM: packed scoring failed on
    this model", or with scoring.check=false as a ValueError traceback after the first evaluation."""
    from pact_fast import trainer
    from pact_fast.config import ConfigError
    from pact_fast.kernels import registry

    monkeypatch.setattr(registry, "interpreting", lambda: False)  # the suite runs Triton under its interpreter
    loaded = []
    monkeypatch.setattr(trainer, "build_policy", lambda *a, **k: loaded.append(1))
    cfg = load_config(None, TINY + [f"train.{key}=triton", "train.device=cpu", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=rf"train.{key}=triton needs a CUDA device; this run is on cpu"):
        trainer.build(cfg, log=lambda *a: None)
    assert not loaded and not (tmp_path / "run").exists()


def test_flex_attention_on_the_cpu_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """train.attn_backend=flex on a CPU (FlexAttention has no CPU backward) failed in the scoring check as
    "Qwen3ForCausalLM: packed scoring failed on this model ... it cannot be scored packed", blaming the model."""
    from pact_fast import trainer

    monkeypatch.setattr(trainer, "build_policy", lambda *a, **k: pytest.fail("the model loaded"))
    cfg = load_config(None, TINY + ["train.attn_backend=flex", "train.device=cpu", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^train.attn_backend=flex needs a CUDA device; this run is on cpu"):
        trainer.build(cfg, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_checkpoints_keep_the_last_k(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=3", "train.save_every=1", "train.keep_last=2",
                                    f"train.out_dir={tmp_path}"])
    train(cfg, log=lambda *a: None)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000003"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step_000003")
    AutoTokenizer.from_pretrained(tmp_path / "checkpoints" / "step_000003")


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "pact_fast", "train", *TINY, "train.steps=500", f"train.out_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    done = len([line for line in metrics.read_text().splitlines() if "reward_mean" in line])
    ckpts = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert ckpts and ckpts[-1].name == f"step_{done:06d}"
    assert '"interrupted": true' in out
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("args,message", [
    (["train.stpes=3"], "unknown key 'train.stpes'; valid keys here: .*steps"),
    (["train.steps=abc"], "train.steps: expected an integer"),
    (["loss.mode=ppo"], r"loss.mode='ppo' is not valid; choose one of \['pact', 'sft', 'grpo', 'sft_then_grpo'\]"),
    (["trian.steps=3"], "unknown section 'trian'"),
    (["steps=3"], "must name a section"),
    (["loss.anchor_q=2"], "anchor_q"),
])
def test_bad_config_is_an_error_naming_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, args)
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "train", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert proc.returncode == 2 and "config error" in proc.stderr


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 7\n  lr: 0.01\nloss:\n  mode: grpo\ndata:\n  hops: [1, 3]\n")
    cfg = load_config(path, ["train.steps=9"])
    assert cfg.train.steps == 9 and cfg.train.lr == 0.01 and cfg.loss.mode == "grpo" and cfg.data.hops == (1, 3)
    path.write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(path)


def _fsdp_run(out, nproc, tmp_path, extra=(), env_extra=None):
    args = [str(out), *TINY, "train.steps=3", "rollout.group_size=3", *extra]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{HERE}:{HERE.parent}"
    env.update(env_extra or {})
    if nproc == 1:
        cmd = [sys.executable, str(HERE / "fsdp_worker.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29533",
               str(HERE / "fsdp_worker.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _weights(out)[1]


def test_fsdp2_on_gloo_matches_one_process(tmp_path):
    one = _fsdp_run(tmp_path / "one", 1, tmp_path)
    two = _fsdp_run(tmp_path / "two", 2, tmp_path)
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5), k
    initial = _initial_weights()
    assert any(not torch.allclose(one[k], initial[k]) for k in one), "training must move the weights"
    # the logged step metrics are the whole step's: counts summed over the ranks (each holds half the groups),
    # the losses and rewards the same as one process's
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                if '"sampled_tokens"' in line] for n in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 3
    for a, b in zip(rows["one"], rows["two"]):
        for key in ("sampled_tokens", "unshared_tokens", "truncated_episodes"):
            assert a[key] == b[key], (key, a[key], b[key])
        # each rank's trees share prefixes only among its own groups
        assert a["packed_tokens"] <= b["packed_tokens"] <= b["unshared_tokens"]
        for key in ("reward_mean", "loss/total", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_fsdp2_in_bf16_mixed_precision_trains_as_one_process_under_autocast(tmp_path):
    """The trainer's default under torchrun on CUDA: FSDP2 with bf16 parameters under bf16 autocast (the CPU's here).
    FSDP2 copied the tree layout (a dataclass) into each layer field by field, so the forward's layer count read 0 and
    the first step failed ("tree attention ran in 0 of 2 layers")."""
    bf16 = {"PACT_TEST_BF16": "1"}
    one = _fsdp_run(tmp_path / "one", 1, tmp_path, env_extra=bf16)
    two = _fsdp_run(tmp_path / "two", 2, tmp_path, env_extra=bf16)
    initial = _initial_weights()
    assert one.keys() == two.keys() and all(torch.isfinite(two[k]).all() for k in two)
    assert any(not torch.allclose(two[k], initial[k]) for k in two), "training must move the weights"
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                if '"sampled_tokens"' in line] for n in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 3
    for a, b in zip(rows["one"], rows["two"]):  # bf16 weights under FSDP2, fp32 ones in one process
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=0.05, abs=0.02)


def test_torchrun_loss_metrics_weigh_the_ranks_as_one_process_weighs_its_micro_batches(tmp_path):
    """2 ranks, one prompt group each, 2 epochs: the RL terms' metrics were each rank's token mean averaged plainly
    over the ranks (loss/rl 0.00931 where one process logged 0.00923, clip fractions off by 0.5-1%); now weighted
    by the ranks' tokens, and maxima the largest, they are the one-process run's."""
    extra = ["train.steps=3", "train.prompts_per_step=2", "train.update_epochs=2"]
    _fsdp_run(tmp_path / "one", 1, tmp_path, extra=extra)
    _fsdp_run(tmp_path / "two", 2, tmp_path, extra=extra)
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                if '"sampled_tokens"' in line] for n in ("one", "two")}
    for a, b in zip(rows["one"], rows["two"]):
        for key in ("loss/total", "loss/rl", "loss/sft", "po/clip_frac_high", "tc/clip_frac_high", "po/approx_kl",
                    "tc/approx_kl", "po/ratio_mean", "tc/ratio_mean", "po/ratio_max", "tc/ratio_max"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key, a[key], b[key])


def test_torchrun_step_metrics_weigh_by_rollout_tokens_only_what_the_loss_reports(tmp_path):
    """reward_mean is the episodes' mean, which replaces the loss's own: it was weighted over the ranks by their
    rollout tokens (ranks of 200 and 20 tokens with rewards 1, 1 and 0, 0 logged 0.909 for 0.5); a micro-batch
    without rollout tokens counted its fallback ratio with weight 1; maxima are the largest over all ranks; the
    advantages' means are by rollouts."""
    out = tmp_path / "logged.json"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, str(HERE / "rank_metrics_worker.py"), str(out), "29541"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads(out.read_text())
    assert logged["reward_mean"] == pytest.approx(0.5)
    assert logged["loss/rl"] == pytest.approx((200 * 0.1 + 20 * 0.3) / 220)
    assert logged["po/ratio_mean"] == pytest.approx((200 * 0.9 + 20 * 0.8) / 220)
    assert logged["po/ratio_max"] == pytest.approx(1.7)
    assert logged["adv_abs_mean"] == pytest.approx(2.0)  # by rollouts: 4 of them, not by their tokens


def test_a_one_process_checkpoint_resumes_under_torchrun(tmp_path):
    """A single-process checkpoint holds the optimizer state by parameter index, a torchrun one by name; torchrun's
    loader stopped on the first with KeyError: 'state.0.step'. Now 1 step in one process and 1 under torchrun reach
    the weights of 2 steps in one process (AdamW's moments carried over: the second step depends on them)."""
    whole = _fsdp_run(tmp_path / "whole", 1, tmp_path, extra=["train.steps=2"])
    _fsdp_run(tmp_path / "split", 1, tmp_path, extra=["train.steps=2", "train.stop_after=1"])
    split = _fsdp_run(tmp_path / "split", 2, tmp_path, extra=["train.steps=2"], env_extra={"PACT_TEST_RESUME": "1"})
    assert whole.keys() == split.keys()
    for k in whole:
        assert torch.allclose(whole[k], split[k], rtol=1e-4, atol=1e-5), k


def test_torchrun_evaluations_see_the_weights_of_the_last_update(tmp_path):
    """2 gloo ranks, each sampling from an unsharded copy of the policy: a held-out evaluation between steps runs
    on the weights of the update just made (the copy is refreshed first), as the next step's rollouts do, not on
    the copy the step's rollouts used."""
    log = tmp_path / "rollouts"
    _fsdp_run(tmp_path / "run", 2, tmp_path, extra=["train.eval_every=1"],
              env_extra={"PACT_TEST_ROLLOUT_LOG": str(log)})
    for rank in (0, 1):
        calls = [json.loads(line) for line in Path(f"{log}.rank{rank}").read_text().splitlines()]
        # eval before, then per step: its rollouts, the evaluation after it (the last one after the final save)
        assert [c["eval"] for c in calls] == [True, False, True, False, True, False, True], calls
        sums = [c["sum"] for c in calls]
        assert sums[0] == sums[1], "the first rollouts sample the initial weights"
        for k in (1, 3):  # the evaluations between steps
            assert sums[k + 1] != sums[k], "the evaluation after a step saw the weights from before its update"
            assert sums[k + 1] == sums[k + 2], "the evaluation and the next step's rollouts see the same weights"


def test_the_command_under_torchrun_prints_one_summary_and_says_each_evaluation_once(tmp_path):
    """`torchrun -m pact_fast train ... > summary.json`: every rank printed the summary JSON (two documents on
    stdout: json.load failed with "Extra data") and every held-out line; rank 0 alone says them now. So with
    `--resume`: every rank said the resumption and each changed option (before 2026-12-06)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(HERE.parent)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547", "-m",
                "pact_fast", "train"]
    cmd = [*torchrun, *TINY, "train.steps=2", "train.stop_after=1", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["steps"] == 1, proc.stdout
    assert proc.stderr.count("held-out before training:") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("held-out evaluation before training") == 1, proc.stderr[-3000:]
    proc = subprocess.run([*torchrun, "--resume", str(tmp_path / "run"), "train.keep_last=5"], capture_output=True,
                          text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["steps"] == 2, proc.stdout
    for line in ("pact-fast: resuming", "[pact_fast] resumed from", "pact-fast: changed train.keep_last"):
        assert proc.stderr.count(line) == 1, (line, proc.stderr[-3000:])


def test_torchrun_ranks_whose_clocks_disagree_save_at_the_same_steps(tmp_path):
    """train.save_every_minutes was each rank's own clock: a rank due to save (collectives) while the other trained
    on hung both (here rank 1's clock runs 1000 s per read). Now every rank saves when any is due: after each step."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=f"{HERE}:{HERE.parent}", PACT_TEST_FAST_CLOCK_RANK="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29539",
           str(HERE / "fsdp_worker.py"), str(tmp_path / "run"), *TINY, "train.steps=3", "train.save_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        out = proc.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun's agent passes it on to the ranks (each in a session of its own)
        proc.communicate(timeout=120)
        pytest.fail("the ranks hung: one saved a checkpoint while the other trained on")
    assert proc.returncode == 0, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000002", "step_000003"]


def test_built_in_held_out_tasks_come_from_another_world():
    from pact_fast.data import load_data

    cfg = load_config(None, ["data.eval_tasks=5", "data.train_tasks=7"])
    train_set, held_out = load_data(cfg.data)
    assert len(train_set) == 7 and len(held_out) == 5
    assert {e.env["world_seed"] for e in train_set} == {0} and {e.env["world_seed"] for e in held_out} == {1}


def test_local_model_dir_data_file_and_reference_kl(tmp_path):
    from pact_fast.data import write_examples
    from pact_fast.envs import make_tasks

    first = load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path / 'first'}"])
    model_dir = Path(train(first, log=lambda *a: None)["checkpoint"])
    data = tmp_path / "tasks.jsonl"
    write_examples(data, make_tasks(12, seed=5, hops=(1, 2)))
    cfg = load_config(None, tiny_for(data_path=True, model_path=True) + [
                                    "train.steps=2", "loss.beta_kl=0.1", "data.eval_tasks=2",
                                    f"model.path={model_dir}", f"data.path={data}", f"train.out_dir={tmp_path / 'second'}"])
    summary = train(cfg, log=lambda *a: None)
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "second" / "metrics.jsonl") if "reward_mean" in line]
    assert all("loss/kl" in r and r["loss/kl"] >= 0 for r in rows)
    assert rows[0]["loss/kl"] < 1e-6, "the policy starts equal to the frozen reference"


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _flaky_loss(monkeypatch, bad_steps, how):
    """Make the loss non-finite (loss or gradient) at the given 0-based steps, in the trainer's unfused path
    (pact_loss) and in the fused head (fused_pact_head, which no longer calls pact_loss)."""
    import pact_fast.trainer as trainer

    real, real_head = trainer.pact_loss, trainer.fused_pact_head

    def flaky(batch, config, progress, *, step, **kw):
        loss, metrics = real(batch, config, progress, step=step, **kw)
        if step not in bad_steps:
            return loss, metrics
        if how == "loss":
            raise FloatingPointError("pact_loss: the loss is not finite (nan)")
        return loss + _NaNGrad.apply(batch.logp_po.sum()) * 0.0, metrics

    def flaky_head(hidden, *args, step, **kw):
        loss, metrics = real_head(hidden, *args, step=step, **kw)
        if step not in bad_steps:
            return loss, metrics
        if how == "loss":
            raise FloatingPointError("pact_loss: the loss is not finite (nan)")
        return loss + _NaNGrad.apply(hidden.sum()) * 0.0, metrics

    monkeypatch.setattr(trainer, "pact_loss", flaky)
    monkeypatch.setattr(trainer, "fused_pact_head", flaky_head)


def _all_checkpoint_weights(run_dir):
    return {p.name: load_file(str(p / "model.safetensors")) for p in sorted((Path(run_dir) / "checkpoints").glob("step_*"))}


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "unfused"])
@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_and_logged(tmp_path, monkeypatch, how, fused):
    _flaky_loss(monkeypatch, {1}, how)
    logs = []
    cfg = load_config(None, TINY + ["train.steps=3", "train.save_every=1", "train.keep_last=5", f"train.out_dir={tmp_path}",
                                    f"train.fused_head={str(fused).lower()}"])
    summary = train(cfg, log=logs.append)
    assert summary["steps"] == 3 and summary["stopped"] is None
    w = _all_checkpoint_weights(tmp_path)
    assert all(torch.equal(w["step_000001"][k], w["step_000002"][k]) for k in w["step_000001"]), \
        "the skipped step must not change the weights"
    assert any(not torch.equal(w["step_000002"][k], w["step_000003"][k]) for k in w["step_000002"])
    assert all(torch.isfinite(v).all() for v in w["step_000003"].values())
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "reward_mean" in line]
    assert [r["skipped_step"] for r in rows] == [0.0, 1.0, 0.0]
    assert any(f"step 2: non-finite {how}; step skipped" in line for line in logs), logs


def test_a_skipped_first_step_says_no_torch_warning_about_the_schedule(tmp_path, monkeypatch):
    """The schedule steps on a skipped step too; before the first update torch warned "Detected call of
    `lr_scheduler.step()` before `optimizer.step()` ... call them in the opposite order", advice to the user about
    the trainer's own code."""
    import warnings

    _flaky_loss(monkeypatch, {0}, "gradient")
    cfg = load_config(None, TINY + ["train.steps=2", f"train.out_dir={tmp_path}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, log=lambda *a: None)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "reward_mean" in line]
    assert [r["skipped_step"] for r in rows] == [1.0, 0.0]


def test_a_ctrl_c_after_a_skipped_steps_gradients_lets_the_step_finish(tmp_path, monkeypatch):
    """A skipped step left the step abortable through the schedule's step: a Ctrl-C there aborted a step whose
    learning-rate schedule had already moved on (one step ahead of its data after a resume)."""
    _flaky_loss(monkeypatch, {1}, "loss")
    calls, real_step = [], torch.optim.lr_scheduler.LambdaLR.step

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the constructor's, step 1's, then the skipped step 2's
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)
    cfg = load_config(None, TINY + ["train.steps=4", f"train.out_dir={tmp_path}"])
    summary = train(cfg, log=lambda *a: None)
    assert summary["interrupted"] and summary["steps"] == 2, "the skipped step completes, schedule and all"
    assert summary["checkpoint"].endswith("step_000002")


def test_each_periodic_evaluation_prints_a_line_and_train_threads_sets_torchs_pool(tmp_path):
    logs, threads = [], torch.get_num_threads()
    cfg = load_config(None, TINY + ["train.steps=3", "train.eval_every=1", "train.threads=1",
                                    f"train.out_dir={tmp_path}"])
    try:
        train(cfg, log=logs.append)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "eval/success_rate" in line]
    periodic = [line for line in logs if line.startswith("[pact_fast] held-out at step")]
    assert [line.split(":")[0] for line in periodic] == ["[pact_fast] held-out at step 1",
                                                        "[pact_fast] held-out at step 2"]
    for line, row in zip(periodic, rows[1:3]):
        assert row["step"] == int(line.split(":")[0].split()[-1])
        assert f"'success_rate': {row['eval/success_rate']}" in line, (line, row)


def test_a_model_scored_wrongly_is_refused_before_any_step_unless_the_check_is_off(tmp_path, monkeypatch):
    from pact_fast import scoring
    from pact_fast.models import ModelError

    monkeypatch.setattr(scoring, "logit_transform", lambda config: {"logit_scale": 3.0, "softcap": None})
    cfg = load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path / 'on'}"])
    with pytest.raises(ModelError, match="packed log-probs differ from the model's own forward"):
        train(cfg, log=lambda *a: None)
    assert not (tmp_path / "on").exists(), "refused before the run directory is made"
    cfg = load_config(None, TINY + ["train.steps=1", "scoring.check=off", f"train.out_dir={tmp_path / 'off'}"])
    assert train(cfg, log=lambda *a: None)["steps"] == 1


def test_consecutive_non_finite_steps_stop_the_run_with_a_message(tmp_path, monkeypatch):
    _flaky_loss(monkeypatch, set(range(1, 100)), "loss")
    cfg = load_config(None, TINY + ["train.steps=6", "train.max_skipped_steps=2", "train.save_every=1",
                                    "train.keep_last=5", f"train.out_dir={tmp_path}"])
    summary = train(cfg, log=lambda *a: None)
    assert summary["steps"] == 3 and "2 consecutive steps had a non-finite loss or gradient" in summary["stopped"]
    w = _all_checkpoint_weights(tmp_path)
    assert sorted(w) == ["step_000001", "step_000002", "step_000003"]
    assert all(torch.equal(w["step_000001"][k], w["step_000003"][k]) for k in w["step_000001"])


@pytest.mark.parametrize("fails_in", ["step", "evaluation"])
def test_a_failure_saves_the_last_whole_step(tmp_path, fails_in):
    """An environment's error in step 3's rollouts, or in the held-out evaluation after step 2 (with no periodic
    checkpoint), lost the steps before it: the run stopped with nothing on disk. Now the last whole step is saved
    before the error stops the run, and a resume from it reaches the weights of an unbroken run."""
    sys.path.insert(0, str(HERE))
    from replay_engine import ReplayEngine

    from pact_fast.envs.base import ToolEnvError

    class FailsOnce(ReplayEngine):
        calls = {False: 0, True: 0}

        def rollout(self, examples, make_env, group_size=None, greedy=None):
            FailsOnce.calls[bool(greedy)] += 1  # greedy: the evaluations (before training, after step 2)
            if (fails_in == "step" and FailsOnce.calls[False] == 3) or \
                    (fails_in == "evaluation" and FailsOnce.calls[True] == 2):
                raise ToolEnvError("Flaky.reward raised ConnectionError: the grader is gone")
            return super().rollout(examples, make_env, group_size, greedy)

    overrides = TINY + ["train.steps=4", "train.save_every=0", "train.save_every_minutes=0", "train.eval_every=2"]
    run = tmp_path / "run"
    lines = []
    with pytest.raises(ToolEnvError, match="the grader is gone"):
        train(load_config(None, overrides + [f"train.out_dir={run}"]), engine_factory=FailsOnce, log=lines.append)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    what = "step 3" if fails_in == "step" else "the held-out evaluation after step 2"
    assert any(f"{what} failed; saved the last whole step" in line for line in lines), lines
    train(load_config(str(run / "config.yaml"), [f"train.out_dir={run}"]), resume=str(run),
          engine_factory=ReplayEngine, log=lambda *a: None)
    whole = tmp_path / "whole"
    train(load_config(None, overrides + [f"train.out_dir={whole}"]), engine_factory=ReplayEngine,
          log=lambda *a: None)
    a = load_file(str(run / "checkpoints" / "step_000004" / "model.safetensors"))
    b = load_file(str(whole / "checkpoints" / "step_000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_ctrl_c_during_the_save_after_a_failure_lets_the_save_finish(tmp_path, monkeypatch):
    """The save after a failed step ran with the step still abortable: a Ctrl-C during it raised the step abort
    (a BaseException) out of train, no checkpoint written. Now it is a flag there: the save finishes and the
    step's own error stops the run."""
    sys.path.insert(0, str(HERE))
    from replay_engine import ReplayEngine

    from pact_fast import checkpoint
    from pact_fast.envs.base import ToolEnvError

    class FailsAtStep3(ReplayEngine):
        steps = 0

        def rollout(self, examples, make_env, group_size=None, greedy=None):
            if not greedy:
                FailsAtStep3.steps += 1
                if FailsAtStep3.steps == 3:
                    raise ToolEnvError("the grader is gone")
            return super().rollout(examples, make_env, group_size, greedy)

    save = checkpoint.save

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at once, in this thread
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", interrupted_save)
    run = tmp_path / "run"
    with pytest.raises(ToolEnvError, match="the grader is gone"):
        train(load_config(None, TINY + ["train.steps=4", "train.save_every=0", "train.save_every_minutes=0",
                                        f"train.out_dir={run}"]), engine_factory=FailsAtStep3, log=lambda *a: None)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]


def test_an_agreed_failure_keeps_its_own_context(monkeypatch):
    """Under torchrun a rank's error comes out of train in place of the agreement that carried it: raised from
    inside that handler, its traceback lost the exception it was raised while handling (a ConnectionError)."""
    from pact_fast import trainer
    from pact_fast.envs.base import ToolEnvError
    from pact_fast.stopping import AgreedFailure

    try:
        try:
            raise ConnectionError("the grader's socket closed")
        except ConnectionError:
            raise ToolEnvError("Flaky.reward raised")
    except ToolEnvError as exc:
        error = exc

    def fails(*args):
        raise AgreedFailure(error)

    monkeypatch.setattr(trainer, "_train", fails)
    with pytest.raises(ToolEnvError) as info:
        train(load_config(None, TINY))
    assert info.value is error and isinstance(error.__context__, ConnectionError)
    assert not error.__suppress_context__


def test_evaluation_goes_through_the_runs_engine(tmp_path):
    sys.path.insert(0, str(HERE))
    from replay_engine import ReplayEngine

    calls = []

    class Recording(ReplayEngine):
        def rollout(self, examples, make_env, group_size=None, greedy=None):
            calls.append((len(examples), group_size, greedy))
            return super().rollout(examples, make_env, group_size, greedy)

    cfg = load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path}"])
    summary = train(cfg, engine_factory=lambda m, t, c, s: Recording(m, t, c, s), log=lambda *a: None)
    eval_calls = [c for c in calls if c[2] is True]
    assert eval_calls == [(2, 1, True), (2, 1, True)], calls  # before and after, held-out tasks, one greedy episode
    assert summary["eval_after"]["success_rate"] == 0.0  # the replay's first episode has reward 0


@pytest.mark.parametrize("override,message", [
    ("rollout.tool_call_format=xml", "rollout.tool_call_format='xml' is not valid; choose one of ['compact', 'hermes']"),
    ("train.device=gpu", "train.device='gpu' is not valid; choose auto, cpu, cuda or cuda:N"),
    ("train.max_skipped_steps=0", "train.max_skipped_steps=0 must be >= 1"),
])
def test_options_with_fixed_values_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_compare_stops_at_an_unfinished_mode_and_still_prints_its_table(tmp_path, monkeypatch, capsys):
    import pact_fast.compare as compare

    def fake_train(cfg, log):
        Path(cfg.train.out_dir).mkdir(parents=True)
        (Path(cfg.train.out_dir) / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
        done = cfg.loss.mode == "sft"
        return {"steps": 3 if done else 1, "seconds": 2.0, "interrupted": not done, "stopped": None,
                "eval_before": {"success_rate": 0.0},
                "eval_after": {"success_rate": 0.25, "mean_reward": 0.5, "tokens_per_episode": 7.0, "answer_rate": 0.75,
                               "tool_calls_per_episode": 1.5} if done else None}

    monkeypatch.setattr(compare, "train", fake_train)
    cfg = load_config(None, [f"train.out_dir={tmp_path}"])
    rows = compare.compare(cfg, modes=("sft", "grpo", "pact"), log=lambda *a: None)
    assert [r["mode"] for r in rows] == ["sft", "grpo"]  # pact never started
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["sft", "0.250", "0.500", "0.750", "1.50", "7.0", "2"]
    assert table[2].split() == ["grpo", "-", "-", "-", "-", "-", "2"]
    assert (tmp_path / "compare.json").exists()


def test_compare_over_seeds_reports_mean_and_spread_and_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    import pact_fast.compare as compare
    from pact_fast.config import save_config

    calls = []

    def fake_train(cfg, log):  # writes what train writes: metrics, summary and config
        assert cfg.train.seed == cfg.data.seed  # and loss.seed where it is read (pact draws anchors)
        assert cfg.loss.seed == (cfg.train.seed if cfg.loss.mode == "pact" else 0)
        calls.append((cfg.loss.mode, cfg.train.seed))
        run = Path(cfg.train.out_dir)
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.1 * cfg.train.seed}) + "\n")
        success = 0.1 * cfg.train.seed + (0.5 if cfg.loss.mode == "pact" else 0.0)
        summary = {"steps": cfg.train.steps, "seconds": 1.0, "interrupted": False, "stopped": None,
                   "eval_before": {"success_rate": 0.0},
                   "eval_after": {"success_rate": success, "mean_reward": success, "tokens_per_episode": 5.0,
                                  "answer_rate": 0.25 * cfg.train.seed}}
        (run / "summary.json").write_text(json.dumps(summary))
        save_config(cfg, run / "config.yaml")
        return summary

    monkeypatch.setattr(compare, "train", fake_train)
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.steps=3"])
    rows = compare.compare(cfg, modes=("sft", "pact"), seeds=[0, 1, 2], log=lambda *a: None)
    assert sorted(calls) == sorted((m, s) for m in ("sft", "pact") for s in (0, 1, 2))
    assert {r["run_dir"] for r in rows} == {str(tmp_path / f"seed{s}" / m) for m in ("sft", "pact") for s in (0, 1, 2)}
    summary = {e["mode"]: e["success_rate"] for e in json.loads((tmp_path / "compare_summary.json").read_text())}
    assert summary["pact"]["mean"] == pytest.approx(0.6) and summary["pact"]["std"] == pytest.approx(0.1)
    assert (summary["sft"]["min"], summary["sft"]["max"]) == pytest.approx((0.0, 0.2))
    table = capsys.readouterr().out.splitlines()
    assert table[2].split() == ["pact", "3", "0.600", "0.100", "0.500", "0.700", "0.600", "0.250"]
    assert (tmp_path / "compare.png").exists()

    compare.compare(cfg, modes=("sft", "pact"), seeds=[0, 1, 2], log=lambda *a: None)
    assert len(calls) == 6, "finished runs of the same configuration are read back, not trained again"
    changed = load_config(None, [f"train.out_dir={tmp_path}", "train.steps=3", "loss.anchor_q=0.5"])
    with pytest.raises(ConfigError, match=r"holds a run of another configuration \(loss.anchor_q\)"):
        compare.compare(changed, modes=("pact",), seeds=[0], log=lambda *a: None)
    assert len(calls) == 6, "a directory holding another configuration's run is never trained over"
    with pytest.raises(ConfigError, match=r"seed0/pact holds a run of another configuration"):
        compare.compare(changed, modes=("sft", "pact"), seeds=[5, 0], log=lambda *a: None)
    assert len(calls) == 6, "every run's directory is checked before the first run trains"
    # a one-off or cosmetic option (stop_after, which config.yaml keeps at its default) still reads the run back
    again = load_config(None, [f"train.out_dir={tmp_path}", "train.steps=3", "train.stop_after=1",
                               "train.tensorboard=false"])
    compare.compare(again, modes=("sft", "pact"), seeds=[0, 1, 2], log=lambda *a: None)
    assert len(calls) == 6


def test_a_run_directory_that_cannot_be_made_or_written_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """train.out_dir naming a file, or a directory under a file: FileExistsError / NotADirectoryError from mkdir, a
    traceback after the model load and the held-out evaluation."""
    import pact_fast.trainer as trainer

    monkeypatch.setattr(trainer, "build_policy", lambda *a, **k: pytest.fail("the model loaded"))
    a_file = tmp_path / "runs"
    a_file.write_text("")
    for out_dir in (a_file, a_file / "pact"):
        with pytest.raises(ConfigError, match=f"^train.out_dir={out_dir}: {a_file} is a file, not a directory"):
            train(load_config(None, TINY + [f"train.out_dir={out_dir}"]))
    monkeypatch.setattr(trainer.os, "access", lambda path, mode: Path(path) != tmp_path)  # (root writes anywhere)
    with pytest.raises(ConfigError, match=f"^train.out_dir={tmp_path / 'run'}: {tmp_path} is not writable$"):
        train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'run'}"]))


def test_a_second_run_into_a_run_directory_is_refused_before_anything_loads(tmp_path):
    """A second `train` into a run's directory appended its metrics to the first's and pruned the newer run's
    checkpoints by name, and eval, plot and export then read the old model or a mix: refused, untouched; a
    directory whose run stopped before its first step is reused."""
    from pact_fast.trainer import check_fresh_run_dir

    run = tmp_path / "run"
    train(load_config(None, TINY + ["train.steps=1", f"train.out_dir={run}"]), log=lambda *a: None)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=f"train.out_dir={run} already holds a run \\(checkpoints\\): continue it "
                                          f"with --resume {run}"):
        train(load_config(None, TINY + ["train.steps=1", "model.hidden_size=64", f"train.out_dir={run}"]))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    for inside in (run / "checkpoints", run / "checkpoints" / "step_000001" / "more", run / "sub"):  # nested in it
        with pytest.raises(ConfigError, match=f"train.out_dir={inside} is inside the directory of the run {run}:"):
            check_fresh_run_dir(inside)
    project = tmp_path / "project"  # a directory holding a config file of the user's own is no run
    (project / "runs").mkdir(parents=True)
    (project / "config.yaml").write_text("train:\n  steps: 2\n")
    check_fresh_run_dir(project / "runs" / "a")
    # `--config project/config.yaml --out project`: the run wrote its resolved config over the user's file
    with pytest.raises(ConfigError, match=f"train.out_dir={project} holds a config.yaml that is no run's"):
        check_fresh_run_dir(project)
    finished = tmp_path / "finished"  # save_every=0: a summary, nothing to resume
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished run .* delete that directory"):
        check_fresh_run_dir(finished)
    # a run killed before its first checkpoint (its step-0 evaluation logged): rerunning it is the way on
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/success_rate": 0.0}) + "\n")
    train(load_config(None, TINY + ["train.steps=1", f"train.out_dir={stopped}"]), log=lambda *a: None)
    assert (stopped / "metrics.jsonl.prev").read_text().startswith('{"step": 0')
    assert [json.loads(r)["step"] for r in (stopped / "metrics.jsonl").read_text().splitlines()][-1] == 1


def test_compare_resumes_an_unfinished_run_of_its_configuration(tmp_path, monkeypatch):
    """An interrupted comparison goes on from the run's last checkpoint (it trained the run again from step 0 into
    the same directory before, mixing the two)."""
    import pact_fast.compare as compare
    from pact_fast.config import save_config

    calls = []

    def fake_train(cfg, log, resume=None):
        calls.append((cfg.loss.mode, resume))
        Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.out_dir) / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
        return {"steps": cfg.train.steps, "seconds": 1.0, "interrupted": False, "stopped": None,
                "eval_before": None, "eval_after": {"success_rate": 0.5}}

    monkeypatch.setattr(compare, "train", fake_train)
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.steps=3"])
    run = tmp_path / "pact"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    unfinished = copy.deepcopy(cfg)
    unfinished.loss.mode, unfinished.train.out_dir = "pact", str(run)
    save_config(unfinished, run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"steps": 1, "interrupted": True, "stopped": None}))
    compare.compare(cfg, modes=("sft", "pact"), log=lambda *a: None)
    assert calls == [("sft", None), ("pact", str(run))]


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    marker = tmp_path / "writing"
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(HERE / "slow_checkpoint_worker.py"), str(run), str(marker), *TINY,
                             "train.steps=4", "train.save_every=1", "train.keep_last=5"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [".tmp-step_000002", "step_000001"], ckpts  # killed mid-write: a partial temporary directory
    resumed = subprocess.run([sys.executable, "-m", "pact_fast", "train", "--resume", str(run)],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} from step_000001 (step 1 of 4)" in resumed.stderr
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000001", "step_000002", "step_000003", "step_000004"]


def test_resume_says_what_changed_and_never_keeps_one_off_options(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    base = [sys.executable, "-m", "pact_fast", "train"]
    first = subprocess.run(base + [*TINY, "train.steps=3", "train.stop_after=1", f"train.out_dir={tmp_path}"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = (tmp_path / "config.yaml").read_text()
    assert "stop_after: 0" in saved  # a one-off option is never persisted
    again = subprocess.run(base + ["--resume", str(tmp_path), "loss.anchor_q=0.5", "train.stop_after=1"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {tmp_path} from step_000001 (step 1 of 3)" in again.stderr
    assert "changed loss.anchor_q: 0.3 -> 0.5" in again.stderr and "changed train.stop_after: 0 -> 1" in again.stderr
    assert json.loads(again.stdout[again.stdout.index("{"):])["steps"] == 2
    # the options step 1 trained with stay in the run directory (the resume wrote config.yaml over them)
    assert (tmp_path / "config.before_step_000001.yaml").read_text() == saved
    assert "anchor_q: 0.5" in (tmp_path / "config.yaml").read_text()
    last = subprocess.run(base + ["--resume", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert last.returncode == 0 and "pact-fast: changed" not in last.stderr  # anchor_q=0.5 is now the run's own option
    assert sorted(p.name for p in tmp_path.glob("config*.yaml")) == ["config.before_step_000001.yaml", "config.yaml"]
    assert json.loads(last.stdout[last.stdout.index("{"):])["steps"] == 3  # no stop_after carried over
    # a resume that would end before the run's last checkpoint is refused: it would overwrite that step's files
    weights = (tmp_path / "checkpoints" / "step_000003" / "model.safetensors").read_bytes()
    behind = subprocess.run(base + ["--resume", str(tmp_path), "train.steps=2"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert behind.returncode == 2 and behind.stderr.strip() == (
        f"pact-fast: --resume {tmp_path}: its last checkpoint is at step 3, past train.steps=2; raise train.steps to "
        "go on (a run is never cut back)")
    assert (tmp_path / "checkpoints" / "step_000003" / "model.safetensors").read_bytes() == weights
    refused = subprocess.run(base + ["--resume", str(tmp_path), "--model", "/some/model"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("pact-fast: --model cannot be combined with --resume: a resumed run keeps its run "
                                      "directory, model, data and config.yaml; pass changes as section.key=value "
                                      "overrides")


def test_a_bad_data_file_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a"\n')
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "train", "--data", str(bad), "--out", str(tmp_path / "run"),
                           *tiny_for(data_path=True)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)},
                          timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pact-fast:")]
    assert len(lines) == 1 and f"{bad}:1:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _start(tmp_path, *extra):
    """The command as a terminal starts it: SIGINT at its default, whatever this process inherited (a child
    exec'd with SIGINT ignored keeps it ignored, and Python then installs no KeyboardInterrupt handler)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "pact_fast", "train", *TINY, f"train.out_dir={tmp_path}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_at_start_up_is_one_line_and_exit_130(tmp_path):
    # 32 held-out tasks of up to 30 tokens: the evaluation before training takes seconds
    proc = _start(tmp_path, "train.steps=50", "data.eval_tasks=32", "rollout.max_new_tokens=30")
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "config.yaml").exists():  # the model is built
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # during the held-out evaluation before the first step
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "pact-fast: interrupted" in err
    assert not (tmp_path / "metrics.jsonl").exists() or '"reward_mean"' not in (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_mid_step_aborts_the_step_and_saves_the_last_whole_one(tmp_path, signum, name):
    """SIGTERM (a batch scheduler's, kill's, timeout's) is a Ctrl-C: it killed the run on the spot, losing the steps
    since the last periodic checkpoint."""
    # steps of 8 groups x 2 rollouts of up to 30 tokens: several seconds each on this CPU
    proc = _start(tmp_path, "train.steps=50", "train.prompts_per_step=8", "rollout.max_new_tokens=30")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"reward_mean"' in metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signum)  # step 2 has just begun its rollouts
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert f"{name}: saving a checkpoint of the last whole step" in out + err
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if "reward_mean" in line]
    assert [s["step"] for s in steps] == [1], "the step in progress was aborted, not finished"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    resumed = subprocess.run([sys.executable, "-m", "pact_fast", "train", "--resume", str(tmp_path), "train.stop_after=1"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)},
                             timeout=600)
    assert resumed.returncode == 0 and "from step_000001 (step 1 of 50)" in resumed.stderr


def test_a_ctrl_c_that_code_on_the_way_swallows_still_aborts_the_step():
    """The handler's raise lands wherever Python is: an ``except Exception`` there (a tool back-end's errors
    made observations, a library's probe) must not take it, and where a finaliser does (Python prints it and goes
    on), the step still aborts before its first update instead of finishing (CI saw that: steps [1, 2])."""
    from pact_fast.stopping import Interrupt, StepAborted

    interrupt = Interrupt(log=lambda *a: None)
    interrupt.abortable = True
    with pytest.raises(StepAborted):
        try:
            interrupt._handle(signal.SIGINT, None)
        except Exception:  # what BFCL's tool runner and many libraries do with anything a call raises
            pass
    lost = Interrupt(log=lambda *a: None)
    lost.abortable = True
    try:
        lost._handle(signal.SIGINT, None)
    except BaseException:  # a finaliser: Python reports it and the step goes on
        pass
    with pytest.raises(StepAborted):
        lost.commit()
    calm = Interrupt(log=lambda *a: None)
    calm.abortable = True
    calm.commit()  # no Ctrl-C: the step goes on to its update, and a Ctrl-C now is only a flag
    calm._handle(signal.SIGINT, None)
    assert calm.requested and not calm.abortable
    calm.commit()  # a second epoch's update after the first was applied: the step completes


@pytest.mark.parametrize("extra", [[], ["train.update_epochs=2", "loss.c_ent=0.01"]], ids=["one-epoch", "two-epochs-entropy"])
def test_training_with_the_fused_head_equals_training_without_it(tmp_path, extra):
    """Same seeds, rollouts and steps: the fused lm_head loss and linear_logprobs + pact_loss give the same
    losses and (to fp32 rounding) the same weights."""
    runs = {}
    for fused in (True, False):
        out = tmp_path / str(fused)
        cfg = load_config(None, TINY + extra + ["train.steps=3", f"train.out_dir={out}", f"train.fused_head={str(fused).lower()}"])
        train(cfg, log=lambda *a: None)
        rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "reward_mean" in line]
        runs[fused] = ([r["loss/total"] for r in rows], _weights(out)[1])
    (loss_f, w_f), (loss_u, w_u) = runs[True], runs[False]
    assert loss_f == pytest.approx(loss_u, rel=1e-4)
    for k in w_u:
        assert torch.allclose(w_f[k], w_u[k], rtol=1e-4, atol=1e-5), k


def test_evaluate_counts_answers_and_tool_calls_besides_success():
    from pact_fast.rollout import Episode
    from pact_fast.trainer import evaluate

    episodes = [Episode([1], [2, 3], [1, 1], reward=1.0, tool_calls=2, finish="answer"),
                Episode([1], [2, 3, 4], [1, 0, 1], reward=0.0, tool_calls=3, finish="answer"),
                Episode([1], [2], [1], reward=0.0, tool_calls=0, finish="turn_limit"),
                Episode([1], [2, 3, 4, 5], [1, 1, 1, 1], reward=0.5, tool_calls=1, finish="length")]

    class Engine:
        def rollout(self, examples, make_env, group_size, greedy):
            assert group_size == 1 and greedy
            return [[episodes[i]] for i in range(len(examples))]

    result = evaluate(Engine(), list(range(4)), make_env=None)
    assert result == pytest.approx({"success_rate": 0.25, "mean_reward": 0.375, "tokens_per_episode": 2.25,
                                    "answer_rate": 0.5, "tool_calls_per_episode": 1.5})


def test_a_resumed_run_drops_the_metrics_rows_past_its_checkpoint(tmp_path):
    """A run killed after step 3's row but before its checkpoint (step 2) resumes at step 2 and writes step 3
    again: the rows past the checkpoint, and a row the kill cut short, are dropped first."""
    from pact_fast.trainer import _Writers

    rows = [{"step": 1, "reward_mean": 0.1}, {"step": 2, "eval/success": 0.5}, {"step": 2, "reward_mean": 0.2},
            {"step": 3, "reward_mean": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')
    config = load_config(None, ["train.tensorboard=false"])
    writers = _Writers(tmp_path, config.train, config, start_step=2)
    writers.log({"step": 3, "reward_mean": 0.35})
    writers.file.close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:3] + [{"step": 3, "reward_mean": 0.35}]


def test_the_last_checkpoint_is_written_once_and_a_ctrl_c_in_it_keeps_it(tmp_path, monkeypatch):
    """A periodic save at the last step is the final checkpoint: writing it again deleted the one on disk before
    renaming the new one into place (a kill there lost the run with keep_last=1). A Ctrl-C during the final write
    was outside the handler: the write died and every step since the last periodic checkpoint was lost."""
    from pact_fast import checkpoint

    writes = []
    original = checkpoint.save

    def counting(run_dir, step, *args, **kwargs):
        writes.append(step)
        if step == 3:  # the final checkpoint: Ctrl-C in the middle of writing it
            os.kill(os.getpid(), signal.SIGINT)
        return original(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", counting)
    cfg = load_config(None, TINY + ["train.steps=4", "train.save_every=2", f"train.out_dir={tmp_path / 'a'}"])
    assert train(cfg, log=lambda *a: None)["checkpoint"].endswith("step_000004")
    assert writes == [2, 4]
    writes.clear()
    cfg = load_config(None, TINY + ["train.steps=3", "train.save_every=2", "train.keep_last=1",
                                    f"train.out_dir={tmp_path / 'b'}"])
    summary = train(cfg, log=lambda *a: None)
    assert writes == [2, 3] and summary["interrupted"] and summary["eval_after"] is None
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step_000003"]
    writes.clear()
    resumed = train(cfg, resume=tmp_path / "b", log=lambda *a: None)  # a finished run: nothing to write again
    assert resumed["steps"] == 3 and writes == []


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    from pact_fast import checkpoint

    cfg = load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path}"])
    train(cfg, log=lambda *a: None)
    from pact_fast.trainer import build

    c = build(cfg, resume=tmp_path, log=lambda *a: None)
    path = checkpoint.save(tmp_path, 1, c.scorer, c.tokenizer, c.optimizer, c.scheduler, c.order, 2)
    assert (path / checkpoint.STATE_FILE).exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]


def test_step_metrics_do_not_depend_on_the_micro_batching(tmp_path):
    """The same step cut into one micro-batch or several: the same gradient, and the same per-term metrics.
    Before, every metric was averaged over micro-batches weighted by rollouts + traces: a micro-batch of rollouts
    alone pulled loss/sft and the SFT weights toward 0, and counts (anchored_groups) were averaged, not counted."""
    rows = {}
    for budget in (700, 20_000):
        out = tmp_path / str(budget)
        cfg = load_config(None, TINY + ["train.steps=1", "train.prompts_per_step=6", f"train.micro_batch_tokens={budget}",
                                        "data.eval_tasks=1", f"train.out_dir={out}"])
        train(cfg, log=lambda *a: None)
        rows[budget] = next(json.loads(line) for line in open(out / "metrics.jsonl") if "reward_mean" in line)
    split, whole = rows[700], rows[20_000]
    assert split["micro_batches"] > 1 == whole["micro_batches"]
    for key in ("grad_norm", "loss/total", "loss/sft", "loss/rl", "sft_weight_mean", "sft_weight/reasoning",
                "po/clip_frac_low", "anchored_groups", "skipped_groups", "reward_mean", "tool_call_weight"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


def test_advantage_metrics_are_means_over_the_step_rollouts_however_micro_batched(tmp_path, monkeypatch):
    """adv_mean and adv_abs_mean are means over the step's rollouts. They were averaged over the micro-batches
    weighted by response tokens (the token-mean loss's weight), so the logged value moved with
    train.micro_batch_tokens. Advantages made distinct per rollout here (the tiny model's rewards tie), and the
    replayed responses differ in length (the tiny model's all reach max_new_tokens)."""
    sys.path.insert(0, str(HERE))
    from replay_engine import ReplayEngine

    from pact_fast import trainer

    made = []

    def distinct(rewards, group_of, **kwargs):
        made.append(torch.linspace(-1.0, 3.0, len(rewards)) ** 3)  # [N], uneven
        return made[-1]

    monkeypatch.setattr(trainer, "group_advantages", distinct)
    rows = {}
    for budget in (700, 20_000):
        out = tmp_path / str(budget)
        cfg = load_config(None, TINY + ["train.steps=1", "train.prompts_per_step=6", "rollout.group_size=3",
                                        f"train.micro_batch_tokens={budget}", "data.eval_tasks=1",
                                        f"train.out_dir={out}"])
        train(cfg, engine_factory=ReplayEngine, log=lambda *a: None)
        rows[budget] = next(json.loads(line) for line in open(out / "metrics.jsonl") if "reward_mean" in line)
    assert rows[700]["micro_batches"] > 1 == rows[20_000]["micro_batches"]
    adv = made[-1].double()
    for row in rows.values():
        assert row["adv_mean"] == pytest.approx(float(adv.mean()), rel=1e-5)
        assert row["adv_abs_mean"] == pytest.approx(float(adv.abs().mean()), rel=1e-5)


def test_a_logged_ratio_max_is_the_largest_over_the_micro_batches_and_epochs(tmp_path, monkeypatch):
    """po/ratio_max and tc/ratio_max were averaged over the micro-batches and epochs (and ranks): the first epoch's
    1.0 halved the second's excess (a step's 1.91 was logged as 1.46). Now the step's largest."""
    from pact_fast import trainer

    seen, real = [], trainer._micro_batch_loss

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out[1])
        return out

    monkeypatch.setattr(trainer, "_micro_batch_loss", spy)
    cfg = load_config(None, TINY + ["train.steps=1", "train.update_epochs=2", "train.micro_batch_tokens=250",
                                    "data.eval_tasks=1", f"train.out_dir={tmp_path}"])
    train(cfg, log=lambda *a: None)
    row = next(json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "reward_mean" in line)
    assert len(seen) > 2
    for key in ("po/ratio_max", "tc/ratio_max"):
        top = max(m[key] for m in seen if m)
        assert top > 1.01 and row[key] == pytest.approx(top, rel=1e-6), (key, row[key], top)


def test_torchrun_ranks_that_disagree_on_their_data_are_refused(tmp_path):
    """Rank 1 given another data.seed trained without a word, averaging gradients of different steps."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=f"{HERE}:{HERE.parent}", PACT_TEST_OVERRIDES_RANK1="data.seed=1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
           str(HERE / "fsdp_worker.py"), str(tmp_path / "run"), *TINY, "train.steps=2", "rollout.group_size=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    assert "torchrun: rank 1's config or data differs from rank 0's" in proc.stdout + proc.stderr


def test_torchrun_refuses_prompts_per_step_that_the_ranks_cannot_share_in_one_line(tmp_path):
    """train.prompts_per_step=3 on 2 ranks loaded the model, evaluated, then stopped in step 1 with a traceback
    (ValueError) on every rank; now one line per rank before anything loads, no run directory left."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29538", "-m",
           "pact_fast", "train", "--out", str(tmp_path / "run"), *TINY, "train.prompts_per_step=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("pact-fast: train.prompts_per_step=3 must be a multiple of the torchrun world size 2") == 2, out
    assert "[rank0]: Traceback" not in out and "held-out" not in out and not (tmp_path / "run").exists()


def test_a_resumed_runs_summary_carries_on_and_a_finished_one_is_not_evaluated_again(tmp_path):
    """After a resume the summary had eval_before null and the seconds of the last session only; resuming a finished
    run evaluated it again and appended a second eval row at its last step."""
    cfg = load_config(None, TINY + ["train.steps=2", "train.stop_after=1", f"train.out_dir={tmp_path}"])
    first = train(cfg, log=lambda *a: None)
    cfg = load_config(None, TINY + ["train.steps=2", f"train.out_dir={tmp_path}"])
    second = train(cfg, resume=tmp_path, log=lambda *a: None)
    assert second["eval_before"] == first["eval_before"] is not None
    assert second["seconds"] > first["seconds"] > 0
    again = train(cfg, resume=tmp_path, log=lambda *a: None)
    assert again["eval_after"] == second["eval_after"] is not None
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"eval/' in line]
    assert [r["step"] for r in evals] == [0, 2]


def test_a_checkpoint_moved_aside_by_a_killed_rewrite_is_found_again(tmp_path):
    """save() moves a step's old checkpoint aside before renaming the new one in; a kill between the two left the
    step only as .old-step_N, which --resume did not see ("no checkpoint" with keep_last=1)."""
    from pact_fast import checkpoint

    old = tmp_path / "checkpoints" / ".old-step_000002"
    old.mkdir(parents=True)
    (old / checkpoint.STATE_FILE).write_bytes(b"state")
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints" / "step_000002"
    assert (tmp_path / "checkpoints" / "step_000002" / checkpoint.STATE_FILE).read_bytes() == b"state"


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    """Resumed from step 2 of a run that went to 4, the new step 3 was pruned by name in favour of the abandoned
    step 4, which a later --resume then picked up: the two histories mixed without a word."""
    from pact_fast import checkpoint

    lines = []
    cfg3 = load_config(None, TINY + ["train.steps=4", "train.save_every=1", "train.keep_last=3",
                                     f"train.out_dir={tmp_path / 'b'}"])
    train(cfg3, log=lambda *a: None)  # steps 2, 3 and 4 kept
    again = load_config(None, TINY + ["train.steps=3", "train.save_every=1", "train.keep_last=3",
                                      f"train.out_dir={tmp_path / 'b'}"])
    summary = train(again, resume=tmp_path / "b" / "checkpoints" / "step_000002", log=lines.append)
    assert summary["steps"] == 3
    assert any("the newer checkpoints step_000003, step_000004 are not this run's continuation" in l for l in lines)
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names == [".abandoned-step_000003", ".abandoned-step_000004", "step_000002", "step_000003"]
    assert checkpoint.latest(tmp_path / "b").name == "step_000003"


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _summary_of_rows(run_dir):
    """What summary.json must say of the rows in metrics.jsonl: the step-0 evaluation, the steps' seconds summed
    and the last step's reward_mean."""
    rows = _rows(run_dir)
    steps = [r for r in rows if "step_seconds" in r]
    before = [{k[len("eval/"):]: v for k, v in r.items() if k != "step"} for r in rows if r["step"] == 0]
    return {"eval_before": before[0], "seconds": pytest.approx(sum(r["step_seconds"] for r in steps)),
            "final_reward_mean": steps[-1]["reward_mean"]}


def test_a_resumed_runs_summary_is_the_rows_it_keeps_after_a_kill_or_from_an_older_checkpoint(tmp_path):
    """summary.json carried eval_before and seconds on only from a summary.json ending where the resume started:
    after a kill -9 (no summary written) or a resume from an older checkpoint, eval_before was null and seconds
    this session's alone. Now both come from the metrics rows the resumed run keeps."""
    quiet = lambda *a: None  # noqa: E731
    cfg = load_config(None, TINY + ["train.steps=3", "train.stop_after=1", f"train.out_dir={tmp_path / 'killed'}"])
    train(cfg, log=quiet)
    (tmp_path / "killed" / "summary.json").unlink()  # killed (-9) before its summary
    cfg = load_config(None, TINY + ["train.steps=3", f"train.out_dir={tmp_path / 'killed'}"])
    summary = train(cfg, resume=tmp_path / "killed", log=quiet)
    assert summary["eval_before"] is not None and {k: summary[k] for k in _summary_of_rows(tmp_path / "killed")} == \
        _summary_of_rows(tmp_path / "killed")
    cfg = load_config(None, TINY + ["train.steps=3", "train.save_every=1", "train.keep_last=3",
                                    f"train.out_dir={tmp_path / 'older'}"])
    train(cfg, log=quiet)
    summary = train(cfg, resume=tmp_path / "older" / "checkpoints" / "step_000001", log=quiet)
    assert summary["steps"] == 3 and {k: summary[k] for k in _summary_of_rows(tmp_path / "older")} == \
        _summary_of_rows(tmp_path / "older")
    assert json.loads((tmp_path / "older" / "summary.json").read_text())["eval_before"] == summary["eval_before"]


def test_resuming_a_finished_run_keeps_its_final_reward_mean(tmp_path):
    """--resume of a run with no step left rewrote summary.json with final_reward_mean null (no step this session)."""
    cfg = load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path}"])
    first = train(cfg, log=lambda *a: None)
    again = train(cfg, resume=tmp_path, log=lambda *a: None)
    assert first["final_reward_mean"] is not None
    for key in ("final_reward_mean", "seconds", "eval_before", "eval_after"):
        assert again[key] == first[key], key


def test_a_run_interrupted_in_its_first_step_resumes_without_evaluating_step_0_again(tmp_path, monkeypatch):
    """A Ctrl-C in step 1 saves step_000000 after the step-0 evaluation's row; --resume evaluated again and
    metrics.jsonl held two step-0 evaluations (rows were trimmed only past a step above 0). Now the row is carried
    on, and a row past step 0 (a kill -9 after step 1's row) is dropped."""
    from pact_fast import trainer

    original, evaluated = trainer.train_step, []

    def interrupted(c, step, interrupt=None):
        os.kill(os.getpid(), signal.SIGINT)  # in the step's abortable part: the step is aborted
        return original(c, step, interrupt)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    cfg = load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path}"])
    first = train(cfg, log=lambda *a: None)
    assert first["interrupted"] and first["steps"] == 0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000000"]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 1, "reward_mean": 0.5, "step_seconds": 1.0}) + "\n")
    monkeypatch.setattr(trainer, "train_step", original)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: evaluated.append(1) or {"success": 0.0})
    second = train(cfg, resume=tmp_path, log=lambda *a: None)
    assert second["steps"] == 1 and second["eval_before"] == first["eval_before"] is not None
    assert len(evaluated) == 1  # the final evaluation only
    assert [r["step"] for r in _rows(tmp_path) if "step_seconds" not in r] == [0, 1]
    assert [r["step"] for r in _rows(tmp_path) if "step_seconds" in r] == [1]
    assert second["seconds"] != pytest.approx(1.0)


def test_a_periodic_evaluation_lost_to_a_kill_after_its_checkpoint_runs_on_resume(tmp_path, monkeypatch):
    """A step's checkpoint is written before its held-out evaluation: a run killed between the two resumed from
    that checkpoint past the evaluation, lost for good. Now the resumed run runs it first (and only when missing)."""
    from pact_fast import trainer

    class Killed(BaseException):
        pass

    original = trainer._evaluate_and_log

    def killed_at_step_2(c, step, **kwargs):
        if step == 2:
            raise Killed
        return original(c, step, **kwargs)

    monkeypatch.setattr(trainer, "_evaluate_and_log", killed_at_step_2)
    cfg = load_config(None, TINY + ["train.steps=4", "train.save_every=1", "train.eval_every=1",
                                    f"train.out_dir={tmp_path}"])
    with pytest.raises(Killed):
        train(cfg, log=lambda *a: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    monkeypatch.setattr(trainer, "_evaluate_and_log", original)
    lines = []
    cfg = load_config(None, TINY + ["train.steps=4", "train.save_every=1", "train.eval_every=1", "train.stop_after=1",
                                    f"train.out_dir={tmp_path}"])
    train(cfg, resume=tmp_path, log=lines.append)
    assert any(line.startswith("[pact_fast] held-out at step 2:") for line in lines), lines
    train(cfg, resume=tmp_path, log=lines.append)  # step 3's evaluation is logged: not run again
    assert [r["step"] for r in _rows(tmp_path) if "step_seconds" not in r] == [0, 1, 2, 3, 4]


def test_a_ctrl_c_in_the_final_evaluation_still_writes_the_summary_and_the_plot(tmp_path, monkeypatch):
    """A Ctrl-C during the final held-out evaluation left only "interrupted; checkpoints already written are kept":
    no summary.json, no curves.png, though the last checkpoint was complete. Now both are written (eval_after null,
    final_eval_interrupted) and the run says so; --resume runs the evaluation and carries the summary on."""
    from pact_fast import trainer

    original, calls, lines = trainer.evaluate, [], []

    def interrupted_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the final evaluation (the first is step 0's): what Python's SIGINT handler raises
            raise KeyboardInterrupt  # (an os.kill here depends on the handler earlier tests left installed)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", interrupted_second_time)
    cfg = load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path}"])
    try:
        first = train(cfg, log=lines.append)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C in the final evaluation went through: no summary.json, no curves.png")
    assert first["interrupted"] and first["final_eval_interrupted"] and first["eval_after"] is None
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(first))
    assert (tmp_path / "curves.png").exists()
    assert any("Ctrl-C during the final held-out evaluation" in line for line in lines), lines
    monkeypatch.setattr(trainer, "evaluate", original)
    again = train(cfg, resume=tmp_path, log=lambda *a: None)
    assert not again["interrupted"] and not again["final_eval_interrupted"] and again["eval_after"] is not None
    for key in ("eval_before", "seconds", "final_reward_mean"):
        assert again[key] == first[key], key


@pytest.mark.parametrize("fused_head", [True, False])
def test_training_steps_under_bf16_autocast_as_on_cuda(tmp_path, monkeypatch, fused_head):
    """The trainer's default on CUDA (train.bf16: fp32 weights under bf16 autocast), run here under the CPU's bf16
    autocast: the first step failed in tree attention (query and key fp32 beside a bf16 value). Steps must train:
    finite losses, a gradient, weights that move."""
    from pact_fast import trainer

    monkeypatch.setattr(trainer.Components, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    run = tmp_path / "run"
    summary = train(load_config(None, TINY + ["train.steps=2", f"train.fused_head={str(fused_head).lower()}",
                                              "train.warmup_steps=0", "train.save_every=1", f"train.out_dir={run}"]),
                    log=lambda *a: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert summary["steps"] == 2 and len(steps) == 2
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) and r["grad_norm"] > 0 for r in steps)
    one, two = (load_file(str(run / "checkpoints" / f"step_00000{i}" / "model.safetensors")) for i in (1, 2))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in two.values())
    assert any(not torch.equal(one[k], two[k]) for k in two)


@pytest.mark.parametrize("overrides,refused", [([], False), (["train.update_epochs=2"], True),
                                               (["loss.beta_kl=0.1"], True), (["rollout.is_cap=2.0"], True)])
def test_a_model_with_hidden_dropout_is_refused_where_the_run_compares_passes(tmp_path, monkeypatch, overrides,
                                                                              refused):
    """A policy's dropout outside attention (GPT-2's resid_pdrop) made the ratios between passes random: refused
    before any step where a run compares them, trained as dropout where it does not (one update, no KL, HF engine)."""
    from pact_fast import trainer
    from pact_fast.models import ModelError

    real = trainer.build_policy

    def with_dropout(*args, **kwargs):
        policy = real(*args, **kwargs)
        policy.model.config.resid_pdrop = 0.1
        return policy

    monkeypatch.setattr(trainer, "build_policy", with_dropout)
    cfg = load_config(None, TINY + overrides + [f"train.out_dir={tmp_path / 'run'}"])
    if refused:
        with pytest.raises(ModelError, match=f"resid_pdrop=0.1: training-mode dropout .*{overrides[0].split('=')[0]}"):
            trainer.build(cfg, log=lambda *a: None)
    else:
        assert trainer.build(cfg, log=lambda *a: None).model.config.resid_pdrop == 0.1


def test_lora_dropout_is_refused_where_the_run_compares_passes(tmp_path):
    """model.lora.dropout acts in the policy's training mode: with two update epochs the ratio to the step's first
    log-probs was two dropout draws."""
    from pact_fast import trainer
    from pact_fast.models import ModelError

    lora = ["model.lora.enabled=true", "model.lora.dropout=0.1"]
    cfg = load_config(None, TINY + lora + ["train.update_epochs=2", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ModelError, match=r"dropout model.lora.dropout=0.1: .*\(train.update_epochs=2\); set "
                                         r"model.lora.dropout=0$"):
        trainer.build(cfg, log=lambda *a: None)
    trainer.build(load_config(None, TINY + lora + [f"train.out_dir={tmp_path / 'one'}"]), log=lambda *a: None)
