"""PACTPolicyLoss against OpenRLHF's own PolicyLoss (openrlhf 0.11.2, installed --no-deps).

``openrlhf.models`` imports the actor, which needs flash-attn (CUDA only), and ``models/utils.py``
imports deepspeed for ZeRO-3 helpers the loss never calls. The fixture loads the real ``loss.py`` and
``utils.py`` as modules of a bare ``openrlhf.models`` package, with an empty stand-in for deepspeed
when it is not installed; everything is undone after each test.
"""
import importlib
import importlib.util
import inspect
import sys
import types
from pathlib import Path

import pytest
import torch

from pact_fast.adapters.openrlhf import PACTPolicyLoss
from pact_fast.losses import TOOL_CALL, PACTLossConfig, tool_call_weight

D = torch.float64


@pytest.fixture
def PolicyLoss(monkeypatch):
    root = Path(importlib.util.find_spec("openrlhf").submodule_search_locations[0]) / "models"
    package = types.ModuleType("openrlhf.models")
    package.__path__ = [str(root)]
    monkeypatch.setitem(sys.modules, "openrlhf.models", package)
    if importlib.util.find_spec("deepspeed") is None:
        monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    for name in ("openrlhf.models.loss", "openrlhf.models.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("openrlhf.models.loss")
    for name in ("openrlhf.models.loss", "openrlhf.models.utils"):
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # removed again at teardown
    return module.PolicyLoss


def _inputs(B=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=D) * 3
    new = old + 0.5 * torch.randn(B, T, generator=g, dtype=D)  # ratios well outside [0.8, 1.2]
    adv = torch.randn(B, 1, generator=g, dtype=D).expand(B, T).clone()
    adv[1, :3] = -adv[1, :3]  # token-level advantages, as OpenRLHF passes them
    mask = (torch.rand(B, T, generator=g) > 0.25).to(D)
    mask[0, 0] = 1.0
    return new, old, adv, mask


def _grad(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("global_info", [{}, {"dp_size": 2, "batch_num_tokens": 61.0, "global_batch_size": 10.0}])
def test_grpo_mode_is_openrlhfs_policy_loss(PolicyLoss, token_level_loss, dual_clip, global_info):
    new, old, adv, mask = _inputs()
    mask[3] = 0.0  # an empty sample
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level_loss)
    theirs = PolicyLoss(**kwargs)
    ours = PACTPolicyLoss(**kwargs, pact_config=PACTLossConfig(mode="grpo"))
    x = new.clone().requires_grad_()
    t = theirs(x, old, adv, action_mask=mask, rollout_log_probs=None, **global_info)
    o = ours(x, old, adv, action_mask=mask, rollout_log_probs=None, **global_info)
    assert len(o) == len(t) == 5 and o[3] is None and o[4] is None
    for a, b in zip(o[:3], t[:3]):
        assert a.item() == pytest.approx(b.item(), rel=1e-8)  # OpenRLHF adds 1e-8 to token counts
    torch.testing.assert_close(_grad(o[0], x), _grad(t[0], x), rtol=1e-8, atol=1e-15)
    assert 0 < t[1].item() < 1  # both clipping branches are in play


def test_pact_mode_routes_each_group_to_its_context(PolicyLoss):
    """Anchored groups use the prompt-only log-probs, the others the trace-conditioned ones: OpenRLHF's
    loss on the token-wise composition of the two, with gradients split between the two inputs."""
    po, old_po, adv, mask = _inputs(seed=1)
    tc, old_tc, _, _ = _inputs(seed=2)
    group_ids = torch.tensor([0, 0, 1, 1])
    anchored = torch.tensor([True, True, False, False])
    x_po, x_tc = po.clone().requires_grad_(), tc.clone().requires_grad_()
    ours = PACTPolicyLoss(clip_eps_high=0.28, pact_config=PACTLossConfig(lambda_sft=0.0))
    loss, clip_ratio, ppo_kl, _, _ = ours(x_po, old_po, adv, action_mask=mask, log_probs_tc=x_tc,
                                          old_log_probs_tc=old_tc, group_ids=group_ids, anchored=anchored)
    pick = anchored[:, None].expand_as(po)
    composed = torch.where(pick, po, tc).requires_grad_()
    expected = PolicyLoss(clip_eps_high=0.28)(composed, torch.where(pick, old_po, old_tc), adv, action_mask=mask)[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    g = _grad(expected, composed)
    torch.testing.assert_close(_grad(loss, x_po), torch.where(pick, g, torch.zeros_like(g)))
    torch.testing.assert_close(_grad(loss, x_tc), torch.where(pick, torch.zeros_like(g), g))
    assert ours.metrics["anchored_groups"] == 1.0


def test_the_sft_term_adds_the_weighted_trace_nll():
    po, old_po, adv, mask = _inputs(seed=3)
    tc, old_tc, _, _ = _inputs(seed=4)
    g = torch.Generator().manual_seed(5)
    sft_lp = -torch.rand(2, 6, generator=g, dtype=D)
    components = torch.full((2, 6), TOOL_CALL)
    common = dict(action_mask=mask, log_probs_tc=tc, old_log_probs_tc=old_tc, anchored=torch.zeros(4, dtype=torch.bool))
    config = PACTLossConfig(sft_reasoning_mode="scale", lambda_sft=0.7)
    without = PACTPolicyLoss(pact_config=PACTLossConfig(lambda_sft=0.0))(po, old_po, adv, **common)[0]
    loss = PACTPolicyLoss(pact_config=config)(po, old_po, adv, **common, sft_log_probs=sft_lp,
                                               sft_components=components, sft_scale=0.5, progress=0.25)[0]
    beta = tool_call_weight(0.25)
    nll = sum(-beta * sft_lp[s].sum().item() / 6 for s in range(2)) / 2
    assert loss.item() - without.item() == pytest.approx(0.7 * 0.5 * nll, rel=1e-10)


def test_it_takes_every_argument_policy_loss_takes(PolicyLoss):
    for ours, theirs in ((PACTPolicyLoss.__init__, PolicyLoss.__init__), (PACTPolicyLoss.forward, PolicyLoss.forward)):
        ours_params = inspect.signature(ours).parameters
        theirs_params = inspect.signature(theirs).parameters
        assert list(ours_params)[:len(theirs_params)] == list(theirs_params)
        for name, p in theirs_params.items():
            assert ours_params[name].default == p.default or (name == "is_correction_threshold"
                                                              and tuple(ours_params[name].default) == tuple(p.default))


@pytest.mark.parametrize("kwargs,message", [
    ({"policy_loss_type": "gspo"}, "only 'ppo'"),
    ({"is_correction_level": "token"}, "importance-sampling"),
    # the call takes no reference log-probs and no entropy: these failed at the first call, asking for batch fields
    # the caller cannot pass
    ({"pact_config": PACTLossConfig(beta_kl=0.1)}, r"pact_config.beta_kl=0.1 .*algo.kl"),
    ({"pact_config": PACTLossConfig(c_ent=0.01)}, r"pact_config.c_ent=0.01 .*entropy_coef"),
    # the call takes OpenRLHF's advantages: PACT's own advantage options were silently unused
    ({"pact_config": PACTLossConfig(norm_adv_by_std=False)}, r"pact_config.norm_adv_by_std=False: .*estimator"),
])
def test_unsupported_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PACTPolicyLoss(**kwargs)


def test_bernoulli_anchoring_needs_the_steps_draws():
    """Drawn inside each call (OpenRLHF passes no step), a group's draw would repeat in every micro-batch and
    step: group ids alone are refused, the step's draws (anchor_rows) are what the call takes."""
    po, old, adv, mask = _inputs()
    for extra in ({}, {"group_ids": torch.tensor([0, 0, 1, 1])}):
        with pytest.raises(ValueError, match="needs anchored"):
            PACTPolicyLoss()(po, old, adv, action_mask=mask, log_probs_tc=po, old_log_probs_tc=old, **extra)


def test_an_action_mask_of_another_shape_is_named():
    """A [B, T-1] action_mask was reported as wrong advantages (pact_loss shapes them by the mask)."""
    po, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match=r"action_mask \(4, \d+\) must be log_probs' \[B, T\]"):
        PACTPolicyLoss(pact_config=PACTLossConfig(mode="grpo"))(po, old, adv, action_mask=mask[:, :-1])


@pytest.mark.parametrize("token_level_loss,name", [(True, "batch_num_tokens"), (False, "global_batch_size")])
def test_a_step_count_of_zero_is_refused(token_level_loss, name):
    """A step total of 0 beside a non-empty micro-batch made its share 0: the RL loss and gradient silently 0
    (OpenRLHF's PolicyLoss divides by it: inf)."""
    po, old, adv, mask = _inputs()
    loss = PACTPolicyLoss(token_level_loss=token_level_loss, pact_config=PACTLossConfig(mode="grpo"))
    with pytest.raises(ValueError, match=f"{name}=0 must be > 0"):
        loss(po, old, adv, action_mask=mask, dp_size=2, **{name: 0})


def test_a_pact_config_that_disagrees_with_policy_loss_arguments_is_refused():
    """PolicyLoss's arguments set the clipping and reduction over pact_config's defaults; a pact_config field set
    to something else was silently replaced by them (by PolicyLoss's defaults when none were given)."""
    with pytest.raises(ValueError, match=r"clip_eps_high: 0.2 here, 0.28 in pact_config.*loss_agg: 'token-mean' "
                                         r"here, 'seq-mean-token-sum-norm' in pact_config"):
        PACTPolicyLoss(pact_config=PACTLossConfig(clip_eps_high=0.28, loss_agg="seq-mean-token-sum-norm"))
    loss = PACTPolicyLoss(clip_eps_high=0.28, dual_clip=3.0, token_level_loss=False,
                          pact_config=PACTLossConfig(clip_eps_high=0.28, dual_clip=3.0,
                                                     loss_agg="seq-mean-token-mean"))
    assert (loss.config.clip_eps_high, loss.config.dual_clip, loss.config.loss_agg) == (0.28, 3.0,
                                                                                         "seq-mean-token-mean")


def test_a_scheduled_loss_needs_the_steps_progress():
    """A call without progress ran the SFT annealing (and sft_then_grpo's switch) at progress 0 every step."""
    po, old_po, adv, mask = _inputs(seed=3)
    common = dict(action_mask=mask, log_probs_tc=po, old_log_probs_tc=old_po, anchored=torch.zeros(4, dtype=torch.bool),
                  sft_log_probs=-torch.rand(2, 6, dtype=D), sft_components=torch.full((2, 6), TOOL_CALL))
    for config in (PACTLossConfig(sft_reasoning_mode="scale"), PACTLossConfig(mode="sft_then_grpo")):
        with pytest.raises(ValueError, match="progress"):
            PACTPolicyLoss(pact_config=config)(po, old_po, adv, **common)
        PACTPolicyLoss(pact_config=config)(po, old_po, adv, **common, progress=0.6)
    PACTPolicyLoss(pact_config=PACTLossConfig(mode="grpo"))(po, old_po, adv, action_mask=mask)  # no schedule


def test_a_micro_batch_without_traces():
    """In a micro-batch holding no trace, the SFT inputs are [0, E] (segment labels may be left out); left out
    altogether they are refused by their names in this call (pact_loss's own field names said nothing here)."""
    po, old_po, adv, mask = _inputs(seed=3)
    common = dict(action_mask=mask, log_probs_tc=po, old_log_probs_tc=old_po, anchored=torch.zeros(4, dtype=torch.bool),
                  progress=0.3)
    with pytest.raises(ValueError, match="sft_log_probs and sft_components"):
        PACTPolicyLoss()(po, old_po, adv, **common)
    loss = PACTPolicyLoss()(po, old_po, adv, **common, sft_log_probs=torch.zeros(0, 6, dtype=D),
                            sft_components=torch.zeros(0, 6, dtype=torch.long))[0]
    rl_only = PACTPolicyLoss(pact_config=PACTLossConfig(lambda_sft=0.0))(po, old_po, adv, **common)[0]
    assert loss.item() == pytest.approx(rl_only.item(), rel=1e-12)


@pytest.mark.parametrize("step", [dict(dp_size=2), dict(batch_num_tokens=1000.0), dict(dp_size=2, batch_num_tokens=1e3),
                                  dict(global_batch_size=9.0, token_level_loss=False)],
                         ids=["two-ranks", "two-micro-batches", "both", "samples"])
def test_an_sft_term_in_a_part_of_the_step_needs_its_sft_scale(step):
    """OpenRLHF passes the step's counts (batch_num_tokens, global_batch_size, dp_size), which scale the RL term
    to this micro-batch's share; the SFT term's share is the caller's sft_scale. Left at its default 1 in a
    micro-batch that is part of a step, every micro-batch and rank added a whole step's SFT term (here 4 micro-batches
    on 2 ranks: 8 times the RL term's weight relative to one batch). Whole-step calls keep the default."""
    po, old_po, adv, mask = _inputs(seed=3)
    step = dict(step)
    token_level = step.pop("token_level_loss", True)
    common = dict(action_mask=mask, log_probs_tc=po, old_log_probs_tc=old_po, anchored=torch.zeros(4, dtype=torch.bool),
                  sft_log_probs=-torch.rand(2, 6, dtype=D), sft_components=torch.full((2, 6), TOOL_CALL), progress=0.3)
    loss_fn = PACTPolicyLoss(token_level_loss=token_level, pact_config=PACTLossConfig(sft_reasoning_mode="scale"))
    with pytest.raises(ValueError, match=r"part of a step .*pass sft_scale"):
        loss_fn(po, old_po, adv, **common, **step)
    with_scale = loss_fn(po, old_po, adv, **common, **step, sft_scale=0.25)[0]
    without_sft = PACTPolicyLoss(token_level_loss=token_level, pact_config=PACTLossConfig(lambda_sft=0.0))(
        po, old_po, adv, **{k: v for k, v in common.items() if k[:4] != "sft_"}, **step)[0]
    nll = sum(-tool_call_weight(0.3) * common["sft_log_probs"][s].sum().item() / 6 for s in range(2)) / 2
    assert with_scale.item() - without_sft.item() == pytest.approx(0.25 * nll, rel=1e-10)
    # the whole step in one call (OpenRLHF's counts equal to this micro-batch's): the default share 1
    whole = dict(batch_num_tokens=float(mask.sum())) if token_level else dict(global_batch_size=4.0)
    assert loss_fn(po, old_po, adv, **common, **whole)[0].item() == pytest.approx(
        loss_fn(po, old_po, adv, **common, **whole, sft_scale=1.0)[0].item(), rel=1e-12)
    if not token_level:  # global_batch_size counts samples, a fully masked one too: still the whole step
        masked = mask.clone()
        masked[3] = 0
        masked_common = dict(common, action_mask=masked)
        assert loss_fn(po, old_po, adv, **masked_common, **whole)[0].item() == pytest.approx(
            loss_fn(po, old_po, adv, **masked_common, **whole, sft_scale=1.0)[0].item(), rel=1e-12)
    # a micro-batch without traces has no SFT term to scale
    no_traces = dict(common, sft_log_probs=torch.zeros(0, 6, dtype=D), sft_components=torch.zeros(0, 6).long())
    assert loss_fn(po, old_po, adv, **no_traces, **step)[0].item() == pytest.approx(without_sft.item(), rel=1e-12)
