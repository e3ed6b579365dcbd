"""The verl adapter through verl 0.9.1's own code: its registry, ``ppo_loss`` and no-padding batches.

verl is installed --no-deps (its metadata pins transformers < 5.11; the loss code runs with newer ones),
with Ray and tensordict, which it imports. Float64 hand computations check the numbers besides."""
import dataclasses
import inspect
import math
import re
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict
from verl.trainer.ppo import core_algos
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding

from pact_fast.adapters import verl as adapter
from pact_fast.adapters.verl import (PO, TC, TRACE, compute_policy_loss_pact, pact_config_from_actor_config,
                                     pact_loss_fn)
from pact_fast.losses import (OTHER, REASONING, TOOL_CALL, TOOL_RESPONSE, PACTBatch, PACTLossConfig, anchor_rows,
                              pact_loss)

D = torch.float64
# verl 0.9.1's PolicyLossFn parameters, in order; ppo_loss calls the function with these keywords
VERL_POLICY_LOSS_PARAMS = ["old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config",
                           "rollout_is_weights"]


def _tokens(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=D) * 3
    new = old + 0.5 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, 1, generator=g, dtype=D).expand(B, T).clone()
    mask = (torch.rand(B, T, generator=g) > 0.25).to(D)
    mask[0, 0] = 1.0
    return new, old, adv, mask


def _hand_vanilla(new, old, adv, mask, lo, hi, c, weights, mode, dp_size=1, batch_num_tokens=None,
                  global_batch_size=None, loss_scale_factor=None):
    """verl's vanilla policy loss, token by token in float64."""
    B, T = new.shape
    per_seq, tokens, clipped, lower = [], 0, 0, 0
    for b in range(B):
        row = []
        for t in range(T):
            if not mask[b, t]:
                continue
            a = adv[b, t].item()
            r = math.exp(min(max(new[b, t].item() - old[b, t].item(), -20.0), 20.0))
            l1, l2 = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
            loss = max(l1, l2)
            clipped += l2 > l1
            if a < 0:
                lower += loss > -a * c
                loss = min(loss, -a * c)
            row.append(loss * weights[b, t].item())
        per_seq.append(row)
        tokens += len(row)
    nonempty = [r for r in per_seq if r]
    if mode == "token-mean":
        value = sum(map(sum, per_seq)) / (batch_num_tokens or tokens) * dp_size
    elif mode == "token-sum":
        value = sum(map(sum, per_seq)) * dp_size
    elif mode == "seq-mean-token-mean":
        value = sum(sum(r) / len(r) for r in nonempty) / (global_batch_size or len(nonempty)) * dp_size
    else:
        value = sum(sum(r) for r in nonempty) / (global_batch_size or len(nonempty)) * dp_size
        if mode == "seq-mean-token-sum-norm":
            value /= loss_scale_factor or T
    return value, clipped / tokens, lower / tokens


def test_the_policy_loss_has_verls_signature():
    assert list(inspect.signature(compute_policy_loss_pact).parameters) == VERL_POLICY_LOSS_PARAMS


@pytest.mark.parametrize("mode", adapter.LOSS_AGG_MODES)
@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "batch_num_tokens": 57.0, "global_batch_size": 9.0,
                                       "loss_scale_factor": 16}])
@pytest.mark.parametrize("with_weights", [False, True])
def test_policy_loss_is_verls_vanilla_surrogate(mode, info, with_weights):
    new, old, adv, mask = _tokens(5, 8, seed=1)
    mask[4] = 0.0
    weights = torch.rand(5, 8, dtype=D) + 0.5 if with_weights else torch.ones(5, 8, dtype=D)
    config = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.0,
                             global_batch_info=dict(info))
    x = new.clone().requires_grad_()
    loss, metrics = compute_policy_loss_pact(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                                             loss_agg_mode=mode, config=config,
                                             rollout_is_weights=weights if with_weights else None)
    expected, clipfrac, lower = _hand_vanilla(new, old, adv, mask, 0.2, 0.28, 2.0, weights, mode, **info)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(clipfrac)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(lower)
    assert 0 < clipfrac < 1 and lower > 0  # every branch is taken
    loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_weights_of_masked_tokens_do_not_reach_the_loss_or_its_gradient(bad):
    """rollout_is_weights past a response (verl pads them as it likes) gave a finite loss and a NaN gradient: the
    masked tokens' weights are read as 0, whatever they hold."""
    new, old, adv, mask = _tokens(4, 7, seed=3)
    config = SimpleNamespace(clip_ratio=0.2, global_batch_info={})
    weights = torch.rand(4, 7, dtype=D) + 0.5
    results = []
    for fill in (bad, 1.0):
        w = torch.where(mask != 0, weights, torch.full_like(weights, fill))
        x = new.clone().requires_grad_()
        loss, _ = compute_policy_loss_pact(old, x, adv, mask, "token-mean", config, rollout_is_weights=w)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (want_loss, want_grad) = results
    assert torch.isfinite(grad).all() and torch.equal(grad, want_grad) and torch.equal(loss, want_loss)


def _no_padding_batch(fields, log_probs, prompt_lens, seed=0):
    """A micro-batch as verl's engine hands it to a loss: ``fields`` ([N, T] response-aligned tensors, or [N])
    in a TensorDict in verl's no-padding layout, and per-token log-probs [N, T] of the responses placed in
    a nested tensor over prompt + response (position t holds the log-prob of token t + 1)."""
    N, T = log_probs.shape
    P = max(prompt_lens)
    g = torch.Generator().manual_seed(seed)
    prompts, responses = torch.randint(3, 50, (N, P), generator=g), torch.randint(3, 50, (N, T), generator=g)
    attention = torch.zeros(N, P + T, dtype=torch.long)
    for i, p in enumerate(prompt_lens):
        attention[i, P - p:] = 1
    data = TensorDict({**fields, "prompts": prompts, "responses": responses,
                       "input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention,
                       "position_ids": (attention.cumsum(-1) - 1).clamp_min(0)}, batch_size=[N])
    data = left_right_2_no_padding(data)
    filler = -torch.rand(N, P + 1, generator=g, dtype=log_probs.dtype)
    values = torch.cat([torch.cat([filler[i, :p - 1], log_probs[i], filler[i, p:p + 1]])
                        for i, p in enumerate(prompt_lens)])
    return data, torch.nested.nested_tensor_from_jagged(values, offsets=data["input_ids"].offsets())


def _global_info(data, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    for key, value in (("dp_size", dp_size), ("batch_num_tokens", batch_num_tokens),
                       ("global_batch_size", global_batch_size)):
        tu.assign_non_tensor_data(data, key, value)
    return data


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.delitem(core_algos.POLICY_LOSS_REGISTRY, "pact", raising=False)  # removed again at teardown
    return adapter.register("pact")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "batch_num_tokens": 57, "global_batch_size": 9}])
def test_verls_ppo_loss_runs_it_as_loss_mode_pact(registered, mode, info):
    """verl's own ppo_loss with loss_mode=pact gives vanilla's loss, gradient and metrics."""
    assert registered is compute_policy_loss_pact
    assert core_algos.get_policy_loss_fn("pact") is compute_policy_loss_pact
    new, old, adv, mask = _tokens(5, 8, seed=2)
    mask[4] = 0.0
    results = []
    for loss_mode in ("vanilla", "pact"):
        config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_high=0.28,
                             clip_ratio_c=1.5, loss_agg_mode=mode, policy_loss=PolicyLossConfig(loss_mode=loss_mode))
        x = new.clone().requires_grad_()
        data, log_probs = _no_padding_batch({"response_mask": mask, "old_log_probs": old, "advantages": adv}, x,
                                            prompt_lens=[3, 5, 2, 4, 5])
        loss, metrics = ppo_loss(config, {"log_probs": log_probs}, _global_info(data, **info))
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.item(), grad, {k: m.aggregate() for k, m in metrics.items()}))
    (vanilla, g_vanilla, m_vanilla), (pact, g_pact, m_pact) = results
    assert pact == pytest.approx(vanilla, rel=1e-12)
    torch.testing.assert_close(g_pact, g_vanilla, rtol=1e-12, atol=1e-15)
    assert m_pact.keys() == m_vanilla.keys()
    for key in m_vanilla:
        assert m_pact[key] == pytest.approx(m_vanilla[key], rel=1e-6, abs=1e-12), key  # verl: fp32 fractions
    assert m_vanilla["actor/pg_clipfrac"] > 0 and m_vanilla["actor/pg_clipfrac_lower"] > 0


# ---------------------------------------------------------------- whole-loss hook


def _group_rows(G=3, R=2, T=10, E=10, seed=0):
    """Canonical tensors of G groups x R rollouts and one trace per group, and the verl rows made of them
    (PO rows, then TC rows, then TRACE rows; callers shuffle)."""
    g = torch.Generator().manual_seed(seed)
    B = G * R
    po, old_po, adv, mask = _tokens(B, T, seed)
    tc, old_tc, _, _ = _tokens(B, T, seed + 1)
    sft = -torch.rand(G, E, generator=g, dtype=D) * 2
    labels = torch.tensor([REASONING, REASONING, TOOL_CALL, TOOL_CALL, TOOL_RESPONSE, REASONING, REASONING, OTHER,
                           TOOL_CALL, OTHER])
    comps = labels.repeat(G, 1)
    segs = torch.tensor([0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).repeat(G, 1)
    turns = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1]).repeat(G, 1)
    group = torch.arange(B) // R
    anchored = anchor_rows(group, G, 0.5, seed=3, step=7)
    canonical = PACTBatch(response_mask=mask, rewards=torch.zeros(B, dtype=D), group_ids=group, logp_po=po,
                          old_logp_po=old_po, logp_tc=tc, old_logp_tc=old_tc, advantages=adv, anchored=anchored,
                          sft_logp=sft, sft_components=comps, sft_segment_ids=segs, sft_turn_ids=turns)
    zeros = torch.zeros(B, T, dtype=torch.long)
    rows = {
        "pact_role": torch.cat([torch.full((B,), PO), torch.full((B,), TC), torch.full((G,), TRACE)]),
        "pact_rollout": torch.cat([torch.arange(B), torch.arange(B), torch.full((G,), -1)]),
        "pact_group": torch.cat([group, group, torch.arange(G)]),
        "pact_anchored": torch.cat([anchored, anchored, torch.zeros(G, dtype=torch.bool)]),
        "response_mask": torch.cat([mask, mask, torch.ones(G, T, dtype=D)]),
        "old_log_probs": torch.cat([old_po, old_tc, sft.detach()]),
        "advantages": torch.cat([adv, adv, torch.zeros(G, T, dtype=D)]),
        "pact_components": torch.cat([zeros, zeros, comps]),
        "pact_segment_ids": torch.cat([zeros, zeros, segs]),
        "pact_turn_ids": torch.cat([zeros, zeros, turns]),
    }
    log_probs = torch.cat([po, tc, sft])
    return canonical, rows, log_probs


def _take(rows, index):
    return {k: v[index] for k, v in rows.items()}


def test_hook_routes_shuffled_rows_to_their_roles():
    canonical, rows, log_probs = _group_rows()
    config = PACTLossConfig(anchor_q=0.5)
    perm = torch.randperm(log_probs.shape[0], generator=torch.Generator().manual_seed(0))
    x = log_probs[perm].clone().requires_grad_()
    loss, metrics = pact_loss_fn(None, {"log_probs": x}, _take(rows, perm), pact_config=config, progress=0.4)

    leaf = log_probs.clone().requires_grad_()
    B, G = canonical.logp_po.shape[0], canonical.sft_logp.shape[0]
    canonical.logp_po, canonical.logp_tc, canonical.sft_logp = leaf[:B], leaf[B:2 * B], leaf[2 * B:2 * B + G]
    expected, expected_metrics = pact_loss(canonical, config, 0.4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert metrics["actor/pact/loss/sft"] == pytest.approx(expected_metrics["loss/sft"], rel=1e-12)
    assert 0 < metrics["actor/pact/anchored_groups"] < 3  # both contexts are in play
    (g_hook,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(expected, leaf)
    torch.testing.assert_close(g_hook, g_ref[perm], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_and_ranks_add_up_to_the_mini_batch(loss_agg):
    canonical, rows, log_probs = _group_rows(G=4)
    config = PACTLossConfig(anchor_q=0.5, loss_agg=loss_agg)
    whole, _ = pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=config, progress=0.3)
    mask = canonical.response_mask
    counts = {"pact_rl_tokens": mask.sum().item(), "pact_rl_seqs": float((mask.sum(-1) > 0).sum()), "pact_traces": 4.0}
    B = 8
    halves = [torch.tensor([0, 1, 2, 3, B, B + 1, B + 2, B + 3, 16, 17]),
              torch.tensor([4, 5, 6, 7, B + 4, B + 5, B + 6, B + 7, 18, 19])]
    micro = sum(pact_loss_fn(None, {"log_probs": log_probs[i]}, {**_take(rows, i), **counts}, pact_config=config,
                             progress=0.3)[0]
                for i in halves)
    assert micro.item() == pytest.approx(whole.item(), rel=1e-12)
    # two data-parallel ranks: gradients are averaged, so the mean of the rank losses is the whole loss
    ranks = [pact_loss_fn(None, {"log_probs": log_probs[i]}, {**_take(rows, i), **counts, "dp_size": 2},
                          pact_config=config, progress=0.3)[0] for i in halves]
    assert (sum(ranks) / 2).item() == pytest.approx(whole.item(), rel=1e-12)


def test_hook_refuses_what_it_cannot_compute():
    _, rows, log_probs = _group_rows()
    config = PACTLossConfig()
    keep = torch.tensor([i for i in range(15) if i != 6])  # drop the TC row of rollout 0
    with pytest.raises(ValueError, match=r"unpaired"):
        pact_loss_fn(None, {"log_probs": log_probs[keep]}, _take(rows, keep), pact_config=config, progress=0.3)
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 12, 13, 14])  # no TC row at all (pact_loss asked for 'batch fields')
    with pytest.raises(ValueError, match=r"6 PO rows and no TC row"):
        pact_loss_fn(None, {"log_probs": log_probs[keep]}, _take(rows, keep), pact_config=config, progress=0.3)
    no_draws = {k: v for k, v in rows.items() if k != "pact_anchored"}
    with pytest.raises(ValueError, match="pact_anchored"):
        pact_loss_fn(None, {"log_probs": log_probs}, no_draws, pact_config=config, progress=0.3)
    with pytest.raises(ValueError, match="pact_rl_tokens"):
        pact_loss_fn(None, {"log_probs": log_probs}, {**rows, "dp_size": 2}, pact_config=config, progress=0.3)
    # one rank, two micro-batches: verl says so through batch_num_tokens, and adds the micro-batch losses (each
    # normalised on its own, the step's gradient was twice the mini-batch's)
    half = torch.tensor([0, 1, 2, 6, 7, 8, 12])
    whole_tokens = float(rows["response_mask"].sum())
    with pytest.raises(ValueError, match=f"holds {rows['response_mask'][half].sum():.0f} of the mini-batch's "
                                         f"{whole_tokens:.0f} response tokens"):
        pact_loss_fn(None, {"log_probs": log_probs[half]}, {**_take(rows, half), "batch_num_tokens": whole_tokens},
                     pact_config=config, progress=0.3)
    pact_loss_fn(None, {"log_probs": log_probs}, {**rows, "batch_num_tokens": whole_tokens}, pact_config=config,
                 progress=0.3)
    with pytest.raises(ValueError, match="rollout_is_weights"):  # verl's rollout correction: not silently dropped
        pact_loss_fn(None, {"log_probs": log_probs}, {**rows, "rollout_is_weights": torch.ones_like(log_probs)},
                     pact_config=config, progress=0.3)
    for name in ("pact_group", "pact_role", "advantages"):  # a missing field is named, not a TypeError
        with pytest.raises(ValueError, match=f"data has no '{name}'"):
            pact_loss_fn(None, {"log_probs": log_probs}, {k: v for k, v in rows.items() if k != name},
                         pact_config=config, progress=0.3)


def test_hook_refuses_a_rollout_whose_two_rows_do_not_pair_up():
    """Two PO rows of one pact_rollout id passed the pairing check (both paired with one TC row, the other TC row
    dropped: loss 0.409 for 0.344), and a TC row's own response_mask went unread (a TC response cut short would
    have trained on its padding's log-probs: 0.504)."""
    _, rows, log_probs = _group_rows()
    config = PACTLossConfig()
    twice = {**rows, "pact_rollout": rows["pact_rollout"].clone()}
    twice["pact_rollout"][1] = 0  # PO rows 0 and 1 both say rollout 0
    with pytest.raises(ValueError, match=r"pact_rollout \[0\] name two PO rows each"):
        pact_loss_fn(None, {"log_probs": log_probs}, twice, pact_config=config, progress=0.3)
    cut = {**rows, "response_mask": rows["response_mask"].clone()}
    B = int((rows["pact_role"] == PO).sum())
    cut["response_mask"][B + 2, -2:] = 0  # the TC row of rollout 2, cut two tokens short
    assert not torch.equal(cut["response_mask"][B + 2], rows["response_mask"][B + 2])
    with pytest.raises(ValueError, match=r"TC rows of pact_rollout \[2\] have another response_mask"):
        pact_loss_fn(None, {"log_probs": log_probs}, cut, pact_config=config, progress=0.3)


@pytest.mark.parametrize("name", ["pact_role", "pact_group", "pact_anchored", "old_log_probs", "pact_components"])
def test_a_per_row_field_of_another_length_than_the_log_probs_is_refused(name):
    """Each per-row field is indexed by the log-probs' rows: pact_role one row short (the last trace row dropped)
    scored 0.357 for 0.344 with no word, the others paired rows with another row's values or raised IndexError
    inside the hook. A numpy array (verl's non-tensor batch) is refused the same way."""
    _, rows, log_probs = _group_rows()
    config = PACTLossConfig(anchor_q=0.5)
    for bad, got in ((rows[name][:-1], f"shape {tuple(rows[name][:-1].shape)}"), (rows[name].numpy(), "ndarray")):
        with pytest.raises(ValueError, match=re.escape(f"data['{name}'] must be a tensor with one row per row of "
                                                       f"log_probs (15), got {got}")):
            pact_loss_fn(None, {"log_probs": log_probs}, {**rows, name: bad}, pact_config=config, progress=0.3)
    with pytest.raises(ValueError, match=re.escape("data['response_mask'] must be a tensor with one row per row of "
                                                   "log_probs (14)")):
        pact_loss_fn(None, {"log_probs": log_probs[:-1]}, rows, pact_config=config, progress=0.3)


@pytest.mark.parametrize("role", [torch.tensor(3), torch.tensor(-1), torch.tensor(2.5)], ids=["3", "-1", "2.5"])
def test_a_row_role_other_than_po_tc_or_trace_is_refused(role):
    """A pact_role outside PO, TC and TRACE matched no role: a trace row marked 3 left the loss (0.357 for 0.344)
    with no word, and a float role was truncated (2.5 read as TRACE)."""
    _, rows, log_probs = _group_rows()
    roles = rows["pact_role"].to(role.dtype)
    roles[-1] = role
    with pytest.raises(ValueError, match=re.escape("data['pact_role'] must hold the integers 0 (PO), 1 (TC) and 2 "
                                                   "(TRACE)")):
        pact_loss_fn(None, {"log_probs": log_probs}, {**rows, "pact_role": roles},
                     pact_config=PACTLossConfig(anchor_q=0.5), progress=0.3)


def test_the_policy_loss_refuses_a_mask_or_weights_of_another_shape_and_a_soft_mask():
    """A response_mask or rollout_is_weights of another shape than log_prob failed inside torch's broadcasting
    ("The size of tensor a (4) must match ..."); a soft mask (0.5) was read as 1 (the loss of a 0/1 mask)."""
    new, old, adv, mask = _tokens(4, 5, 0)
    config = {"clip_ratio": 0.2}
    with pytest.raises(ValueError, match=re.escape("response_mask (4, 4) must be log_prob's [B, T] = [4, 5]")):
        compute_policy_loss_pact(old, new, adv, mask[:, :-1], "token-mean", config)
    with pytest.raises(ValueError, match=re.escape("rollout_is_weights (4, 6) must be log_prob's [B, T] = [4, 5]")):
        compute_policy_loss_pact(old, new, adv, mask, "token-mean", config, torch.ones(4, 6, dtype=D))
    with pytest.raises(ValueError, match="response_mask must hold 0 and 1 only"):
        compute_policy_loss_pact(old, new, adv, mask * 0.5, "token-mean", config)
    column, _ = compute_policy_loss_pact(old, new, adv, mask, "token-mean", config, torch.full((4, 1), 0.5, dtype=D))
    assert column.item() == pytest.approx(0.5 * compute_policy_loss_pact(old, new, adv, mask, "token-mean",
                                                                         config)[0].item(), rel=1e-12)


def test_trace_rows_without_labels_and_a_progress_column():
    """TRACE rows without data['pact_components'] are named (a TypeError from zeros_like before); pact_progress as a
    TensorDict column ([N], one value) is that value (it was 'a Tensor with 15 elements cannot be converted to
    Scalar'), and a column of several values is refused."""
    _, rows, log_probs = _group_rows()
    config = PACTLossConfig(anchor_q=0.5)
    with pytest.raises(ValueError, match="data has no 'pact_components'"):
        pact_loss_fn(None, {"log_probs": log_probs}, {k: v for k, v in rows.items() if k != "pact_components"},
                     pact_config=config, progress=0.3)
    column, _ = pact_loss_fn(None, {"log_probs": log_probs}, {**rows, "pact_progress": torch.full((15,), 0.25)},
                             pact_config=config)
    assert column.item() == pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=config,
                                         progress=0.25)[0].item()
    with pytest.raises(ValueError, match="pact_progress'\] is one number per step"):
        pact_loss_fn(None, {"log_probs": log_probs}, {**rows, "pact_progress": torch.linspace(0, 1, 15)},
                     pact_config=config)


def test_anchor_rows_draws_once_per_group_reproducibly():
    group = torch.arange(4000).repeat_interleave(2)
    a = anchor_rows(group, 4000, 0.3, seed=11, step=5)
    assert torch.equal(a[0::2], a[1::2])  # one draw per group
    assert torch.equal(a, anchor_rows(group, 4000, 0.3, seed=11, step=5))
    assert not torch.equal(a, anchor_rows(group, 4000, 0.3, seed=11, step=6))
    assert abs(a[0::2].double().mean().item() - 0.3) < 0.03  # 4000 draws: 4 standard deviations
    # two ranks holding parts of the step's groups, group 2 on both: each group keeps its own draw
    rank0, rank1 = torch.tensor([0, 1, 2, 2]), torch.tensor([2, 3, 3, 5])
    draws = anchor_rows(torch.arange(6), 6, 0.5, seed=1, step=0)
    assert torch.equal(anchor_rows(rank0, 6, 0.5, seed=1, step=0), draws[rank0])
    assert torch.equal(anchor_rows(rank1, 6, 0.5, seed=1, step=0), draws[rank1])
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        anchor_rows(torch.tensor([6]), 6, 0.5, seed=1, step=0)


def test_the_actor_config_carries_over():
    actor = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=2.5,
                            loss_agg_mode="seq-mean-token-mean", loss_scale_factor=None, entropy_coeff=0.01,
                            use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.05)
    cfg = pact_config_from_actor_config(actor, anchor_q=0.4)
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip, cfg.loss_agg) == (0.1, 0.3, 2.5, "seq-mean-token-mean")
    assert (cfg.c_ent, cfg.beta_kl, cfg.kl_estimator, cfg.anchor_q) == (0.01, 0.05, "k3", 0.4)
    assert pact_config_from_actor_config({"use_kl_loss": False, "kl_loss_coef": 0.05}).beta_kl == 0.0
    with pytest.raises(ValueError, match="kl_loss_type='full'"):
        pact_config_from_actor_config({"use_kl_loss": True, "kl_loss_type": "full"})
    with pytest.raises(ValueError, match="token-sum"):
        pact_config_from_actor_config({"loss_agg_mode": "token-sum"})
    with pytest.raises(ValueError, match=r"entropy_coeff=-0.01 < 0 \(an entropy penalty\)"):  # was dropped quietly
        pact_config_from_actor_config({"entropy_coeff": -0.01})


def test_hook_reads_verls_no_padding_batches():
    """The hook on a TensorDict in verl's no-padding layout, with nested log-probs, is the hook on the
    padded rows: the same loss as pact_loss of the canonical batch, and the same gradients."""
    canonical, rows, log_probs = _group_rows()
    config = PACTLossConfig(anchor_q=0.5)
    leaf = log_probs.clone().requires_grad_()
    data, nested = _no_padding_batch(rows, leaf, prompt_lens=[4, 6, 3, 5, 7, 2, 6, 6, 4, 4, 3, 5, 2, 7, 3])
    tu.assign_non_tensor_data(data, "pact_progress", 0.2)  # the host's per-step field, beside verl's own
    loss, _ = pact_loss_fn(None, {"log_probs": nested}, _global_info(data), pact_config=config)
    reference = log_probs.clone().requires_grad_()
    B, G = canonical.logp_po.shape[0], canonical.sft_logp.shape[0]
    canonical.logp_po, canonical.logp_tc = reference[:B], reference[B:2 * B]
    canonical.sft_logp = reference[2 * B:2 * B + G]
    expected, _ = pact_loss(canonical, config, 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(expected, reference)[0],
                               rtol=1e-12, atol=1e-15)


def test_a_whole_mini_batch_in_bf16_is_not_taken_for_a_micro_batch():
    """The micro-batch check counted response tokens in the log-probs' dtype: in bf16 4,101 tokens sum to 4,096,
    and a call holding the whole mini-batch was refused."""
    B, T = 3, 1367
    logp = -torch.rand(B, T).bfloat16()
    data = {"pact_role": torch.full((B,), PO), "pact_group": torch.arange(B), "response_mask": torch.ones(B, T),
            "old_log_probs": logp.float(), "advantages": torch.randn(B, T), "batch_num_tokens": float(B * T)}
    loss, _ = pact_loss_fn(None, {"log_probs": logp}, data, pact_config=PACTLossConfig(mode="grpo"))
    assert torch.isfinite(loss)



@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_bf16_log_probs_are_normalised_by_exact_token_counts(loss_agg):
    """The hook cast the response mask to the log-probs' dtype and loss_scales counted this micro-batch's tokens in
    it: with bf16 log-probs and the mini-batch's counts given, 3,734 tokens counted as 3,744 and the loss and its
    gradient came out 0.27% too large."""
    B, T = 3, 1367
    g = torch.Generator().manual_seed(5)
    logp = (-torch.rand(B, T, generator=g)).bfloat16()
    mask = torch.ones(B, T)
    mask[2, 1000:] = 0.0
    data = {"pact_role": torch.full((B,), PO), "pact_group": torch.arange(B), "response_mask": mask,
            "old_log_probs": logp.float() + 0.01 * torch.randn(B, T, generator=g),
            "advantages": torch.randn(B, 1, generator=g).expand(B, T).contiguous(),
            "pact_rl_tokens": float(mask.sum()) * 2, "pact_rl_seqs": 6.0, "pact_traces": 0.0}  # half the mini-batch
    config = PACTLossConfig(mode="grpo", loss_agg=loss_agg)
    x, x64 = logp.clone().requires_grad_(), logp.double().requires_grad_()
    loss, _ = pact_loss_fn(None, {"log_probs": x}, data, pact_config=config, progress=0.3)
    data64 = {**data, "old_log_probs": data["old_log_probs"].double(), "advantages": data["advantages"].double()}
    expected, _ = pact_loss_fn(None, {"log_probs": x64}, data64, pact_config=config, progress=0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    (g_bf16,), (g64,) = torch.autograd.grad(loss, x), torch.autograd.grad(expected, x64)
    assert (g_bf16.double() - g64).abs().max() <= 1e-2 * g64.abs().max()
    assert g_bf16.double().sum().item() == pytest.approx(g64.sum().item(), rel=1e-3)  # no bias from the count


def _actor(**fields):
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **fields)


@pytest.mark.parametrize("actor_fields,name", [
    (dict(clip_ratio_high=0.28), "clip_eps_high"), (dict(clip_ratio_low=0.1), "clip_eps_low"),
    (dict(loss_agg_mode="seq-mean-token-mean"), "loss_agg"), (dict(clip_ratio_c=10.0), "dual_clip"),
    (dict(use_kl_loss=True, kl_loss_coef=0.1), "beta_kl"), (dict(entropy_coeff=0.01), "c_ent"),
    (dict(use_kl_loss=True, kl_loss_type="k1"), "kl_estimator"),
])
def test_a_hand_built_pact_config_that_disagrees_with_the_actor_config_is_refused(actor_fields, name):
    """The hook took pact_config's clipping, reduction, KL and entropy bonus over the ActorConfig's without a
    word: with the actor's clip_ratio_high 0.28, seq-mean-token-mean, KL loss and entropy coefficient set, the
    loss was that of the defaults."""
    _, rows, log_probs = _group_rows()
    actor = _actor(**actor_fields)
    derived = pact_config_from_actor_config(actor, anchor_q=0.5)
    hand = dataclasses.replace(derived, **{name: getattr(pact_config_from_actor_config(_actor()), name)})
    with pytest.raises(ValueError, match=f"pact_config.{name}="):
        pact_loss_fn(actor, {"log_probs": log_probs}, {**rows, "ref_log_prob": log_probs.detach()},
                     pact_config=hand, progress=0.3)
    # built from the actor config (overrides of PACT's own fields only), it agrees, and the actor adds nothing
    output, data = {"log_probs": log_probs, "entropy": -log_probs.detach()}, {**rows, "ref_log_prob": log_probs - 0.1}
    loss, _ = pact_loss_fn(actor, output, data, pact_config=derived, progress=0.3)
    alone, _ = pact_loss_fn(None, output, data, pact_config=derived, progress=0.3)
    assert loss.item() == pytest.approx(alone.item(), rel=1e-12)


@pytest.mark.parametrize("loss_mode", ["gspo", "clip_cov", "bypass_mode"])
def test_a_verl_loss_mode_the_hook_does_not_compute_is_refused(loss_mode):
    """pact_config_from_actor_config read the clipping of an ActorConfig whose policy_loss.loss_mode was gspo
    (sequence ratios) and the hook computed token-ratio clipping without a word."""
    actor = _actor(policy_loss=PolicyLossConfig(loss_mode=loss_mode))
    with pytest.raises(ValueError, match=f"policy_loss.loss_mode='{loss_mode}'"):
        pact_config_from_actor_config(actor)
    for ok in ("vanilla", "pact"):
        pact_config_from_actor_config(_actor(policy_loss=PolicyLossConfig(loss_mode=ok)))


@pytest.mark.parametrize("name", ["pact_rl_tokens", "pact_rl_seqs", "pact_traces"])
def test_mini_batch_counts_below_the_micro_batchs_own_are_refused(name):
    """A mini-batch count smaller than this micro-batch's own (0, or another micro-batch's) scaled the term by
    world x local / count without a word: 0 dropped the RL (or SFT) term, a smaller one inflated it."""
    canonical, rows, log_probs = _group_rows()
    mask = canonical.response_mask
    counts = {"pact_rl_tokens": mask.sum().item(), "pact_rl_seqs": float((mask.sum(-1) > 0).sum()), "pact_traces": 3.0}
    config = PACTLossConfig(anchor_q=0.5)
    pact_loss_fn(None, {"log_probs": log_probs}, {**rows, **counts}, pact_config=config, progress=0.3)
    for wrong in (0.0, counts[name] - 1):
        with pytest.raises(ValueError, match=f"{name}={wrong:g} is below this micro-batch's own"):
            pact_loss_fn(None, {"log_probs": log_probs}, {**rows, **counts, name: wrong}, pact_config=config,
                         progress=0.3)


@pytest.mark.parametrize("option", [{"norm_adv_by_std": False}, {"adv_eps": 1e-3}], ids=["no-std", "eps"])
def test_pact_advantage_options_are_refused_by_the_hook(option):
    """The hook takes verl's advantages (data['advantages']): PACTLossConfig's advantage options were silently
    unused (norm_adv_by_std=False trained on verl's std-normalised advantages)."""
    _, rows, log_probs = _group_rows()
    name, value = next(iter(option.items()))
    with pytest.raises(ValueError, match=f"pact_config.{name}={value!r}: .*norm_adv_by_std_in_grpo"):
        pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=PACTLossConfig(anchor_q=0.5, **option),
                     progress=0.3)


def test_progress_comes_with_the_data_each_step():
    """verl calls the loss function it was given (functools.partial over pact_loss_fn), so a progress keyword stays
    at its set_loss_fn-time value: without one the hook ran at progress 0 every step (tool-call weight 0.8 and every
    reasoning segment supervised forever, sft_then_grpo never switching to RL). It reads data['pact_progress'] and
    refuses to run a schedule without it."""
    canonical, rows, log_probs = _group_rows()
    config = PACTLossConfig(anchor_q=0.5)
    for pact_config in (config, PACTLossConfig(mode="sft_then_grpo")):
        with pytest.raises(ValueError, match="data\\['pact_progress'\\]"):
            pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=pact_config)
    for progress in (0.0, 0.7):
        from_data, _ = pact_loss_fn(None, {"log_probs": log_probs}, {**rows, "pact_progress": progress},
                                    pact_config=config)
        expected, _ = pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=config, progress=progress)
        assert from_data.item() == expected.item()
    assert pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=config, progress=0.7)[0].item() != \
        pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=config, progress=0.0)[0].item()
    pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=PACTLossConfig(mode="grpo"))  # no schedule


def test_seq_mean_token_sum_norm_needs_a_fixed_divisor():
    """Without loss_scale_factor, seq-mean-token-sum-norm divided the rollouts' token sums by the micro-batch's padded
    width, which its longest row sets, a trace row included: rollouts of 10 tokens were divided by 20 beside a
    trace of 20 tokens, by 10 beside none. The hook asks for a fixed divisor instead."""
    canonical, rows, log_probs = _group_rows()
    config = PACTLossConfig(anchor_q=0.5, loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="loss_scale_factor"):
        pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=config, progress=0.3)
    fixed = PACTLossConfig(anchor_q=0.5, loss_agg="seq-mean-token-sum-norm", loss_scale_factor=10)
    loss, _ = pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=fixed, progress=0.3)
    expected, _ = pact_loss(canonical, fixed, 0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_a_micro_batch_without_trace_rows_or_without_rollouts():
    """A micro-batch without TRACE rows failed in the default segment mode ('needs batch fields
    ['sft_segment_ids', 'sft_turn_ids']'): most micro-batches hold no trace. Rollouts in one micro-batch and the
    traces in another add up to the whole."""
    canonical, rows, log_probs = _group_rows()
    config = PACTLossConfig(anchor_q=0.5)
    whole, _ = pact_loss_fn(None, {"log_probs": log_probs}, rows, pact_config=config, progress=0.3)
    mask = canonical.response_mask
    counts = {"pact_rl_tokens": mask.sum().item(), "pact_rl_seqs": float((mask.sum(-1) > 0).sum()), "pact_traces": 3.0}
    rollouts, traces = torch.arange(12), torch.arange(12, 15)
    parts = [pact_loss_fn(None, {"log_probs": log_probs[i]}, {**_take(rows, i), **counts}, pact_config=config,
                          progress=0.3)[0] for i in (rollouts, traces)]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-12)
