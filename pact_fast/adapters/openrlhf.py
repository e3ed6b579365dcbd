"""OpenRLHF: ``PACTPolicyLoss``, a drop-in for ``openrlhf.models.loss.PolicyLoss`` (tested against 0.11.2).

It is built with PolicyLoss's arguments and called the way ``PPOActor.training_step`` calls
``self.actor_loss_fn``, and returns the same ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``
tuple, so ``self.actor_loss_fn = PACTPolicyLoss(...)`` is the whole swap. Called with only
OpenRLHF's arguments and ``PACTLossConfig(mode="grpo")`` it is PolicyLoss (same loss, gradient and
statistics). The PACT terms need tensors OpenRLHF does not compute, passed as keyword arguments:

- ``log_probs_tc`` [B, T]: the current policy's log-probs of the same action tokens with the
  expert trace in the prompt (a second actor forward on the trace-conditioned sequences), and
  ``old_log_probs_tc`` [B, T] (the old policy's, from experience making) when ``ctx_den='same'``;
- ``anchored`` [B] bool, each sample's group's anchoring draw (``anchor_mode='bernoulli'``), made once per
  step for the step's groups with ``pact_fast.losses.anchor_rows(group_ids, n_groups, q, seed, step)``:
  OpenRLHF calls the loss once per micro-batch and passes no step, so draws made inside each call would be
  the same in every micro-batch and every step; a bernoulli call without it is refused. ``group_ids`` [B]
  (optional) names each sample's group for the metrics;
- ``sft_log_probs`` [S, E] with ``sft_components`` [S, E] (and ``sft_segment_ids``, ``sft_turn_ids``
  in ``segment`` mode): the trace tokens' log-probs under the prompt and their labels from
  ``pact_fast.chat.trace_sequences`` ([0, E] in a micro-batch without traces); ``sft_scale`` is this
  micro-batch's share of the step's traces times ``dp_size`` (``pact_fast.losses.loss_scales(action_mask,
  n_traces, step_traces=..., world=dp_size)[1]``, as the RL term's ``batch_num_tokens`` share), required with an
  SFT term and traces when the micro-batch is not the whole step (``dp_size > 1``, or fewer tokens or samples than
  ``batch_num_tokens`` / ``global_batch_size``): 1, the default otherwise, would count every micro-batch's traces
  as a whole step's;
- ``progress`` in [0, 1] for the annealing schedules (and sft_then_grpo's switch): required when the config has
  one (``pact_fast.losses.has_schedule``), as OpenRLHF passes no step.

``self.metrics`` holds the last call's ``pact_loss`` metrics (floats) for logging.
"""
import dataclasses

import torch

from ..losses import (PACTBatch, PACTLossConfig, advantage_options, has_schedule, loss_scales, pact_loss,
                      response_counts)


class PACTPolicyLoss(torch.nn.Module):
    """PolicyLoss-compatible PACT loss.

    Args: PolicyLoss's own (``clip_eps_low``, ``clip_eps_high``, ``dual_clip``, ``token_level_loss``,
    ``policy_loss_type``, ``is_correction_*``) and ``pact_config``. PolicyLoss's arguments set the clipping and
    the reduction (``token_level_loss``: ``loss_agg`` token-mean, else seq-mean-token-mean) over
    ``pact_config``'s defaults; a ``pact_config`` field set to another value than both is refused (one would
    silently replace the other).
    ``policy_loss_type='gspo'`` and train/rollout importance-sampling correction are refused, and so are PACT's
    KL and entropy terms (``beta_kl``, ``c_ent``): the call gets neither reference log-probs nor entropies, and
    OpenRLHF adds its own KL loss and entropy bonus outside PolicyLoss.
    """

    def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                 policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
                 is_correction_gating="ratio", is_correction_threshold=(0.5, 5.0), *, pact_config=None):
        super().__init__()
        if policy_loss_type != "ppo":
            raise ValueError(f"PACTPolicyLoss: policy_loss_type={policy_loss_type!r}; only 'ppo' (token ratios)")
        if is_correction_level != "off":
            raise ValueError(f"PACTPolicyLoss: is_correction_level={is_correction_level!r}; importance-sampling "
                             "correction is not supported (use 'off')")
        if pact_config is not None and pact_config.beta_kl > 0:
            raise ValueError(f"PACTPolicyLoss: pact_config.beta_kl={pact_config.beta_kl} needs reference log-probs, "
                             "which PolicyLoss's call does not get; OpenRLHF adds its own KL loss (algo.kl.use_loss, "
                             "init_coef): keep beta_kl=0")
        if pact_config is not None and pact_config.c_ent > 0:
            raise ValueError(f"PACTPolicyLoss: pact_config.c_ent={pact_config.c_ent} needs the entropy, which "
                             "PolicyLoss's call does not get; OpenRLHF adds its own bonus (actor.entropy_coef): keep "
                             "c_ent=0")
        if pact_config is not None and advantage_options(pact_config):
            raise ValueError(f"PACTPolicyLoss: {', '.join(advantage_options(pact_config))}: the call takes OpenRLHF's "
                             "advantages; choose them with algo.advantage.estimator (group_norm, dr_grpo, ...)")
        given = dict(clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
                     loss_agg="token-mean" if token_level_loss else "seq-mean-token-mean")
        if pact_config is not None:
            default = PACTLossConfig()
            differ = [f"{key}: {given[key]!r} here, {getattr(pact_config, key)!r} in pact_config" for key in given
                      if getattr(pact_config, key) not in (given[key], getattr(default, key))]
            if differ:
                raise ValueError("PACTPolicyLoss: PolicyLoss's arguments (clip_eps_low, clip_eps_high, dual_clip, "
                                 "token_level_loss) and pact_config disagree on " + "; ".join(differ) +
                                 "; give both the same values")
        self.config = dataclasses.replace(pact_config or PACTLossConfig(), **given)
        self.metrics = {}

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None, *, log_probs_tc=None, old_log_probs_tc=None,
                group_ids=None, anchored=None, sft_log_probs=None, sft_components=None, sft_segment_ids=None,
                sft_turn_ids=None, sft_scale=None, progress=None):
        """log_probs, old_log_probs, advantages, action_mask: [B, T]. Returns (loss, clip_ratio, ppo_kl, None, None)."""
        if action_mask is None:
            action_mask = torch.ones_like(log_probs)
        if action_mask.shape != log_probs.shape:  # pact_loss would blame the advantages, shaped by the mask
            raise ValueError(f"PACTPolicyLoss: action_mask {tuple(action_mask.shape)} must be log_probs' [B, T] = "
                             f"{list(log_probs.shape)}")
        B = log_probs.shape[0]
        cfg = self.config
        if cfg.mode == "pact" and cfg.anchor_mode == "bernoulli" and anchored is None:
            raise ValueError("PACTPolicyLoss: anchor_mode='bernoulli' needs anchored [B], the step's draws made once "
                             "(pact_fast.losses.anchor_rows(group_ids, n_groups, q, seed, step)): drawn in each "
                             "micro-batch's call they would repeat in every micro-batch and step")
        if progress is None and has_schedule(cfg):
            raise ValueError(f"PACTPolicyLoss: mode {cfg.mode!r} anneals with training progress: pass progress= "
                             "(steps done / total) with each call")
        progress = progress or 0.0
        sft_on = cfg.lambda_sft > 0 and (cfg.mode in ("pact", "sft") or
                                         (cfg.mode == "sft_then_grpo" and progress < cfg.switch_progress))
        if sft_on and (sft_log_probs is None or sft_components is None):
            raise ValueError(f"PACTPolicyLoss: mode {cfg.mode!r} with lambda_sft > 0 needs sft_log_probs and "
                             "sft_components [S, E] (S = 0, [0, E] tensors, in a micro-batch without traces)")
        name, total = (("batch_num_tokens", batch_num_tokens) if cfg.loss_agg == "token-mean" else
                       ("global_batch_size", global_batch_size))
        if total is not None and not total > 0:  # 0 made this micro-batch's share, and its RL loss, 0
            raise ValueError(f"PACTPolicyLoss: {name}={total!r} must be > 0: the step's count over all ranks, "
                             "this micro-batch's included")
        if sft_scale is None:
            # what OpenRLHF counts: response tokens, or samples (global_batch_size counts a masked one too)
            own = response_counts(action_mask)[0] if cfg.loss_agg == "token-mean" else action_mask.shape[0]
            if sft_on and len(sft_log_probs) and (dp_size > 1 or (total is not None and own < total)):
                # the RL term is this micro-batch's share of the step (batch_num_tokens, dp_size); an SFT term at
                # scale 1 would be a whole step's in every micro-batch and on every rank
                step = "?" if total is None else f"{float(total):g}"
                raise ValueError(f"PACTPolicyLoss: this micro-batch is part of a step ({own} of {name}={step} "
                                 f"{'tokens' if name == 'batch_num_tokens' else 'samples'}, dp_size={dp_size}): "
                                 "pass sft_scale, its share of the step's traces times dp_size "
                                 "(pact_fast.losses.loss_scales(action_mask, n_traces, step_traces=..., "
                                 "world=dp_size)[1])")
            sft_scale = 1.0
        if group_ids is None:
            group_ids = torch.arange(B, device=log_probs.device)  # the draws come in per sample via `anchored`
        batch = PACTBatch(
            response_mask=action_mask, rewards=torch.zeros(B, device=log_probs.device), group_ids=group_ids,
            logp_po=log_probs, old_logp_po=old_log_probs, logp_tc=log_probs_tc, old_logp_tc=old_log_probs_tc,
            behavior_logp=rollout_log_probs, advantages=advantages, anchored=anchored,
            sft_logp=sft_log_probs, sft_components=sft_components, sft_segment_ids=sft_segment_ids,
            sft_turn_ids=sft_turn_ids)
        scale, _ = loss_scales(action_mask, 0, cfg.loss_agg, step_tokens=batch_num_tokens,
                               step_seqs=global_batch_size, world=dp_size)
        loss, metrics = pact_loss(batch, cfg, progress, rl_scale=scale, sft_scale=sft_scale)
        metrics.pop("reward_mean", None)  # OpenRLHF passes advantages, not rewards
        self.metrics = metrics
        ctx = "tc/" if "tc/approx_kl" in metrics else "po/"  # the trace-conditioned surrogate when PACT has one
        like = dict(dtype=loss.dtype, device=loss.device)
        clip_ratio = torch.tensor(metrics.get(f"{ctx}clip_frac_low", 0.0) + metrics.get(f"{ctx}clip_frac_high", 0.0),
                                  **like)
        ppo_kl = torch.tensor(metrics.get(f"{ctx}approx_kl", 0.0), **like)
        return loss, clip_ratio, ppo_kl, None, None
