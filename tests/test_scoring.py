import pytest
import torch

from pact_fast.scoring import sequence_logprobs
from conftest import rel_err
from models import FAMILIES, tiny_causal_lm
from trees import pact_group


def _separate(model, seqs):
    """Reference: each sequence on its own through the model's own forward, log_softmax, gather."""
    out = []
    for s in seqs:
        ids = torch.tensor(s)[None]
        logits = model(input_ids=ids).logits[0, :-1].float()
        out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1))
    return out


def _grads(model, logps, weights):
    model.zero_grad()
    sum((lp * w).sum() for lp, w in zip(logps, weights)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["sdpa", "triton", "varlen"])
def test_packed_scoring_equals_separate_forwards(family, backend):
    model = tiny_causal_lm(family)
    seqs = pact_group(seed=3, prompt=13, trace=6, header=3, G=3, response=4, sft=5, vocab=60)
    weights = [torch.randn(len(s) - 1) for s in seqs]
    ref = _separate(model, seqs)
    ref_grads = _grads(model, ref, weights)
    ours = sequence_logprobs(model, seqs, backend=backend)
    assert model.config._attn_implementation == "sdpa", "the model's attention setting must be restored"
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and o.dtype == torch.float32
        assert rel_err(o, r) < 1e-5
    grads = _grads(model, ours, weights)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_with_the_tree_layout(use_reentrant):
    """The backward pass recomputes checkpointed layers after the forward has given the model its own
    attention back; the recomputation must still run the tree layout (same gradients as without)."""
    model = tiny_causal_lm("qwen3").train()
    seqs = pact_group(seed=4, prompt=11, trace=5, header=3, G=3, response=4, sft=5, vocab=60)
    weights = [torch.randn(len(s) - 1) for s in seqs]
    plain = _grads(model, sequence_logprobs(model, seqs), weights)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = _grads(model, sequence_logprobs(model, seqs), weights)
    assert model.config._attn_implementation == "sdpa"
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        assert rel_err(checkpointed[name], plain[name]) < 1e-5, name


def test_entropy_and_temperature():
    model = tiny_causal_lm("qwen3")
    seqs = pact_group(seed=5, vocab=60)
    out = sequence_logprobs(model, seqs, temperature=0.8, return_entropy=True)
    for (lp, ent), s in zip(out, seqs):
        logits = model(input_ids=torch.tensor(s)[None]).logits[0, :-1] / 0.8
        logprobs = torch.log_softmax(logits, -1)
        assert rel_err(lp, logprobs.gather(-1, torch.tensor(s[1:])[:, None]).squeeze(-1)) < 1e-5
        assert rel_err(ent, -(logprobs.exp() * logprobs).sum(-1)) < 1e-5


def test_sliding_window_model_is_refused():
    model = tiny_causal_lm("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding"):
        sequence_logprobs(model, pact_group(vocab=60))


def test_non_hf_module_is_refused():
    with pytest.raises(TypeError, match="causal LM"):
        sequence_logprobs(torch.nn.Linear(4, 4), [[1, 2, 3]])
