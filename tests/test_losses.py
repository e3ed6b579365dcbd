"""Every PACT term against hand-written float64 computations (loops, no vectorised shortcuts)."""
import math
import re

import numpy as np
import pytest
import torch

from pact_fast.losses import (NONE, OTHER, REASONING, TOOL_CALL, TOOL_RESPONSE, PACTBatch, PACTLossConfig,
                              aggregate, anchor_draws, anchor_generator, clipped_surrogate_tokens,
                              group_advantages, kl_penalty, pact_loss, reasoning_segments_kept, sft_loss,
                              sft_token_weights, tool_call_weight)

D = torch.float64


def _batch(B=6, T=7, seed=0, groups=(0, 0, 0, 1, 1, 1)):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(D)
    mask[0, :] = 1.0
    old_tc = -torch.rand(B, T, generator=g, dtype=D) * 3
    old_po = -torch.rand(B, T, generator=g, dtype=D) * 3
    return PACTBatch(
        response_mask=mask, rewards=torch.rand(B, generator=g, dtype=D),
        group_ids=torch.tensor(groups[:B]),
        logp_tc=(old_tc + 0.4 * torch.randn(B, T, generator=g, dtype=D)).requires_grad_(),
        logp_po=(old_po + 0.4 * torch.randn(B, T, generator=g, dtype=D)).requires_grad_(),
        old_logp_tc=old_tc, old_logp_po=old_po,
        sft_logp=(-torch.rand(2, 9, generator=g, dtype=D) * 2).requires_grad_(),
        sft_components=torch.tensor([[NONE, REASONING, REASONING, REASONING, TOOL_CALL, TOOL_CALL, OTHER,
                                      TOOL_RESPONSE, REASONING],
                                     [REASONING, REASONING, TOOL_CALL, OTHER, TOOL_RESPONSE, TOOL_RESPONSE,
                                      REASONING, TOOL_CALL, NONE]]),
        sft_segment_ids=torch.tensor([[0, 0, 1, 2, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 0]]),
        sft_turn_ids=torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1]]),
    )


def _hand_advantages(rewards, groups, eps, norm):
    out = []
    for i in range(len(rewards)):
        members = [float(rewards[j]) for j in range(len(rewards)) if int(groups[j]) == int(groups[i])]
        mean = sum(members) / len(members)
        var = sum((r - mean) ** 2 for r in members) / max(len(members) - 1, 1)
        a = float(rewards[i]) - mean
        out.append(a / (math.sqrt(var) + eps) if norm else a)
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("norm", [True, False], ids=["std", "no-std"])
def test_group_advantages(norm):
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 3.0, 7.0], dtype=D)
    groups = torch.tensor([4, 4, 4, 9, 9, 1, 1])
    adv = group_advantages(rewards, groups, eps=1e-6, norm_by_std=norm)
    assert torch.allclose(adv.double(), _hand_advantages(rewards, groups, 1e-6, norm).float().double(), atol=1e-5)
    assert adv[3] == 0 and adv[4] == 0, "equal rewards give zero advantage"
    assert group_advantages(torch.tensor([3.0]), torch.tensor([0])).item() == 0.0


def test_group_advantages_of_rewards_whose_squares_overflow_float32():
    """Rewards past ~1.8e19 (an environment's raw score): their squares overflowed fp32, the std became inf and
    every advantage 0, so the group taught nothing, without a word."""
    rewards = torch.tensor([1e20, 0.0, 0.0, 1e20])
    groups = torch.tensor([0, 0, 0, 0])
    adv = group_advantages(rewards, groups)
    assert adv.dtype == torch.float32
    assert torch.allclose(adv.double(), _hand_advantages(rewards.double(), groups, 1e-6, True), rtol=1e-6)
    assert adv[0] > 0.8 and adv[1] < -0.8


def _hand_token_loss(lp, old, a, lo, hi, c):
    r = math.exp(lp - old)
    loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
    if c is not None and a < 0:
        loss = min(loss, -a * c)
    return loss


@pytest.mark.parametrize("dual", [None, 3.0], ids=["no-dual", "dual3"])
def test_clipped_surrogate_clips_both_sides(dual):
    lp = torch.tensor([[0.0, 0.5, -0.5, 2.0, -2.0, 0.1]], dtype=D).repeat(2, 1)
    old = torch.zeros_like(lp)
    adv = torch.tensor([1.0, -1.0], dtype=D)
    loss, ratio, low, high, dual_mask = clipped_surrogate_tokens(lp, old, adv, clip_eps_low=0.2, clip_eps_high=0.28,
                                                                 dual_clip=dual)
    for b in range(2):
        for t in range(lp.shape[1]):
            expected = _hand_token_loss(lp[b, t].item(), 0.0, adv[b].item(), 0.2, 0.28, dual)
            assert loss[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert high[0].tolist() == [False, True, False, True, False, False]
    assert low[1].tolist() == [False, False, True, False, True, False]
    if dual:
        assert dual_mask[1].tolist() == [False, False, False, True, False, False]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_with_an_empty_row(agg):
    values = torch.randn(3, 4, dtype=D)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=D)
    values[1, 0] = float("nan")  # masked NaN must not leak
    rows = [[values[b, t].item() for t in range(4) if mask[b, t]] for b in range(3)]
    if agg == "token-mean":
        expected = sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    elif agg == "seq-mean-token-mean":
        expected = sum(sum(r) / len(r) for r in rows if r) / 2
    else:
        expected = sum(sum(r) for r in rows) / (2 * 4)
    assert aggregate(values, mask, agg).item() == pytest.approx(expected, rel=1e-12)


def _hand_tc_po(batch, cfg):
    adv = _hand_advantages(batch.rewards, batch.group_ids, cfg.adv_eps, cfg.norm_adv_by_std)
    B, T = batch.response_mask.shape
    tc, po = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            tc[b][t] = _hand_token_loss(batch.logp_tc[b, t].item(), batch.old_logp_tc[b, t].item(), adv[b].item(),
                                        cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip)
            po[b][t] = _hand_token_loss(batch.logp_po[b, t].item(), batch.old_logp_po[b, t].item(), adv[b].item(),
                                        cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip)
    return torch.tensor(tc, dtype=D), torch.tensor(po, dtype=D)


def test_mix_anchoring_is_the_weighted_sum_of_both_surrogates():
    batch = _batch()
    cfg = PACTLossConfig(anchor_mode="mix", anchor_q=0.3, lambda_sft=0.0, clip_eps_high=0.28)
    loss, metrics = pact_loss(batch, cfg)
    tc, po = _hand_tc_po(batch, cfg)
    m = batch.response_mask
    expected = ((0.7 * tc + 0.3 * po) * m).sum() / m.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert metrics["loss/rl"] == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("ctx_den", ["same", "behavior"])
def test_bernoulli_anchoring_picks_one_surrogate_per_group(ctx_den):
    batch = _batch()
    batch.behavior_logp = batch.old_logp_po - 0.1
    cfg = PACTLossConfig(anchor_q=0.5, lambda_sft=0.0, ctx_den=ctx_den)
    draws = anchor_draws(2, 0.5, anchor_generator(cfg.seed, 11))
    loss, metrics = pact_loss(batch, cfg, step=11)
    den_batch = PACTBatch(**{**batch.__dict__, "old_logp_tc": batch.behavior_logp}) if ctx_den == "behavior" else batch
    tc, po = _hand_tc_po(den_batch, cfg)
    _, po_true = _hand_tc_po(batch, cfg)
    rows = [po_true[b] if draws[int(batch.group_ids[b])] else tc[b] for b in range(6)]
    m = batch.response_mask
    expected = (torch.stack(rows) * m).sum() / m.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert metrics["anchored_groups"] == float(draws.sum())


def test_anchoring_frequency_matches_q_and_is_reproducible():
    q = 0.3
    draws = anchor_draws(40000, q, anchor_generator(seed=7, step=3))
    assert abs(draws.double().mean().item() - q) < 0.01
    assert torch.equal(draws, anchor_draws(40000, q, anchor_generator(seed=7, step=3)))
    assert not torch.equal(draws, anchor_draws(40000, q, anchor_generator(seed=7, step=4)))
    # per step, over many steps of 2 groups, pact_loss anchors a q fraction
    batch = _batch()
    counts = [pact_loss(batch, PACTLossConfig(anchor_q=q, lambda_sft=0.0), step=s)[1]["anchored_groups"]
              for s in range(1500)]
    assert abs(sum(counts) / (2 * 1500) - q) < 0.03


@pytest.mark.parametrize("progress,beta,kept4,kept3", [(0.0, 0.8, 4, 3), (0.5, 0.5, 2, 2), (1.0, 0.2, 0, 0)])
def test_schedules(progress, beta, kept4, kept3):
    assert tool_call_weight(progress) == pytest.approx(beta)
    assert reasoning_segments_kept(4, progress) == kept4
    assert reasoning_segments_kept(3, progress) == kept3
    assert reasoning_segments_kept(torch.tensor([4, 3]), progress).tolist() == [kept4, kept3]


def _hand_sft_weights(comp, seg, turn, progress, cfg):
    beta = cfg.beta_0 + (cfg.beta_1 - cfg.beta_0) * min(progress / cfg.s_end, 1.0)
    S, E = comp.shape
    w = [[0.0] * E for _ in range(S)]
    for s in range(S):
        n_seg = {}
        for e in range(E):
            if comp[s, e] == REASONING:
                k = int(turn[s, e])
                n_seg[k] = max(n_seg.get(k, 0), int(seg[s, e]) + 1)
        for e in range(E):
            c = int(comp[s, e])
            if c == TOOL_CALL:
                w[s][e] = beta
            elif c == OTHER:
                w[s][e] = cfg.w_other
            elif c == REASONING:
                if cfg.sft_reasoning_mode == "scale":
                    w[s][e] = cfg.w_reason * beta
                else:
                    keep = math.ceil(n_seg[int(turn[s, e])] * (1 - min(progress / cfg.s_end, 1.0)) - 1e-9)
                    w[s][e] = cfg.w_reason if int(seg[s, e]) < keep else 0.0
    return torch.tensor(w, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["segment", "scale"])
@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_sft_weights_and_loss(mode, progress):
    batch = _batch()
    cfg = PACTLossConfig(mode="pact", sft_reasoning_mode=mode, w_reason=0.9, w_other=0.7)
    comp, seg, turn = batch.sft_components, batch.sft_segment_ids, batch.sft_turn_ids
    w = sft_token_weights(comp, seg, turn, progress, cfg)
    expected_w = _hand_sft_weights(comp, seg, turn, progress, cfg)
    assert torch.allclose(w, expected_w)
    assert (w[comp == TOOL_RESPONSE] == 0).all() and (w[comp == NONE] == 0).all()
    lp = batch.sft_logp.detach()
    expected = 0.0
    for s in range(2):
        n = sum(int(c) in (REASONING, TOOL_CALL, OTHER) for c in comp[s])
        expected += sum(-expected_w[s, e].item() * lp[s, e].item() for e in range(9)) / n
    assert sft_loss(lp, w, comp).item() == pytest.approx(expected / 2, rel=1e-6)


def test_gradcheck_wrt_every_logprob_input():
    batch = _batch(B=4, T=5, groups=(0, 0, 1, 1))
    cfg = PACTLossConfig(anchor_mode="mix", beta_kl=0.1, c_ent=0.01)
    batch.ref_logp = batch.old_logp_po - 0.05
    ent = torch.rand(4, 5, dtype=D)

    def f(logp_tc, logp_po, sft_logp, entropy):
        b = PACTBatch(**{**batch.__dict__, "logp_tc": logp_tc, "logp_po": logp_po, "sft_logp": sft_logp,
                         "entropy": entropy})
        return pact_loss(b, cfg, progress=0.3)[0]

    inputs = (batch.logp_tc.detach().clone().requires_grad_(), batch.logp_po.detach().clone().requires_grad_(),
              batch.sft_logp.detach().clone().requires_grad_(), ent.requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
    lp = torch.tensor([-1.0, -0.5, -2.0], dtype=D)
    ref = torch.tensor([-1.2, -0.5, -1.0], dtype=D)
    for i in range(3):
        d = lp[i].item() - ref[i].item()
        expected = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) + d - 1}[estimator]
        assert kl_penalty(lp, ref, estimator)[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_kl_term_with_and_without_the_ratio_weight():
    batch = _batch()
    batch.ref_logp = batch.logp_po.detach() - 0.3 * torch.rand_like(batch.logp_po)
    lp, old, ref, m = batch.logp_po.detach(), batch.old_logp_po, batch.ref_logp, batch.response_mask
    for weighted in (False, True):
        cfg = PACTLossConfig(mode="grpo", beta_kl=0.5, kl_ratio_weighted=weighted)
        base = pact_loss(batch, PACTLossConfig(mode="grpo"))[0].item()
        total, tokens = 0.0, 0
        for b in range(m.shape[0]):
            for t in range(m.shape[1]):
                if m[b, t]:
                    d = lp[b, t].item() - ref[b, t].item()
                    k3 = math.exp(-d) + d - 1
                    total += k3 * (math.exp(lp[b, t].item() - old[b, t].item()) if weighted else 1.0)
                    tokens += 1
        loss, metrics = pact_loss(batch, cfg)
        assert metrics["loss/kl"] == pytest.approx(total / tokens, rel=1e-10)
        assert loss.item() == pytest.approx(base + 0.5 * total / tokens, rel=1e-10)


def test_baseline_sft_is_textbook_nll():
    batch = _batch()
    loss, metrics = pact_loss(batch, PACTLossConfig(mode="sft"), progress=0.9)
    lp, comp = batch.sft_logp.detach(), batch.sft_components
    per_trace = []
    for s in range(2):
        toks = [-lp[s, e].item() for e in range(9) if int(comp[s, e]) in (REASONING, TOOL_CALL, OTHER)]
        per_trace.append(sum(toks) / len(toks))
    assert loss.item() == pytest.approx(sum(per_trace) / 2, rel=1e-10)
    assert "loss/rl" not in metrics


def test_baseline_grpo_is_textbook_prompt_only_grpo():
    batch = _batch()
    cfg = PACTLossConfig(mode="grpo")
    loss, metrics = pact_loss(batch, cfg)
    _, po = _hand_tc_po(batch, cfg)
    m = batch.response_mask
    assert loss.item() == pytest.approx(((po * m).sum() / m.sum()).item(), rel=1e-10)
    assert "loss/sft" not in metrics
    batch.logp_tc = None  # GRPO never needs the trace-conditioned log-probs
    assert pact_loss(batch, cfg)[0].item() == pytest.approx(loss.item())


def test_sft_then_grpo_switches_at_the_configured_progress():
    batch = _batch()
    cfg = PACTLossConfig(mode="sft_then_grpo", switch_progress=0.4)
    early = pact_loss(batch, cfg, progress=0.1)
    late = pact_loss(batch, cfg, progress=0.6)
    assert early[0].item() == pytest.approx(pact_loss(batch, PACTLossConfig(mode="sft"))[0].item())
    assert late[0].item() == pytest.approx(pact_loss(batch, PACTLossConfig(mode="grpo"))[0].item())


def test_masked_nan_is_harmless_and_empty_groups_are_counted():
    batch = _batch()
    batch.response_mask[3:] = 0  # group 1 selects nothing
    with torch.no_grad():
        batch.logp_tc[3:] = float("nan")
        batch.logp_po[3:] = float("nan")
    loss, metrics = pact_loss(batch, PACTLossConfig(anchor_mode="mix"))
    loss.backward()
    assert torch.isfinite(loss) and metrics["skipped_groups"] == 1.0
    assert torch.isfinite(batch.logp_tc.grad).all() and (batch.logp_tc.grad[3:] == 0).all()


def test_all_masked_gives_zero_rl_loss_not_nan():
    batch = _batch()
    batch.response_mask.zero_()
    loss, metrics = pact_loss(batch, PACTLossConfig(mode="grpo"))
    assert loss.item() == 0.0 and metrics["skipped_groups"] == 2.0


@pytest.mark.parametrize("change,word", [
    (lambda b: setattr(b, "logp_tc", b.logp_tc[:, :-1]), "logp_tc"),
    (lambda b: b.logp_po.data.__setitem__((0, 0), float("nan")), "logp_po contains NaN"),
    (lambda b: b.rewards.__setitem__(0, float("nan")), "rewards"),
    (lambda b: setattr(b, "old_logp_po", None), "old_logp_po"),
    (lambda b: setattr(b, "sft_components", b.sft_components[:, :-1]), "sft_components"),
    (lambda b: setattr(b, "sft_segment_ids", None), "sft_segment_ids"),
], ids=["shape", "nan-logp", "nan-reward", "missing-old", "sft-shape", "missing-segments"])
def test_bad_input_is_a_clear_error(change, word):
    batch = _batch()
    change(batch)
    with pytest.raises(ValueError, match=word):
        pact_loss(batch, PACTLossConfig())


@pytest.mark.parametrize("kwargs,word", [(dict(mode="ppo"), "mode"), (dict(loss_agg="mean"), "loss_agg"),
                                         (dict(anchor_q=1.5), "anchor_q"), (dict(dual_clip=0.5), "dual_clip"),
                                         (dict(kl_estimator="k4"), "kl_estimator")])
def test_bad_config_names_the_field_and_choices(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PACTLossConfig(**kwargs)


def test_precomputed_advantages_and_anchoring_are_used_as_given():
    batch = _batch()
    cfg = PACTLossConfig(anchor_q=0.5, lambda_sft=0.0)
    adv = torch.tensor([0.5, -1.0, 0.2, 1.5, -0.3, 0.0], dtype=D)
    anchored = torch.tensor([True, True, True, False, False, False])
    batch.advantages, batch.anchored = adv, anchored
    loss, metrics = pact_loss(batch, cfg)
    rows = []
    for b in range(6):
        lp = batch.logp_po if anchored[b] else batch.logp_tc
        old = batch.old_logp_po if anchored[b] else batch.old_logp_tc
        rows.append([_hand_token_loss(lp[b, t].item(), old[b, t].item(), adv[b].item(), 0.2, 0.2, None)
                     for t in range(7)])
    m = batch.response_mask
    assert loss.item() == pytest.approx(((torch.tensor(rows, dtype=D) * m).sum() / m.sum()).item(), rel=1e-10)
    assert metrics["anchored_groups"] == 1.0


def test_a_batch_without_rollouts_gives_the_sft_term_alone():
    batch = _batch()
    full_sft = pact_loss(batch, PACTLossConfig(), progress=0.2)[1]["loss/sft"]
    empty = torch.zeros(0, 0, dtype=D)
    batch = PACTBatch(**{**batch.__dict__, "response_mask": empty, "rewards": torch.zeros(0, dtype=D),
                         "group_ids": torch.zeros(0, dtype=torch.long), "logp_tc": empty, "logp_po": empty,
                         "old_logp_tc": empty, "old_logp_po": empty})
    loss, metrics = pact_loss(batch, PACTLossConfig(), progress=0.2)
    assert loss.item() == pytest.approx(full_sft) and metrics["loss/rl"] == 0.0


def test_a_batch_without_traces_needs_no_segment_labels():
    """Empty trace tensors ([0, E]: a micro-batch holding rollouts only) in segment mode were refused for lack of
    segment and turn ids, which label no token there; the loss is the RL term alone."""
    batch = _batch()
    rl_only = pact_loss(batch, PACTLossConfig(lambda_sft=0.0), progress=0.2)[0]
    empty = dict(sft_logp=torch.zeros(0, 9, dtype=D), sft_components=torch.zeros(0, 9, dtype=torch.long),
                 sft_segment_ids=None, sft_turn_ids=None)
    loss, metrics = pact_loss(PACTBatch(**{**vars(batch), **empty}), PACTLossConfig(), progress=0.2)
    assert loss.item() == pytest.approx(rl_only.item(), rel=1e-12) and metrics["loss/sft"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("value,size", [(0.7, 16), (0.9, 3), (1 / 3, 7), (0.1, 5), (1000.1, 9), (-2.3, 2)])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(dtype, value, size):
    g = torch.Generator().manual_seed(size)
    varied = torch.rand(5, generator=g, dtype=torch.float64)
    rewards = torch.cat([torch.full((size,), value, dtype=torch.float64), varied]).to(dtype)
    groups = torch.tensor([7] * size + [2] * 5)
    for norm in (True, False):
        adv = group_advantages(rewards, groups, norm_by_std=norm)
        assert (adv[:size] == 0).all(), (norm, adv[:size])
        hand = _hand_advantages(rewards.double(), groups, 1e-6, norm)
        assert torch.allclose(adv[size:].double(), hand[size:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("mode", ["pact", "grpo"])
def test_a_group_of_equal_rewards_contributes_no_loss_and_no_gradient(dtype, mode):
    batch = _batch(groups=(0, 0, 0, 1, 1, 1))
    batch.rewards = torch.tensor([0.7, 0.7, 0.7, 0.2, 0.9, 0.4], dtype=dtype)
    cfg = PACTLossConfig(mode=mode, lambda_sft=0.0, anchor_mode="mix", anchor_q=0.5)  # both surrogates
    loss, _ = pact_loss(batch, cfg)
    loss.backward()
    for name in ("logp_po", "logp_tc") if mode == "pact" else ("logp_po",):
        grad = getattr(batch, name).grad
        assert (grad[:3] == 0).all(), name
        assert grad[3:].abs().sum() > 0, name
    moved = _batch(groups=(0, 0, 0, 1, 1, 1))
    moved.rewards = batch.rewards
    with torch.no_grad():
        moved.logp_po[:3] += 0.3
        moved.logp_tc[:3] -= 0.2
    assert pact_loss(moved, cfg)[0].item() == loss.item(), "the equal-reward group's tokens add nothing"


@pytest.mark.parametrize("change,word", [
    (lambda b: setattr(b, "anchored", torch.ones(5, dtype=torch.bool)), "anchored must be \\[B\\] = \\[6\\]"),
    (lambda b: setattr(b, "advantages", torch.zeros(6, 3, dtype=D)), "advantages must be \\[B\\]"),
    (lambda b: setattr(b, "advantages", torch.zeros(7, dtype=D)), "advantages must be \\[B\\]"),
    (lambda b: setattr(b, "group_ids", b.group_ids.double()), "group_ids must be an integer"),
    (lambda b: setattr(b, "rewards", b.rewards[:4]), "rewards must be \\[B\\]"),
    (lambda b: setattr(b, "anchored", torch.ones(6, dtype=D)), "anchored must be an integer or bool"),
    # with advantages given, bool group ids (a mask passed as ids) were taken as two groups without a word
    (lambda b: (setattr(b, "group_ids", b.group_ids > 0), setattr(b, "advantages", torch.ones(6, dtype=D))),
     "group_ids must be an integer tensor, got torch.bool"),
], ids=["anchored-length", "advantages-2d", "advantages-length", "float-group-ids", "rewards-length",
        "float-anchored", "bool-group-ids-with-advantages"])
def test_wrong_per_rollout_fields_name_the_field(change, word):
    batch = _batch()
    change(batch)
    with pytest.raises(ValueError, match=word):
        pact_loss(batch, PACTLossConfig())


@pytest.mark.parametrize("progress", [-0.1, 1.5, float("nan")])
def test_progress_outside_zero_one_is_rejected(progress):
    with pytest.raises(ValueError, match="progress"):
        pact_loss(_batch(), PACTLossConfig(), progress)


def test_float_group_ids_are_rejected_by_group_advantages():
    with pytest.raises(ValueError, match="group_ids must be an integer"):
        group_advantages(torch.rand(4), torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_advantages_per_token_are_accepted():
    batch = _batch()
    cfg = PACTLossConfig(mode="grpo", lambda_sft=0.0)
    per_rollout = torch.linspace(-1, 1, 6, dtype=D)
    batch.advantages = per_rollout
    expected = pact_loss(batch, cfg)[0].item()
    batch.advantages = per_rollout[:, None].expand(6, 7)
    assert pact_loss(batch, cfg)[0].item() == pytest.approx(expected, rel=1e-12)


def test_sft_weight_metrics_follow_each_components_schedule():
    batch = _batch()
    for progress in (0.0, 0.5, 1.0):
        cfg = PACTLossConfig(sft_reasoning_mode="scale", w_other=0.6)
        _, m = pact_loss(batch, cfg, progress)
        beta = tool_call_weight(progress)
        assert m["sft_weight/tool_call"] == pytest.approx(beta)
        assert m["sft_weight/reasoning"] == pytest.approx(beta * cfg.w_reason)  # scale mode: annealed like calls
        assert m["sft_weight/other"] == pytest.approx(0.6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("split", [[[0, 1], [2, 3, 4], [5]], [[0], [1], [2], [3], [4], [5]]], ids=["3-mbs", "6-mbs"])
def test_loss_scales_make_micro_batch_losses_add_up_to_the_step_loss(agg, split):
    """pact_loss of each micro-batch times its loss_scales: the gradients add up to those of the whole batch in
    one pact_loss (float64, to 1e-10), for every aggregation; traces are spread over the micro-batches."""
    from pact_fast.losses import loss_scales, response_counts

    full = _batch()
    cfg = PACTLossConfig(loss_agg=agg, loss_scale_factor=7 if agg == "seq-mean-token-sum-norm" else None)
    full.advantages = group_advantages(full.rewards, full.group_ids)
    full.anchored = torch.tensor([True, True, True, False, False, False])
    loss, _ = pact_loss(full, cfg, 0.3)
    leaves = (full.logp_tc, full.logp_po, full.sft_logp)
    want = torch.autograd.grad(loss, leaves)
    traces = [[0], [1]] + [[]] * (len(split) - 2)
    step_tokens, step_seqs = response_counts(full.response_mask)
    total = 0.0
    for rows, sft_rows in zip(split, traces):
        part = PACTBatch(**{name: value[rows] if torch.is_tensor(value) and name[:4] != "sft_" and value.dim() else
                            value for name, value in vars(full).items()})
        for name in ("sft_logp", "sft_components", "sft_segment_ids", "sft_turn_ids"):
            setattr(part, name, getattr(full, name)[sft_rows])
        rl_scale, sft_scale = loss_scales(part.response_mask, len(sft_rows), agg, step_tokens=step_tokens,
                                          step_seqs=step_seqs, step_traces=2)
        total = total + pact_loss(part, cfg, 0.3, rl_scale=rl_scale, sft_scale=sft_scale)[0]
    got = torch.autograd.grad(total, leaves)
    assert total.detach().item() == pytest.approx(loss.detach().item(), rel=1e-10)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["sft", "pact"])
def test_a_trace_row_without_assistant_tokens_counts_in_the_mean_so_micro_batches_add_up(mode):
    """A trace row with no assistant token (a trace cut to its tool responses, a row masked out) is a trace
    row to loss_scales, the adapters and the trainer: the step's SFT term is the mean over the step's rows, that
    row counting 0. pact_loss averaged over rows with assistant tokens only, so the micro-batch losses
    (1.5 / 3 + 2 / 1 * 2 / 3 = 1.83 here) did not add up to the whole step's ((1.5 + 2) / 2 = 1.75), and a
    trace's weight depended on which micro-batch held the empty row."""
    from pact_fast.losses import loss_scales

    comps = torch.tensor([[REASONING, TOOL_CALL], [TOOL_RESPONSE, NONE], [OTHER, OTHER]])
    logp = torch.tensor([[-1.0, -2.0], [-5.0, -5.0], [-3.0, -1.0]], dtype=D, requires_grad=True)
    cfg = PACTLossConfig(mode=mode, w_other=1.0, beta_0=1.0, beta_1=1.0)  # every assistant token weighs 1
    empty = torch.zeros(0, 2, dtype=D)

    def loss(rows, step_traces):
        batch = PACTBatch(response_mask=empty, rewards=torch.zeros(0, dtype=D), group_ids=torch.zeros(0).long(),
                          logp_po=empty, old_logp_po=empty, logp_tc=empty, old_logp_tc=empty,
                          sft_logp=logp[rows], sft_components=comps[rows],
                          sft_segment_ids=torch.zeros_like(comps[rows]), sft_turn_ids=torch.zeros_like(comps[rows]))
        _, sft_scale = loss_scales(empty, len(rows), step_traces=step_traces)
        return pact_loss(batch, cfg, 0.0, sft_scale=sft_scale)[0]

    whole = loss([0, 1, 2], None)
    assert whole.item() == pytest.approx((1.5 + 0.0 + 2.0) / 3, rel=1e-12)  # by hand: the mean over 3 rows
    for split in ([[0], [1, 2]], [[0, 1], [2]], [[1], [0, 2]]):
        total = sum(loss(rows, 3) for rows in split)
        assert total.item() == pytest.approx(whole.item(), rel=1e-12)
        got, = torch.autograd.grad(total, logp)
        want = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]], dtype=D) / -(2 * 3)  # -w_t / N_trace / 3 rows
        assert torch.allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("field,value,message", [
    ("advantages", torch.tensor([1, -1, 0, 2, 1, 0]), r"advantages must be a floating-point tensor, got torch.int64"),
    ("advantages", torch.tensor([True, False] * 3), r"advantages must be a floating-point tensor, got torch.bool"),
    ("response_mask", torch.ones(6, 7, device="meta"), r"response_mask on the meta device"),
    ("old_logp_po", torch.ones(6, 7, device="meta"), r"old_logp_po on the meta device"),
], ids=["int-advantages", "bool-advantages", "meta-mask", "meta-old-logp"])
def test_advantages_that_are_not_floats_and_meta_tensors_are_refused_in_one_line(field, value, message):
    """Integer advantages failed in the metrics (mean of a Long tensor), bool ones at the surrogate's negation, and
    a meta tensor at the first Tensor.item(), each a deep traceback naming no input; pact_loss and loss_grads'
    prepare (the fused head's) refuse them by name."""
    from pact_fast import loss_grads

    batch = _batch()
    setattr(batch, field, value)
    with pytest.raises(ValueError, match=message):
        pact_loss(batch, PACTLossConfig(), 0.3)
    with pytest.raises(ValueError, match=message):
        loss_grads.prepare(batch, PACTLossConfig(), 0.3)


def test_loss_scales_without_step_counts_take_the_micro_batch_as_the_step():
    from pact_fast.losses import loss_scales

    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert loss_scales(mask, 1) == (1.0, 1.0)
    assert loss_scales(mask, 1, "token-mean", step_tokens=8, step_traces=4, world=2) == (0.5, 0.5)
    assert loss_scales(mask, 0, "seq-mean-token-mean", step_seqs=4, step_traces=0) == (0.25, 0.0)


@pytest.mark.parametrize("kwargs,name", [(dict(step_tokens=0, step_traces=4), "step_tokens"),
                                         (dict(loss_agg="seq-mean-token-mean", step_seqs=0, step_traces=4), "step_seqs"),
                                         (dict(step_tokens=8, step_traces=0), "step_traces")])
def test_loss_scales_refuse_a_step_count_of_0_beside_a_micro_batch_that_holds_some(kwargs, name):
    """A step count of 0 gave this micro-batch's share as 0: its RL or SFT term silently left the loss (step_traces=0
    with traces here turned the SFT term off). The step's count includes the micro-batch's own."""
    from pact_fast.losses import loss_scales

    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=f"loss_scales: {name}=0 while this micro-batch holds"):
        loss_scales(mask, 2, **kwargs)


def test_loss_scales_refuse_an_unknown_aggregation_and_a_world_below_1():
    """loss_agg='token_mean' (a typo) took the responses' count where the loss averages tokens (rl_scale 1.0 for
    0.5), and world=0 made both shares 0: the micro-batch's loss left the step without a word."""
    from pact_fast.losses import loss_scales

    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="loss_scales: unknown loss_agg 'token_mean'"):
        loss_scales(mask, 1, "token_mean", step_tokens=12, step_traces=2)
    with pytest.raises(ValueError, match="loss_scales: world=0 must be >= 1"):
        loss_scales(mask, 1, "token-mean", step_tokens=12, step_traces=2, world=0)
    assert loss_scales(mask, 1, "token-mean", step_tokens=12, step_traces=2) == (0.5, 0.5)


@pytest.mark.parametrize("name", ["old_logp_po", "old_logp_tc", "ref_logp", "behavior_logp"])
def test_a_constant_that_carries_a_gradient_is_refused(name):
    """old_logp_po=logp_po without .detach() (on-policy, one epoch) makes every ratio exp(0) with a gradient that
    cancels: the RL term's gradient would be exactly 0. The loss refuses it, naming the field."""
    batch = _batch()
    batch.ref_logp = batch.old_logp_po.clone()
    config = PACTLossConfig(mode="grpo", beta_kl=0.1)
    setattr(batch, name, batch.logp_po if name != "old_logp_tc" else batch.logp_tc)
    with pytest.raises(ValueError, match=f"{name} requires grad; pass it detached"):
        pact_loss(batch, config, 0.3)
    setattr(batch, name, getattr(batch, name).detach())
    loss, _ = pact_loss(batch, config, 0.3)
    assert torch.autograd.grad(loss, batch.logp_po)[0].abs().sum() > 0


@pytest.mark.parametrize("name,shape", [("sft_turn_ids", (1, 9)), ("sft_segment_ids", (1, 9)),
                                        ("sft_segment_ids", (2, 8)), ("sft_turn_ids", (18,)), ("sft_logp", (2, 8))])
def test_a_trace_field_of_another_shape_than_sft_components_is_refused_naming_it(name, shape):
    """sft_turn_ids [1, E] broadcast over the traces (every trace took row 0's turns: loss 0.5 for 0.6), and
    other shapes failed with an IndexError naming no field; fused_pact_head took a [1, E] sft_segment_ids too."""
    from pact_fast.ops.fused_pact_head import fused_pact_head

    batch = _batch()
    setattr(batch, name, getattr(batch, name).reshape(-1)[:math.prod(shape)].reshape(shape))
    with pytest.raises(ValueError, match=rf"{name} must be \[S, E\] = \[2, 9\]"):
        pact_loss(batch, PACTLossConfig(), 0.5)
    if name != "sft_logp":  # the fused head scores the traces itself
        batch.logp_tc = batch.logp_po = batch.sft_logp = None
        rows = {"logp_tc": torch.arange(42).reshape(6, 7), "logp_po": torch.arange(42, 84).reshape(6, 7),
                "sft_logp": torch.arange(84, 102).reshape(2, 9)}
        with pytest.raises(ValueError, match=rf"{name} must be \[S, E\]"):
            fused_pact_head(torch.randn(102, 4, dtype=D), torch.randn(5, 4, dtype=D), torch.zeros(102, dtype=torch.long),
                            rows, batch, PACTLossConfig(), 0.5)


@pytest.mark.parametrize("field,value,message", [
    ("c_ent", -0.1, "c_ent=-0.1 must be >= 0"), ("beta_kl", -0.1, "beta_kl=-0.1 must be >= 0"),
    ("lambda_sft", -1.0, "lambda_sft=-1.0 must be >= 0"), ("clip_eps_high", -0.5, "clip_eps_high=-0.5 must be >= 0"),
    ("clip_eps_low", -0.1, "clip_eps_low=-0.1 must be >= 0"), ("clip_eps_low", 1.0, "clip_eps_low=1.0 must be < 1"),
    ("w_reason", -1.0, "w_reason=-1.0 must be >= 0"), ("beta_0", -0.2, "beta_0=-0.2 must be >= 0"),
    ("loss_scale_factor", -5, "loss_scale_factor=-5 must be >= 1"),
    ("loss_scale_factor", 0, "loss_scale_factor=0 must be >= 1"),
])
def test_a_loss_config_out_of_range_is_refused(field, value, message):
    """A negative coefficient or weight read as "off" (``> 0`` tests, ``where(w > 0)``), a negative clip emptied the
    clip range (zero gradient), a loss_scale_factor <= 0 flipped the loss's sign or read as None: refused."""
    with pytest.raises(ValueError, match=re.escape(f"PACTLossConfig.{message}")):
        PACTLossConfig(**{field: value})


@pytest.mark.parametrize("field", ["lambda_sft", "c_ent", "beta_kl", "switch_progress", "clip_eps_low", "adv_eps",
                                   "s_end", "dual_clip", "w_reason"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_loss_config_that_is_not_finite_is_refused(field, value):
    """NaN passed every range check (each comparison is False): lambda_sft, c_ent or beta_kl NaN turned its term
    off without a word (their ``> 0`` tests), switch_progress NaN made sft_then_grpo SFT forever, the others a NaN
    loss several calls later. Refused in one line naming the field."""
    with pytest.raises(ValueError, match=re.escape(f"PACTLossConfig.{field}={value} must be a finite number")):
        PACTLossConfig(**{field: value})


def test_anchor_rows_refuses_a_probability_or_group_ids_it_would_misread():
    """q outside [0, 1] (NaN: no group anchored, 2.0: every group) and bool group ids (read as a mask over the
    draws: one draw for two rows) were taken silently; float ids were an IndexError, string ids a numpy error."""
    from pact_fast.losses import anchor_draws, anchor_generator, anchor_rows

    ids = torch.tensor([1, 0, 1, 2])
    want = anchor_draws(3, 0.5, anchor_generator(4, 7))[ids]
    assert torch.equal(anchor_rows(ids, 3, 0.5, 4, 7), want)
    assert torch.equal(anchor_rows(ids.tolist(), 3, 0.5, 4, 7), want)
    for q in (math.nan, 2.0, -0.1):
        with pytest.raises(ValueError, match=re.escape(f"anchor_rows: q={q} must lie in [0, 1]")):
            anchor_rows(ids, 3, q, 4, 7)
    for bad in (torch.tensor([True, False]), ids.float()):
        with pytest.raises(TypeError, match=f"group_ids must be integers, got {bad.dtype}"):
            anchor_rows(bad, 3, 0.5, 4, 7)
    for uid in (np.array(["a", "b"]), ["a", "b"]):
        with pytest.raises(TypeError, match="numpy.unique"):
            anchor_rows(uid, 3, 0.5, 4, 7)


@pytest.mark.parametrize("name", ["logp_tc", "sft_logp", "logp_po", "entropy"])
def test_a_current_policy_input_without_gradient_beside_ones_with_it_is_refused(name):
    """logp_tc scored under torch.no_grad() (as old log-probs are) added the trace-conditioned surrogate's value and
    no gradient: PACT's signal silently off for every group not anchored. A used current-policy input without
    gradient beside ones with it is refused; all without (evaluation under no_grad) and an empty one (a micro-batch
    without traces) pass, and so does one the loss does not read."""
    config = PACTLossConfig(c_ent=0.1)
    batch = _batch()
    batch.entropy = torch.rand_like(batch.logp_po).requires_grad_()
    setattr(batch, name, getattr(batch, name).detach())
    with pytest.raises(ValueError, match=rf"pact_loss: .* gradients but {name} does not \(scored under"):
        pact_loss(batch, config, 0.3)
    # read with weight 0 is unused too: every group anchored (anchor_q=1) weighs the trace-conditioned term 0,
    # none (anchor_q=0) the prompt-only one
    unused = {"logp_tc": [dict(mode="grpo"), dict(anchor_q=1.0), dict(anchor_q=1.0, anchor_mode="mix")],
              "logp_po": [dict(mode="sft"), dict(anchor_q=0.0), dict(anchor_q=0.0, anchor_mode="mix")],
              "sft_logp": [dict(mode="grpo")], "entropy": [{}]}
    for options in unused[name]:
        pact_loss(batch, PACTLossConfig(**options), 0.3)
    with torch.no_grad():
        pact_loss(PACTBatch(**{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()}),
                  config, 0.3)
    empty = _batch()
    empty.sft_logp, empty.sft_components = torch.zeros(0, 9, dtype=D), torch.zeros(0, 9, dtype=torch.long)
    empty.sft_segment_ids = empty.sft_turn_ids = empty.sft_components
    pact_loss(empty, PACTLossConfig(), 0.3)


def test_a_fractional_step_or_seed_of_the_anchoring_is_refused():
    """int() truncated the step: a training progress in [0, 1) passed as the step (pact_loss takes both) drew the
    same groups at every step, without a word. Integers (numpy's, 0-dim tensors', 3.0) are taken as they are."""
    from pact_fast.losses import anchor_rows

    ids = torch.arange(6)
    assert torch.equal(anchor_rows(ids, 6, 0.5, 4, 3.0), anchor_rows(ids, 6, 0.5, 4, np.int64(3)))
    assert torch.equal(anchor_rows(ids, 6, 0.5, 4, torch.tensor(3)), anchor_rows(ids, 6, 0.5, 4, 3))
    for step in (0.3, 0.9, math.nan, True):
        with pytest.raises(ValueError, match=re.escape(f"anchoring: step={step!r} must be an integer (the step")):
            anchor_rows(ids, 6, 0.5, 4, step)
    with pytest.raises(ValueError, match="anchoring: step=0.5 must be an integer"):
        pact_loss(_batch(), PACTLossConfig(), 0.5, step=0.5)
    with pytest.raises(ValueError, match="anchoring: seed=1.5 must be an integer"):
        anchor_rows(ids, 6, 0.5, 1.5, 3)


def test_a_mask_of_token_weights_is_refused_and_aggregate_counts_what_it_sums():
    """A soft mask (0.5) was read as 1 by pact_loss (same loss as a 0/1 mask) while aggregate divided by the soft
    sum: pact_loss refuses it; aggregate selects with nonzero entries in the sums and the counts alike."""
    values = torch.arange(20.0).reshape(4, 5)
    assert aggregate(values, 0.3 * torch.ones(4, 5)).item() == pytest.approx(9.5)
    assert aggregate(torch.ones(4, 5), 0.5 * torch.ones(4, 5), "seq-mean-token-mean").item() == pytest.approx(1.0)
    B, T = 4, 5
    logp = -torch.rand(B, T, dtype=torch.float64)
    batch = PACTBatch(response_mask=torch.full((B, T), 0.5), rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
                      group_ids=torch.tensor([0, 0, 1, 1]), logp_po=logp, old_logp_po=logp)
    with pytest.raises(ValueError, match="response_mask must hold 0 and 1 only"):
        pact_loss(batch, PACTLossConfig(mode="grpo"))


def test_an_empty_grpo_micro_batch_backpropagates_and_1d_token_rows_are_refused():
    """B=0 in mode grpo gave a loss without a graph (backward raised); clipped_surrogate_tokens on flat [N] token
    rows broadcast advantages against them into an [N, N] loss."""
    lp = torch.zeros(0, 5, requires_grad=True)
    batch = PACTBatch(response_mask=torch.zeros(0, 5), rewards=torch.zeros(0), group_ids=torch.zeros(0, dtype=torch.long),
                      logp_po=lp, old_logp_po=lp.detach())
    loss, _ = pact_loss(batch, PACTLossConfig(mode="grpo"))
    loss.backward()
    assert loss.item() == 0.0 and lp.grad.shape == (0, 5)
    with pytest.raises(ValueError, match=r"must be \[B, T\] and advantages \[B\] or \[B, T\]"):
        clipped_surrogate_tokens(torch.zeros(4), torch.zeros(4), torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_16_bit_log_probs_are_summed_and_counted_in_fp32(dtype, agg):
    """With fp16 log-probs and old log-probs, pact_loss counted the response tokens in fp16: 66,000 tokens summed to
    inf and the token-mean loss and its gradient were exactly 0 (bf16: counts off by up to 0.4%, and a trace of
    2,049 assistant tokens counted as 2,048)."""
    B, T, E = 33, 2000, 2049
    g = torch.Generator().manual_seed(0)
    old = (-torch.rand(B, T, generator=g)).to(dtype)
    logp = (old.double() + 0.1 * torch.randn(B, T, generator=g, dtype=D)).to(dtype)
    adv = torch.randn(B, generator=g).to(dtype)
    sft = (-torch.rand(1, E, generator=g) * 2).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (logp, sft)]
    leaves64 = [t.double().requires_grad_() for t in (logp, sft)]
    totals = []
    for (lp, sft_lp), cast in ((leaves, dtype), (leaves64, D)):
        batch = PACTBatch(response_mask=torch.ones(B, T), rewards=torch.zeros(B), group_ids=torch.arange(B),
                          logp_po=lp, old_logp_po=old.to(cast), logp_tc=lp, old_logp_tc=old.to(cast),
                          advantages=adv.to(cast), sft_logp=sft_lp, sft_components=torch.full((1, E), TOOL_CALL))
        totals.append(pact_loss(batch, PACTLossConfig(loss_agg=agg, anchor_mode="mix", sft_reasoning_mode="scale"))[0])
    loss, expected = totals
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves64)):
        assert (got.double() - want).abs().max() <= 1e-2 * want.abs().max()  # each rounded to the 16-bit leaf


@pytest.mark.parametrize("per_token", [False, True], ids=["[B]", "[B, T]"])
def test_a_non_finite_advantage_is_named_and_a_masked_one_is_harmless(per_token):
    """A NaN advantage on a response token failed as 'the loss is not finite', naming no input (rewards and token
    inputs are named); one on a masked token (or a row without response tokens) changes nothing."""
    batch = _batch()
    B, T = batch.response_mask.shape
    adv = torch.randn(B, T, dtype=D) if per_token else torch.randn(B, dtype=D)
    batch.response_mask[5] = 0.0
    clean, _ = pact_loss(PACTBatch(**{**vars(batch), "advantages": adv}), PACTLossConfig(mode="grpo"))
    masked = adv.clone()
    masked[5] = float("nan")  # a row without response tokens (and each of its tokens)
    if per_token:
        masked[1][batch.response_mask[1] == 0] = float("inf")
    leaf = batch.logp_po
    loss, _ = pact_loss(PACTBatch(**{**vars(batch), "advantages": masked}), PACTLossConfig(mode="grpo"))
    assert loss.item() == clean.item()
    assert torch.isfinite(torch.autograd.grad(loss, leaf)[0]).all()
    masked[0] = float("nan")
    with pytest.raises(ValueError, match="advantages contains NaN or inf on unmasked tokens"):
        pact_loss(PACTBatch(**{**vars(batch), "advantages": masked}), PACTLossConfig(mode="grpo"))
