"""``pact_fast.checkpoint`` on its own: which checkpoint of a run directory is the latest, which ones pruning keeps,
which ones a resume from an older one sets aside."""
import torch

from pact_fast import checkpoint
from pact_fast.config import load_config
from pact_fast.trainer import build
from test_trainer import TINY


def _fake_checkpoint(run_dir, name, step):
    path = run_dir / "checkpoints" / name
    path.mkdir(parents=True)
    torch.save({"step": step}, path / checkpoint.STATE_FILE)
    return path


def test_the_latest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    """Past step 999,999 the name grows a digit: sorted by name, step_1000000 came before step_999999, so resume
    took the older one and pruning deleted the newest checkpoint right after writing it; a copy such as
    step_000005.bak counted as a checkpoint (the latest, by name)."""
    for name, step in (("step_999999", 999_999), ("step_1000000", 1_000_000), ("step_1000000.bak", 1_000_000)):
        _fake_checkpoint(tmp_path, name, step)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_999999", "step_1000000"]
    assert checkpoint.latest(tmp_path).name == "step_1000000"
    assert checkpoint.set_aside_newer(tmp_path, 999_999) == ["step_1000000"]
    assert checkpoint.latest(tmp_path).name == "step_999999"


def test_pruning_keeps_the_newest_steps(tmp_path):
    c = build(load_config(None, TINY + ["train.steps=2", f"train.out_dir={tmp_path}"]), log=lambda *a: None)
    _fake_checkpoint(tmp_path, "step_999999", 999_999)
    _fake_checkpoint(tmp_path, "step_999999.bak", 999_999)
    written = checkpoint.save(tmp_path, 1_000_000, c.scorer, c.tokenizer, c.optimizer, c.scheduler, c.order,
                              keep_last=1)
    assert written.is_dir() and written.name == "step_1000000"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1000000", "step_999999.bak"]
    assert checkpoint.latest(tmp_path) == written


def test_a_checkpoint_prints_no_progress_bar_and_leaves_transformers_bars_as_they_were(tmp_path, capfd):
    """transformers' "Writing model shards" bar printed at every checkpoint, with train.progress=false and through
    the run's own bar."""
    from transformers.utils import logging as hf_logging

    from pact_fast.trainer import train

    assert hf_logging.is_progress_bar_enabled()
    train(load_config(None, TINY + ["train.steps=2", "train.save_every=1", f"train.out_dir={tmp_path / 'run'}"]),
          log=lambda *a: None)
    assert len(checkpoint.checkpoints(tmp_path / "run")) == 2
    out, err = capfd.readouterr()
    assert "Writing model shards" not in out + err and "it/s" not in out + err
    assert hf_logging.is_progress_bar_enabled()
