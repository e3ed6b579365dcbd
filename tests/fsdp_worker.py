"""Run a few training steps (replayed episodes) single-process or under torchrun; used by test_trainer. With
``PACT_TEST_ROLLOUT_LOG`` set, every rollout call appends {"eval": greedy, "sum": the engine model's weight sum}
to ``$PACT_TEST_ROLLOUT_LOG.rank<RANK>`` (which weights each rollout and evaluation saw). With ``PACT_TEST_RESUME``
set, the run resumes from its run directory's latest checkpoint. On the rank ``PACT_TEST_FAST_CLOCK_RANK`` names, the
trainer's ``time.monotonic()`` moves on 1000 s at every read (a rank whose clock disagrees)."""
import json
import os
import sys
import time
from types import SimpleNamespace

from pact_fast import trainer
from pact_fast.config import load_config
from pact_fast.trainer import train
from replay_engine import ReplayEngine


class RecordingReplayEngine(ReplayEngine):
    def rollout(self, examples, make_env, group_size=None, greedy=None):
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
    config = load_config(None, [f"train.out_dir={out_dir}", *overrides])
    train(config, resume=out_dir if os.environ.get("PACT_TEST_RESUME") else None,
          engine_factory=lambda m, t, c, s: RecordingReplayEngine(m, t, c, s), log=lambda *a: None)
