"""verl: a registered policy loss and a whole-loss hook (tested with verl 0.9.1).

verl is imported only by ``register()`` and for nested (no-padding) model outputs, so this module
loads without it. The tests run both through verl's own ``ppo_loss``, registry and no-padding batches.

1. ``compute_policy_loss_pact``, a ``PolicyLossFn`` (``register()`` makes it
   ``actor.policy_loss.loss_mode=pact``): the PACT surrogate of the rows verl scored, whatever
   context each row holds. Use it when the host builds, per prompt group, the trace-conditioned
   copy of its rollouts or, for groups drawn for anchoring (``pact_fast.losses.anchor_rows``), the prompt-only one;
   verl's own old log-probs of those rows are then the ``ctx_den='same'`` denominator. Clipping comes
   from verl's ``ActorConfig`` (``clip_ratio_low``/``clip_ratio_high``, dual clip ``clip_ratio_c``),
   the reduction from ``loss_agg_mode`` and ``config.global_batch_info``, as for verl's ``vanilla``.
   The SFT term needs trace rows, which this signature never sees: use the hook for it.

2. ``pact_loss_fn(config, model_output, data, dp_group=None, *, pact_config=None, progress=None)``, the
   whole loss, for ``actor.set_loss_fn(functools.partial(pact_loss_fn, config=actor_config,
   pact_config=...))``; ``pact_config_from_actor_config`` carries the ActorConfig's clipping,
   reduction, KL loss and entropy coefficient over (the default when ``pact_config`` is None; a
   ``pact_config`` that disagrees with the ActorConfig on one of them is refused, as is a
   ``policy_loss.loss_mode`` other than vanilla's clipping).
   A micro-batch holds rows in three roles, ``data["pact_role"]`` [N]: ``PO`` (a rollout with the
   prompt), ``TC`` (the same response with the trace-conditioned prompt) and ``TRACE`` (an expert
   trace as the response of the prompt). The host supplies, besides verl's
   ``response_mask``, ``old_log_probs``, ``advantages`` ([N, T], padded or nested):
   - ``pact_rollout`` [N]: an id shared by a rollout's PO and TC rows (both must be in the micro-batch, one of
     each, with the same ``response_mask``: the same response tokens in both contexts);
   - ``pact_group`` [N]: prompt group id; ``pact_anchored`` [N] bool: the group's anchoring draw
     (``pact_fast.losses.anchor_rows``), needed for ``anchor_mode='bernoulli'``;
   - ``pact_components``, ``pact_segment_ids``, ``pact_turn_ids`` [N, T] on TRACE rows: labels of
     the trace tokens from ``pact_fast.chat.trace_sequences``;
   - ``ref_log_prob`` [N, T] when ``pact_config.beta_kl > 0``;
   - ``pact_progress``: training progress in [0, 1] (steps done / total), each step, for the annealing schedules
     (and sft_then_grpo's switch);
   - with ``dp_size > 1`` or micro-batching, the global counts ``pact_rl_tokens`` (response tokens
     of PO rows), ``pact_rl_seqs`` (PO rows with any) and ``pact_traces`` (TRACE rows) of the mini-batch,
     so that micro-batch losses add up to the mini-batch's (without them each micro-batch is
     normalised on its own, right only when it is the whole mini-batch on one rank: a micro-batch holding
     fewer response tokens than verl's ``batch_num_tokens`` is then refused, as is ``dp_size > 1``).
   ``rollout_is_weights`` (verl's rollout correction) is refused by the hook; ``compute_policy_loss_pact``
   applies it.
"""
import torch

from ..losses import (MASK_VALUES, PACTBatch, PACTLossConfig, advantage_options, aggregate, binary,
                      clipped_surrogate_tokens, has_schedule, loss_scales, pact_loss, response_counts,
                      surrogate_metrics)

PO, TC, TRACE = 0, 1, 2
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def _get(config, name, default=None):
    """Read a field of verl's ActorConfig, a DictConfig or a plain dict."""
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    return default if value is None else value


def verl_aggregate(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                   loss_scale_factor=None):
    """verl's reduction of ``loss_mat [B, T]`` over ``mask [B, T]``, normalised by global-batch counts."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"verl_aggregate: unknown loss_agg_mode {mode!r}; choose one of {LOSS_AGG_MODES}")
    if mode == "token-sum":
        return torch.where(mask.bool(), loss_mat, torch.zeros_like(loss_mat)).sum() * dp_size
    total = batch_num_tokens if mode == "token-mean" else global_batch_size
    if total is None and dp_size > 1:
        raise ValueError(f"verl_aggregate: {mode} with dp_size > 1 needs "
                         f"{'batch_num_tokens' if mode == 'token-mean' else 'global_batch_size'}")
    if mode == "seq-mean-token-sum":
        mode, loss_scale_factor = "seq-mean-token-sum-norm", 1
    share, _ = loss_scales(mask, 0, mode, step_tokens=batch_num_tokens, step_seqs=global_batch_size,
                           world=dp_size)
    return aggregate(loss_mat, mask, mode, loss_scale_factor) * share


def compute_policy_loss_pact(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                             config=None, rollout_is_weights=None):
    """verl ``PolicyLossFn``: [B, T] tensors in, ``(loss, metrics)`` out (metrics under verl's names)."""
    if config is None:
        raise ValueError("compute_policy_loss_pact: verl passes the actor config; got None")
    shape = tuple(log_prob.shape)
    if tuple(response_mask.shape) != shape:
        raise ValueError(f"compute_policy_loss_pact: response_mask {tuple(response_mask.shape)} must be log_prob's "
                         f"[B, T] = {list(shape)}")
    if rollout_is_weights is not None and not (rollout_is_weights.dim() == 2 and all(
            w in (1, n) for w, n in zip(rollout_is_weights.shape, shape))):
        raise ValueError(f"compute_policy_loss_pact: rollout_is_weights {tuple(rollout_is_weights.shape)} must be "
                         f"log_prob's [B, T] = {list(shape)}")
    if not binary(response_mask):  # aggregate selects tokens by mask != 0: a soft mask would be read as 1
        raise ValueError(MASK_VALUES.replace("pact_loss", "compute_policy_loss_pact"))
    clip = _get(config, "clip_ratio", 0.2)
    loss_mat, ratio, low, high, dual = clipped_surrogate_tokens(
        log_prob, old_log_prob, advantages, clip_eps_low=_get(config, "clip_ratio_low", clip),
        clip_eps_high=_get(config, "clip_ratio_high", clip), dual_clip=_get(config, "clip_ratio_c", 3.0))
    if rollout_is_weights is not None:  # masked tokens' weights read as 0: a NaN there gave a NaN gradient
        loss_mat = loss_mat * torch.where(response_mask != 0, rollout_is_weights, 0.0)
    info = dict(_get(config, "global_batch_info", {}) or {})
    loss = verl_aggregate(loss_mat, response_mask, loss_agg_mode, **info)
    m = surrogate_metrics(log_prob, old_log_prob, ratio, low, high, dual, response_mask)
    return loss, {"actor/pg_clipfrac": m["clip_frac_low"] + m["clip_frac_high"], "actor/ppo_kl": m["approx_kl"],
                  "actor/pg_clipfrac_lower": m["dual_clip_frac"]}


def register(name="pact"):
    """Register ``compute_policy_loss_pact`` with verl as ``actor.policy_loss.loss_mode=<name>``."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    return register_policy_loss(name)(compute_policy_loss_pact)


def _field(data, name):
    if name not in data.keys():
        return None
    value = data[name]
    if isinstance(value, torch.Tensor) and value.is_nested:
        value = value.to_padded_tensor(0)
    return value


def _need(data, name, why=""):
    """``_field``, or a ValueError naming the missing field."""
    value = _field(data, name)
    if value is None:
        raise ValueError(f"pact_loss_fn: data has no {name!r}{why}; see pact_fast.adapters.verl's docstring for what "
                         "the host supplies")
    return value


def _scalar(data, name):
    """A per-step number: a Python number, or a tensor holding one value (a TensorDict's [N] column of it too)."""
    value = _field(data, name)
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        if value.numel() == 0 or bool((value != value.reshape(-1)[0]).any()):
            raise ValueError(f"pact_loss_fn: data[{name!r}] is one number per step; got a tensor of shape "
                             f"{tuple(value.shape)} holding {'none' if value.numel() == 0 else 'several values'}")
        value = value.reshape(-1)[0]
    return None if value is None else float(value.item() if isinstance(value, torch.Tensor) else value)


# data's fields with one entry per row of the micro-batch (the rows of model_output's log_probs)
ROW_FIELDS = ("response_mask", "old_log_probs", "advantages", "pact_role", "pact_rollout", "pact_group",
              "pact_anchored", "pact_components", "pact_segment_ids", "pact_turn_ids", "ref_log_prob")


def _check_rows(data, n, entropy):
    """Refuse a per-row field (``ROW_FIELDS``, model_output's entropy) that is not a tensor of ``n`` rows: indexed
    by the log-probs' rows, a shorter one would pair rows with another row's values."""
    fields = [(f"data[{name!r}]", _field(data, name)) for name in ROW_FIELDS] + [("model_output['entropy']", entropy)]
    for name, value in fields:
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != n):
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"pact_loss_fn: {name} must be a tensor with one row per row of log_probs ({n}), "
                             f"got {got}")


def _log_probs(model_output, data, key):
    value = model_output.get(key)
    if value is None or not value.is_nested:
        return value
    from verl.workers.utils.padding import no_padding_2_padding  # nested rows hold prompt + response

    return no_padding_2_padding(value, data)


# verl's kl_loss_type -> PACTLossConfig.kl_estimator
KL_ESTIMATORS = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


# The PACTLossConfig fields pact_config_from_actor_config derives from an ActorConfig (kl_estimator only with a KL
# loss); pact_loss_fn refuses a pact_config that disagrees with its ActorConfig on one of them.
ACTOR_FIELDS = ("clip_eps_low", "clip_eps_high", "dual_clip", "loss_agg", "loss_scale_factor", "c_ent", "beta_kl",
                "kl_estimator")


def _is_pact_loss_mode(name):
    """Whether verl's ``policy_loss.loss_mode`` is vanilla's token-ratio clipping, as PACT's: ``vanilla`` or
    ``compute_policy_loss_pact``'s registered name."""
    if name in ("vanilla", "pact"):
        return True
    try:
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
    except ImportError:
        return False
    return POLICY_LOSS_REGISTRY.get(name) is compute_policy_loss_pact


def pact_config_from_actor_config(config, **overrides):
    """A ``PACTLossConfig`` carrying verl's ActorConfig clipping, reduction, KL loss and entropy bonus.

    verl's ``low_var_kl`` becomes PACT's ``k3``, which is not clamped: verl clamps each token's estimate to
    [-10, 10], so the two differ on tokens whose log-prob lies more than ~2.53 nats under the reference's (k3 = 10
    there; past it verl's gradient is 0, PACT's keeps pulling the token back). A negative ``entropy_coeff`` (an
    entropy penalty) has no PACT counterpart and is refused, as is a ``policy_loss.loss_mode`` other than vanilla's
    clipping (gspo, clip_cov, ...: PACT computes token-ratio clipping). ``overrides`` set PACT's own fields
    (``anchor_q``, ``lambda_sft``, ...); one of ``ACTOR_FIELDS`` overridden here is refused by ``pact_loss_fn``
    with that ActorConfig (set it in the ActorConfig)."""
    loss_mode = _get(_get(config, "policy_loss", {}), "loss_mode", "vanilla")
    if not _is_pact_loss_mode(loss_mode):
        raise ValueError(f"pact_config_from_actor_config: policy_loss.loss_mode={loss_mode!r} has no PACT "
                         "counterpart (PACT clips token ratios as verl's vanilla); use 'vanilla' or 'pact'")
    clip = _get(config, "clip_ratio", 0.2)
    mode = _get(config, "loss_agg_mode", "token-mean")
    if mode not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        raise ValueError(f"pact_config_from_actor_config: loss_agg_mode={mode!r} has no PACT counterpart; use "
                         "token-mean, seq-mean-token-mean or seq-mean-token-sum-norm")
    values = dict(clip_eps_low=_get(config, "clip_ratio_low", clip),
                  clip_eps_high=_get(config, "clip_ratio_high", clip), dual_clip=_get(config, "clip_ratio_c", 3.0),
                  loss_agg=mode,
                  loss_scale_factor=_get(config, "loss_scale_factor"), c_ent=_get(config, "entropy_coeff", 0.0))
    if values["c_ent"] < 0:
        raise ValueError(f"pact_config_from_actor_config: entropy_coeff={values['c_ent']} < 0 (an entropy penalty) has "
                         "no PACT counterpart; PACT's c_ent is a bonus (>= 0)")
    if _get(config, "use_kl_loss", False):
        kl_type = _get(config, "kl_loss_type", "low_var_kl")
        if kl_type not in KL_ESTIMATORS:
            raise ValueError(f"pact_config_from_actor_config: kl_loss_type={kl_type!r}; choose one of "
                             f"{sorted(KL_ESTIMATORS)}")
        values.update(beta_kl=_get(config, "kl_loss_coef", 0.001), kl_estimator=KL_ESTIMATORS[kl_type])
    values.update(overrides)
    return PACTLossConfig(**values)


def _check_agrees(pact_config, config):
    """Refuse a ``pact_config`` that differs from ``pact_config_from_actor_config(config)`` on ``ACTOR_FIELDS``."""
    derived = pact_config_from_actor_config(config)
    names = [n for n in ACTOR_FIELDS if n != "kl_estimator" or derived.beta_kl > 0]
    differ = [f"pact_config.{n}={getattr(pact_config, n)!r} (ActorConfig: {getattr(derived, n)!r})" for n in names
              if getattr(pact_config, n) != getattr(derived, n)]
    if differ:
        raise ValueError("pact_loss_fn: pact_config disagrees with verl's ActorConfig on " + "; ".join(differ) +
                         "; set these in the ActorConfig and build pact_config with "
                         "pact_config_from_actor_config(actor_config, ...)")


def pact_loss_fn(config, model_output, data, dp_group=None, *, pact_config=None, progress=None):
    """verl whole-loss hook: PACT over a micro-batch of PO / TC / TRACE rows. Returns (loss, metrics).

    config: verl's ActorConfig; without ``pact_config`` the PACT config is ``pact_config_from_actor_config(config)``,
        and a ``pact_config`` given with it must agree with it on ``ACTOR_FIELDS`` (else one would be dropped).
    progress: training progress in [0, 1]; None (the default) reads ``data["pact_progress"]``, which the host sets
        each step (verl calls the function given to ``set_loss_fn``, so a keyword there never changes). Required
        when the loss has a schedule (``pact_fast.losses.has_schedule``), else 0.
    """
    cfg = pact_config or pact_config_from_actor_config(config or {})
    progress = _scalar(data, "pact_progress") if progress is None else progress
    if progress is None and has_schedule(cfg):
        raise ValueError(f"pact_loss_fn: mode {cfg.mode!r} anneals with training progress: set data['pact_progress'] "
                         "(steps done / total) each step; a progress keyword bound at set_loss_fn time stays fixed")
    progress = progress or 0.0
    if cfg.loss_agg == "seq-mean-token-sum-norm" and cfg.loss_scale_factor is None and cfg.mode != "grpo" \
            and cfg.lambda_sft > 0:
        raise ValueError("pact_loss_fn: seq-mean-token-sum-norm needs a fixed loss_scale_factor "
                         "(actor.loss_scale_factor, e.g. the longest response): without one the rollouts' divisor is "
                         "the micro-batch's padded width, which its trace rows set")
    if pact_config is not None and config is not None:
        _check_agrees(pact_config, config)
    if advantage_options(cfg):
        raise ValueError(f"pact_loss_fn: {', '.join(advantage_options(cfg))}: the hook takes verl's advantages "
                         "(data['advantages']); choose them in verl (algorithm.norm_adv_by_std_in_grpo)")
    if _field(data, "rollout_is_weights") is not None:
        raise ValueError("pact_loss_fn: data['rollout_is_weights'] (verl's rollout correction) is not applied by this "
                         "hook; turn the correction off, or use compute_policy_loss_pact (loss_mode=pact), which "
                         "weighs its rows by them")
    logp = _log_probs(model_output, data, "log_probs")
    entropy = _log_probs(model_output, data, "entropy")
    _check_rows(data, logp.shape[0], entropy)
    mask = _need(data, "response_mask")
    old = _need(data, "old_log_probs")
    role = _need(data, "pact_role", " (PO, TC or TRACE per row)")
    # another value matched no role: its row left the loss without a word (a float role was truncated)
    if role.is_floating_point() or role.is_complex() or role.dtype == torch.bool or \
            not bool(((role >= PO) & (role <= TRACE)).all()):
        raise ValueError(f"pact_loss_fn: data['pact_role'] must hold the integers {PO} (PO), {TC} (TC) and {TRACE} "
                         f"(TRACE), got {role.dtype} values {sorted(set(role.reshape(-1).tolist()))[:8]}")
    role = role.long()
    po = torch.nonzero(role == PO)[:, 0]
    tc_rows = torch.nonzero(role == TC)[:, 0]
    trace = torch.nonzero(role == TRACE)[:, 0]

    tc = po.new_empty(0)
    if cfg.mode == "pact" and len(po) and not len(tc_rows):
        raise ValueError(f"pact_loss_fn: mode 'pact' needs each PO row's TC row (pact_role {TC}) in the same "
                         f"micro-batch; this one has {len(po)} PO rows and no TC row")
    if len(tc_rows):
        rollout = _need(data, "pact_rollout", " (the id a rollout's PO and TC rows share)")
        for role_name, index in (("PO", po), ("TC", tc_rows)):
            ids = [int(rollout[i]) for i in index.tolist()]
            if len(set(ids)) != len(ids):
                twice = sorted({i for i in ids if ids.count(i) > 1})
                raise ValueError(f"pact_loss_fn: pact_rollout {twice} name two {role_name} rows each; one PO and "
                                 "one TC row per rollout")
        by_rollout = {int(rollout[j]): j for j in tc_rows.tolist()}
        missing = [int(rollout[i]) for i in po.tolist() if int(rollout[i]) not in by_rollout]
        if missing or len(by_rollout) != len(po):
            raise ValueError(f"pact_loss_fn: every PO row needs its TC row in the same micro-batch; rollouts "
                             f"{missing or sorted(set(by_rollout) - {int(rollout[i]) for i in po.tolist()})} "
                             "are unpaired")
        tc = torch.tensor([by_rollout[int(rollout[i])] for i in po.tolist()], device=po.device)
        differ = (mask[tc] != mask[po]).any(dim=-1)
        if bool(differ.any()):  # the same response tokens in both contexts, or the TC row's padding would train
            raise ValueError(f"pact_loss_fn: the TC rows of pact_rollout {sorted(int(rollout[i]) for i in po[differ])} "
                             "have another response_mask than their PO rows (a response cut short under the longer "
                             "trace-conditioned prompt?); a rollout's two rows hold the same response tokens")

    def rows(tensor, index):
        return None if tensor is None or len(index) == 0 else tensor[index]

    anchored = _field(data, "pact_anchored")
    if cfg.mode == "pact" and cfg.anchor_mode == "bernoulli" and anchored is None and len(po):
        raise ValueError("pact_loss_fn: anchor_mode='bernoulli' needs data['pact_anchored'] (see pact_fast.losses.anchor_rows)")
    ref = _field(data, "ref_log_prob")
    batch = PACTBatch(
        response_mask=mask[po], rewards=torch.zeros(len(po), device=mask.device),
        group_ids=_need(data, "pact_group", " (prompt group id per row)")[po], logp_po=logp[po], old_logp_po=old[po],
        logp_tc=rows(logp, tc), old_logp_tc=rows(old, tc), advantages=_need(data, "advantages")[po],
        anchored=rows(anchored, po), ref_logp=rows(ref, po), entropy=rows(entropy, po),
        sft_logp=rows(logp, trace),
        sft_components=rows(_need(data, "pact_components", " (labels of the TRACE rows' tokens)"), trace)
        if len(trace) else None,
        sft_segment_ids=rows(_field(data, "pact_segment_ids"), trace),
        sft_turn_ids=rows(_field(data, "pact_turn_ids"), trace))
    if len(trace):  # trace tokens outside the response are never targets
        batch.sft_components = torch.where(mask[trace].bool(), batch.sft_components,
                                           torch.zeros_like(batch.sft_components))
    else:  # no trace in this micro-batch: an empty SFT term
        batch.sft_logp = logp.new_zeros((0, logp.shape[1]))
        batch.sft_components = role.new_zeros((0, logp.shape[1]))
    dp_size = _scalar(data, "dp_size") or 1.0
    rl_tokens, rl_seqs, traces = (_scalar(data, k) for k in ("pact_rl_tokens", "pact_rl_seqs", "pact_traces"))
    if dp_size > 1 and None in (rl_tokens, rl_seqs, traces):
        raise ValueError("pact_loss_fn: with dp_size > 1 the host must supply pact_rl_tokens, pact_rl_seqs and "
                         "pact_traces (global counts of the mini-batch)")
    whole = _scalar(data, "batch_num_tokens")  # verl's count of the mini-batch's response tokens (one rank here)
    here = float(_need(data, "response_mask").sum(dtype=torch.float64))  # not in logp's dtype: bf16 rounds counts
    if None in (rl_tokens, rl_seqs, traces) and whole is not None and here < whole:
        raise ValueError(f"pact_loss_fn: this micro-batch holds {here:.0f} of the mini-batch's {whole:.0f} response "
                         "tokens (verl's batch_num_tokens) and verl adds the micro-batch losses: supply "
                         "pact_rl_tokens, pact_rl_seqs and pact_traces (the mini-batch's counts), or each "
                         "micro-batch counts as a whole mini-batch")
    if None not in (rl_tokens, rl_seqs, traces):
        own = (*response_counts(batch.response_mask), len(trace))
        for name, given, mine in zip(("pact_rl_tokens", "pact_rl_seqs", "pact_traces"), (rl_tokens, rl_seqs, traces),
                                     own):
            if given < mine:
                raise ValueError(f"pact_loss_fn: {name}={given:g} is below this micro-batch's own {mine}; it counts "
                                 "the whole mini-batch, over every micro-batch and rank")
    rl_scale, sft_scale = loss_scales(batch.response_mask, len(trace), cfg.loss_agg, step_tokens=rl_tokens,
                                      step_seqs=rl_seqs, step_traces=traces, world=dp_size)
    loss, metrics = pact_loss(batch, cfg, progress, rl_scale=rl_scale, sft_scale=sft_scale)
    metrics.pop("reward_mean", None)  # verl logs rewards; the rows carry advantages
    return loss, {f"actor/pact/{k}": v for k, v in metrics.items()}
