"""``pact_loss`` without host synchronisation: its per-token gradients in closed form, its value and metrics.

Every PACT term is a sum over tokens of a function of the token's own log-prob (and entropy) and of
constants fixed before the log-probs exist: advantages, old / behaviour / reference log-probs,
aggregation weights (from token and response counts), the anchoring draw, SFT weights, clip settings
(SPEC section 7, last paragraph). ``prepare`` computes those constants once, on the device of the batch,
without reading device memory on the host (no ``.item()``, ``unique``, ``nonzero`` or boolean indexing:
group ranks come from a sort, counts stay tensors). Then

- ``surrogate_grad``, ``kl_grad``: d/d logp of one token's clipped surrogate and KL estimate, elementwise,
  equal to autograd of ``losses.clipped_surrogate_tokens`` / ``kl_penalty`` including its tie rules
  (``torch.maximum`` / ``minimum`` split a tie's gradient in halves; ``clamp`` passes it at the bounds);
- ``token_grads``: d pact_loss / d (logp_po, logp_tc, sft_logp, entropy), tensors shaped like the batch's;
- ``loss_and_metrics``: the value of ``pact_loss`` and its metrics as device tensors, resolved to floats by
  one ``tolist`` in ``Metrics.resolve``, which raises where ``pact_loss`` would (non-finite inputs:
  ``ValueError``; a non-finite loss: ``FloatingPointError``).

``pact_fast.ops.fused_pact_head`` evaluates ``token_grads``' terms per row inside its pass over the
vocabulary; tests/test_loss_grads.py holds them to float64 autograd of ``pact_loss`` for every mode,
aggregation, anchoring setting, KL estimator and clip option.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .losses import (ANCHORED_VALUES, COMPONENT_VALUES, MASK_VALUES, NONE, OTHER, REASONING, SEGMENT_VALUES,
                     TOOL_CALL, TOOL_RESPONSE, COMPONENT_NAMES, PACTBatch, PACTLossConfig, aggregate, anchor_generator,
                     binary, check_call, clipped_surrogate_tokens, known_components, known_segments, kl_penalty,
                     one_draw_per_group, per_token_advantages, reasoning_segments_kept, sft_weights_before_segments,
                     tool_call_weight)

LOG_RATIO_CLAMP = 20.0  # clipped_surrogate_tokens clamps logp - old_logp to [-20, 20]
KL_CLAMP = 20.0  # kl_penalty's k3 clamps -(logp - ref_logp) to <= 20


def dense_groups(group_ids):
    """(index [B] int64 in [0, G), G as a 0-dim int64 tensor): each rollout's rank among the distinct group ids
    in increasing order (``torch.unique(..., return_inverse=True)``'s inverse), from a sort: no sync."""
    sorted_ids, order = torch.sort(group_ids, stable=True)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    rank = new.long().cumsum(0) - 1
    return torch.empty_like(rank).scatter_(0, order, rank), new.sum()


def group_advantages(rewards, group_ids, *, eps=1e-6, norm_by_std=True):
    """``losses.group_advantages`` without a sync: (advantages [B], rewards_finite 0-dim bool). The caller
    refuses non-finite rewards after its one sync (``Metrics.resolve``). Computed in fp64 as there."""
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(torch.float64)
    inv, _ = dense_groups(group_ids)
    zeros = torch.zeros(r.shape[0], device=r.device, dtype=r.dtype)  # [B] >= G buckets
    count = zeros.index_add(0, inv, torch.ones_like(r))
    mean = zeros.index_add(0, inv, r) / count.clamp_min(1)
    lowest = zeros.scatter_reduce(0, inv, r, reduce="amin", include_self=False)
    highest = zeros.scatter_reduce(0, inv, r, reduce="amax", include_self=False)
    constant = (lowest == highest)[inv]
    centered = torch.where(constant, torch.zeros_like(r), r - mean[inv])
    finite = torch.isfinite(rewards).all()
    if not norm_by_std:
        return centered.to(out_dtype), finite
    sq = zeros.index_add(0, inv, centered ** 2)
    std = torch.sqrt(sq / (count - 1).clamp_min(1))
    return (centered / (std[inv] + eps)).to(out_dtype), finite


def sft_weights(components, segment_ids, turn_ids, progress, config, dtype=torch.float32):
    """``losses.sft_token_weights`` without a sync: [S, E] dtype. The segment count of each (trace, turn) is a
    segmented max over the turn's dense rank within its trace (a sort along E), not over ``max(turn) + 1``
    buckets."""
    w, reasoning = sft_weights_before_segments(components, progress, config, dtype)
    if reasoning is None:
        return w
    S, E = components.shape
    if S * E == 0:
        return w
    turns = turn_ids.long().clamp_min(0)
    sorted_turns, order = torch.sort(turns, dim=1, stable=True)  # [S, E]
    new = torch.ones_like(sorted_turns, dtype=torch.bool)
    new[:, 1:] = sorted_turns[:, 1:] != sorted_turns[:, :-1]
    rank = torch.empty_like(order).scatter_(1, order, new.long().cumsum(1) - 1)  # [S, E] turn rank in [0, E)
    key = torch.arange(S, device=w.device)[:, None] * E + rank  # [S, E] one bucket per (trace, turn)
    seg = segment_ids.long()
    n_seg = torch.zeros(S * E, dtype=torch.long, device=w.device).scatter_reduce_(
        0, key.reshape(-1), torch.where(reasoning, seg + 1, torch.zeros_like(seg)).reshape(-1), reduce="amax",
        include_self=True)
    kept = reasoning_segments_kept(n_seg, progress, config.s_end)
    keep = reasoning & (seg < kept[key])
    return w.masked_fill(keep, config.w_reason)


def surrogate_grad(logp, den, adv, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, upstream=None):
    """d/d logp of ``clipped_surrogate_tokens``' per-token loss at logp, ratio denominator ``den`` (a tensor,
    or None: the token's own log-prob, detached, so the ratio is 1) and advantage ``adv`` (broadcastable), times
    ``upstream`` (the token loss's own gradient; None: 1).

    loss = max(-A rho, -A clip(rho, 1 - lo, 1 + hi)), rho = exp(clamp(logp - den, -20, 20)); with a dual clip
    c, min(loss, -A c) where A < 0. Elementwise, any shape; the products in autograd's order, so fp32 results
    round as autograd's do."""
    raw = logp - den if den is not None else torch.zeros_like(logp)
    ratio = torch.exp(raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    g = torch.ones_like(ratio) if upstream is None else upstream.expand_as(ratio)
    zero = torch.zeros_like(g)
    low, high = 1.0 - clip_eps_low, 1.0 + clip_eps_high
    neg_adv = -adv
    unclipped = neg_adv * ratio
    clipped = neg_adv * ratio.clamp(low, high)
    if dual_clip is not None:
        loss = torch.maximum(unclipped, clipped)
        bound = -adv * dual_clip
        g_min = torch.where(loss == bound, g / 2, g).masked_fill(loss > bound, 0.0)
        g = torch.where(adv < 0, g_min, zero) + torch.where(adv < 0, zero, g)
    g_unclipped = torch.where(unclipped == clipped, g / 2, g).masked_fill(unclipped < clipped, 0.0)
    g_clipped = torch.where(unclipped == clipped, g / 2, g).masked_fill(unclipped > clipped, 0.0)
    g_ratio = g_unclipped * neg_adv + torch.where((ratio >= low) & (ratio <= high), g_clipped * neg_adv, zero)
    return torch.where((raw >= -LOG_RATIO_CLAMP) & (raw <= LOG_RATIO_CLAMP), g_ratio * ratio, zero)


def kl_grad(logp, ref_logp, estimator, upstream=None):
    """d/d logp of ``kl_penalty(logp, ref_logp, estimator)`` times ``upstream`` (None: 1), elementwise, in
    autograd's order."""
    log_ratio = logp - ref_logp
    g = torch.ones_like(log_ratio) if upstream is None else upstream.expand_as(log_ratio)
    if estimator == "k1":
        return g
    if estimator == "k2":
        return (g * 0.5) * (2 * log_ratio)
    neg = -log_ratio
    return -torch.where(neg <= KL_CLAMP, g * torch.exp(neg.clamp(max=KL_CLAMP)) - g, torch.zeros_like(g))


@dataclass
class Prepared:
    """What ``pact_loss`` computes before it reads a current log-prob, as device tensors. RL fields [B, T]
    (advantages broadcast), None when that term is off; SFT fields [S, E]."""

    config: PACTLossConfig
    progress: float
    rl_scale: float
    sft_scale: float
    use_rl: bool
    use_sft: bool
    rl_kind: str  # "pact" | "grpo"
    old_from_current: bool
    rl_empty: bool  # the RL term is on but the batch has no rollout rows
    batch: PACTBatch  # masked token inputs (0 off the response mask) and advantages
    mask: Optional[torch.Tensor] = None  # [B, T] bool
    adv: Optional[torch.Tensor] = None  # [B] or [B, T]
    agg_weight: Optional[torch.Tensor] = None  # [B, T] d total / d token loss: rl_scale / the aggregation's count
    kl_weight: Optional[torch.Tensor] = None  # [B, T] d total / d token KL estimate (beta_kl > 0)
    ent_weight: Optional[torch.Tensor] = None  # [B, T] d total / d token entropy (c_ent > 0)
    po_share: Optional[torch.Tensor] = None  # [B, T] the prompt-only surrogate's share of a token's loss
    tc_share: Optional[torch.Tensor] = None  # [B, T] the trace-conditioned surrogate's share (None: grpo)
    tc_den: Optional[torch.Tensor] = None  # [B, T] L_TC's ratio denominator (None: logp_tc itself)
    per_rollout: Optional[torch.Tensor] = None  # [B] bool, bernoulli anchoring
    n_groups: Optional[torch.Tensor] = None  # 0-dim int64
    group_index: Optional[torch.Tensor] = None  # [B]
    rewards_finite: Optional[torch.Tensor] = None  # 0-dim bool (None: advantages given)
    sft_w: Optional[torch.Tensor] = None  # [S, E] SFT token weights (0 where logp is not a target)
    sft_grad: Optional[torch.Tensor] = None  # [S, E] d pact_loss / d sft_logp (constant)
    generator: Optional[torch.Generator] = None  # the caller's anchoring generator, to advance by G draws


def _require(batch, names, why, have):
    missing = [n for n in names if getattr(batch, n) is None and n not in have]
    if missing:
        raise ValueError(f"pact_loss: {why} needs batch fields {missing}")


def prepare(batch, config=None, progress=0.0, *, step=0, generator=None, rl_scale=1.0, sft_scale=1.0,
            old_from_current=False, scored=("logp_tc", "logp_po", "sft_logp", "entropy"), dtype=None):
    """The per-token constants of ``pact_loss(batch, config, progress, ...)`` (same arguments), with the
    current-policy fields named in ``scored`` still to come (they may be None in ``batch``);
    ``old_from_current``: ``old_logp_tc`` / ``old_logp_po`` are those current values, detached; ``dtype``: the
    float dtype those will have (the constants are made in at least that precision). Host checks only (shapes,
    options); checks of values are deferred to ``Metrics.resolve``."""
    config = config or PACTLossConfig()
    check_call(progress, rl_scale, sft_scale)
    batch.validate()
    have = set(scored) | ({"old_logp_tc", "old_logp_po"} if old_from_current else set())
    mode = config.mode
    if mode == "sft_then_grpo":
        use_rl, use_sft, rl_kind = progress >= config.switch_progress, progress < config.switch_progress, "grpo"
    else:
        use_rl, use_sft, rl_kind = mode != "sft", mode != "grpo", mode
    rl_empty = use_rl and batch.response_mask.shape[0] == 0  # only trace sequences: no RL term here
    prep = Prepared(config, progress, rl_scale, sft_scale, use_rl and not rl_empty, use_sft and config.lambda_sft > 0,
                    rl_kind, old_from_current, rl_empty, batch)
    if prep.use_rl:
        _prepare_rl(prep, batch, config, step, generator, have, dtype)
    if prep.use_sft:
        _require(batch, ["sft_logp", "sft_components"], f"mode {mode!r} (trace SFT)", have)
        comps = batch.sft_components
        if mode == "pact" and config.sft_reasoning_mode == "segment" and len(comps):  # traces to label
            _require(batch, ["sft_segment_ids", "sft_turn_ids"], "sft_reasoning_mode='segment'", have)
        zeros = torch.zeros_like(comps)
        dtype = batch.sft_logp.dtype if batch.sft_logp is not None else torch.promote_types(
            batch.response_mask.dtype, dtype or torch.float32)
        w = sft_weights(comps, batch.sft_segment_ids if batch.sft_segment_ids is not None else zeros,
                        batch.sft_turn_ids if batch.sft_turn_ids is not None else zeros, progress, config, dtype=dtype)
        assistant = (comps == REASONING) | (comps == TOOL_CALL) | (comps == OTHER)
        n_trace = assistant.sum(-1).clamp_min(1).to(dtype)  # [S]
        n_rows = max(comps.shape[0], 1)  # every trace row counts in the mean (losses.sft_loss)
        prep.sft_w = w
        scale = torch.full((), sft_scale * config.lambda_sft, dtype=dtype, device=w.device)  # d total / d L_SFT
        prep.sft_grad = torch.where(w > 0, -((scale / n_rows) / n_trace[:, None]) * w, torch.zeros_like(w))
    return prep


def _prepare_rl(prep, batch, config, step, generator, have, scored_dtype=None):
    _require(batch, ["logp_po", "old_logp_po"], f"mode {config.mode!r} (prompt-only surrogate)", have)
    mask = batch.response_mask.bool()
    for name in ("logp_po", "old_logp_po", "logp_tc", "old_logp_tc", "behavior_logp", "ref_logp", "entropy"):
        t = getattr(batch, name)
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"pact_loss: {name} {tuple(t.shape)} must match response_mask {tuple(mask.shape)}")
    if prep.rl_kind == "pact":
        _require(batch, ["logp_tc"], "mode 'pact' (trace-conditioned surrogate)", have)
        if config.ctx_den == "same" and batch.old_logp_tc is None and not prep.old_from_current:
            raise ValueError("pact_loss: ctx_den='same' needs batch field old_logp_tc")
        if config.ctx_den == "behavior" and batch.behavior_logp is None and prep.old_from_current:
            raise ValueError("loss_grads: ctx_den='behavior' with old_from_current needs batch.behavior_logp "
                             "(L_TC's denominator would be another row's current log-prob)")
    if config.beta_kl > 0:
        _require(batch, ["ref_logp"], "beta_kl > 0", have)
    if config.c_ent > 0:
        _require(batch, ["entropy"], "c_ent > 0", have)
    prep.mask = mask
    # the aggregation weights in the precision of the log-probs (float64 ones with a float32 or integer mask)
    dtype = torch.promote_types(batch.response_mask.dtype, scored_dtype or torch.float32)
    for t in (batch.old_logp_po, batch.old_logp_tc, batch.behavior_logp, batch.ref_logp, batch.logp_po):
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    fm = mask.to(dtype)
    seq_tokens = fm.sum(-1)  # [B]
    n_seq = (seq_tokens > 0).sum().clamp_min(1)

    def per_token(factor):
        """factor x d aggregate / d token value [B, T], divided as autograd divides (0 off the mask)."""
        scale = torch.full((), factor, dtype=fm.dtype, device=fm.device)
        if config.loss_agg == "token-mean":
            per = (scale / seq_tokens.sum().clamp_min(1)).expand_as(seq_tokens)
        elif config.loss_agg == "seq-mean-token-mean":
            per = (scale / n_seq) / seq_tokens.clamp_min(1)
        else:
            per = (scale / (n_seq * (config.loss_scale_factor or mask.shape[-1]))).expand_as(seq_tokens)
        return torch.where(mask, per[:, None].expand_as(fm), torch.zeros_like(fm))

    prep.agg_weight = per_token(prep.rl_scale)
    prep.kl_weight = per_token(prep.rl_scale * config.beta_kl) if config.beta_kl > 0 else None
    prep.ent_weight = per_token(-(prep.rl_scale * config.c_ent)) if config.c_ent > 0 else None
    group_index, n_groups = dense_groups(batch.group_ids)
    prep.group_index, prep.n_groups = group_index, n_groups
    if batch.advantages is not None:
        prep.adv = batch.advantages
    else:
        prep.adv, prep.rewards_finite = group_advantages(batch.rewards, batch.group_ids, eps=config.adv_eps,
                                                         norm_by_std=config.norm_adv_by_std)
    ones = torch.ones_like(fm)
    if prep.rl_kind == "grpo":
        prep.po_share = ones
    elif config.anchor_mode == "mix":
        prep.po_share, prep.tc_share = config.anchor_q * ones, (1.0 - config.anchor_q) * ones
    else:
        if batch.anchored is not None:
            per_rollout = batch.anchored.bool()
        else:  # anchor_draws(G, q, gen)[g]: rand(B)'s first G values are rand(G)'s (one generator stream)
            gen = anchor_generator(config.seed, step)
            if generator is not None:  # drawn from a copy; Metrics.resolve advances the caller's by G, as pact_loss
                gen.set_state(generator.get_state())
                prep.generator = generator
            draws = torch.rand(mask.shape[0], generator=gen) < config.anchor_q  # [B] >= G draws
            per_rollout = draws.to(mask.device, non_blocking=True)[group_index]
        prep.per_rollout = per_rollout
        prep.po_share = torch.where(per_rollout[:, None], ones, torch.zeros_like(ones))
        prep.tc_share = 1.0 - prep.po_share
    if prep.rl_kind == "pact":
        behavior = batch.behavior_logp if batch.behavior_logp is not None else batch.old_logp_po
        prep.tc_den = batch.old_logp_tc if config.ctx_den == "same" else behavior
        if prep.old_from_current and config.ctx_den == "same":
            prep.tc_den = None


def _masked(t, mask):
    return None if t is None else torch.where(mask, t, torch.zeros_like(t))


@dataclass
class SurrogateTerm:
    """One context's share of the RL loss as per-token constants (tensors of one shape: the batch's [B, T],
    or per row of a fused head): ``weight`` (rl_scale x aggregation weight x anchoring share, 0 off the mask),
    ``adv``, ratio denominator ``den`` (None: the token's own log-prob, detached), and for the prompt-only
    context the KL term's ``kl_weight`` (rl_scale x aggregation weight x beta_kl) and ``ref``."""

    weight: torch.Tensor
    adv: torch.Tensor
    den: Optional[torch.Tensor]
    config: PACTLossConfig
    kl_weight: Optional[torch.Tensor] = None
    ref: Optional[torch.Tensor] = None

    def grad(self, logp):
        """d loss / d logp, elementwise over the constants' shape."""
        c = self.config
        g = surrogate_grad(logp, self.den, self.adv, c.clip_eps_low, c.clip_eps_high, c.dual_clip, self.weight)
        if self.kl_weight is None:
            return g
        if not c.kl_ratio_weighted:
            return g + kl_grad(logp, self.ref, c.kl_estimator, self.kl_weight)
        raw = logp - self.den if self.den is not None else torch.zeros_like(logp)
        ratio = torch.exp(raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        d_ratio = torch.where(raw.abs() <= LOG_RATIO_CLAMP, ratio, torch.zeros_like(ratio))
        g_kl = kl_grad(logp, self.ref, c.kl_estimator, self.kl_weight * ratio)
        return g + g_kl + self.kl_weight * kl_penalty(logp, self.ref, c.kl_estimator) * d_ratio

    def map(self, fn):
        """The same term with ``fn`` applied to every tensor (e.g. to move it to another layout)."""
        return SurrogateTerm(*(fn(t) if isinstance(t, torch.Tensor) else t for t in
                               (self.weight, self.adv, self.den, self.config, self.kl_weight, self.ref)))


def token_terms(prep):
    """The per-token constants of every term's gradient: ``{"logp_po": SurrogateTerm, "logp_tc": SurrogateTerm,
    "entropy": [B, T] constant gradient, "sft_logp": [S, E] constant gradient}``, a key absent when its term is
    off. [B, T] tensors are 0 off the response mask."""
    out = {}
    c = prep.config
    if prep.use_rl:
        mask = prep.mask
        adv = prep.adv[:, None] if prep.adv.dim() == 1 else prep.adv
        adv = torch.where(mask, adv.expand(mask.shape), torch.zeros((), dtype=adv.dtype, device=adv.device))
        weight = prep.agg_weight
        old_po = None if prep.old_from_current else _masked(prep.batch.old_logp_po, mask)
        kl = dict(kl_weight=prep.kl_weight, ref=_masked(prep.batch.ref_logp, mask)) if c.beta_kl > 0 else {}
        out["logp_po"] = SurrogateTerm(weight * prep.po_share, adv, old_po, c, **kl)
        if prep.tc_share is not None:
            out["logp_tc"] = SurrogateTerm(weight * prep.tc_share, adv, _masked(prep.tc_den, mask), c)
        if c.c_ent > 0:
            out["entropy"] = prep.ent_weight
    if prep.use_sft:
        out["sft_logp"] = prep.sft_grad
    return out


def token_grads(prep, logp_po=None, logp_tc=None):
    """d pact_loss / d (logp_po [B, T], logp_tc [B, T], sft_logp [S, E], entropy [B, T]) at the given current
    log-probs, as a dict (a field absent when its term is off): ``token_terms`` evaluated."""
    current = {"logp_po": logp_po, "logp_tc": logp_tc}
    out = {}
    for name, term in token_terms(prep).items():
        if isinstance(term, SurrogateTerm):
            g = term.grad(_masked(current[name], prep.mask))
            out[name] = torch.where(prep.mask, g, torch.zeros_like(g))
        else:
            out[name] = term
    return out


@dataclass
class Metrics:
    """Metric values as device tensors (or host floats), the checks ``pact_loss`` makes, and the keys that
    exist only where a 0-dim bool tensor holds; ``resolve`` reads them all with one ``tolist``."""

    entries: list  # (key, value: 0-dim tensor | float, present: 0-dim bool tensor | None)
    checks: list  # (ok: 0-dim bool tensor, exception type, message)
    total: torch.Tensor
    generator: Optional[torch.Generator] = None  # advanced by n_groups draws once they are read
    n_groups: Optional[torch.Tensor] = None

    def resolve(self):
        """The metrics dict of ``pact_loss``; raises what it raises. One host synchronisation."""
        tensors = [v for _, v, _ in self.entries if isinstance(v, torch.Tensor)]
        tensors += [p for _, _, p in self.entries if p is not None]
        tensors += [ok for ok, _, _ in self.checks] + [torch.isfinite(self.total)]
        tensors += [self.n_groups] if self.generator is not None else []
        values = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist()) if tensors else iter(())
        got = [next(values) if isinstance(v, torch.Tensor) else float(v) for _, v, _ in self.entries]
        present = [bool(next(values)) if p is not None else True for _, _, p in self.entries]
        for _, exc, message in self.checks:
            if not next(values):
                raise exc(message)
        finite = bool(next(values))
        if self.generator is not None:
            torch.rand(int(next(values)), generator=self.generator)  # pact_loss's anchor_draws(G, ...)
        metrics = {key: value for (key, _, _), value, keep in zip(self.entries, got, present) if keep}
        if not finite:
            raise FloatingPointError(f"pact_loss: the loss is not finite ({metrics['loss/total']}); metrics: "
                                     f"{metrics}")
        return metrics


def _surrogate_entries(logp, old_logp, ratio, low, high, dual, mask, prefix):
    count = mask.sum()
    n = count.clamp_min(1).to(torch.float64)
    some = count > 0

    def mean(x):
        return torch.where(mask, x, torch.zeros_like(x)).sum() / n

    diff = old_logp - logp
    return [(f"{prefix}clip_frac_low", mean(low.double()), None),
            (f"{prefix}clip_frac_high", mean(high.double()), None),
            (f"{prefix}dual_clip_frac", mean(dual.double()), None),
            (f"{prefix}approx_kl", torch.where(some, mean(diff), 0.0), None),
            (f"{prefix}ratio_mean", torch.where(some, mean(ratio), 1.0), None),
            (f"{prefix}ratio_max", torch.where(some, torch.where(mask, ratio, float("-inf")).amax(), 1.0), None)]


def loss_and_metrics(prep, logp_po=None, logp_tc=None, sft_logp=None, entropy=None):
    """(loss, Metrics): the value of ``pact_loss`` at these current values (tensors shaped like the batch's;
    with ``old_from_current`` the old log-probs are these, detached) and its metrics, unresolved."""
    c = prep.config
    b = prep.batch
    entries, checks = [], []
    total = torch.zeros((), device=b.response_mask.device)
    if prep.use_rl:
        mask = prep.mask
        old_po = logp_po.detach() if prep.old_from_current else b.old_logp_po
        old_tc = logp_tc.detach() if prep.old_from_current and logp_tc is not None else b.old_logp_tc
        inputs = {"logp_po": logp_po, "old_logp_po": old_po, "logp_tc": logp_tc, "old_logp_tc": old_tc,
                  "behavior_logp": b.behavior_logp, "ref_logp": b.ref_logp, "entropy": entropy}
        checks.append((binary(b.response_mask), ValueError, MASK_VALUES))
        for name, t in inputs.items():
            if t is not None:
                checks.append((torch.isfinite(torch.where(mask, t, torch.zeros_like(t))).all(), ValueError,
                               f"pact_loss: {name} contains NaN or inf on unmasked tokens"))
        if prep.rewards_finite is not None:
            checks.append((prep.rewards_finite, ValueError, "group_advantages: rewards contain NaN or inf"))
        else:  # advantages given
            adv_tokens = per_token_advantages(prep.adv, mask)
            checks.append((torch.isfinite(torch.where(mask, adv_tokens, torch.zeros_like(adv_tokens))).all(),
                           ValueError, "pact_loss: advantages contains NaN or inf on unmasked tokens"))
        t = {k: _masked(v, mask) for k, v in inputs.items()}
        adv = prep.adv
        counts = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device).index_add_(
            0, prep.group_index, mask.sum(-1))
        real_group = torch.arange(mask.shape[0], device=mask.device) < prep.n_groups
        entries.append(("skipped_groups", ((counts == 0) & real_group).sum(), None))
        clip = dict(clip_eps_low=c.clip_eps_low, clip_eps_high=c.clip_eps_high, dual_clip=c.dual_clip)
        po = clipped_surrogate_tokens(t["logp_po"], t["old_logp_po"], adv, **clip)
        entries += _surrogate_entries(t["logp_po"], t["old_logp_po"], *po[1:], mask, "po/")
        if prep.rl_kind == "grpo":
            token_loss = po[0]
            entries.append(("anchored_groups", prep.n_groups, None))
        else:
            behavior = t["behavior_logp"] if t["behavior_logp"] is not None else t["old_logp_po"]
            den = t["old_logp_tc"] if c.ctx_den == "same" else behavior
            tc = clipped_surrogate_tokens(t["logp_tc"], den, adv, **clip)
            entries += _surrogate_entries(t["logp_tc"], den, *tc[1:], mask, "tc/")
            if c.anchor_mode == "mix":
                token_loss = (1.0 - c.anchor_q) * tc[0] + c.anchor_q * po[0]
                entries.append(("anchored_groups", c.anchor_q * prep.n_groups.double(), None))
            else:
                token_loss = torch.where(prep.per_rollout[:, None], po[0], tc[0])
                entries.append(("anchored_groups", _anchored_groups(prep), None))
                if b.anchored is not None:
                    checks.append((one_draw_per_group(prep.per_rollout, prep.group_index, mask.shape[0]), ValueError,
                                   ANCHORED_VALUES))
        l_rl = aggregate(token_loss, mask, c.loss_agg, c.loss_scale_factor)
        total = total + prep.rl_scale * l_rl
        entries += [("loss/rl", l_rl, None), ("adv_mean", adv.mean(), None), ("adv_abs_mean", adv.abs().mean(), None),
                    ("reward_mean", b.rewards.float().mean(), None)]
        if c.beta_kl > 0:
            kl_tokens = kl_penalty(t["logp_po"], t["ref_logp"], c.kl_estimator)
            if c.kl_ratio_weighted:
                kl_tokens = kl_tokens * po[1]
            kl = aggregate(kl_tokens, mask, c.loss_agg, c.loss_scale_factor)
            total = total + prep.rl_scale * c.beta_kl * kl
            entries.append(("loss/kl", kl, None))
        if c.c_ent > 0:
            ent = aggregate(t["entropy"], mask, c.loss_agg, c.loss_scale_factor)
            total = total - prep.rl_scale * c.c_ent * ent
            entries.append(("entropy", ent, None))
    elif prep.rl_empty:
        entries.append(("loss/rl", 0.0, None))  # RL on, but no rollout rows in this micro-batch
    if prep.use_sft:
        comps = b.sft_components
        if comps.shape != sft_logp.shape:
            raise ValueError(f"pact_loss: sft_components {tuple(comps.shape)} must match sft_logp "
                             f"{tuple(sft_logp.shape)}")
        checks.append((known_components(comps), ValueError, COMPONENT_VALUES))
        if c.mode == "pact" and c.sft_reasoning_mode == "segment" and len(comps):  # the annealing reads them
            checks.append((known_segments(comps, b.sft_segment_ids, b.sft_turn_ids), ValueError, SEGMENT_VALUES))
        target = comps != NONE
        checked = target & (comps != TOOL_RESPONSE)
        checks.append((torch.isfinite(torch.where(checked, sft_logp, torch.zeros_like(sft_logp))).all(), ValueError,
                       "pact_loss: sft_logp contains NaN or inf on unmasked tokens"))
        w = prep.sft_w
        logp = torch.where(w > 0, sft_logp, torch.zeros_like(sft_logp))
        assistant = (comps == REASONING) | (comps == TOOL_CALL) | (comps == OTHER)
        n_trace = assistant.sum(-1).clamp_min(1).to(logp.dtype)
        per_trace = (-(logp * w.to(logp.dtype))).sum(-1) / n_trace
        l_sft = per_trace.sum() / max(comps.shape[0], 1)  # every trace row counts (losses.sft_loss)
        total = total + prep.sft_scale * c.lambda_sft * l_sft
        entries.append(("loss/sft", l_sft, None))
        entries.append(("sft_weight_mean", _mean_where(w, target), None))
        for comp in (REASONING, TOOL_CALL, OTHER):
            sel = comps == comp
            entries.append((f"sft_weight/{COMPONENT_NAMES[comp]}", _mean_where(w, sel), sel.any()))
        entries.append(("tool_call_weight", tool_call_weight(prep.progress, c.beta_0, c.beta_1, c.s_end), None))
    entries.append(("loss/total", total, None))
    entries.append(("progress", float(prep.progress), None))
    return total, Metrics(entries, checks, total, prep.generator, prep.n_groups)


def _anchored_groups(prep):
    """Groups the Bernoulli anchoring sends to L_PO: those with an anchored rollout, counted without a sync."""
    B = prep.group_index.shape[0]
    hit = torch.zeros(B, dtype=torch.long, device=prep.group_index.device).index_add_(
        0, prep.group_index, prep.per_rollout.long())
    return (hit > 0).sum()


def _mean_where(values, sel):
    count = sel.sum()
    return torch.where(count > 0, torch.where(sel, values, torch.zeros_like(values)).sum() / count.clamp_min(1), 0.0)
