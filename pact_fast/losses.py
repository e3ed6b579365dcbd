"""Every PACT objective as a pure function of tensors (SPEC section 1; docs/method.md).

Layout: rollouts are rows of a padded batch, ``[B, T]`` per-token tensors with a
``response_mask [B, T]`` (1 on model-generated tokens, 0 on tool responses and padding), scalar
``rewards [B]`` and ``group_ids [B]`` (which prompt group a rollout belongs to). The expert traces
are rows of ``[S, E]`` tensors with per-token component labels. No model is involved: callers
supply log-probs from any engine (``pact_fast.scoring`` or their own).

``pact_loss(batch, config, progress)`` combines the terms and returns ``(loss, metrics)``; the
baselines ``sft``, ``grpo`` and ``sft_then_grpo`` are values of ``PACTLossConfig.mode``.
"""
import math
import operator
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

# Component labels of trace tokens (``sft_components``).
NONE, REASONING, TOOL_CALL, TOOL_RESPONSE, OTHER = 0, 1, 2, 3, 4
COMPONENT_NAMES = {NONE: "none", REASONING: "reasoning", TOOL_CALL: "tool_call", TOOL_RESPONSE: "tool_response",
                   OTHER: "other"}

MODES = ("pact", "sft", "grpo", "sft_then_grpo")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
CTX_DENS = ("same", "behavior")
ANCHOR_MODES = ("bernoulli", "mix")
SFT_REASONING_MODES = ("segment", "scale")
KL_ESTIMATORS = ("k1", "k2", "k3")


# PACTLossConfig fields that must be >= 0
NONNEGATIVE = ("adv_eps", "clip_eps_low", "clip_eps_high", "lambda_sft", "w_reason", "w_other", "beta_0", "beta_1",
               "beta_kl", "c_ent")


@dataclass
class PACTLossConfig:
    """Every knob of the PACT objective. Fields marked (reading) are our reconstruction of the paper."""

    mode: str = field(default="pact", metadata={"help": "pact | sft | grpo | sft_then_grpo", "choices": MODES})
    # GRPO advantages
    adv_eps: float = field(default=1e-6, metadata={"help": "eps in (R - mean) / (std + eps)"})
    norm_adv_by_std: bool = field(default=True, metadata={"help": "divide advantages by the group std"})
    # clipped surrogate
    clip_eps_low: float = field(default=0.2, metadata={"help": "lower clip: ratio >= 1 - clip_eps_low"})
    clip_eps_high: float = field(default=0.2, metadata={"help": "upper clip: ratio <= 1 + clip_eps_high"})
    dual_clip: Optional[float] = field(default=None, metadata={
        "help": "dual-clip constant c > 1 bounding the loss of negative-advantage tokens by -A * c; None = off"})
    loss_agg: str = field(default="token-mean", metadata={"help": "loss aggregation", "choices": LOSS_AGGS})
    loss_scale_factor: Optional[int] = field(default=None, metadata={
        "help": "divisor per sequence for seq-mean-token-sum-norm; None = the padded length T"})
    ctx_den: str = field(default="same", metadata={
        "help": "(reading) ratio denominator of L_TC: old policy under the trace context (same) or the "
                "prompt-only behaviour policy (behavior)", "choices": CTX_DENS})
    # prompt-only anchoring
    anchor_mode: str = field(default="bernoulli", metadata={
        "help": "(reading) bernoulli: per group L_PO with probability q, else L_TC; mix: (1-q) L_TC + q L_PO",
        "choices": ANCHOR_MODES})
    anchor_q: float = field(default=0.3, metadata={"help": "anchoring probability / weight q"})
    # component-aware SFT on the trace
    lambda_sft: float = field(default=1.0, metadata={"help": "weight of L_SFT in the total loss"})
    sft_reasoning_mode: str = field(default="segment", metadata={
        "help": "segment: annealed prefix of reasoning segments; scale: all segments, weight annealed like "
                "tool calls", "choices": SFT_REASONING_MODES})
    w_reason: float = field(default=1.0, metadata={"help": "weight of supervised reasoning tokens"})
    w_other: float = field(default=1.0, metadata={"help": "weight of other assistant tokens (delimiters)"})
    beta_0: float = field(default=0.8, metadata={"help": "tool-call weight at progress 0"})
    beta_1: float = field(default=0.2, metadata={"help": "tool-call weight from progress s_end on"})
    s_end: float = field(default=1.0, metadata={"help": "progress at which the annealing schedules end"})
    # regularisers (off by default)
    beta_kl: float = field(default=0.0, metadata={"help": "weight of KL(pi_theta || pi_ref); 0 = off"})
    kl_estimator: str = field(default="k3", metadata={"help": "KL estimator", "choices": KL_ESTIMATORS})
    kl_ratio_weighted: bool = field(default=False, metadata={
        "help": "weight each token's KL estimate by the ratio pi_theta / pi_old (the samples come from pi_old; "
                "TRL's use_bias_correction_kl)"})
    c_ent: float = field(default=0.0, metadata={"help": "entropy bonus coefficient; 0 = off"})
    # baselines
    switch_progress: float = field(default=0.5, metadata={"help": "sft_then_grpo: progress at which SFT stops"})
    seed: int = field(default=0, metadata={"help": "seed of the anchoring draws (mixed with the step)"})

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"PACTLossConfig.{f.name}={getattr(self, f.name)!r}; choose one of {choices}")
            # NaN fails every comparison below: read as "off" by the > 0 tests (lambda_sft, c_ent, beta_kl) or as a
            # NaN loss later; an infinite weight or bound is as meaningless
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"PACTLossConfig.{f.name}={getattr(self, f.name)} must be a finite number")
        if not 0.0 <= self.anchor_q <= 1.0:
            raise ValueError(f"PACTLossConfig.anchor_q={self.anchor_q} must lie in [0, 1]")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"PACTLossConfig.dual_clip={self.dual_clip} must be > 1 (or None)")
        if self.s_end <= 0:
            raise ValueError(f"PACTLossConfig.s_end={self.s_end} must be > 0")
        # weights and coefficients below 0 would not turn a term around: each is read as "off" (> 0 tests) or
        # empties the clip range, so they are refused rather than trained on
        for name in NONNEGATIVE:
            if getattr(self, name) < 0:
                raise ValueError(f"PACTLossConfig.{name}={getattr(self, name)} must be >= 0")
        if self.clip_eps_low >= 1:
            raise ValueError(f"PACTLossConfig.clip_eps_low={self.clip_eps_low} must be < 1 (the ratio's lower bound "
                             "1 - clip_eps_low stays positive)")
        if self.loss_scale_factor is not None and self.loss_scale_factor < 1:
            raise ValueError(f"PACTLossConfig.loss_scale_factor={self.loss_scale_factor} must be >= 1 (or None: the "
                             "padded length T)")


# PACTLossConfig fields read only where pact_loss computes the advantages from rewards (no batch.advantages)
ADVANTAGE_FIELDS = ("adv_eps", "norm_adv_by_std")


def advantage_options(config):
    """``config``'s ``ADVANTAGE_FIELDS`` set away from their defaults, as ``"pact_config.name=value"`` strings: an
    adapter whose host computes the advantages refuses them (they would go unused)."""
    default = PACTLossConfig()
    return [f"pact_config.{name}={getattr(config, name)!r}" for name in ADVANTAGE_FIELDS
            if getattr(config, name) != getattr(default, name)]


def has_schedule(config):
    """Whether ``pact_loss`` changes with training progress under ``config``: the SFT term's annealing (mode pact)
    or sft_then_grpo's switch. An adapter that cannot see the step refuses such a config without a progress."""
    return config.mode == "sft_then_grpo" or (config.mode == "pact" and config.lambda_sft > 0)


@dataclass
class PACTBatch:
    """Inputs of ``pact_loss``. Shapes: B rollouts, T response tokens, S traces, E trace tokens.

    Log-probs are per-token values of the rollout tokens (``0`` where masked), fp32 or float64 (16-bit ones are
    upcast to fp32). Current-policy tensors carry gradients; ``old_*``, ``behavior_logp`` and ``ref_logp`` do not.
    """

    response_mask: torch.Tensor  # [B, T] 1 = model-generated token
    rewards: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B] int, prompt group of each rollout
    logp_tc: Optional[torch.Tensor] = None  # [B, T] current policy under (x, h)
    logp_po: Optional[torch.Tensor] = None  # [B, T] current policy under (x)
    old_logp_tc: Optional[torch.Tensor] = None  # [B, T] old policy under (x, h)
    old_logp_po: Optional[torch.Tensor] = None  # [B, T] old policy under (x)
    behavior_logp: Optional[torch.Tensor] = None  # [B, T] sampling policy (prompt-only); default old_logp_po
    ref_logp: Optional[torch.Tensor] = None  # [B, T] reference policy under (x), for the KL term
    entropy: Optional[torch.Tensor] = None  # [B, T] current-policy entropy under (x), for the bonus
    sft_logp: Optional[torch.Tensor] = None  # [S, E] current policy on the trace tokens under (x)
    sft_components: Optional[torch.Tensor] = None  # [S, E] int labels (NONE, REASONING, ...)
    sft_segment_ids: Optional[torch.Tensor] = None  # [S, E] reasoning segment index within its turn
    sft_turn_ids: Optional[torch.Tensor] = None  # [S, E] assistant turn index
    # Precomputed per-rollout values, for callers that split a step's groups across micro-batches or ranks:
    advantages: Optional[torch.Tensor] = None  # [B] group advantages computed over the whole group
    anchored: Optional[torch.Tensor] = None  # [B] bool, the group's Bernoulli anchoring draw

    def validate(self):
        """Raise a ``ValueError`` naming the field when a per-rollout input has the wrong shape or dtype, or a
        constant of the loss (``CONSTANT_FIELDS``: old, behaviour and reference log-probs, rewards,
        advantages) requires grad."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not isinstance(value, torch.Tensor):
                hint = (" (string ids such as verl's uid: integers first, e.g. "
                        "torch.as_tensor(numpy.unique(uid, return_inverse=True)[1]))" if f.name == "group_ids" else "")
                raise ValueError(f"PACTBatch: {f.name} must be a torch.Tensor, got {type(value).__name__}{hint}")
        if self.response_mask.dim() != 2:
            raise ValueError(f"PACTBatch: response_mask must be [B, T], got {tuple(self.response_mask.shape)}")
        B = self.response_mask.shape[0]
        for name in ("rewards", "group_ids", "anchored"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (B,):
                raise ValueError(f"PACTBatch: {name} must be [B] = [{B}] (rows of response_mask), "
                                 f"got {tuple(t.shape)}")
        for name in ("group_ids", "anchored"):
            t = getattr(self, name)
            # bool group ids (a mask passed as ids) read as two groups; group_advantages and anchor_rows refuse them
            if t is not None and (t.is_floating_point() or t.is_complex() or
                                  (name == "group_ids" and t.dtype == torch.bool)):
                raise ValueError(f"PACTBatch: {name} must be an integer{' or bool' if name == 'anchored' else ''} "
                                 f"tensor, got {t.dtype}")
        if self.advantages is not None and tuple(self.advantages.shape) not in ((B,), tuple(self.response_mask.shape)):
            raise ValueError(f"PACTBatch: advantages must be [B] = [{B}] or [B, T] = "
                             f"{list(self.response_mask.shape)}, got {tuple(self.advantages.shape)}")
        if self.advantages is not None and not self.advantages.is_floating_point():
            # integers failed deep in the metrics (mean of a Long tensor), bools at the surrogate's negation
            raise ValueError(f"PACTBatch: advantages must be a floating-point tensor, got {self.advantages.dtype}")
        meta = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)
                and getattr(self, f.name).is_meta]
        if meta:  # the loss reads values (its checks, metrics and counts): Tensor.item() failed deep inside
            raise ValueError(f"PACTBatch: {', '.join(meta)} on the meta device; the loss reads its inputs' values "
                             "(checks, counts, metrics): pass tensors on a real device")
        if self.sft_components is not None:  # the trace fields: every one [S, E], as sft_components
            if self.sft_components.dim() != 2:
                raise ValueError(f"PACTBatch: sft_components must be [S, E], got {tuple(self.sft_components.shape)}")
            shape = tuple(self.sft_components.shape)
            for name in ("sft_logp", "sft_segment_ids", "sft_turn_ids"):
                t = getattr(self, name)
                if t is not None and tuple(t.shape) != shape:
                    raise ValueError(f"PACTBatch: {name} must be [S, E] = {list(shape)} (the shape of "
                                     f"sft_components), got {tuple(t.shape)}")
        for name in ("sft_components", "sft_segment_ids", "sft_turn_ids"):
            t = getattr(self, name)
            # a float label 1.5 matched no component (read as none), a float segment id was truncated, and a bool
            # mask passed as labels read every token as reasoning
            if t is not None and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
                raise ValueError(f"PACTBatch: {name} must be an integer tensor, got {t.dtype}")
        for name in CONSTANT_FIELDS:
            t = getattr(self, name)
            if t is not None and t.requires_grad:
                raise ValueError(f"PACTBatch: {name} requires grad; pass it detached (it is a constant of the loss: "
                                 "when it is the current log-probs with their graph, the ratio's gradient is 0)")


# The inputs the loss treats as constants: a tensor among them that requires grad is refused (PACTBatch.validate)
CONSTANT_FIELDS = ("old_logp_tc", "old_logp_po", "behavior_logp", "ref_logp", "rewards", "advantages")


# ---------------------------------------------------------------- advantages


def group_advantages(rewards, group_ids, *, eps=1e-6, norm_by_std=True):
    """GRPO advantages ``A_i = (R_i - mean_G R) / (std_G R + eps)`` (or without the std).

    rewards: [B] float (any float dtype); group_ids: [B] int. Returns [B] fp32 (fp64 for fp64 rewards),
    computed in fp64 (squares of rewards past ~1.8e19 overflow fp32: the std became inf, every advantage 0).
    The std is the unbiased sample std. A group of one rollout, or whose rewards are all equal, gets
    exactly 0: its rounded mean would otherwise leave a tiny ``R - mean`` that ``1 / (std + eps)``
    magnifies (0.7 x 16 in fp32 gives 0.106 each), pushing the whole group one way.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} and group_ids "
                         f"{tuple(group_ids.shape)} must both be [B]")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_advantages: group_ids must be an integer tensor, got {group_ids.dtype}")
    if not torch.isfinite(rewards).all():
        raise ValueError("group_advantages: rewards contain NaN or inf")
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(torch.float64)
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    zeros = torch.zeros(n_groups, device=r.device, dtype=r.dtype)
    count = zeros.index_add(0, inv, torch.ones_like(r))
    mean = zeros.index_add(0, inv, r) / count
    lowest = zeros.scatter_reduce(0, inv, r, reduce="amin", include_self=False)
    highest = zeros.scatter_reduce(0, inv, r, reduce="amax", include_self=False)
    constant = (lowest == highest)[inv]  # [B] the rollout's group has one reward value
    centered = torch.where(constant, torch.zeros_like(r), r - mean[inv])
    if not norm_by_std:
        return centered.to(out_dtype)
    sq = zeros.index_add(0, inv, centered ** 2)
    std = torch.sqrt(sq / (count - 1).clamp_min(1))
    return (centered / (std[inv] + eps)).to(out_dtype)


# ---------------------------------------------------------------- surrogate


def at_least_fp32(t):
    """``t`` in fp32 when it is a 16-bit float tensor (else as it is): what the loss computes in."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def aggregate(values, mask, agg="token-mean", loss_scale_factor=None):
    """Reduce per-token ``values [B, T]`` over ``mask [B, T]`` (SPEC agg modes; a nonzero mask entry selects its
    token, in the sums and in the counts alike); empty masks give 0. Sums and counts in fp32 at least (fp16 counts
    overflow at 65,504 tokens)."""
    values = at_least_fp32(values)
    mask = mask.bool()
    masked = torch.where(mask, values, torch.zeros_like(values))  # where, not *: NaN * 0 is NaN
    seq_tokens = mask.to(values.dtype).sum(-1)
    if agg == "token-mean":
        return masked.sum() / seq_tokens.sum().clamp_min(1)
    n_seq = (seq_tokens > 0).sum().clamp_min(1)
    if agg == "seq-mean-token-mean":
        return (masked.sum(-1) / seq_tokens.clamp_min(1)).sum() / n_seq
    if agg == "seq-mean-token-sum-norm":
        scale = loss_scale_factor or values.shape[-1]
        return masked.sum() / (n_seq * scale)
    raise ValueError(f"aggregate: unknown agg {agg!r}; choose one of {LOSS_AGGS}")


def response_counts(response_mask):
    """What the RL aggregations average over: ``(response tokens, non-empty responses)`` of
    ``response_mask [B, T]`` (token-mean counts tokens, the seq-mean aggregations count responses); counted exactly
    whatever the mask's dtype (a bf16 sum of 3,734 ones is 3,744)."""
    lengths = (response_mask != 0).sum(-1)  # [B] int64
    return lengths.sum().item(), (lengths > 0).sum().item()


def loss_scales(response_mask, n_traces=0, loss_agg="token-mean", *, step_tokens=None, step_seqs=None,
                step_traces=None, world=1):
    """The step's loss normaliser, as ``(rl_scale, sft_scale)`` of one micro-batch for ``pact_loss``.

    ``pact_loss`` averages over its own micro-batch; each scale is the micro-batch's share of the step's count
    times the data-parallel world size, so the micro-batch losses add up (and ranks average, as data-parallel
    gradients do) to the loss of the whole step in one batch.

    Args:
        response_mask: ``[B, T]`` 0/1, the micro-batch's rollout rows.
        n_traces: trace sequences in the micro-batch (the SFT term averages over them).
        loss_agg: the RL aggregation: ``token-mean`` counts response tokens, the others non-empty responses.
        step_tokens, step_seqs, step_traces: the same counts over the whole step, all micro-batches and ranks
            (``response_counts`` summed, and the traces); None means this micro-batch is the whole step
            (share 1). A count of 0 beside a micro-batch that holds some is refused (``ValueError``).
        world: data-parallel ranks whose gradients are averaged.
    """
    if loss_agg not in LOSS_AGGS:  # a typo (token_mean) counted responses where the loss averages tokens
        raise ValueError(f"loss_scales: unknown loss_agg {loss_agg!r}; choose one of {LOSS_AGGS}")
    if not world >= 1:  # 0 made every share 0: the whole loss left the step
        raise ValueError(f"loss_scales: world={world} must be >= 1 (the data-parallel ranks)")
    tokens, seqs = response_counts(response_mask)
    local, total = (tokens, step_tokens) if loss_agg == "token-mean" else (seqs, step_seqs)
    names = ("step_tokens" if loss_agg == "token-mean" else "step_seqs", "step_traces")
    return _share(local, total, world, names[0]), _share(n_traces, step_traces, world, names[1])


def _share(local, total, world, name):
    if total is None:
        return 1.0
    if not total and local:  # a share of 0 would drop this micro-batch's term from the loss
        raise ValueError(f"loss_scales: {name}={total} while this micro-batch holds {local}; it counts the whole step, "
                         "this micro-batch included")
    return world * local / total if total else 0.0


def clipped_surrogate_tokens(logp, old_logp, advantages, *, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None):
    """Per-token PPO/GRPO loss ``max(-A rho, -A clip(rho, 1-eps_lo, 1+eps_hi))`` with optional dual clip.

    logp, old_logp: [B, T]; advantages: [B] or [B, T]. Returns (loss [B, T], ratio [B, T],
    clipped_low [B, T] bool, clipped_high [B, T] bool, dual_clipped [B, T] bool).
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape or \
            tuple(advantages.shape) not in ((logp.shape[0],), tuple(logp.shape)):
        raise ValueError(f"clipped_surrogate_tokens: logp and old_logp must be [B, T] and advantages [B] or [B, T]; "
                         f"got {tuple(logp.shape)}, {tuple(old_logp.shape)} and {tuple(advantages.shape)} (1-D "
                         "token rows would broadcast to [N, N])")
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # keeps exp finite on stale or masked tokens
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped_low = (ratio < 1.0 - clip_eps_low) & (adv < 0)
    clipped_high = (ratio > 1.0 + clip_eps_high) & (adv > 0)
    dual_clipped = torch.zeros_like(clipped_low)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_clipped = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    return loss, ratio, clipped_low, clipped_high, dual_clipped


def policy_loss(logp, old_logp, advantages, response_mask, *, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None,
                loss_agg="token-mean", loss_scale_factor=None):
    """Aggregated clipped surrogate and the metrics people watch. Returns (loss, metrics: dict[str, float])."""
    loss_t, ratio, low, high, dual = clipped_surrogate_tokens(
        logp, old_logp, advantages, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip=dual_clip)
    loss = aggregate(loss_t, response_mask, loss_agg, loss_scale_factor)
    return loss, surrogate_metrics(logp, old_logp, ratio, low, high, dual, response_mask)


def surrogate_metrics(logp, old_logp, ratio, clipped_low, clipped_high, dual_clipped, mask, prefix=""):
    m = mask.bool()
    n = max(int(m.sum()), 1)
    with torch.no_grad():
        diff = (old_logp - logp)[m]
        return {
            f"{prefix}clip_frac_low": clipped_low[m].sum().item() / n,
            f"{prefix}clip_frac_high": clipped_high[m].sum().item() / n,
            f"{prefix}dual_clip_frac": dual_clipped[m].sum().item() / n,
            f"{prefix}approx_kl": diff.mean().item() if diff.numel() else 0.0,  # k1 estimate of KL(old || new)
            f"{prefix}ratio_mean": ratio[m].mean().item() if diff.numel() else 1.0,
            f"{prefix}ratio_max": ratio[m].max().item() if diff.numel() else 1.0,
        }


# ---------------------------------------------------------------- anchoring


def anchor_draws(num_groups, q, generator):
    """Bernoulli(q) per prompt group from a seeded generator: True = use the prompt-only surrogate. [G] bool."""
    return torch.rand(num_groups, generator=generator) < q


def anchor_rows(group_ids, num_groups, q, seed, step):
    """Each row's anchoring draw: group g of a step's ``num_groups`` prompt groups gets draw g of
    ``anchor_draws(num_groups, q, anchor_generator(seed, step))``. group_ids: [N] int -> [N] bool.

    With step-wide group ids, rows of one group get the same draw on whichever rank holds them."""
    if not 0.0 <= q <= 1.0:  # NaN too: every draw would be False, as q > 1 makes them all True
        raise ValueError(f"anchor_rows: q={q} must lie in [0, 1] (PACTLossConfig.anchor_q)")
    try:
        group_ids = torch.as_tensor(group_ids)
    except (TypeError, ValueError):  # numpy strings; a list of strings
        raise TypeError("anchor_rows: group_ids must be integers (string ids such as verl's uid: "
                        "numpy.unique(uid, return_inverse=True)[1])") from None
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        # a bool tensor would index the draws as a mask: fewer draws than rows
        raise TypeError(f"anchor_rows: group_ids must be integers, got {group_ids.dtype}")
    if len(group_ids) and not 0 <= int(group_ids.min()) <= int(group_ids.max()) < num_groups:
        raise ValueError(f"anchor_rows: group ids must lie in [0, {num_groups}); got "
                         f"[{int(group_ids.min())}, {int(group_ids.max())}]")
    draws = anchor_draws(num_groups, q, anchor_generator(seed, step))
    return draws[group_ids.cpu()].to(group_ids.device)


def anchor_generator(seed, step):
    """The generator ``pact_loss`` draws from at a given step: reproducible from (seed, step), both integers."""
    return torch.Generator().manual_seed((_integer("seed", seed) * 1_000_003 + _integer("step", step)) % (2 ** 63))


def _integer(name, value):
    """``value`` as an int (numpy's, 0-dim integer tensors' and a float's such as 3.0 too); a fraction or a bool
    refused: int() truncated, and a progress in [0, 1) passed as the step drew the same groups at every step."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            if isinstance(value, float) and value.is_integer():
                return int(value)
    raise ValueError(f"anchoring: {name}={value!r} must be an integer (the step: optimizer steps done, not the "
                     "training progress)" if name == "step" else f"anchoring: {name}={value!r} must be an integer")


# ---------------------------------------------------------------- SFT


def tool_call_weight(progress, beta_0=0.8, beta_1=0.2, s_end=1.0):
    """beta(s): linear from beta_0 at s=0 to beta_1 at s=s_end, constant after."""
    frac = min(max(progress / s_end, 0.0), 1.0)
    return beta_0 + (beta_1 - beta_0) * frac


def reasoning_segments_kept(n_segments, progress, s_end=1.0):
    """ceil(n_k * (1 - s / s_end)): leading reasoning segments of a turn still supervised. Tensor or int."""
    frac = min(max(progress / s_end, 0.0), 1.0)
    if isinstance(n_segments, torch.Tensor):
        return torch.ceil(n_segments.double() * (1.0 - frac) - 1e-9).long()
    return math.ceil(n_segments * (1.0 - frac) - 1e-9)


def sft_weights_before_segments(components, progress, config, dtype=torch.float32):
    """The SFT weights that need no reasoning-segment count: ``(w [S, E] dtype, reasoning)``. ``reasoning`` is
    None when ``w`` is complete (the SFT modes, scale mode); in segment mode it is the [S, E] mask of reasoning
    tokens, whose weights the caller fills from their segments."""
    w = torch.zeros(components.shape, dtype=dtype, device=components.device)
    assistant = (components == REASONING) | (components == TOOL_CALL) | (components == OTHER)
    if config.mode in ("sft", "sft_then_grpo"):
        return w.masked_fill(assistant, 1.0), None
    beta = tool_call_weight(progress, config.beta_0, config.beta_1, config.s_end)
    w = w.masked_fill(components == TOOL_CALL, beta)
    w = w.masked_fill(components == OTHER, config.w_other)
    reasoning = components == REASONING
    if config.sft_reasoning_mode == "scale":
        return w.masked_fill(reasoning, config.w_reason * beta), None
    return w, reasoning


def sft_token_weights(components, segment_ids, turn_ids, progress, config, dtype=torch.float32):
    """Per-token SFT weights ``w_t`` of traces. components/segment_ids/turn_ids: [S, E] int. Returns [S, E] dtype.

    Reasoning (segment mode): ``w_reason`` on the first ``ceil(n_k (1 - s/s_end))`` segments of turn k, else 0;
    (scale mode): ``w_reason * beta(s)`` on all. Tool calls: ``beta(s)``. Tool responses and NONE: 0 (never
    targets). Other assistant tokens: ``w_other``. ``mode='sft'`` (the plain SFT baseline): 1 on every
    assistant token, no annealing.
    """
    w, reasoning = sft_weights_before_segments(components, progress, config, dtype)
    if reasoning is None:
        return w
    # segment mode: n_k = 1 + largest segment id of turn k in each trace
    S, E = components.shape
    turns = turn_ids.long().clamp_min(0)
    n_turns = int(turns.max()) + 1 if turns.numel() else 1
    key = (torch.arange(S, device=w.device)[:, None] * n_turns + turns)[reasoning]  # [n_reasoning]
    seg = segment_ids.long()[reasoning]
    n_seg = torch.zeros(S * n_turns, dtype=torch.long, device=w.device).scatter_reduce_(
        0, key, seg + 1, reduce="amax", include_self=True)
    kept = reasoning_segments_kept(n_seg, progress, config.s_end)
    keep = torch.zeros_like(reasoning)
    keep[reasoning] = seg < kept[key]
    return w.masked_fill(keep, config.w_reason)


def sft_loss(sft_logp, weights, components):
    """``L_SFT = mean over traces of sum_t w_t * nll_t / N_trace`` with N_trace the trace's assistant tokens.

    sft_logp: [S, E] log-probs of trace tokens; weights: [S, E]; components: [S, E]. Returns a scalar.
    Every one of the S rows counts in the mean, a row without assistant tokens as 0: ``loss_scales`` and the
    adapters share the SFT term out by the step's trace rows, so the micro-batch losses add up to the step's
    whichever micro-batch holds such a row (counting only rows with assistant tokens here, they did not).
    """
    sft_logp = at_least_fp32(sft_logp)
    assistant = (components == REASONING) | (components == TOOL_CALL) | (components == OTHER)
    n_trace = assistant.sum(-1).clamp_min(1).to(sft_logp.dtype)  # [S]
    per_trace = (-(sft_logp * weights.to(sft_logp.dtype))).sum(-1) / n_trace
    return per_trace.sum() / max(components.shape[0], 1)


# ---------------------------------------------------------------- regularisers


def kl_penalty(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) from log-probs of sampled tokens. [B, T]."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        neg = (-log_ratio).clamp(max=20.0)
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


# ---------------------------------------------------------------- total


COMPONENT_VALUES = (f"pact_loss: sft_components must hold the labels {NONE}-{OTHER} ("
                    f"{', '.join(f'{k} {v}' for k, v in COMPONENT_NAMES.items())}; "
                    "pact_fast.chat.trace_sequences makes them); another value would be read as none, never a target")


def known_components(components):
    """0-dim bool tensor: every entry of ``components`` is one of the ``COMPONENT_NAMES`` labels."""
    return ((components >= NONE) & (components <= OTHER)).all()


SEGMENT_VALUES = ("pact_loss: sft_segment_ids and sft_turn_ids must be >= 0 on reasoning tokens (the annealing counts "
                  "each turn's segments from them; pact_fast.chat.trace_sequences makes them)")


def known_segments(components, segment_ids, turn_ids):
    """0-dim bool tensor: ``segment_ids`` and ``turn_ids`` ([S, E], as ``components``) are >= 0 on every reasoning
    token (the only tokens whose segment and turn the annealing reads)."""
    return ((components != REASONING) | ((segment_ids >= 0) & (turn_ids >= 0))).all()


ANCHORED_VALUES = ("pact_loss: anchored differs between rollouts of one prompt group (group_ids); it is the group's "
                   "draw, the same on each of its rows (anchor_rows(group_ids, ...) of these rows, in their order)")


def one_draw_per_group(anchored, group_index, n_groups):
    """0-dim bool tensor: the rows of each group (``group_index [B]`` in [0, n_groups)) agree on ``anchored [B]``."""
    hits = torch.zeros(n_groups, dtype=torch.long, device=anchored.device)
    drawn = hits.index_add(0, group_index, anchored.long())[group_index]  # [B] anchored rows of the row's group
    rows = hits.index_add(0, group_index, torch.ones_like(group_index))[group_index]  # [B] rows of the row's group
    return ((drawn == 0) | (drawn == rows)).all()


MASK_VALUES = ("pact_loss: response_mask must hold 0 and 1 only (bool, int or float); token weights are not a mask: "
               "fold them into per-token advantages ([B, T])")


def binary(mask):
    """0-dim bool tensor: every entry of ``mask`` is 0 or 1 (no kernel for a bool mask)."""
    if mask.dtype == torch.bool:
        return torch.ones((), dtype=torch.bool, device=mask.device)
    return ((mask == 0) | (mask == 1)).all()


def per_token_advantages(advantages, mask):
    """Advantages [B] or [B, T] as [B, T] (a view): each row's value on each of its tokens."""
    return advantages.expand(mask.shape) if advantages.dim() == 2 else advantages[:, None].expand(mask.shape)


def check_call(progress, rl_scale, sft_scale):
    """Refuse a progress outside [0, 1] and a loss scale that is negative or not finite (``loss_scales`` makes them
    >= 0; a negative one would turn its terms' gradient around)."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"pact_loss: progress={progress} must lie in [0, 1] (training steps done / total)")
    for name, value in (("rl_scale", rl_scale), ("sft_scale", sft_scale)):
        if not 0.0 <= value < math.inf:
            raise ValueError(f"pact_loss: {name}={value} must be a finite number >= 0 (this micro-batch's share of "
                             "the step, pact_fast.losses.loss_scales)")


def _check_finite(name, tensor, mask=None):
    values = tensor if mask is None else tensor[mask.bool()]
    if not torch.isfinite(values).all():
        raise ValueError(f"pact_loss: {name} contains NaN or inf" + (" on unmasked tokens" if mask is not None else ""))


def _check_gradients(batch, used):
    """Refuse current-policy inputs of which some carry gradients and others do not: one scored under
    ``torch.no_grad()`` or detached by mistake would add its term's value and no gradient (the trace-conditioned
    surrogate, the PACT signal, silently off). ``used``: {field: whether the loss reads it}; empty tensors (a
    micro-batch without traces) are not counted."""
    present = [n for n, on in used.items() if on and getattr(batch, n) is not None and getattr(batch, n).numel()]
    without = [n for n in present if not getattr(batch, n).requires_grad]
    if without and len(without) < len(present):
        carry = [n for n in present if n not in without]
        raise ValueError(f"pact_loss: {', '.join(carry)} {'carries' if len(carry) == 1 else 'carry'} gradients but "
                         f"{', '.join(without)} {'does' if len(without) == 1 else 'do'} not (scored under "
                         "torch.no_grad() or detached?): its terms would add no gradient")


def _require(batch, names, why):
    missing = [n for n in names if getattr(batch, n) is None]
    if missing:
        raise ValueError(f"pact_loss: {why} needs batch fields {missing}")


def pact_loss(batch, config=None, progress=0.0, *, step=0, generator=None, rl_scale=1.0, sft_scale=1.0):
    """The PACT objective: ``L = L_RL + lambda_sft L_SFT + beta_kl KL - c_ent H`` (SPEC section 1).

    Args:
        batch: ``PACTBatch``; which fields are needed depends on the mode (a clear error names any missing).
        config: ``PACTLossConfig`` (default: PACT defaults).
        progress: training progress s in [0, 1] driving the annealing schedules (and sft_then_grpo's switch).
        step: mixed with ``config.seed`` for the anchoring draws when no ``generator`` is given.
        generator: torch.Generator for the Bernoulli anchoring draws.
            Without ``batch.anchored``, the call draws for the groups it holds, by their rank among its group ids:
            right for one call per step holding the step's groups. A step split over micro-batches or ranks passes
            ``batch.anchored`` (``anchor_rows`` with step-wide group ids), or every call would draw the same.
        rl_scale, sft_scale: factors on the RL terms (surrogate, KL, entropy) and on the SFT term, for gradient
            accumulation: a micro-batch's share of the step's response tokens (or sequences) and of its traces
            makes the sum over micro-batches equal the loss of the whole step.

    Returns:
        ``(loss, metrics)``: a scalar tensor (never NaN) and a dict of floats: every loss term, the
        surrogate metrics of each context, anchoring counts and ``skipped_groups`` (groups whose
        response mask selects nothing).
    """
    config = config or PACTLossConfig()
    check_call(progress, rl_scale, sft_scale)
    batch.validate()
    mode = config.mode
    if mode == "sft_then_grpo":
        use_rl, use_sft = progress >= config.switch_progress, progress < config.switch_progress
        rl_kind = "grpo"
    else:
        use_rl, use_sft, rl_kind = mode != "sft", mode != "grpo", mode
    metrics = {}
    device = batch.response_mask.device
    total = torch.zeros((), device=device)

    if use_rl and batch.response_mask.shape[0] == 0:
        use_rl = False  # a micro-batch holding only trace sequences: no RL term here
        metrics["loss/rl"] = 0.0
    # anchoring by anchor_q (a weight, or a draw when the batch brings none): every group anchored at 1, none at 0
    by_q = rl_kind == "pact" and (config.anchor_mode == "mix" or batch.anchored is None)
    _check_gradients(batch, {"logp_po": use_rl and not (by_q and config.anchor_q == 0.0),
                             "logp_tc": use_rl and rl_kind == "pact" and not (by_q and config.anchor_q == 1.0),
                             "entropy": use_rl and config.c_ent > 0, "sft_logp": use_sft and config.lambda_sft > 0})
    if use_rl:
        _require(batch, ["logp_po", "old_logp_po"], f"mode {mode!r} (prompt-only surrogate)")
        if not binary(batch.response_mask):
            raise ValueError(MASK_VALUES)
        mask = batch.response_mask.bool()
        if batch.logp_po.shape != mask.shape:
            raise ValueError(f"pact_loss: logp_po {tuple(batch.logp_po.shape)} must match response_mask "
                             f"{tuple(mask.shape)}")
        token_inputs = {}
        for name in ("logp_po", "old_logp_po", "logp_tc", "old_logp_tc", "behavior_logp", "ref_logp", "entropy"):
            t = getattr(batch, name)
            if t is not None:
                if t.shape != mask.shape:
                    raise ValueError(f"pact_loss: {name} {tuple(t.shape)} must match response_mask {tuple(mask.shape)}")
                _check_finite(name, t, mask)
                # masked tokens become 0 so that nothing non-finite there reaches the loss or its gradient
                t = at_least_fp32(torch.where(mask, t, torch.zeros_like(t)))
            token_inputs[name] = t
        batch = PACTBatch(**{**{f.name: getattr(batch, f.name) for f in fields(batch)}, **token_inputs})
        if batch.advantages is not None:
            adv = batch.advantages
            _check_finite("advantages", per_token_advantages(adv, mask), mask)
        else:
            adv = group_advantages(batch.rewards, batch.group_ids, eps=config.adv_eps,
                                   norm_by_std=config.norm_adv_by_std)
        _, group_index = torch.unique(batch.group_ids, return_inverse=True)
        n_groups = int(group_index.max()) + 1
        tokens_per_group = torch.zeros(n_groups, dtype=torch.float32, device=device).index_add_(0, group_index, mask.sum(-1).float())
        metrics["skipped_groups"] = float((tokens_per_group == 0).sum())
        clip = dict(clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high, dual_clip=config.dual_clip)
        behavior = batch.behavior_logp if batch.behavior_logp is not None else batch.old_logp_po
        po = clipped_surrogate_tokens(batch.logp_po, batch.old_logp_po, adv, **clip)
        metrics.update(surrogate_metrics(batch.logp_po, batch.old_logp_po, *po[1:], mask, prefix="po/"))
        if rl_kind == "grpo":
            token_loss = po[0]
            metrics["anchored_groups"] = float(n_groups)
        else:
            _require(batch, ["logp_tc"], "mode 'pact' (trace-conditioned surrogate)")
            den = batch.old_logp_tc if config.ctx_den == "same" else behavior
            if den is None:
                raise ValueError("pact_loss: ctx_den='same' needs batch field old_logp_tc")
            tc = clipped_surrogate_tokens(batch.logp_tc, den, adv, **clip)
            metrics.update(surrogate_metrics(batch.logp_tc, den, *tc[1:], mask, prefix="tc/"))
            if config.anchor_mode == "mix":
                token_loss = (1.0 - config.anchor_q) * tc[0] + config.anchor_q * po[0]
                metrics["anchored_groups"] = config.anchor_q * n_groups
            else:
                if batch.anchored is not None:
                    per_rollout = batch.anchored.bool().to(device)  # [B]
                    if not one_draw_per_group(per_rollout, group_index, n_groups):
                        raise ValueError(ANCHORED_VALUES)
                    anchored = torch.zeros(n_groups, dtype=torch.bool, device=device).index_fill_(
                        0, group_index[per_rollout], True)
                else:
                    gen = generator or anchor_generator(config.seed, step)
                    anchored = anchor_draws(n_groups, config.anchor_q, gen).to(device)  # [G]
                    per_rollout = anchored[group_index]
                token_loss = torch.where(per_rollout[:, None], po[0], tc[0])
                metrics["anchored_groups"] = float(anchored.sum())
        l_rl = aggregate(token_loss, mask, config.loss_agg, config.loss_scale_factor)
        total = total + rl_scale * l_rl
        metrics["loss/rl"] = l_rl.item()
        metrics["adv_mean"] = adv.mean().item()
        metrics["adv_abs_mean"] = adv.abs().mean().item()
        metrics["reward_mean"] = batch.rewards.float().mean().item()
        if config.beta_kl > 0:
            _require(batch, ["ref_logp"], "beta_kl > 0")
            kl_tokens = kl_penalty(batch.logp_po, batch.ref_logp, config.kl_estimator)
            if config.kl_ratio_weighted:
                kl_tokens = kl_tokens * po[1]  # po[1]: the prompt-only ratio pi_theta / pi_old
            kl = aggregate(kl_tokens, mask, config.loss_agg, config.loss_scale_factor)
            total = total + rl_scale * config.beta_kl * kl
            metrics["loss/kl"] = kl.item()
        if config.c_ent > 0:
            _require(batch, ["entropy"], "c_ent > 0")
            ent = aggregate(batch.entropy, mask, config.loss_agg, config.loss_scale_factor)
            total = total - rl_scale * config.c_ent * ent
            metrics["entropy"] = ent.item()

    if use_sft and config.lambda_sft > 0:
        _require(batch, ["sft_logp", "sft_components"], f"mode {mode!r} (trace SFT)")
        if batch.sft_components.shape != batch.sft_logp.shape:
            raise ValueError(f"pact_loss: sft_components {tuple(batch.sft_components.shape)} must match sft_logp "
                             f"{tuple(batch.sft_logp.shape)}")
        if not known_components(batch.sft_components):
            raise ValueError(COMPONENT_VALUES)
        target = batch.sft_components != NONE
        _check_finite("sft_logp", batch.sft_logp, target & (batch.sft_components != TOOL_RESPONSE))
        # segment labels only where there are trace tokens to label
        needs_segments = mode == "pact" and config.sft_reasoning_mode == "segment" and len(batch.sft_components)
        if needs_segments:
            _require(batch, ["sft_segment_ids", "sft_turn_ids"], "sft_reasoning_mode='segment'")
            if not known_segments(batch.sft_components, batch.sft_segment_ids, batch.sft_turn_ids):
                raise ValueError(SEGMENT_VALUES)
        zeros = torch.zeros_like(batch.sft_components)
        sft_logp = at_least_fp32(batch.sft_logp)
        weights = sft_token_weights(batch.sft_components,
                                    batch.sft_segment_ids if batch.sft_segment_ids is not None else zeros,
                                    batch.sft_turn_ids if batch.sft_turn_ids is not None else zeros, progress, config,
                                    dtype=sft_logp.dtype)
        logp = torch.where(weights > 0, sft_logp, torch.zeros_like(sft_logp))
        l_sft = sft_loss(logp, weights, batch.sft_components)
        total = total + sft_scale * config.lambda_sft * l_sft
        metrics["loss/sft"] = l_sft.item()
        metrics["sft_weight_mean"] = weights[target].mean().item() if target.any() else 0.0
        for comp in (REASONING, TOOL_CALL, OTHER):  # the annealing, component by component
            sel = batch.sft_components == comp
            if sel.any():
                metrics[f"sft_weight/{COMPONENT_NAMES[comp]}"] = weights[sel].mean().item()
        metrics["tool_call_weight"] = tool_call_weight(progress, config.beta_0, config.beta_1, config.s_end)

    if not total.requires_grad:  # nothing reached the loss (an empty micro-batch): a zero on the inputs' graph
        for t in (batch.logp_po, batch.logp_tc, batch.sft_logp, batch.entropy):
            if t is not None and t.requires_grad:
                total = total + t.reshape(-1)[:0].sum()  # an empty sum: 0 even where masked values are NaN
    if not torch.isfinite(total):
        raise FloatingPointError(f"pact_loss: the loss is not finite ({total.item()}); metrics: {metrics}")
    metrics["loss/total"] = total.item()
    metrics["progress"] = float(progress)
    return total, metrics


# ---------------------------------------------------------------- off-policy correction


def truncated_importance_weights(logp, behavior_logp, response_mask, cap):
    """Truncated importance sampling (TIS) for rollouts sampled by another engine than the trainer (vLLM).

    ``w_t = min(exp(logp_t - behavior_logp_t), cap)`` per sampled token: the trainer's old policy over the
    sampler's probability of the token, capped. A weight multiplies the token's clipped surrogate; the
    surrogate is positively homogeneous in the advantage, so callers pass ``A_i w_t`` as a ``[B, T]`` advantage
    (docs/method.md, "Off-policy correction").

    Args:
        logp: [B, T] the trainer's log-probs of the sampled tokens under the sampling context, no gradient.
        behavior_logp: [B, T] the sampler's log-probs of the same tokens.
        response_mask: [B, T] 1 on sampled tokens.
        cap: C >= 1.

    Returns:
        ``(weights [B, T] fp32, 0 off the mask, metrics)``; metrics: ``rollout/logp_mismatch_mean`` and
        ``rollout/logp_mismatch_max`` (mean and max of ``|logp - behavior_logp|`` over sampled tokens),
        ``rollout/is_clipped_frac`` (share of sampled tokens whose ratio exceeded the cap), ``rollout/is_weight_mean``.
    """
    if not cap >= 1:
        raise ValueError(f"truncated_importance_weights: cap={cap} must be >= 1")
    if logp.shape != behavior_logp.shape or logp.shape != response_mask.shape:
        raise ValueError(f"truncated_importance_weights: logp {tuple(logp.shape)}, behavior_logp "
                         f"{tuple(behavior_logp.shape)} and response_mask {tuple(response_mask.shape)} must match")
    mask = response_mask.bool()
    diff = torch.where(mask, logp.detach().float() - behavior_logp.float(), torch.zeros_like(logp, dtype=torch.float32))
    if not torch.isfinite(diff[mask]).all():
        raise ValueError("truncated_importance_weights: logp or behavior_logp is NaN or inf on a sampled token")
    ratio = diff.exp()
    weights = torch.where(mask, ratio.clamp(max=cap), torch.zeros_like(ratio))  # [B, T]
    n = mask.sum().clamp(min=1)
    metrics = {"rollout/logp_mismatch_mean": float(diff.abs().sum() / n),
               "rollout/logp_mismatch_max": float(diff.abs().max()) if mask.any() else 0.0,
               "rollout/is_clipped_frac": float(((ratio > cap) & mask).sum() / n),
               "rollout/is_weight_mean": float(weights.sum() / n)}
    return weights, metrics
