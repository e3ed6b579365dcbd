"""Trains the tiny config of tests/test_trainer.py with a checkpoint every step, but stalls inside the write of
checkpoint 2 (after its weights, before trainer_state.pt) and says so in a marker file: the test then kills the
process with SIGKILL mid-write. argv: run_dir marker_file overrides..."""
import sys
import time
from pathlib import Path

import torch

import pact_fast.trainer as trainer
from pact_fast.config import load_config

run_dir, marker, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
real_save = torch.save


def stalling_save(obj, f, *args, **kwargs):
    if ".tmp-step_000002" in str(f):
        marker.write_text("writing checkpoint 2")
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)


trainer.torch.save = stalling_save
trainer.train(load_config(None, overrides + [f"train.out_dir={run_dir}"]), log=lambda *a: None)
