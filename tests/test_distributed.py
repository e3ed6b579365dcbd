"""The torchrun process group (``pact_fast.distributed``) and what the ranks must agree on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.distributed_c10d import Backend, BackendConfig

from pact_fast import distributed as dist

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=16", "model.intermediate_size=64", "data.train_tasks=24", "data.eval_tasks=2",
        "train.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=10", "rollout.max_turns=2",
        "train.progress=false", "train.tensorboard=false", "train.micro_batch_tokens=700", "train.warmup_steps=1"]
HERE = Path(__file__).parent


@pytest.mark.parametrize("cuda,backends", [(True, {"cpu": "gloo", "cuda": "nccl"}),
                                           (False, {"cpu": "gloo", "cuda": "gloo"})])
def test_with_cuda_the_process_group_keeps_gloo_for_cpu_tensors(monkeypatch, cuda, backends):
    """With CUDA the group was NCCL alone, which refuses CPU tensors ("No backend type associated with device type
    cpu"): a torchrun run on GPUs stopped at its first step's counts (``sum_counts``, CPU tensors)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(dist.td, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.td, "init_process_group", lambda backend: seen.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init()
    assert BackendConfig(Backend(seen[0])).get_device_backend_map() == backends


def _torchrun(cmd, env, cwd, hang):
    """(exit status, stdout and stderr) of a torchrun command; a test failure naming ``hang`` past 240 s."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    try:
        out = proc.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=60)
        pytest.fail(f"the ranks hung: {hang}")
    return proc.returncode, out


@pytest.mark.parametrize("phase", ["rollout", "loss"])
def test_a_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(phase, tmp_path):
    """Under torchrun a rank's Ctrl-C aborted its own step at once: it went on to save its checkpoint (collectives)
    while the other rank went on with the step's (a hang, or collectives paired wrongly: a checkpoint mixing the
    shards of two steps). Now the ranks agree: rank 1 alone gets a SIGINT in the second step, during its rollouts or
    its first micro-batch's loss; both abort that step and save the first."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=f"{HERE}:{HERE.parent}", PACT_TEST_SIGINT=f"1:{phase}:2",
               PACT_TEST_SUMMARY=str(tmp_path / "summary"))
    port = {"rollout": 29561, "loss": 29562}[phase]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(HERE / "fsdp_worker.py"), str(tmp_path / "run"), *TINY, "train.steps=4", "train.save_every=0"]
    returncode, out = _torchrun(cmd, env, tmp_path, "one left its step for its checkpoint while the other trained on")
    assert returncode == 0, out[-3000:]
    summaries = [json.loads((tmp_path / f"summary.rank{r}").read_text()) for r in (0, 1)]
    assert [(s["steps"], s["interrupted"]) for s in summaries] == [(1, True), (1, True)]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000001"]


@pytest.mark.parametrize("fails_in", ["step", "evaluation"])
def test_an_error_on_one_rank_saves_the_last_whole_step_on_every_rank(fails_in, tmp_path):
    """Under torchrun an environment's error in one rank's rollouts (step 3's) or held-out evaluation (after step 2)
    left the other rank waiting in its next collective until torchrun killed them both: the steps since the last
    periodic checkpoint were lost (one process saved them). Now the ranks agree on the failure where they agree on a
    Ctrl-C, save step 2 together and stop: the failed rank with its own error, the other naming it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the evaluations: before training (call 1) and after step 2 (call 2)
    env.update(PYTHONPATH=f"{HERE}:{HERE.parent}", PACT_TEST_FAIL=f"1:{fails_in}:{3 if fails_in == 'step' else 2}")
    port = {"step": 29563, "evaluation": 29564}[fails_in]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(HERE / "fsdp_worker.py"), str(tmp_path / "run"), *TINY, "train.steps=4", "train.save_every=0",
           "train.save_every_minutes=0", "train.eval_every=2"]
    returncode, out = _torchrun(cmd, env, tmp_path, "one left its step with an error while the other went on")
    assert returncode != 0, out[-3000:]
    assert "ToolEnvError: Flaky.reward raised ConnectionError: the grader is gone" in out, out[-3000:]
    assert "OtherRankFailed: rank 1 failed: ToolEnvError: Flaky.reward raised" in out, out[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_000002"], out[-3000:]
    assert (ckpts / "step_000002" / "trainer_state.pt").exists()


def test_signals_deferred_holds_a_sigterm_back_too(monkeypatch):
    """The trainer stops on SIGTERM as on Ctrl-C: its raise must not cut the block's collectives either."""
    import signal

    seen = []

    def handler(signum, frame):
        seen.append(signum)
        raise RuntimeError("step aborted")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        monkeypatch.setattr(dist, "is_distributed", lambda: True)
        with pytest.raises(RuntimeError):
            with dist.signals_deferred():
                signal.raise_signal(signal.SIGTERM)
                seen.append("block done")
        assert seen == ["block done", signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_signals_deferred_replays_each_ctrl_c_after_the_block_and_is_nothing_in_one_process(monkeypatch):
    """Held-back SIGINTs reach the handler in order once the block ends (the last one's raise wins: a second Ctrl-C
    quits); in a single process the handler runs at once."""
    import signal

    seen = []

    def handler(signum, frame):
        seen.append(signum)
        raise (KeyboardInterrupt if len(seen) > 1 else RuntimeError)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        monkeypatch.setattr(dist, "is_distributed", lambda: True)
        with pytest.raises(KeyboardInterrupt):
            with dist.signals_deferred():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
                seen.append("block done")
        assert seen == ["block done", signal.SIGINT, signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is handler
        monkeypatch.setattr(dist, "is_distributed", lambda: False)
        seen.clear()
        with pytest.raises(RuntimeError):
            with dist.signals_deferred():
                signal.raise_signal(signal.SIGINT)
                seen.append("block done")
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
