"""Run a few training steps (replayed episodes) single-process or under torchrun; used by test_trainer."""
import sys

from pact_fast.config import load_config
from pact_fast.trainer import train
from replay_engine import ReplayEngine

if __name__ == "__main__":
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    config = load_config(None, [f"train.out_dir={out_dir}", *overrides])
    train(config, engine_factory=lambda m, t, c, s: ReplayEngine(m, t, c, s), log=lambda *a: None)
