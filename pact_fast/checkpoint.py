"""Checkpoints of a training run, in one place: save, find the latest, load, resume.

A run directory holds ``checkpoints/step_NNNNNN/``: the model (``save_pretrained``, safetensors, tied weights
once; with LoRA the adapters only, in peft's format: ``adapter_config.json`` and ``adapter_model.safetensors``),
the tokenizer, and ``trainer_state.pt`` (step, optimizer, scheduler, data order, Python and torch RNG
states). A checkpoint is written under ``.tmp-step_NNNNNN``, fsynced, then renamed, so a process killed
mid-write (even by SIGKILL) leaves the previous checkpoints whole and only a temporary directory that resuming
ignores. Under ``torchrun`` the state is gathered unsharded and rank 0 writes it; every rank loads it.
"""
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from . import distributed as dist
from .data import DataFormatError
from .files import read_or_raise

STATE_FILE = "trainer_state.pt"
STATE_KEYS = ("step", "optimizer", "scheduler", "order", "rng")  # what _write puts in it


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed into this run: damaged, or of a model of other options (one line)."""


def step_dir(run_dir, step):
    """Where ``save`` writes the checkpoint of ``step`` in ``run_dir``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def save(run_dir, step, scorer, tokenizer, optimizer, scheduler, order, keep_last, *, peft_model=None):
    """Write ``run_dir/checkpoints/step_N`` under a temporary name, then rename; keep the last ``keep_last``
    (at least 1). With ``peft_model`` (LoRA) only the adapters are written. A checkpoint of the same step already
    there is moved aside before the rename and deleted after it, so no moment leaves the step without one on disk.
    Returns the checkpoint directory."""
    final = step_dir(run_dir, step)
    ckpt_root = final.parent
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-step_{step:06d}"
    old = ckpt_root / f".old-step_{step:06d}"
    model_state = {k.removeprefix("model."): v for k, v in dist.full_model_state(scorer).items()}
    if getattr(scorer.model.config, "tie_word_embeddings", False):
        for key in dist.tied_keys(scorer.model):  # a gathered state dict holds tied weights as separate copies
            model_state.pop(key, None)
    optim_state = dist.full_optimizer_state(scorer, optimizer)
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write(tmp, step, scorer, tokenizer, scheduler, order, model_state, optim_state, peft_model)
        except Exception as exc:
            if not _disk_error(exc):  # a bug stays a traceback
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # (it would keep the disk full)
            reason = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"{final}: the checkpoint of step {step} could not be written ({type(exc).__name__}: "
                                  f"{reason}); is the disk full? The checkpoints before it are kept") from exc
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_tree(ckpt_root, files=False)
        shutil.rmtree(old, ignore_errors=True)
        for old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


# how a full disk (or a quota) reads in the errors of torch.save (PytorchStreamWriter) and safetensors (IoError)
_DISK_WORDS = ("unexpected pos", "PytorchStreamWriter", "IoError", "No space left", "StorageFull", "quota")


def _disk_error(exc):
    """Whether a checkpoint write failed for want of disk (an ``OSError``, or torch's and safetensors' wording)."""
    return isinstance(exc, OSError) or any(word in str(exc) for word in _DISK_WORDS)


@contextmanager
def _no_transformers_bars():
    """transformers' progress bars off inside the block ("Writing model shards" printed a bar at every checkpoint,
    through the run's own bar and with ``train.progress=false``), as they were after it."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _write(tmp, step, scorer, tokenizer, scheduler, order, model_state, optim_state, peft_model):
    """Every file of a checkpoint into ``tmp``, fsynced: on disk before the rename makes it visible."""
    with _no_transformers_bars():
        if peft_model is not None:
            from .model_setup import save_adapter

            save_adapter(peft_model, model_state, tmp)
        else:
            scorer.model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "order": order.__dict__, "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}},
               tmp / STATE_FILE)
    _fsync_tree(tmp)


def _fsync_tree(path, files=True):
    """fsync every file directly in ``path`` (when ``files``), then the directory itself."""
    if files:
        for p in Path(path).iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside_newer(run_dir, step):
    """Rename the checkpoints of ``run_dir`` past ``step`` to ``checkpoints/.abandoned-step_N`` (which ``latest``
    does not see) and return their names: a run resumed from an older checkpoint goes on from there, and its new
    checkpoints would otherwise be pruned by name in favour of the abandoned ones, which a later ``--resume``
    would then pick up. Rank 0 renames; every rank gets the names."""
    newer = [p for p in checkpoints(run_dir) if step_of(p) > step]
    if dist.rank() == 0:
        for p in newer:
            target = p.with_name(f".abandoned-{p.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(p, target)
    dist.barrier()
    return [p.name for p in newer]


def checkpoints(run_dir):
    """The checkpoint directories of ``run_dir`` (``checkpoints/step_N``), oldest first by step: by name, step
    1000000 (``step_1000000``) sorted before step 999999, and a copy such as ``step_000003.bak`` counted as one."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("step_*") if step_of(p) is not None]
    return sorted(found, key=step_of)


def has_checkpoint(run_dir):
    """Whether a run directory holds a checkpoint (``checkpoints/step_N``) to resume from."""
    return bool(checkpoints(run_dir))


def is_run_dir(path):
    """Whether ``path`` is a training run's directory: its ``config.yaml`` with a checkpoint or ``metrics.jsonl``
    (a directory holding a config file of the user's own is no run)."""
    path = Path(path)
    return (path / "config.yaml").is_file() and (has_checkpoint(path) or (path / "metrics.jsonl").is_file())


def latest(path):
    """A checkpoint directory: ``path`` itself, or the newest ``checkpoints/step_*`` of a run directory (a checkpoint
    that ``save`` had moved aside, ``.old-step_N``, when a kill left no ``step_N`` in its place, is put back first)."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    for old in (path / "checkpoints").glob(".old-step_*"):
        final = old.with_name(old.name.removeprefix(".old-"))
        if not final.exists() and (old / STATE_FILE).exists():
            try:
                os.replace(old, final)
            except OSError:  # another rank put it back first
                pass
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint (expected {path}/checkpoints/step_*, or a checkpoint directory)")
    return found[-1]


def latest_with_config(path):
    """``(checkpoint, config.yaml)``: ``latest(path)`` and the resolved config of the run that wrote it."""
    ckpt = latest(path)
    run_cfg = ckpt.parent.parent / "config.yaml"
    if not run_cfg.is_file():
        raise FileNotFoundError(f"{path}: {run_cfg} is missing (the run's resolved config)")
    if not run_cfg.read_text().strip():  # read as every default, it would load the run under another config
        raise FileNotFoundError(f"{path}: {run_cfg} is empty (a run writes its whole resolved config there)")
    return ckpt, run_cfg


def held_out_fingerprint(ckpt):
    """``ids_fingerprint`` of the held-out rows the run of ``ckpt`` evaluated, or None for a checkpoint written before
    runs recorded it, or one whose trainer state was removed (an archived run keeps the weights alone). Its trainer
    state is memory-mapped: the optimizer's tensors are not read."""
    path = Path(ckpt) / STATE_FILE
    if not path.exists():
        return None
    state = _readable(path, lambda: torch.load(path, mmap=True, weights_only=False))
    order = state.get("order") if isinstance(state, dict) else None
    return (order or {}).get("held_out") or None


def step_of(ckpt):
    """The step a checkpoint directory's name says (``step_000012`` -> 12), or None for another name."""
    match = re.fullmatch(r"step_(\d+)", Path(ckpt).name)
    return int(match.group(1)) if match else None


def _read_weights(ckpt, peft_model):
    """The checkpoint's weights by parameter name in the causal LM: the full model's, or (LoRA) the adapters'."""
    from safetensors.torch import load_file

    from .model_setup import ADAPTER_WEIGHTS, read_adapter

    if peft_model is not None:
        if not (ckpt / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{ckpt}: no {ADAPTER_WEIGHTS}: a checkpoint of a run without LoRA cannot resume "
                                    "with model.lora.enabled=true")
        return read_adapter(peft_model, ckpt)
    if (ckpt / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{ckpt}: holds LoRA adapters only; resume it with model.lora.enabled=true")
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no *.safetensors weights")
    state = {}
    for f in files:
        state.update(_readable(f, lambda: load_file(str(f))))
    return state


def _readable(path, read):
    """``read()``, a file that does not read (cut short by a full disk, a copy in progress) said in one line."""
    return read_or_raise(read, lambda reason: CheckpointError(
        f"{path}: cannot be read ({reason}); the checkpoint is damaged: move it aside to resume from the one before"))


def load(ckpt, scorer, optimizer, scheduler, order, *, peft_model=None):
    """Restore weights (with ``peft_model``: the LoRA adapters), optimizer, scheduler, data order and RNG from
    ``ckpt``; returns its step."""
    ckpt = Path(ckpt)
    trainer_state = _readable(ckpt / STATE_FILE, lambda: torch.load(ckpt / STATE_FILE, weights_only=False))
    missing = [k for k in STATE_KEYS if not isinstance(trainer_state, dict) or k not in trainer_state]
    if missing:  # another program's file under the name: a KeyError traceback below
        raise CheckpointError(f"{ckpt / STATE_FILE}: not a pact_fast trainer state (no {missing[0]!r}); the checkpoint "
                              "is damaged: move it aside to resume from the one before")
    saved = trainer_state["order"]  # checked before anything is read into the model or the optimizer
    if saved["seed"] != order.seed:  # the order restored below keeps the run's seed: a new one would be said, not used
        raise CheckpointError(f"resume: {ckpt} draws its data order from data.seed={saved['seed']}; this config has "
                              f"data.seed={order.seed}, which cannot change on resume (leave it out)")
    if saved["size"] != order.size or saved.get("fingerprint", order.fingerprint) != order.fingerprint:
        raise DataFormatError(f"resume: {ckpt} drew from {saved['size']:,} training rows; this config's data gives "
                              f"{order.size:,}{' other ones' if saved['size'] == order.size else ''} (the data file, "
                              "its checks or data.eval_tasks changed); resume with the run's data, or start a new run")
    state = _read_weights(ckpt, peft_model)
    model = scorer.model
    if dist.is_distributed():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        set_model_state_dict(scorer, {f"model.{k}": v for k, v in state.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(scorer, optimizer, _keyed_by_name(trainer_state["optimizer"], scorer, optimizer),
                                 options=StateDictOptions(full_state_dict=True))
    elif peft_model is not None:  # read_adapter checked names and shapes
        model.load_state_dict(state, strict=False)
        optimizer.load_state_dict(trainer_state["optimizer"])
    else:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = [k for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]]
        if wrong:
            k = wrong[0]
            raise CheckpointError(f"{ckpt}: weights do not fit the model ({k}: {tuple(state[k].shape)} in the "
                                  f"checkpoint, {shapes[k]} in the model): the model options differ from the run's")
        missing, unexpected = model.load_state_dict(state, strict=False)
        untied = [k for k in missing if k not in dist.tied_keys(model)]
        if untied or unexpected:
            raise CheckpointError(f"{ckpt}: weights do not match the model (missing {untied}, unexpected {unexpected})")
        if dist.tied_keys(model):
            model.tie_weights()
        optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    order.__dict__.update({k: v for k, v in saved.items() if k != "held_out"})  # the held-out rows are this config's
    random.setstate(trainer_state["rng"]["python"])
    torch.set_rng_state(trainer_state["rng"]["torch"])
    return int(trainer_state["step"])


def _keyed_by_name(optim_state, scorer, optimizer):
    """A single-process run's optimizer state (``optimizer.state_dict()``: parameters by index in the optimizer's
    groups) keyed by parameter name, as a torchrun run's is and as ``set_optimizer_state_dict`` reads it (an
    index-keyed one failed there with ``KeyError: 'state.0.step'``); a name-keyed state as it is. The trainer
    makes its optimizer over the scorer's trainable parameters in the same order in both."""
    if not all(isinstance(k, int) for g in optim_state["param_groups"] for k in g["params"]):
        return optim_state
    names = {p: n for n, p in scorer.named_parameters()}
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[k]: v for k, v in optim_state["state"].items()},
            "param_groups": [{**g, "params": [order[k] for k in g["params"]]} for g in optim_state["param_groups"]]}


def resume(path, scorer, optimizer, scheduler, order, *, peft_model=None):
    """Load the latest checkpoint under ``path`` (a run or a checkpoint directory): ``(checkpoint, step)``."""
    ckpt = latest(path)
    return ckpt, load(ckpt, scorer, optimizer, scheduler, order, peft_model=peft_model)
