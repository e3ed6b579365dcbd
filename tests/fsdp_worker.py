"""Run a few training steps (replayed episodes) single-process or under torchrun; used by test_trainer. With
``PACT_TEST_ROLLOUT_LOG`` set, every rollout call appends {"eval": greedy, "sum": the engine model's weight sum}
to ``$PACT_TEST_ROLLOUT_LOG.rank<RANK>`` (which weights each rollout and evaluation saw). With ``PACT_TEST_RESUME``
set, the run resumes from its run directory's latest checkpoint. On the rank ``PACT_TEST_FAST_CLOCK_RANK`` names, the
trainer's ``time.monotonic()`` moves on 1000 s at every read (a rank whose clock disagrees). ``PACT_TEST_SIGINT`` =
``RANK:PHASE:K`` sends that rank alone a SIGINT in its K-th training step, during its rollouts (``PHASE`` rollout)
or its first micro-batch loss (``loss``); with ``PACT_TEST_SUMMARY`` set, each rank writes train's summary to
``$PACT_TEST_SUMMARY.rank<RANK>``. ``PACT_TEST_FAIL`` = ``RANK:KIND:K``: that rank's K-th rollout call of ``KIND``
(``step``, a training step's; ``evaluation``, a held-out evaluation's) raises a ``ToolEnvError``. With
``PACT_TEST_BF16`` set, the run is the trainer's on CUDA with ``train.bf16`` (FSDP2 in bf16 mixed precision under
bf16 autocast) with the CPU's bf16 autocast in place of CUDA's."""
import json
import os
import signal
import sys
import time
from types import SimpleNamespace

from pact_fast import trainer
from pact_fast.config import load_config
from pact_fast.trainer import train
from replay_engine import ReplayEngine


RANK = os.environ.get("RANK", "0")
SIGINT_AT = os.environ.get("PACT_TEST_SIGINT", "::0").split(":")  # rank, phase, step
FAIL_AT = os.environ.get("PACT_TEST_FAIL", "::0").split(":")  # rank, kind, call
steps = {"rollout": 0, "loss": 0}  # the training step each phase was last in
calls = {"step": 0, "evaluation": 0}


def _reached(phase, step):
    """Send this process a SIGINT the first time ``phase`` is in the step ``PACT_TEST_SIGINT`` names."""
    if steps[phase] != step:
        steps[phase] = step
        if SIGINT_AT == [RANK, phase, str(step)]:
            os.kill(os.getpid(), signal.SIGINT)


class RecordingReplayEngine(ReplayEngine):
    def rollout(self, examples, make_env, group_size=None, greedy=None):
        kind = "evaluation" if greedy else "step"
        calls[kind] += 1
        if FAIL_AT == [RANK, kind, str(calls[kind])]:
            from pact_fast.envs.base import ToolEnvError

            raise ToolEnvError("Flaky.reward raised ConnectionError: the grader is gone")
        if not greedy:
            _reached("rollout", steps["rollout"] + 1)
        log = os.environ.get("PACT_TEST_ROLLOUT_LOG")
        if log:
            total = float(sum(p.detach().double().sum() for p in self.model.parameters()))
            with open(f"{log}.rank{os.environ.get('RANK', '0')}", "a") as f:
                f.write(json.dumps({"eval": bool(greedy), "sum": total}) + "\n")
        return super().rollout(examples, make_env, group_size=group_size, greedy=greedy)


if __name__ == "__main__":
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    overrides += os.environ.get(f"PACT_TEST_OVERRIDES_RANK{os.environ.get('RANK', '0')}", "").split()
    if os.environ.get("PACT_TEST_FAST_CLOCK_RANK") == os.environ.get("RANK", "0"):
        reads = iter(range(10 ** 9))
        trainer.time = SimpleNamespace(perf_counter=time.perf_counter,
                                       monotonic=lambda: time.monotonic() + 1000.0 * next(reads))
    micro_batch_loss = trainer._micro_batch_loss

    def counted_loss(*args, **kwargs):
        out = micro_batch_loss(*args, **kwargs)
        _reached("loss", steps["rollout"])
        return out

    trainer._micro_batch_loss = counted_loss
    if os.environ.get("PACT_TEST_BF16"):
        import torch

        shard = trainer.dist.shard
        trainer.dist.shard = lambda model, bf16=False: shard(model, bf16=True)
        trainer.Components.autocast = lambda self: torch.autocast("cpu", dtype=torch.bfloat16)
    config = load_config(None, [f"train.out_dir={out_dir}", *overrides])
    summary = train(config, resume=out_dir if os.environ.get("PACT_TEST_RESUME") else None,
                    engine_factory=lambda m, t, c, s: RecordingReplayEngine(m, t, c, s), log=lambda *a: None)
    if os.environ.get("PACT_TEST_SUMMARY"):
        with open(f"{os.environ['PACT_TEST_SUMMARY']}.rank{RANK}", "w") as f:
            json.dump(summary, f)
