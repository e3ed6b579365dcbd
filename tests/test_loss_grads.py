"""pact_fast.loss_grads against pact_loss itself: per-token gradients against float64 autograd, value and metrics
against pact_loss's, for every mode, aggregation, anchoring setting, KL estimator and clip option; and the whole
of it without a host synchronisation but the one in Metrics.resolve."""
import itertools
import math
import re

import pytest
import torch

from pact_fast import loss_grads
from pact_fast.losses import NONE, REASONING, PACTBatch, PACTLossConfig, group_advantages, pact_loss, sft_token_weights

from sync_count import count_syncs

D = torch.float64


def _batch(seed, B=6, T=7, spread=1.0):
    """Random float64 inputs: ragged masks with an empty rollout, three groups (one of equal rewards), current
    log-probs spread so that ratios land inside, outside and (spread large) beyond the +-20 log-ratio clamp."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(D)
    mask[0], mask[2] = 1.0, 0.0
    comps = torch.randint(0, 5, (3, 9), generator=g)
    comps[2] = NONE  # a trace without assistant tokens
    old = -torch.rand(B, T, generator=g, dtype=D) * 3

    def near_old():
        return old + spread * torch.randn(B, T, generator=g, dtype=D) * 0.3

    current = dict(logp_po=near_old(), logp_tc=near_old(), sft_logp=-torch.rand(3, 9, generator=g, dtype=D) * 3,
                   entropy=torch.rand(B, T, generator=g, dtype=D) * 2)
    current["logp_po"][1, :3] = old[1, :3]  # ratio exactly 1: the surrogate's max has a tie there
    batch = PACTBatch(
        response_mask=mask, rewards=torch.tensor([1.0, 0.0, 0.5, 0.7, 0.7, 0.2], dtype=D)[:B],
        group_ids=torch.tensor([4, 4, 9, 1, 1, 9])[:B], old_logp_po=old,
        old_logp_tc=-torch.rand(B, T, generator=g, dtype=D) * 3, behavior_logp=old + 0.1,
        ref_logp=-torch.rand(B, T, generator=g, dtype=D) * 3, sft_components=comps,
        sft_segment_ids=torch.randint(0, 3, (3, 9), generator=g), sft_turn_ids=torch.randint(0, 7, (3, 9), generator=g))
    batch.old_logp_po[3, 0] = float("nan")  # masked garbage must not reach a value or gradient
    mask[3, 0] = 0.0
    return batch, current


CONFIGS = [
    pytest.param(dict(), 0.3, {}, id="pact-bernoulli"),
    pytest.param(dict(anchor_q=0.6, seed=3), 0.3, {}, id="pact-bernoulli-q0.6"),
    pytest.param(dict(anchor_mode="mix", loss_agg="seq-mean-token-mean", ctx_den="behavior", dual_clip=3.0), 0.5, {},
                 id="pact-mix-seqmean-behavior-dualclip"),
    pytest.param(dict(loss_agg="seq-mean-token-sum-norm", beta_kl=0.1, kl_estimator="k3", c_ent=0.01), 0.9, {},
                 id="pact-sumnorm-k3-entropy"),
    pytest.param(dict(loss_agg="seq-mean-token-sum-norm", loss_scale_factor=11, kl_estimator="k2", beta_kl=0.3), 0.2,
                 {}, id="pact-sumnorm-lsf-k2"),
    pytest.param(dict(mode="grpo", beta_kl=0.2, kl_estimator="k1", kl_ratio_weighted=True), 0.1, {},
                 id="grpo-k1-ratio-weighted"),
    pytest.param(dict(mode="grpo", beta_kl=0.2, kl_estimator="k3", kl_ratio_weighted=True, dual_clip=1.5,
                      clip_eps_low=0.05, clip_eps_high=0.1), 0.1, {"spread": 40.0}, id="grpo-k3-ratio-dual-clamped"),
    pytest.param(dict(mode="sft"), 0.4, {}, id="sft"),
    pytest.param(dict(mode="sft_then_grpo"), 0.2, {}, id="sft_then_grpo-sft-phase"),
    pytest.param(dict(mode="sft_then_grpo", beta_kl=0.05, kl_estimator="k2"), 0.7, {}, id="sft_then_grpo-rl-phase"),
    pytest.param(dict(clip_eps_low=0.1, clip_eps_high=0.28, norm_adv_by_std=False, sft_reasoning_mode="scale",
                      anchor_q=0.9), 0.6, {}, id="pact-asymclip-nostd-scale"),
    pytest.param(dict(c_ent=0.05, anchor_mode="mix"), 0.0, {"old_from_current": True}, id="pact-old-from-current"),
    pytest.param(dict(mode="grpo", beta_kl=0.1, kl_ratio_weighted=True), 0.0, {"old_from_current": True},
                 id="grpo-old-from-current-ratio-kl"),
    pytest.param(dict(dual_clip=2.0), 0.5, {"advantages": "token", "anchored": True}, id="pact-given-adv-anchored"),
    pytest.param(dict(anchor_mode="mix", lambda_sft=0.0), 0.5, {"advantages": "rollout"}, id="pact-given-adv-no-sft"),
    pytest.param(dict(), 0.5, {"spread": 40.0}, id="pact-log-ratios-past-20"),
    pytest.param(dict(), 0.5, {"B": 0}, id="pact-no-rollouts"),
]


def _setup(cfg, opts, seed):
    batch, current = _batch(seed, spread=opts.get("spread", 1.0))
    if opts.get("B") == 0:  # a micro-batch of traces only
        for name in ("response_mask", "rewards", "group_ids", "old_logp_po", "old_logp_tc", "behavior_logp",
                     "ref_logp"):
            setattr(batch, name, getattr(batch, name)[:0])
        current = {k: v if k == "sft_logp" else v[:0] for k, v in current.items()}
    B = batch.response_mask.shape[0]
    if opts.get("advantages") == "token":
        batch.advantages = torch.randn(B, batch.response_mask.shape[1], dtype=D)
    elif opts.get("advantages") == "rollout":
        batch.advantages = torch.randn(B, dtype=D)
    if opts.get("anchored"):
        batch.anchored = torch.tensor([True, True, False, True, True, False])[:B]  # one draw per group (group_ids)
    if opts.get("old_from_current"):
        batch.old_logp_po = batch.old_logp_tc = None
    return PACTLossConfig(**cfg), batch, current


def _reference(config, batch, current, progress, old_from_current, step):
    leaves = {k: v.clone().requires_grad_() for k, v in current.items()}
    fields = {f: getattr(batch, f) for f in batch.__dataclass_fields__}
    fill = dict(leaves)
    if old_from_current:
        fill["old_logp_po"], fill["old_logp_tc"] = leaves["logp_po"].detach(), leaves["logp_tc"].detach()
    if config.c_ent == 0:
        fill.pop("entropy")
    loss, metrics = pact_loss(PACTBatch(**{**fields, **fill}), config, progress, step=step, rl_scale=0.7,
                              sft_scale=1.3)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss, metrics, {k: g for k, g in zip(leaves, grads)}


@pytest.mark.parametrize("cfg,progress,opts", CONFIGS)
def test_token_grads_equal_autograd_of_pact_loss_in_float64(cfg, progress, opts):
    old_from_current = opts.get("old_from_current", False)
    for seed in (0, 1, 2):
        config, batch, current = _setup(cfg, opts, seed)
        step = seed + 5
        ref_loss, ref_metrics, ref_grads = _reference(config, batch, current, progress, old_from_current, step)
        prep = loss_grads.prepare(batch, config, progress, step=step, rl_scale=0.7, sft_scale=1.3,
                                  old_from_current=old_from_current)
        grads = loss_grads.token_grads(prep, current["logp_po"], current["logp_tc"])
        carried = 0.0
        for name, want in ref_grads.items():
            got = grads.get(name)
            if want is None or not want.abs().max() > 0:
                assert got is None or not got.abs().max() > 0, name
                continue
            carried += float(want.abs().sum())
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-15), (name, (got - want).abs().max())
        assert carried > 0 or opts.get("B") == 0 and cfg.get("lambda_sft", 1.0) == 0
        loss, metrics = loss_grads.loss_and_metrics(prep, **{k: v for k, v in current.items()
                                                             if k != "entropy" or config.c_ent > 0})
        metrics = metrics.resolve()
        assert torch.isclose(loss, ref_loss.detach(), rtol=1e-12, atol=1e-15)
        assert metrics.keys() == ref_metrics.keys()
        for k, v in ref_metrics.items():
            assert math.isclose(metrics[k], v, rel_tol=1e-12, abs_tol=1e-14), (k, metrics[k], v)


def test_the_tie_of_the_clipped_max_splits_its_gradient_as_autograd_does():
    """Ratios at 1 (max of two equal terms), exactly at a clip bound, and a dual-clip tie."""
    logp = torch.tensor([[0.0, math.log(1.2), math.log(0.8), 0.3, -0.5]], dtype=D, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, -1.0]], dtype=D)  # [B, T]: per-token advantages
    old = torch.zeros(1, 5, dtype=D)
    from pact_fast.losses import clipped_surrogate_tokens
    for dual in (None, 1.3498588075760032):  # exp(0.3): the fourth token's loss equals the bound
        loss = clipped_surrogate_tokens(logp, old, adv, dual_clip=dual)[0]
        want, = torch.autograd.grad(loss.sum(), logp)
        got = loss_grads.surrogate_grad(logp.detach(), old, adv, dual_clip=dual)
        assert torch.equal(got, want), (dual, got, want)


def test_group_ranks_advantages_and_sft_weights_equal_the_syncing_originals():
    g = torch.Generator().manual_seed(3)
    for B in (1, 5, 40):
        ids = torch.randint(-3, 1000, (B,), generator=g)
        rewards = torch.rand(B, generator=g)
        rewards[: B // 2] = 0.5
        _, inv = torch.unique(ids, return_inverse=True)
        index, n = loss_grads.dense_groups(ids)
        assert torch.equal(index, inv) and int(n) == int(inv.max()) + 1
        for norm in (True, False):
            got, finite = loss_grads.group_advantages(rewards, ids, norm_by_std=norm)
            assert bool(finite) and torch.equal(got, group_advantages(rewards, ids, norm_by_std=norm))
    comps = torch.randint(0, 5, (4, 30), generator=g)
    segs, turns = torch.randint(0, 4, (4, 30), generator=g), torch.randint(0, 50, (4, 30), generator=g)
    for mode, reasoning, progress in itertools.product(("pact", "sft"), ("segment", "scale"), (0.0, 0.4, 1.0)):
        config = PACTLossConfig(mode=mode, sft_reasoning_mode=reasoning, w_reason=0.7, w_other=0.3)
        assert torch.equal(loss_grads.sft_weights(comps, segs, turns, progress, config),
                           sft_token_weights(comps, segs, turns, progress, config))


def test_bernoulli_draws_of_many_groups_are_pact_losss():
    """rand(B)'s first G values are rand(G)'s: the anchoring of 300 rollouts in 170 groups equals pact_loss's."""
    g = torch.Generator().manual_seed(4)
    B, T = 300, 3
    batch = PACTBatch(response_mask=torch.ones(B, T, dtype=D), rewards=torch.rand(B, generator=g, dtype=D),
                      group_ids=torch.randint(0, 170, (B,), generator=g), old_logp_po=torch.zeros(B, T, dtype=D),
                      old_logp_tc=torch.zeros(B, T, dtype=D))
    current = {"logp_po": -torch.rand(B, T, generator=g, dtype=D), "logp_tc": -torch.rand(B, T, generator=g, dtype=D)}
    config = PACTLossConfig(mode="pact", lambda_sft=0.0, anchor_q=0.4)
    for step in range(3):
        ref, ref_m = pact_loss(PACTBatch(**{**vars(batch), **current}), config, 0.5, step=step)
        prep = loss_grads.prepare(batch, config, 0.5, step=step)
        loss, metrics = loss_grads.loss_and_metrics(prep, **current)
        assert torch.isclose(loss, ref, rtol=1e-12) and metrics.resolve()["anchored_groups"] == ref_m["anchored_groups"]


@pytest.mark.parametrize("field,value,error", [
    ("old_logp_po", float("nan"), ValueError), ("rewards", float("inf"), ValueError),
    ("sft_logp", float("nan"), ValueError), ("logp_po", 1e308, FloatingPointError)])
def test_resolve_raises_what_pact_loss_raises(field, value, error):
    config, batch, current = _setup(dict(beta_kl=0.1, kl_estimator="k2"), {}, 0)
    target = current if field in current else vars(batch)
    t = target[field]
    t.view(-1)[0] = value
    with pytest.raises(error):
        pact_loss(PACTBatch(**{**vars(batch), **{k: v for k, v in current.items() if k != "entropy"}}), config, 0.3)
    prep = loss_grads.prepare(batch, config, 0.3)
    _, metrics = loss_grads.loss_and_metrics(prep, current["logp_po"], current["logp_tc"], current["sft_logp"])
    with pytest.raises(error):
        metrics.resolve()


def test_resolve_raises_what_pact_loss_raises_on_a_non_finite_given_advantage():
    config, batch, current = _setup(dict(), {"advantages": "token"}, 0)
    batch.advantages[0, 0] = float("nan")  # row 0 is all response tokens
    with pytest.raises(ValueError, match="advantages contains NaN"):
        pact_loss(PACTBatch(**{**vars(batch), **{k: v for k, v in current.items() if k != "entropy"}}), config, 0.3)
    prep = loss_grads.prepare(batch, config, 0.3)
    _, metrics = loss_grads.loss_and_metrics(prep, current["logp_po"], current["logp_tc"], current["sft_logp"])
    with pytest.raises(ValueError, match="advantages contains NaN"):
        metrics.resolve()


@pytest.mark.parametrize("label", [-100, 5], ids=["hf-ignore", "unknown"])
def test_a_component_label_outside_0_to_4_is_refused_by_both(label):
    """An sft_components label outside NONE..OTHER (HF's -100 for 'not a target', another labelling's 5) was read
    as NONE: its tokens dropped out of the SFT term with no word (a trace labelled all -100 gave loss/sft 0).
    pact_loss refuses it, and the fused head's resolve (its one sync) as pact_loss does."""
    config, batch, current = _setup(dict(), {}, 0)
    batch.sft_components[0, 1] = label
    with pytest.raises(ValueError, match="sft_components must hold the labels 0-4"):
        pact_loss(PACTBatch(**{**vars(batch), **{k: v for k, v in current.items() if k != "entropy"}}), config, 0.3)
    prep = loss_grads.prepare(batch, config, 0.3)
    _, metrics = loss_grads.loss_and_metrics(prep, current["logp_po"], current["logp_tc"], current["sft_logp"])
    with pytest.raises(ValueError, match="sft_components must hold the labels 0-4"):
        metrics.resolve()


@pytest.mark.parametrize("name", ["sft_components", "sft_segment_ids", "sft_turn_ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_trace_labels_of_a_float_or_bool_dtype_are_refused_by_both(name, dtype):
    """A float label 1.5 matched no component (its tokens left the SFT term, read as none), a float segment id 0.7
    was truncated to 0, and a bool mask passed as labels read every token as reasoning: all without a word. The
    labels must be integers, in pact_loss and in the fused head's prepare."""
    config, batch, current = _setup(dict(), {}, 0)
    setattr(batch, name, getattr(batch, name).to(dtype))
    with pytest.raises(ValueError, match=f"{name} must be an integer tensor, got {dtype}"):
        pact_loss(PACTBatch(**{**vars(batch), **{k: v for k, v in current.items() if k != "entropy"}}), config, 0.3)
    with pytest.raises(ValueError, match=f"{name} must be an integer tensor, got {dtype}"):
        loss_grads.prepare(batch, config, 0.3)


@pytest.mark.parametrize("name", ["sft_segment_ids", "sft_turn_ids"])
def test_a_negative_segment_or_turn_id_on_a_reasoning_token_is_refused_by_both(name):
    """The annealing read a negative turn id as turn 0 and kept a negative segment at every progress (loss moved,
    no word). Refused on reasoning tokens, the only ones whose ids it reads, by pact_loss and the fused head's
    resolve; a negative id on another token is not read and passes."""
    config, batch, current = _setup(dict(), {}, 0)
    ids = getattr(batch, name)
    ids[batch.sft_components != REASONING] = -1
    full = PACTBatch(**{**vars(batch), **{k: v for k, v in current.items() if k != "entropy"}})
    pact_loss(full, config, 0.3)
    ids[batch.sft_components == REASONING] = -1
    with pytest.raises(ValueError, match="must be >= 0 on reasoning tokens"):
        pact_loss(full, config, 0.3)
    prep = loss_grads.prepare(batch, config, 0.3)
    _, metrics = loss_grads.loss_and_metrics(prep, current["logp_po"], current["logp_tc"], current["sft_logp"])
    with pytest.raises(ValueError, match="must be >= 0 on reasoning tokens"):
        metrics.resolve()


@pytest.mark.parametrize("name,value", [("rl_scale", -1.0), ("sft_scale", -0.5), ("rl_scale", float("nan")),
                                        ("sft_scale", float("inf"))])
def test_a_loss_scale_that_is_negative_or_not_finite_is_refused_by_both(name, value):
    """A negative rl_scale or sft_scale turned its terms around (the loss and every gradient negated, no word); NaN
    or inf surfaced as 'the loss is not finite'. Refused in one line by pact_loss and by the fused head's prepare."""
    config, batch, current = _setup(dict(), {}, 0)
    full = PACTBatch(**{**vars(batch), **{k: v for k, v in current.items() if k != "entropy"}})
    message = re.escape(f"pact_loss: {name}={value} must be a finite number >= 0")
    with pytest.raises(ValueError, match=message):
        pact_loss(full, config, 0.3, **{name: value})
    with pytest.raises(ValueError, match=message):
        loss_grads.prepare(batch, config, 0.3, **{name: value})


def test_anchoring_draws_that_differ_within_a_group_are_refused_by_both():
    """batch.anchored is each row's copy of its group's draw; rows of one group that disagree (draws not moved
    with their rows, or made for other group ids) were taken row by row, and anchored_groups counted the group as
    anchored. pact_loss refuses them, and the fused head's resolve as pact_loss does."""
    config, batch, current = _setup(dict(), {"anchored": True}, 0)
    pact_loss(PACTBatch(**{**vars(batch), **{k: v for k, v in current.items() if k != "entropy"}}), config, 0.3)
    batch.anchored = batch.anchored.roll(1)  # [F, T, T, F, T, T]: group 4 gets F and T
    with pytest.raises(ValueError, match="anchored differs between rollouts of one prompt group"):
        pact_loss(PACTBatch(**{**vars(batch), **{k: v for k, v in current.items() if k != "entropy"}}), config, 0.3)
    prep = loss_grads.prepare(batch, config, 0.3)
    _, metrics = loss_grads.loss_and_metrics(prep, current["logp_po"], current["logp_tc"], current["sft_logp"])
    with pytest.raises(ValueError, match="anchored differs between rollouts of one prompt group"):
        metrics.resolve()


@pytest.mark.parametrize("cfg,progress,opts", [CONFIGS[0], CONFIGS[2], CONFIGS[3], CONFIGS[11]])
def test_prepare_grads_value_and_metrics_take_one_sync(cfg, progress, opts):
    config, batch, current = _setup(cfg, opts, 1)
    with count_syncs() as syncs:
        prep = loss_grads.prepare(batch, config, progress, step=2, old_from_current=opts.get("old_from_current", False))
        loss_grads.token_grads(prep, current["logp_po"], current["logp_tc"])
        _, metrics = loss_grads.loss_and_metrics(prep, **{k: v for k, v in current.items()
                                                          if k != "entropy" or config.c_ent > 0})
        metrics.resolve()
    assert syncs.total == 1, syncs.calls


def test_a_given_generator_draws_and_advances_as_in_pact_loss():
    config, batch, current = _setup(dict(anchor_q=0.5), {}, 2)
    mine, theirs = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(3):
        ref, ref_m = pact_loss(PACTBatch(**{**vars(batch), **{k: v for k, v in current.items() if k != "entropy"}}),
                               config, 0.3, generator=theirs)
        prep = loss_grads.prepare(batch, config, 0.3, generator=mine)
        loss, metrics = loss_grads.loss_and_metrics(prep, current["logp_po"], current["logp_tc"], current["sft_logp"])
        assert torch.isclose(loss, ref, rtol=1e-12) and metrics.resolve()["anchored_groups"] == ref_m["anchored_groups"]
        assert torch.equal(mine.get_state(), theirs.get_state())


def test_behavior_denominator_from_another_rows_current_log_prob_is_refused():
    """ctx_den='behavior' without behavior_logp and old_from_current: L_TC's denominator would be the prompt-only
    row's current log-prob, not a constant of the token; refused in one line rather than differentiated wrongly."""
    config, batch, _ = _setup(dict(ctx_den="behavior"), {"old_from_current": True}, 0)
    batch.behavior_logp = None
    with pytest.raises(ValueError, match="behavior_logp"):
        loss_grads.prepare(batch, config, 0.3, old_from_current=True)
