"""The PACT training loop (SPEC sections 1 and 2), flat and readable: ``build(config) -> Components`` makes
everything a run trains with, ``train_step(components, step) -> StepStats`` is one step, and ``train(config)``
is the loop around them (logging, checkpoints, evaluation, Ctrl-C: ``stopping``) that returns the run's summary.

Per step (``train_step``):
1. take the next ``prompts_per_step`` prompt groups (a seeded order, resumable);
2. sample G prompt-only episodes each in the environment (``RolloutEngine``);
3. rewards -> group advantages; one anchoring draw per group;
4. old log-probs of both contexts (and the reference's) in a packed no-grad pass, when the update
   needs them (``update_epochs > 1``, or a reference model); with one epoch they equal the detached
   current log-probs, and that pass is skipped;
5. update epochs over micro-batches packed under a token budget: one packed forward with
   gradients scores, for every rollout, its response under the trace-conditioned and the
   prompt-only prompt, and the expert trace; ``pact_loss``; backward; then clip, AdamW, schedule.

The progress variable ``s = step / steps`` drives the annealing schedules. Rollouts, scoring and
updates only meet through ``Episode`` lists, so a faster engine can replace ``HFRolloutEngine``.
"""
import importlib.util
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from . import checkpoint
from . import distributed as dist
from .config import Config, ConfigError, plain, save_config
from .cpu import FreeCores, fit_threads, threads_by_load
from .data import ids_fingerprint, load_data
from .envs import make_env_factory
from .evaluation import evaluate
from .files import write_json
from .losses import (PACTBatch, anchor_rows, group_advantages, loss_scales, pact_loss, response_counts,
                     truncated_importance_weights)
from .model_setup import (AdaptersOffScorer, build_policy, check_no_dropout, enable_checkpointing, fit_chat_template,
                          resolve_device, without_start_adapters)
from .models import apply_liger
from .ops.fused_pact_head import fused_pact_head
from .packing import pack_tree, pad_rows, split_units
from .plots import plot_runs
from .rollout_vllm import is_cap, make_rollout_engine
from .scoring import PackedScorer, check_model
from .stopping import AgreedFailure, Interrupt, StepAborted, agreed
from .task_inputs import fit_episodes, group_inputs, limits, prepare


# ---------------------------------------------------------------- setup


def lr_lambda(cfg):
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it at the last step."""

    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return f


def resume_schedule(optimizer, scheduler, cfg):
    """After a checkpoint's optimizer and scheduler state are loaded: the learning rate and weight decay of this
    run's config ``cfg`` (a resume may change ``train.lr``, ``train.weight_decay``, or the schedule through
    ``train.steps`` / ``warmup_steps`` / ``min_lr_ratio``), at the step count the checkpoint holds. The loaded
    state kept the checkpoint's own, and ``--resume`` said the change while training on without it."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    factor = lr_lambda(cfg)(scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, lr=cfg.lr * factor, weight_decay=cfg.weight_decay)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr reports


WARN_CUT_EVERY = 50  # steps between the console lines that say episodes were cut to fit a step


@dataclass
class DataOrder:
    """Seeded order over the training examples: an epoch's permutation and the position in it."""

    seed: int
    size: int
    epoch: int = 0
    index: int = 0
    fingerprint: str = ""  # of the training rows' ids in order (ids_fingerprint): a resume must see the same rows
    held_out: str = ""  # of the held-out rows' ids: `pact-fast eval --run` must score the same ones

    def take(self, n):
        out = []
        while len(out) < n:
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
            take = perm[self.index:self.index + n - len(out)].tolist()
            out += take
            self.index += len(take)
            if self.index >= self.size:
                self.epoch, self.index = self.epoch + 1, 0
        return out


# ---------------------------------------------------------------- scoring


@dataclass
class Unit:
    """Sequences that go through one micro-batch together."""

    kind: str  # "rollout" (the episode under the trace-conditioned and the prompt-only prompt) or "sft" (one trace sequence)
    group: int  # index of the group in the step
    item: int  # episode index in the step, or trace sequence index in the step
    sequences: list
    mask: list = field(default_factory=list)  # rollout units: the episode's response_mask


def build_units(episodes, inputs):
    """The step's units: per prompt group, one rollout unit per episode, then one sft unit per trace sequence."""
    units, n_ep, n_sft = [], 0, 0
    for g, (eps, gi) in enumerate(zip(episodes, inputs)):
        for ep in eps:
            units.append(Unit("rollout", g, n_ep, [gi.tc_prompt + ep.response_ids, gi.po_prompt + ep.response_ids],
                              ep.response_mask))
            n_ep += 1
        for s in gi.sft:
            units.append(Unit("sft", g, n_sft, [s.input_ids]))
            n_sft += 1
    return units


def pack_micro_batch(units, inputs):
    """The trie of a micro-batch and its scored rows: ``(packed, rows [M], targets [M], offsets [P+1])``, P pieces
    in unit order (a rollout unit's response under the trace-conditioned then the prompt-only prompt; a trace's
    tokens after the first)."""
    seqs = [s for u in units for s in u.sequences]
    packed = pack_tree(seqs)
    token_ids = []
    for u in units:
        if u.kind == "rollout":
            gi = inputs[u.group]
            for seq, prompt in zip(u.sequences, (gi.tc_prompt, gi.po_prompt)):
                token_ids.append(torch.arange(len(prompt), len(seq)))
        else:
            token_ids.append(torch.arange(1, len(u.sequences[0])))
    rows, targets, offsets = packed.predictor_rows(token_ids=token_ids)
    return packed, rows, targets, offsets


class UnitScores(NamedTuple):
    """What one packed forward scored for one unit: a rollout unit's response tokens under the trace-conditioned
    and the prompt-only prompt (and the prompt-only entropies when asked), or a trace unit's tokens after its
    first. Fields a unit's kind does not have are None."""

    logp_tc: Optional[torch.Tensor] = None  # [R] rollout units
    logp_po: Optional[torch.Tensor] = None  # [R] rollout units
    entropy_po: Optional[torch.Tensor] = None  # [R] rollout units, when asked
    logp_sft: Optional[torch.Tensor] = None  # [n-1] trace units


@dataclass
class OldLogps:
    """Log-probs before the step's first update, by episode index in the step: [R] each. ``ref`` is the frozen
    reference's prompt-only log-probs (only with a reference model)."""

    tc: dict = field(default_factory=dict)
    po: dict = field(default_factory=dict)
    ref: Optional[dict] = None
    is_weight: Optional[dict] = None  # truncated importance weights [R] (rollout.is_cap), else None


def _per_unit(units, values, offsets, entropy=None):
    """Split per-row ``values [M]`` (and ``entropy [M]``) by ``offsets [P+1]`` into one ``UnitScores`` per
    unit."""
    bounds = offsets.tolist()
    pieces = [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    ent_pieces = [entropy[a:b] for a, b in zip(bounds[:-1], bounds[1:])] if entropy is not None else None
    results, k = [], 0
    for u in units:
        if u.kind == "rollout":
            results.append(UnitScores(pieces[k], pieces[k + 1], ent_pieces[k + 1] if ent_pieces else None))
            k += 2
        else:
            results.append(UnitScores(logp_sft=pieces[k]))
            k += 1
    return results


def score_micro_batch(scorer, units, inputs, *, backend, logprob_backend, temperature, return_entropy=False):
    """One packed forward for a micro-batch of units.

    Returns ``(one UnitScores per unit, packed tokens)``; ``entropy_po`` is filled when ``return_entropy``.
    """
    packed, rows, targets, offsets = pack_micro_batch(units, inputs)
    out = scorer(packed, rows, targets, backend=backend, logprob_backend=logprob_backend,
                 temperature=temperature, return_entropy=return_entropy)
    logp, ent = out if return_entropy else (out, None)
    return _per_unit(units, logp, offsets, ent), packed.num_tokens


def fused_micro_batch_loss(scorer, units, inputs, episodes_flat, sft_flat, advantages, anchored, old, device,
                           loss_args, *, backend, temperature):
    """``pact_loss`` of a micro-batch through ``fused_pact_head`` (loss, dX and dW in one lm_head pass).

    The middle arguments are ``batch_for_loss``'s; loss_args: ``fused_pact_head``'s config, progress, step,
    rl_scale, sft_scale. Returns ``(loss, metrics or None, packed tokens)``; metrics are None when the loss is
    not finite (the loss is then a zero that still reaches every parameter).
    """
    packed, rows, targets, offsets = pack_micro_batch(units, inputs)
    # the padded layout of batch_for_loss, filled with row number + 1 (0 = padding) instead of log-probs
    slots = batch_for_loss(units, _per_unit(units, torch.arange(1, len(rows) + 1, dtype=torch.float64), offsets),
                           episodes_flat, sft_flat, advantages, anchored, old, device)
    index = {name: getattr(slots, name).long() - 1 for name in ("logp_tc", "logp_po", "sft_logp")}
    batch = PACTBatch(**{**vars(slots), "logp_tc": None, "logp_po": None, "sft_logp": None, "entropy": None,
                         "old_logp_tc": slots.old_logp_tc if old else None,
                         "old_logp_po": slots.old_logp_po if old else None})

    def head_loss(hidden, weight, bias, targets, **logit_transform):
        try:
            return fused_pact_head(hidden, weight, targets, index, batch, bias=bias, temperature=temperature,
                                   old_from_current=not old, **logit_transform, **loss_args)
        except FloatingPointError:
            return hidden.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0 + weight.sum() * 0.0, None

    loss, metrics = scorer(packed, rows, targets, backend=backend, head_loss=head_loss)
    return loss, metrics, packed.num_tokens


def batch_for_loss(units, results, episodes_flat, sft_flat, advantages, anchored, old, device):
    """Assemble a ``PACTBatch`` (padded [B, T] and [S, E]) for the units of one micro-batch."""
    roll = [(u, r) for u, r in zip(units, results) if u.kind == "rollout"]
    sft = [(u, r) for u, r in zip(units, results) if u.kind == "sft"]
    T = max((len(episodes_flat[u.item].response_ids) for u, _ in roll), default=0)
    idx = [u.item for u, _ in roll]

    def stack(values):  # [B, T]; tensor rows keep their dtype
        return pad_rows(values, T, device=device) if values else torch.zeros((0, T), device=device)

    def floats(lists):  # [B, T] float32
        return pad_rows(lists, T, dtype=torch.float32, device=device)

    adv = advantages[idx].to(device) if idx else torch.zeros(0, device=device)  # [B]
    if idx and old and old.is_weight:  # truncated importance weights: A_i w_t, [B, T]
        adv = adv[:, None] * floats([old.is_weight[i] for i in idx])
    batch = PACTBatch(
        response_mask=floats([episodes_flat[i].response_mask for i in idx]),
        rewards=torch.tensor([episodes_flat[i].reward for i in idx], device=device),
        group_ids=torch.tensor([u.group for u, _ in roll], dtype=torch.long, device=device),
        logp_tc=stack([r.logp_tc for _, r in roll]), logp_po=stack([r.logp_po for _, r in roll]),
        old_logp_tc=stack([old.tc[i] for i in idx]) if old else stack([r.logp_tc.detach() for _, r in roll]),
        old_logp_po=stack([old.po[i] for i in idx]) if old else stack([r.logp_po.detach() for _, r in roll]),
        behavior_logp=floats([episodes_flat[i].behavior_logp for i in idx]),
        ref_logp=stack([old.ref[i] for i in idx]) if old and old.ref is not None else None,
        entropy=stack([r.entropy_po for _, r in roll]) if roll and roll[0][1].entropy_po is not None else None,
        advantages=adv,  # (losses.truncated_importance_weights)
        anchored=anchored[[u.group for u, _ in roll]].to(device) if idx else torch.zeros(0, dtype=torch.bool),
    )
    E = max((len(r.logp_sft) for _, r in sft), default=0)
    labels = [sft_flat[u.item] for u, _ in sft]
    batch.sft_logp = pad_rows([r.logp_sft for _, r in sft], E, device=device) if sft else \
        torch.zeros((0, 0), device=device)  # [S, E]
    batch.sft_components = pad_rows([s.components[1:] for s in labels], E, device=device)
    batch.sft_segment_ids = pad_rows([s.segment_ids[1:] for s in labels], E, device=device)
    batch.sft_turn_ids = pad_rows([s.turn_ids[1:] for s in labels], E, device=device)
    return batch


# ---------------------------------------------------------------- loop


@dataclass
class Components:
    """Everything a run trains with, built once by ``build`` and handed to ``train_step`` and the loop."""

    config: Config
    device: torch.device
    tokenizer: object
    scorer: torch.nn.Module  # PackedScorer over the policy (FSDP-sharded under torchrun)
    ref_scorer: Optional[object]  # the frozen reference (loss.beta_kl > 0; with LoRA the policy, adapters off)
    rollout_model: torch.nn.Module  # what the engine samples with: the policy, or its unsharded copy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: object  # a RolloutEngine
    make_env: object  # example -> its environment
    train_set: list  # Example
    held_out: list  # Example
    order: DataOrder
    writers: Optional["_Writers"]  # rank 0 only
    start_step: int = 0
    limits: Optional[object] = None  # task_inputs.Limits (set by build): what a step's sequences must fit
    group_inputs: dict = field(default_factory=dict)  # example id -> GroupInputs, made on the task's first draw
    peft: Optional[torch.nn.Module] = None  # the PeftModel around the policy with LoRA (model_setup.Policy)
    free_cores: Optional[FreeCores] = None  # on CPU, threads chosen by the load: refitted after each step

    @property
    def model(self):
        """The policy's causal LM (inside ``scorer``)."""
        return self.scorer.model

    def inputs_for(self, example):
        """The example's ``GroupInputs``, tokenised once per run (``build`` checked them all before step 1)."""
        if example.id not in self.group_inputs:
            self.group_inputs[example.id] = group_inputs(self.tokenizer, example)
        return self.group_inputs[example.id]

    def autocast(self):
        """bf16 autocast on CUDA with ``train.bf16``; nothing otherwise."""
        if self.config.train.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


def check_fresh_run_dir(out_dir):
    """A ``ConfigError`` when ``out_dir`` already holds a run: a checkpoint or a ``summary.json``. A second run there
    would append its rows to the first's, prune the newer run's checkpoints by name (older step numbers sort first)
    and leave eval, plot and export reading a mix of the two. A run that stopped before its first checkpoint
    (killed, out of memory) left nothing to resume: the directory is reused, its ``metrics.jsonl`` kept as
    ``metrics.jsonl.prev`` (``reuse_run_dir``). Nor may ``out_dir`` lie inside a run's directory (one with its
    ``config.yaml`` and a checkpoint or ``metrics.jsonl``; ``--out RUN/checkpoints`` wrote a second run's files
    among the first's checkpoints; ``checkpoint.is_run_dir``), nor hold a ``config.yaml`` that is no run's (the
    user's own: the run writes its resolved config there)."""
    run_dir = Path(out_dir)
    for parent in run_dir.absolute().parents:
        if checkpoint.is_run_dir(parent):
            raise ConfigError(f"train.out_dir={out_dir} is inside the directory of the run {parent}: a second run "
                              "there would mix its files with that run's; give it a directory of its own")
    if checkpoint.has_checkpoint(run_dir):
        raise ConfigError(f"train.out_dir={out_dir} already holds a run (checkpoints): continue it with --resume "
                          f"{out_dir}, or give a new --out (or train.out_dir)")
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"train.out_dir={out_dir} already holds a finished run (summary.json, no checkpoint to "
                          "resume): give a new --out (or train.out_dir), or delete that directory")
    if (run_dir / "config.yaml").exists() and not checkpoint.is_run_dir(run_dir):
        # (`--config exp/config.yaml --out exp`: the run wrote its resolved config over the user's file)
        raise ConfigError(f"train.out_dir={out_dir} holds a config.yaml that is no run's (no metrics.jsonl): the "
                          "run would write its own over it; give the run a directory of its own")


def check_run_dir_writable(out_dir):
    """A ``ConfigError`` when the run directory ``out_dir`` cannot be made or written: it, or the nearest of its
    parents that exists, is not a directory or not writable. Checked before the model loads: ``mkdir`` failed with a
    traceback after the model load and the held-out evaluation."""
    path = Path(out_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"train.out_dir={out_dir}: {existing} is a file, not a directory; give the run a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.out_dir={out_dir}: {existing} is not writable")


def reuse_run_dir(out_dir, log=print):
    """Before a fresh run in ``out_dir`` (``check_fresh_run_dir`` passed): the rows of a run that stopped before
    its first checkpoint move to ``metrics.jsonl.prev``, so that this run's rows start the file."""
    metrics = Path(out_dir) / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        os.replace(metrics, metrics.with_name("metrics.jsonl.prev"))
        log(f"[pact_fast] {out_dir} held the rows of a run stopped before its first checkpoint: kept as "
            "metrics.jsonl.prev, this run starts metrics.jsonl")


def check_backends(train_cfg, device):
    """Refuse (``ConfigError``, before the model loads) a Triton or FlexAttention backend on a device it cannot run
    on: it failed in the scoring check, blamed on the model, or (``scoring.check=false``) mid-run after the first
    evaluation. (Triton runs on the CPU under its interpreter; FlexAttention has no CPU backward at all.)"""
    from .kernels.registry import interpreting

    if device.type == "cuda":
        return
    cuda_only = [("attn_backend", "flex")] + ([] if interpreting() else [("attn_backend", "triton"),
                                                                         ("logprob_backend", "triton")])
    for key, backend in cuda_only:
        if getattr(train_cfg, key) == backend:
            raise ConfigError(f"train.{key}={backend} needs a CUDA device; this run is on {device} "
                              f"(train.device={train_cfg.device}): use auto, which picks the torch path there")


def check_writers(train_cfg):
    """Refuse (``ConfigError``, before the model loads) ``train.wandb=true`` without wandb installed: its import
    failed in ``_Writers``, after the model load and held-out evaluation, as a traceback with a run directory
    left behind."""
    if train_cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb=true needs wandb, which is not installed (pip install wandb), or "
                          "train.wandb=false")


def config_warnings(config, n_train):
    """What a run of ``config`` on ``n_train`` training tasks runs, but not as its options suggest (said at start)."""
    out = []
    rl = config.loss.mode != "sft"
    if rl and config.rollout.group_size == 1:
        out.append("rollout.group_size=1: each group's advantage is its reward less its own mean, 0: the RL terms "
                   "train nothing (2 or more rollouts per prompt give them a signal)")
    if rl and config.rollout.greedy:
        out.append("rollout.greedy=true in training: a group's rollouts are the same episode, their advantages 0")
    if config.train.prompts_per_step > n_train:
        out.append(f"train.prompts_per_step={config.train.prompts_per_step} is more than the {n_train} training "
                   "tasks: a step draws some of them twice")
    if config.train.warmup_steps > config.train.steps:  # warmup's last step trains at train.lr
        out.append(f"train.warmup_steps={config.train.warmup_steps} > train.steps={config.train.steps}: the "
                   "learning rate never reaches train.lr")
    return out


def build(config: Config, *, resume=None, engine_factory=None, log=print) -> Components:
    """Data, policy (and reference), optimizer, schedule, rollout engine, data order and writers of a run; with
    ``resume`` (a run or checkpoint directory) restored from its latest checkpoint. Creates the run directory
    and writes its ``config.yaml``. ``engine_factory(model, tokenizer, rollout_cfg, seed)`` may supply another
    rollout engine (default ``rollout_vllm.make_rollout_engine``: the one ``rollout.engine`` names)."""
    train_cfg = config.train
    check_run_dir_writable(train_cfg.out_dir)
    if not resume:
        check_fresh_run_dir(train_cfg.out_dir)
    dist.init()
    if train_cfg.prompts_per_step % dist.world_size():  # each rank takes as many prompt groups (dist.shard_list)
        raise ConfigError(f"train.prompts_per_step={train_cfg.prompts_per_step} must be a multiple of the torchrun "
                          f"world size {dist.world_size()}")
    device = resolve_device(train_cfg.device) if not dist.is_distributed() else dist.device(train_cfg.device)
    if device.type == "cpu":
        fit_threads(train_cfg.threads, log=log if dist.rank() == 0 else None)
    # (torchrun's ranks share the cores by OMP_NUM_THREADS; a vLLM engine's processes would count as others)
    follow_load = (device.type == "cpu" and threads_by_load(train_cfg.threads) and config.rollout.engine == "hf"
                   and not dist.is_distributed())
    check_backends(train_cfg, device)
    check_writers(train_cfg)
    run_dir = Path(train_cfg.out_dir)
    # data errors before the expensive model load (a LoRA set-up is checked on the model's skeleton there too)
    train_set, held_out = load_data(config.data, needs_trace=config.loss.mode != "grpo",
                                    log=log if dist.rank() == 0 else None)
    policy = build_policy(without_start_adapters(config.model) if resume else config.model, device, train_cfg.seed,
                          log=log if dist.rank() == 0 else None, training=True)
    model, tokenizer = policy.model, policy.tokenizer
    compared = [why for why, on in ((f"train.update_epochs={train_cfg.update_epochs}", train_cfg.update_epochs > 1),
                                    ("loss.beta_kl > 0, against the reference's log-probs", config.loss.beta_kl > 0),
                                    ("rollout.is_cap, against the rollout engine's eval-mode log-probs",
                                     bool(is_cap(config.rollout)))) if on]
    if compared:
        check_no_dropout(model, compared, {"model.lora.dropout": config.model.lora.dropout}
                         if config.model.lora.enabled else {})
    fit_chat_template(config, tokenizer, train_set + held_out, log=log)
    # every task tokenised and checked once: a row that cannot go through a step fails here, not on its first draw
    lim = limits(model, config)
    train_set, held_out = prepare(tokenizer, train_set, held_out, lim, on_error=config.data.on_error,
                                  log=log if dist.rank() == 0 else None,
                                  tool_call_format=config.rollout.tool_call_format)
    if dist.rank() == 0:
        for warning in config_warnings(config, len(train_set)):
            log(f"[pact_fast] {warning}")
    if train_cfg.grad_checkpointing:
        enable_checkpointing(model)
    if train_cfg.liger:
        apply_liger(model, device)
    rollout_model = dist.rollout_copy(model)  # before sharding: an unsharded copy under torchrun
    if config.scoring.check:  # an architecture scored wrongly is refused before any step
        check_model(model, backend=train_cfg.attn_backend, logprob_backend=train_cfg.logprob_backend,
                    log=log if dist.rank() == 0 else None)
    scorer = dist.shard(PackedScorer(model), bf16=train_cfg.bf16 and device.type == "cuda")
    ref_scorer = None
    if config.loss.beta_kl > 0:  # LoRA: the base with the adapters off; otherwise a frozen copy of the start
        ref_scorer = AdaptersOffScorer(scorer, policy.peft) if policy.peft is not None else PackedScorer(
            build_policy(config.model, device, train_cfg.seed).model.eval().requires_grad_(False))
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg))
    order = DataOrder(config.data.seed, len(train_set), fingerprint=ids_fingerprint(train_set),
                      held_out=ids_fingerprint(held_out))
    dist.check_same(json.dumps([plain(config), order.fingerprint], sort_keys=True, default=str), "config or data")
    start_step = 0
    if resume:
        ckpt, start_step = checkpoint.resume(resume, scorer, optimizer, scheduler, order, peft_model=policy.peft)
        if start_step > train_cfg.steps:
            raise ValueError(f"resume: {ckpt} is at step {start_step}, past train.steps={train_cfg.steps}; "
                             f"raise train.steps to go on (its checkpoints would be overwritten otherwise)")
        resume_schedule(optimizer, scheduler, train_cfg)
        newer = checkpoint.set_aside_newer(run_dir, start_step)
        if dist.rank() == 0:
            log(f"[pact_fast] resumed from {ckpt} at step {start_step}")
            if newer:
                log(f"[pact_fast] {run_dir}: the newer checkpoints {', '.join(newer)} are not this run's "
                    "continuation: moved to checkpoints/.abandoned-*")
    engine = (engine_factory or make_rollout_engine)(rollout_model, tokenizer, config.rollout, train_cfg.seed)
    if dist.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            reuse_run_dir(run_dir, log)
        # resumed with changed options: the values the steps so far trained with stay, as config.before_step_N.yaml
        save_config(config, run_dir / "config.yaml", keep_as=f"config.before_step_{start_step:06d}.yaml" if resume
                    else None)
    writers = _Writers(run_dir, train_cfg, config, start_step) if dist.rank() == 0 else None
    return Components(config, device, tokenizer, scorer, ref_scorer, rollout_model, optimizer, scheduler, engine,
                      make_env_factory(config.data, config.rollout), train_set, held_out, order, writers, start_step,
                      lim, peft=policy.peft, free_cores=FreeCores() if follow_load else None)


@dataclass
class StepStats:
    """What one ``train_step`` did; ``metrics()`` is the row it logs."""

    step: int  # steps done, this one included
    losses: dict  # pact_loss's metrics over the step's micro-batches (``_average``)
    lr: float  # the lr this step trained at
    grad_norm: float
    skipped: bool  # a non-finite loss or gradient: no update
    non_finite_loss: bool  # (when skipped) the loss itself, not only its gradient
    rewards: torch.Tensor  # [N] this rank's episodes
    episodes: list  # Episode
    packed_tokens: int
    micro_batches: int
    unshared_tokens: int
    anchor_frac: Optional[float]  # pact mode only
    rollout_seconds: float
    step_seconds: float
    peak_memory_mb: float
    truncated: int = 0  # episodes cut to fit the step (task_inputs.fit_episodes)
    loss_weights: dict = field(default_factory=dict)  # a weight per metric of ``losses`` that ranks average by it

    def metrics(self):
        """The step's metrics on this rank: the loss terms' (``losses``), then ``episode_metrics``."""
        return {**self.losses, **self.episode_metrics()}

    def episode_metrics(self):
        """What the episodes, the update and the timers say (``reward_mean`` of the episodes, not the loss's)."""
        eps, n = self.episodes, max(1, len(self.episodes))
        sampled = sum(ep.num_model_tokens for ep in eps)
        rewards = self.rewards
        return {
            "step": self.step, "lr": self.lr, "grad_norm": self.grad_norm,
            "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "success_rate": float((rewards >= 1).float().mean()) if len(rewards) else 0.0,
            "episode_turns": sum(ep.turns for ep in eps) / n,
            "tool_calls_per_episode": sum(ep.tool_calls for ep in eps) / n,
            "tool_errors_per_episode": sum(ep.tool_errors for ep in eps) / n,
            "truncated_episodes": self.truncated,
            "sampled_tokens": sampled, "packed_tokens": self.packed_tokens, "micro_batches": self.micro_batches,
            "unshared_tokens": self.unshared_tokens,
            "rollout_seconds": self.rollout_seconds, "step_seconds": self.step_seconds,
            "skipped_step": float(self.skipped),
            **({"anchor_frac": self.anchor_frac} if self.anchor_frac is not None else {}),
            "tokens_per_second": (sampled + self.packed_tokens) / self.step_seconds,
            "peak_memory_mb": self.peak_memory_mb,
        }


def train_step(c: Components, step, interrupt=None) -> StepStats:
    """One PACT step (0-based ``step``): rollouts of the next prompt groups, advantages and anchoring, old
    log-probs when needed, ``update_epochs`` passes of packed micro-batches (loss, backward), then clip, AdamW
    and the schedule. A non-finite loss or gradient skips the update on every rank. ``interrupt.abortable`` is
    ended (``commit``) before the first optimizer update: up to there a Ctrl-C aborts the step (``StepAborted``)."""
    config, train_cfg, lc = c.config, c.config.train, c.config.loss
    t0 = time.perf_counter()
    progress = step / max(1, train_cfg.steps)
    examples = [c.train_set[i] for i in dist.shard_list(c.order.take(train_cfg.prompts_per_step))]  # this rank's
    dist.sync_rollout_weights(c.scorer, c.rollout_model)
    c.engine.generator.manual_seed(train_cfg.seed * 1_000_003 + step * 1009 + dist.rank())
    sample = partial(c.engine.rollout, examples, c.make_env)
    episodes = sample() if interrupt is None else interrupt.rollouts(sample)
    t_roll = time.perf_counter() - t0
    inputs = [c.inputs_for(ex) for ex in examples]
    truncated = fit_episodes(episodes, inputs, c.limits)
    flat = [ep for eps in episodes for ep in eps]
    sft_flat = [s for gi in inputs for s in gi.sft]
    group_of = torch.tensor([g for g, eps in enumerate(episodes) for _ in eps])  # [N]
    rewards = torch.tensor([ep.reward for ep in flat])  # [N]
    advantages = group_advantages(rewards, group_of, eps=lc.adv_eps, norm_by_std=lc.norm_adv_by_std)  # [N]
    all_groups = torch.arange(train_cfg.prompts_per_step)
    anchored = anchor_rows(torch.tensor(dist.shard_list(all_groups.tolist())), train_cfg.prompts_per_step,
                           lc.anchor_q, lc.seed, step)  # this rank's groups' draws [P / world]
    units = build_units(episodes, inputs)
    batches = dist.pad_micro_batches(split_units([u.sequences for u in units], train_cfg.micro_batch_tokens))
    score = dict(backend=train_cfg.attn_backend, logprob_backend=train_cfg.logprob_backend,
                 temperature=config.rollout.temperature)
    old = None
    cap = is_cap(config.rollout)
    if train_cfg.update_epochs > 1 or c.ref_scorer is not None or cap:
        old = _old_logps(c, [[units[i] for i in mb.indices] for mb in batches], inputs, score)
    tis_metrics = _importance_weights(old, flat, cap) if cap else {}
    # step-wide normalisers, over all ranks: the micro-batch losses then add up to the step's loss
    masks = [_response_mask([] if mb.padding else [units[i] for i in mb.indices]) for mb in batches]
    mb_traces = [0 if mb.padding else sum(units[i].kind == "sft" for i in mb.indices) for mb in batches]
    mb_counts = [response_counts(m) for m in masks]
    step_tokens, step_seqs, step_traces = dist.sum_counts(
        [sum(n[0] for n in mb_counts), sum(n[1] for n in mb_counts), sum(mb_traces)])
    step_lc = _step_loss_config(lc, masks)
    packed_tokens, weighted_metrics, skipped = 0, [], False
    step_loss, epochs = 0.0, 0  # the step's loss: its micro-batches' scaled losses add up to it, per epoch
    for _ in range(train_cfg.update_epochs):
        epochs += 1
        non_finite_loss = False
        for mb, mask, counts, n_traces in zip(batches, masks, mb_counts, mb_traces):
            mb_units = [units[i] for i in mb.indices]
            # padding micro-batches count 0: zero loss; FSDP averages gradients over ranks
            rl_scale, sft_scale = loss_scales(mask, n_traces, lc.loss_agg, step_tokens=step_tokens,
                                              step_seqs=step_seqs, step_traces=step_traces, world=dist.world_size())
            loss_args = dict(config=step_lc, progress=progress, step=step, rl_scale=rl_scale, sft_scale=sft_scale)
            with c.autocast():
                loss, metrics, n_tok = _micro_batch_loss(c, mb_units, inputs, flat, sft_flat, advantages, anchored,
                                                         old, loss_args, score)
            non_finite_loss |= metrics is None
            loss.backward()
            if interrupt is not None:
                interrupt.agree()
            packed_tokens += 0 if mb.padding else n_tok
            if metrics is not None and not mb.padding:
                weighted_metrics.append(((counts[0 if lc.loss_agg == "token-mean" else 1], n_traces, mask.shape[0]),
                                         metrics))
                step_loss += metrics["loss/total"]
        grad_norm = dist.clip_grad_norm(c.scorer, train_cfg.grad_clip)
        bad = non_finite_loss or not math.isfinite(float(grad_norm))
        if interrupt is not None:
            interrupt.commit()  # from here on the step completes: its update, or its skip and the schedule's step
        if dist.sum_counts([int(bad)])[0]:  # skipped on every rank alike
            c.optimizer.zero_grad(set_to_none=True)
            skipped = True
            break
        c.optimizer.step()
        c.optimizer.zero_grad(set_to_none=True)
    lr = c.scheduler.get_last_lr()[0]  # the rate this step trained at (logged; the scheduler now moves on)
    with warnings.catch_warnings():  # a skipped first step: torch would say the schedule is called out of order
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        c.scheduler.step()  # the schedule follows the step count, skipped steps included
    anchor_frac = None
    if lc.mode == "pact":
        anchor_frac = lc.anchor_q if lc.anchor_mode == "mix" else float(
            anchor_rows(all_groups, train_cfg.prompts_per_step, lc.anchor_q, lc.seed, step).float().mean())
    means, loss_weights = _average(weighted_metrics)
    losses = {**means, **tis_metrics}
    # over ranks, as over micro-batches: by rollouts (or traces); the TIS metrics by sampled tokens
    loss_weights.update(dict.fromkeys(tis_metrics, float(sum(sum(ep.response_mask) for ep in flat))))
    if "loss/total" in losses:  # the per-term losses are each micro-batch's own means, averaged by size above
        losses["loss/total"] = step_loss / epochs  # (each rank's share of the step, times the world: a plain mean)
        loss_weights.pop("loss/total", None)
    if "anchored_groups" in losses:  # a count over the step's groups, which micro-batches split
        losses["anchored_groups"] = float(train_cfg.prompts_per_step if lc.mode != "pact" else
                                          anchor_frac * train_cfg.prompts_per_step)
    # groups whose every episode has no response token to score, over all ranks (each holds its share of the groups)
    tokens = torch.zeros(len(episodes)).index_add_(0, group_of, torch.tensor(
        [float(sum(ep.response_mask)) for ep in flat]))
    skipped_groups = dist.sum_counts([int((tokens == 0).sum())])[0]
    if "skipped_groups" in losses:
        losses["skipped_groups"] = float(skipped_groups)
    return StepStats(step + 1, losses, lr, float(grad_norm), skipped,
                     non_finite_loss, rewards, flat, packed_tokens, sum(not mb.padding for mb in batches),
                     sum(len(s) for u in units for s in u.sequences), anchor_frac, t_roll, time.perf_counter() - t0,
                     _peak_memory_mb(c.device), truncated, loss_weights)


def _old_logps(c, micro_batches, inputs, score):
    """The policy's (and the reference's) log-probs of every rollout before the step's first update, in a
    no-grad pass over ``micro_batches`` (lists of units)."""
    old = OldLogps(ref={} if c.ref_scorer is not None else None)
    with torch.no_grad(), c.autocast():
        for mb_units in micro_batches:
            res, _ = score_micro_batch(c.scorer, mb_units, inputs, **score)
            ref_res = score_micro_batch(c.ref_scorer, mb_units, inputs, **score)[0] if c.ref_scorer else None
            for j, (u, r) in enumerate(zip(mb_units, res)):
                if u.kind == "rollout":
                    old.tc[u.item], old.po[u.item] = r.logp_tc.float(), r.logp_po.float()
                    if ref_res is not None:
                        old.ref[u.item] = ref_res[j].logp_po.float()
    return old


def _importance_weights(old, flat, cap):
    """Truncated importance weights (``losses.truncated_importance_weights``, cap ``cap``) of every episode's
    sampled tokens, the trainer's prompt-only log-probs before the update over the engine's, into
    ``old.is_weight``; returns their metrics."""
    weights, metrics = truncated_importance_weights(pad_rows([old.po[i].cpu() for i in range(len(flat))]),
                                                    pad_rows([ep.behavior_logp for ep in flat], dtype=torch.float32),
                                                    pad_rows([ep.response_mask for ep in flat], dtype=torch.float32),
                                                    cap)  # [N, T]
    old.is_weight = {i: weights[i, :len(ep.response_ids)] for i, ep in enumerate(flat)}
    return metrics


def _micro_batch_loss(c, units, inputs, flat, sft_flat, advantages, anchored, old, loss_args, score):
    """``(loss, metrics or None, packed tokens)`` of one micro-batch, through the fused head or through
    ``score_micro_batch`` and ``pact_loss``. A non-finite loss gives metrics None and a zero loss that still
    reaches the whole graph (every rank runs its backward: FSDP's collectives)."""
    if c.config.train.fused_head:
        return fused_micro_batch_loss(c.scorer, units, inputs, flat, sft_flat, advantages, anchored, old, c.device,
                                      dict(loss_args, memory_lean=c.config.train.fused_head_memory_lean),
                                      backend=score["backend"], temperature=score["temperature"])
    res, n_tok = score_micro_batch(c.scorer, units, inputs, return_entropy=c.config.loss.c_ent > 0, **score)
    batch = batch_for_loss(units, res, flat, sft_flat, advantages, anchored, old, c.device)
    try:
        loss, metrics = pact_loss(batch, **loss_args)
    except FloatingPointError:  # a non-finite log-prob or loss: this step makes no update
        return _zero_loss(res), None, n_tok
    return loss, metrics, n_tok


def train(config: Config, *, resume=None, engine_factory=None, log=print):
    """Run PACT training; returns a summary dict (steps, interrupted, stopped, checkpoint, run_dir, eval_before,
    eval_after, final_eval_interrupted, final_reward_mean, seconds). ``engine_factory``: see ``build``."""
    try:
        return _train(config, resume, engine_factory, log)
    except AgreedFailure as failure:  # (torchrun) this rank's own error, or the failed rank's named
        error = failure.error
    raise error  # outside the handler: the error keeps its own context, not the AgreedFailure's


def _train(config, resume, engine_factory, log):
    c = build(config, resume=resume, engine_factory=engine_factory, log=log)
    if dist.rank() != 0:  # the ranks agree on what is said below (evaluations, skips, cuts): rank 0 says it once
        log = dist.silent
    train_cfg, run_dir, writers = config.train, Path(config.train.out_dir), c.writers
    # a resumed run's summary carries on from the rows it keeps (its evaluations, steps' seconds, last reward)
    before = _Carried(writers.kept if writers else [])
    eval_before = before.evals.get(0)
    if c.start_step == 0 and _not_logged(eval_before):
        log(f"[pact_fast] held-out evaluation before training: {len(c.held_out)} tasks, one greedy episode each")
        eval_before = _evaluate_and_log(c, 0, sync=False)
        log(f"[pact_fast] held-out before training: {eval_before}")
    # the evaluation of the step resumed from, lost if the run died between that step's checkpoint and it
    if _periodic_eval(train_cfg, c.start_step) and _not_logged(before.evals.get(c.start_step)):
        log(f"[pact_fast] held-out at step {c.start_step}: {_evaluate_and_log(c, c.start_step)}")
    history, eval_after, bar = [], None, _progress(train_cfg, config.loss.mode, c.start_step)
    step, skip_streak, stopped, last_save, warned_cut = c.start_step, 0, None, time.monotonic(), 0
    # the checkpoint of a step is written once: a periodic save at the last step, or the one resumed from, is the
    # final checkpoint (writing it again replaced a checkpoint on disk for nothing)
    resumed = checkpoint.step_dir(run_dir, c.start_step)
    saved = {c.start_step: resumed} if c.start_step and (resumed / checkpoint.STATE_FILE).exists() else {}
    interrupt = Interrupt(log, distributed=dist.is_distributed())
    with interrupt:
        for step in range(c.start_step, train_cfg.steps):
            if interrupt.any_requested() or (train_cfg.stop_after and step - c.start_step >= train_cfg.stop_after):
                break
            order_state = dict(c.order.__dict__)
            try:
                interrupt.abortable = True  # a Ctrl-C in rollouts, scoring or backward aborts the step at once
                stats = train_step(c, step, interrupt)
            except StepAborted:  # nothing of this step was applied: drop its gradients, replay its data
                c.optimizer.zero_grad(set_to_none=True)
                c.order.__dict__.update(order_state)
                break
            except Exception as exc:  # an environment's error, a memory error: the steps since the last save are kept
                if not interrupt.abortable or step == c.start_step:
                    raise
                c.optimizer.zero_grad(set_to_none=True)
                c.order.__dict__.update(order_state)
                interrupt.abortable = False  # a Ctrl-C during the save is a flag: the save finishes
                _save_after_failure(c, step, saved, log, f"step {step + 1}", isinstance(exc, AgreedFailure))
                raise
            finally:
                interrupt.abortable = False
            skip_streak = skip_streak + 1 if stats.skipped else 0
            if stats.skipped:
                _say(bar, log, f"[pact_fast] step {step + 1}: non-finite "
                     f"{'loss' if stats.non_finite_loss else 'gradient'}; step skipped ({skip_streak} in a row)")
            metrics = _step_metrics(stats)
            history.append(metrics)
            if writers:
                writers.log(metrics)
            if bar:
                bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", loss=f"{metrics.get('loss/total', 0):.3f}",
                                tok_s=f"{metrics['tokens_per_second']:.0f}")
                bar.update(1)
            refitted = c.free_cores.step() if c.free_cores else None
            if refitted:
                _say(bar, log, refitted)
            minutes = train_cfg.save_every_minutes
            # every rank saves when any is due: their clocks differ by their own evaluations and steps, and a rank
            # saving (collectives) while another trains on hung both
            due_by_time = minutes and dist.max_count(int(time.monotonic() - last_save >= 60 * minutes))
            if (train_cfg.save_every and (step + 1) % train_cfg.save_every == 0) or due_by_time:
                saved[step + 1] = _save(c, step + 1)
                last_save = time.monotonic()
            if stats.truncated and step >= warned_cut:  # the first cut, then at most every WARN_CUT_EVERY steps
                warned_cut = step + WARN_CUT_EVERY
                _say(bar, log, f"[pact_fast] step {step + 1}: {int(metrics['truncated_episodes'])} of "
                     f"{len(stats.episodes) * dist.world_size()} episodes were cut to fit "
                     f"train.micro_batch_tokens={train_cfg.micro_batch_tokens} or the positions, as out of length "
                     "(reward 0); raise the budget if that is many (metric truncated_episodes)")
            if skip_streak >= train_cfg.max_skipped_steps:
                stopped = (f"{skip_streak} consecutive steps had a non-finite loss or gradient (the last at step "
                           f"{step + 1}); stopped with the last good weights (lower train.lr, or check the data "
                           "and the rewards)")
                step += 1
                break
            if _periodic_eval(train_cfg, step + 1):
                try:
                    result = _evaluate_and_log(c, step + 1)
                except Exception as exc:  # an environment's error in the evaluation: the steps trained so far are kept
                    _save_after_failure(c, step + 1, saved, log, f"the held-out evaluation after step {step + 1}",
                                        isinstance(exc, AgreedFailure))
                    raise
                _say(bar, log, f"[pact_fast] held-out at step {step + 1}: {result}")
        else:
            step = train_cfg.steps
        if bar:
            bar.close()
        ckpt = saved.get(step) or _save(c, step)  # a Ctrl-C now is a flag: the write finishes
        interrupted = interrupt.any_requested()  # the ranks agree whether to run the final evaluation
    final_eval_interrupted = False
    if step == train_cfg.steps and not interrupted:
        eval_after = before.evals.get(step)  # a finished run resumed: evaluated already, nothing trained since
        if _not_logged(eval_after):
            try:
                eval_after = _evaluate_and_log(c, step, last=True)
            except KeyboardInterrupt:  # the checkpoint is complete: the summary and the plot are still written
                final_eval_interrupted = True
                log(f"[pact_fast] Ctrl-C during the final held-out evaluation: checkpoint {ckpt} is complete; "
                    f"summary.json (eval_after null) and curves.png written; --resume {run_dir} evaluates it")
    if stopped:
        log(f"[pact_fast] {stopped}; checkpoint {ckpt}")
    summary = {"steps": step, "interrupted": interrupted or final_eval_interrupted, "stopped": stopped,
               "checkpoint": str(ckpt), "run_dir": str(run_dir), "eval_before": eval_before, "eval_after": eval_after,
               "final_eval_interrupted": final_eval_interrupted,
               "final_reward_mean": history[-1]["reward_mean"] if history else before.reward_mean,
               "seconds": sum(h["step_seconds"] for h in history) + before.seconds}
    if writers:
        writers.close(summary)
    return summary


class _Carried:
    """What a resumed run's summary carries on from the metrics rows it keeps (its checkpoint's step and before):
    the held-out evaluations by step, the steps' seconds summed and the last step's reward_mean. The rows, not the
    last summary.json: a session killed (kill -9) wrote none, and one resumed from an older checkpoint, or
    stopped in its final evaluation, wrote one that does not end where this session starts. Rank 0's rows (it
    writes the summary): the other ranks' summaries carry nothing on."""

    def __init__(self, rows):
        self.evals, self.seconds, self.reward_mean = {}, 0.0, None
        for row in rows:
            evaluation = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
            if evaluation:
                self.evals[row.get("step", 0)] = evaluation
            elif "step_seconds" in row:
                self.seconds += row["step_seconds"]
                self.reward_mean = row.get("reward_mean")


def _periodic_eval(train_cfg, step):
    """Whether ``step`` (steps done) has a held-out evaluation of ``train.eval_every``: not step 0's (before
    training) nor the last step's (the final evaluation)."""
    return bool(train_cfg.eval_every) and step % train_cfg.eval_every == 0 and 0 < step < train_cfg.steps


def _not_logged(evaluation):
    """Whether an evaluation is still to run: ``evaluation`` (what metrics.jsonl holds for it) is None on rank 0,
    which holds the rows and decides for every rank (the evaluation syncs the rollout copy: collectives)."""
    return bool(dist.max_count(int(dist.rank() == 0 and evaluation is None)))


def _save(c, step):
    return checkpoint.save(c.config.train.out_dir, step, c.scorer, c.tokenizer, c.optimizer, c.scheduler, c.order,
                           c.config.train.keep_last, peft_model=c.peft)


def _say(bar, log, line):
    """``log(line)`` with the progress ``bar`` (or None) cleared around it."""
    if bar:
        bar.clear()
    log(line)
    if bar:
        bar.refresh()


def _save_after_failure(c, step, saved, log, what, after_agreement):
    """The checkpoint of step ``step``, the last whole one, after ``what`` (step ``step + 1`` before its update, or
    the evaluation after step ``step``) failed; nothing when ``saved`` (step -> checkpoint) holds it already, or
    under torchrun unless the ranks agreed on the failure first (``after_agreement``, an ``AgreedFailure``: every
    rank is here; otherwise the others wait in a collective and a save would hang). A save that fails too is said,
    not raised: the failure's own error is what the run stops with."""
    if (dist.is_distributed() and not after_agreement) or step in saved:
        return
    try:
        ckpt = _save(c, step)
    except Exception as exc:
        log(f"[pact_fast] {what} failed; the checkpoint of step {step} could not be saved either: "
            f"{type(exc).__name__}: {exc}")
    else:
        log(f"[pact_fast] {what} failed; saved the last whole step: {ckpt} (--resume {ckpt.parent.parent} goes on "
            "from there)")


def _evaluate_and_log(c, step, sync=True, last=False):
    """``evaluate`` on the held-out examples, logged as ``eval/*`` at ``step``. The rollout copy is refreshed first
    (``sync``): under torchrun it is one update old, or (resumed) made before the checkpoint loaded. Before the
    first step it holds the weights it was made from (a step-0 checkpoint's are those): no push of them again.
    Under torchrun the ranks agree on an error in it (``agreed``), unless it is the ``last`` collective work of the
    run (the final evaluation, after the final checkpoint): an error there leaves no rank waiting, and a collective
    as a process's last act can abort it at exit (``distributed._destroy``)."""
    if sync:
        with dist.signals_deferred():  # a rank's Ctrl-C between two of the sync's gathers would strand the others
            dist.sync_rollout_weights(c.scorer, c.rollout_model)
    run = partial(evaluate, c.engine, c.held_out, c.make_env)
    result = run() if last else agreed(run)
    if c.writers:
        c.writers.log({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
    return result


def _zero_loss(results):
    """0 times every scored log-prob of a micro-batch (NaN made 0): a backward that touches the whole graph
    but adds nothing, for a micro-batch whose loss is not finite."""
    leaves = [t for r in results for t in r if t is not None]
    return sum((t.nan_to_num(0.0, 0.0, 0.0) * 0.0).sum() for t in leaves)


def _response_mask(units):
    """The response_mask [B, T] of the rollout units of a micro-batch (T: their longest response)."""
    masks = [u.mask for u in units if u.kind == "rollout"]
    return pad_rows(masks, dtype=torch.float32)


def _step_loss_config(lc, masks):
    """``lc`` for this step: ``seq-mean-token-sum-norm`` divides by a fixed length, which without
    ``loss_scale_factor`` is the step's longest response (over all ranks), not each micro-batch's own.
    masks: the step's response_mask per micro-batch, [B, T] each."""
    if lc.loss_agg != "seq-mean-token-sum-norm" or lc.loss_scale_factor:
        return lc
    return replace(lc, loss_scale_factor=dist.max_count(max((m.shape[-1] for m in masks), default=0)) or None)


# counts each torchrun rank holds a share of (summed over the ranks), and times and memory of the slowest rank
RANK_SUMS = ("sampled_tokens", "packed_tokens", "micro_batches", "unshared_tokens", "truncated_episodes")
RANK_MAXES = ("rollout_seconds", "step_seconds", "peak_memory_mb")


def _step_metrics(stats):
    """The step's metrics over all ranks: counts summed, times the slowest rank's and maxima (``MAXIMA``) the
    largest, the loss terms' means weighted as one process weighs its micro-batches (``loss_weights``), the rest
    averaged (each rank holds as many prompt groups); tokens per second of the whole step."""
    episode = stats.episode_metrics()  # its reward_mean replaces the loss's: a mean over episodes, not tokens
    weights = {k: w for k, w in stats.loss_weights.items() if k not in episode}
    m = dist.reduce_metrics({**stats.losses, **episode}, summed=RANK_SUMS, largest=RANK_MAXES + MAXIMA,
                            weights=weights)
    m["tokens_per_second"] = (m["sampled_tokens"] + m["packed_tokens"]) / m["step_seconds"]
    return m


SFT_METRICS = ("loss/sft", "sft_weight_mean", "sft_weight/", "tool_call_weight")  # the SFT term's (prefixes)
PER_ROLLOUT = ("adv_mean", "adv_abs_mean")  # means over the micro-batch's rollouts, whatever the loss counts
MAXIMA = ("_max",)  # metrics that are a largest value (po/ratio_max, rollout/logp_mismatch_max): suffixes


def _average(weighted):
    """Each metric over the micro-batches ``[((rollouts, traces, rows), metrics)]``, as the step's loss combines
    them (``losses.loss_scales``): the SFT term's (``SFT_METRICS``) weighted by the micro-batch's traces, the
    others by its rollout count (tokens or responses, as the loss counts them), so a micro-batch without traces
    (or rollouts) adds nothing to the other term's means; the advantages' means (``PER_ROLLOUT``) by its rollout
    rows. A metric no weighted micro-batch reports is their plain mean. Maxima (``MAXIMA``) are the largest over
    the micro-batches and epochs (averaged, a second epoch's ratio_max of 1.91 was logged as 1.46).
    Returns ``(means, weights)``: each weighted mean's summed weight, for the mean over ranks."""
    sums, weights, plain, held = {}, {}, {}, {}
    for (rollouts, traces, rows), metrics in weighted:
        for k, v in metrics.items():
            w = traces if k.startswith(SFT_METRICS) else rows if k in PER_ROLLOUT else rollouts
            sums[k] = sums.get(k, 0.0) + w * v
            weights[k] = weights.get(k, 0.0) + w
            plain.setdefault(k, []).append(v)
            if w:  # (a micro-batch of traces alone reports ratio_max 1.0: no rollout of its own)
                held.setdefault(k, []).append(v)
    means = {k: max(held.get(k) or plain[k]) if k.endswith(MAXIMA) else sums[k] / weights[k] if weights[k] else
             sum(plain[k]) / len(plain[k]) for k in sums}
    return means, {k: w for k, w in weights.items() if not k.endswith(MAXIMA)}


def _peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _progress(train_cfg, mode, start):
    if not train_cfg.progress or dist.rank() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=train_cfg.steps, initial=start, desc=mode, unit="step", dynamic_ncols=True)


class _Writers:
    """metrics.jsonl always; TensorBoard and wandb when installed and enabled; a PNG plot at the end."""

    def __init__(self, run_dir, train_cfg, config, start_step=0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.kept = self._cut(start_step) if self.path.exists() else []  # (a fresh run's file: none, or empty)
        self.file = self.path.open("a")
        self.tb = self.wandb = None
        if train_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                pass
        if train_cfg.wandb:
            import wandb  # asked for explicitly: a missing package is an error

            self.wandb = wandb.init(project=train_cfg.wandb_project, config=plain(config, finite=True), dir=str(run_dir))

    def _cut(self, start_step):
        """Keep the rows of the steps a resumed run does not repeat (step <= start_step, step 0's evaluation too
        when it resumes at step 0): a run stopped after a step's row but before its checkpoint (kill -9) wrote
        rows that the resumed run writes again. Returns the kept rows."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a row cut short by the kill
                continue
            if isinstance(row, dict) and row.get("step", 0) <= start_step:
                kept.append((line, row))
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line, _ in kept))
        tmp.replace(self.path)
        return [row for _, row in kept]

    def log(self, metrics):
        self.file.write(json.dumps(plain(metrics, finite=True)) + "\n")
        self.file.flush()
        step = metrics.get("step", 0)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k != "step":
                if self.tb:
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self, summary):
        self.file.close()
        write_json(self.path.parent / "summary.json", plain(summary, finite=True))
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.path.stat().st_size:  # a run stopped before its first row has no curve to draw
            plot_runs([self.path.parent], self.path.parent / "curves.png")
