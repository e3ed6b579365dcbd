import pytest
import torch

from pact_fast.scoring import sequence_logprobs
from conftest import rel_err
from models import FAMILIES, param_grads, separate_logprobs, tiny_causal_lm
from trees import pact_group


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["sdpa", "triton", "varlen"])
def test_packed_scoring_equals_separate_forwards(family, backend):
    model = tiny_causal_lm(family)
    seqs = pact_group(seed=3, prompt=13, trace=6, header=3, G=3, response=4, sft=5, vocab=60)
    weights = [torch.randn(len(s) - 1) for s in seqs]
    ref = separate_logprobs(model, seqs)
    ref_grads = param_grads(model, ref, weights)
    ours = sequence_logprobs(model, seqs, backend=backend)
    assert model.config._attn_implementation == "sdpa", "the model's attention setting must be restored"
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and o.dtype == torch.float32
        assert rel_err(o, r) < 1e-5
    grads = param_grads(model, ours, weights)
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
    plain = param_grads(model, sequence_logprobs(model, seqs), weights)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = param_grads(model, sequence_logprobs(model, seqs), weights)
    assert model.config._attn_implementation == "sdpa"
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        assert rel_err(checkpointed[name], plain[name]) < 1e-5, name


@pytest.mark.parametrize("bad", [-2, 67])
def test_a_token_id_outside_the_vocabulary_is_refused_naming_it(bad):
    """A token id past the model's input embedding (a tokenizer with added tokens and no resize) or below 0 failed
    inside the embedding with "index out of range in self" (a device-side assert on CUDA), naming nothing."""
    from pact_fast.scoring import PackedScoringError

    model = tiny_causal_lm("llama")
    assert model.get_input_embeddings().num_embeddings == 67
    with pytest.raises(PackedScoringError, match=rf"token id {bad} is outside its input embedding's \[0, 67\)"):
        sequence_logprobs(model, [[1, 2, 3], [1, bad, 4]])
    assert [o.shape for o in sequence_logprobs(model, [[1, 66]])] == [(1,)]


def test_no_sequences_score_to_an_empty_list():
    """sequence_logprobs(model, []) failed inside transformers' mask preparation (IndexError: index -1 is out of
    bounds), as a micro-batch whose rows were all filtered out would."""
    model = tiny_causal_lm("llama")
    assert sequence_logprobs(model, []) == [] and sequence_logprobs(model, [], return_entropy=True) == []


def test_entropy_and_temperature():
    model = tiny_causal_lm("qwen3")
    seqs = pact_group(seed=5, vocab=60)
    out = sequence_logprobs(model, seqs, temperature=0.8, return_entropy=True)
    for (lp, ent), s in zip(out, seqs):
        logits = model(input_ids=torch.tensor(s)[None]).logits[0, :-1] / 0.8
        logprobs = torch.log_softmax(logits, -1)
        assert rel_err(lp, logprobs.gather(-1, torch.tensor(s[1:])[:, None]).squeeze(-1)) < 1e-5
        assert rel_err(ent, -(logprobs.exp() * logprobs).sum(-1)) < 1e-5


def test_an_attention_keyword_tree_attention_does_not_implement_is_refused_by_name():
    from pact_fast import scoring

    model = tiny_causal_lm("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    layout = scoring.TreeLayout(scoring.build_layout(torch.full((1, 5), 5, dtype=torch.int32), "sdpa"))
    with pytest.raises(ValueError, match="LlamaAttention passes head_mask, s_aux to its attention"):
        scoring._tree_attention_forward(attn, q, kv, kv, None, tree_layout=layout, s_aux=torch.zeros(4),
                                        head_mask=torch.ones(4), position_ids=torch.arange(5)[None])
    out, _ = scoring._tree_attention_forward(attn, q, kv, kv, None, tree_layout=layout, use_cache=False,
                                             position_ids=torch.arange(5)[None], output_router_logits=False)
    assert out.shape == (1, 5, 4, 8)


def test_check_model_refuses_a_head_it_does_not_reproduce_with_both_numbers(monkeypatch):
    """A causal-LM head that transforms logits in a way pact_fast does not know (stood in for by a logit scale
    the model's own forward does not apply) is refused, naming the difference and the tolerance."""
    from pact_fast import scoring
    from pact_fast.models import ModelError

    model = tiny_causal_lm("qwen3")
    result = scoring.check_model(model)
    assert result["max_abs_diff"] < 1e-5 and result["tolerance"] == (1e-3, 1e-3) and result["tokens"] > 24
    monkeypatch.setattr(scoring, "logit_transform", lambda config: {"logit_scale": 3.0, "softcap": None})
    with pytest.raises(ModelError, match=r"Qwen3ForCausalLM: packed log-probs differ from the model's own forward "
                                         r"by [0-9.e-]+ max, [0-9.e-]+ mean \(tolerance 0.001 / 0.001 in float32\)"):
        scoring.check_model(model)


def test_check_model_crosses_the_smallest_sliding_window():
    from pact_fast.scoring import _probe_group

    model = tiny_causal_lm("qwen2", use_sliding_window=True, sliding_window=40, max_window_layers=0)
    assert max(map(len, _probe_group(model.config, 0))) > 40
    assert max(map(len, _probe_group(tiny_causal_lm("llama").config, 0))) == 24


def test_non_hf_module_is_refused():
    with pytest.raises(TypeError, match="causal LM"):
        sequence_logprobs(torch.nn.Linear(4, 4), [[1, 2, 3]])


@pytest.mark.parametrize("backend", ["sdpa", "triton", "varlen"])
def test_the_layout_is_built_once_per_forward_and_no_layer_syncs(backend, monkeypatch):
    """Every layer reads the layout built before the layer loop: the builder runs once per forward (the tile
    lists, segments and gathers it makes are the forward's only host synchronisation)."""
    import importlib

    import pact_fast.scoring as scoring

    ops = importlib.import_module("pact_fast.ops.tree_attention")  # the module: pact_fast.ops re-exports the function

    built = []
    real = ops.build_layout

    def counting(*args, **kwargs):
        built.append(backend)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "build_layout", counting)
    monkeypatch.setattr(scoring, "build_layout", counting)
    synced = []
    real_segments = ops.segments
    monkeypatch.setattr(ops, "segments", lambda *a: synced.append(1) or real_segments(*a))
    model = tiny_causal_lm("qwen3")
    seqs = pact_group(seed=5, prompt=9, trace=4, header=2, G=2, response=3, sft=4, vocab=60)
    logps = sequence_logprobs(model, seqs, backend=backend)
    assert len(built) == 1 and model.config.num_hidden_layers > 1
    assert len(synced) == (1 if backend == "varlen" else 0)  # segments: once, at build time
    sum(lp.sum() for lp in logps).backward()
    assert len(built) == 1  # the backward pass builds nothing either


@pytest.mark.parametrize("backend", ["sdpa", "triton", "varlen"])
def test_tree_attention_with_a_prebuilt_layout_equals_building_it(backend):
    from pact_fast.ops.tree_attention import build_layout, tree_attention
    from pact_fast.packing import pack_tree

    ends = pack_tree(pact_group(seed=2, prompt=7, trace=3, header=2, G=2, response=3, sft=3, vocab=50)).subtree_end[None]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, ends.shape[1], 16, generator=g) for h in (4, 2, 2))
    layout = build_layout(ends, backend)
    assert torch.equal(tree_attention(q, k, v, layout=layout), tree_attention(q, k, v, ends, backend=backend))


def test_under_autocast_the_head_gets_its_inputs_in_the_autocast_dtype_and_its_gradient_reaches_the_weight():
    """The lm_head ops compute in their inputs' dtype: under the trainer's bf16 autocast (fp32 weights on CUDA) the
    scorer must hand them bf16 inputs, as autocast hands a linear layer, not an fp32 head."""
    from pact_fast.packing import pack_tree
    from pact_fast.scoring import PackedScorer

    model = tiny_causal_lm("qwen3")
    packed = pack_tree(pact_group(seed=6, vocab=60))
    rows, targets, _ = packed.predictor_rows()
    seen = {}

    def head_loss(hidden, weight, bias, targets, **transform):
        seen.update(hidden=hidden.dtype, weight=weight.dtype)
        return torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, targets[:, None]).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = PackedScorer(model)(packed, rows, targets, head_loss=head_loss)
    loss.backward()
    assert seen == {"hidden": torch.bfloat16, "weight": torch.bfloat16}
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight.grad.abs().sum() > 0
    outside = {}
    PackedScorer(model)(packed, rows, targets, head_loss=lambda h, w, b, t, **k: outside.update(h=h.dtype) or 0)
    assert outside == {"h": torch.float32}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_packed_scoring_under_bf16_autocast_matches_the_models_own_autocast_forward(family, backend):
    """The trainer's default on CUDA is bf16 autocast over fp32 weights. There a model's rotary (or q/k norm) leaves
    query and key fp32 beside a bf16 value, and tree attention refused the mix at the first step; SDPA, which
    autocast casts, takes it. Checked here under the CPU's bf16 autocast, against the model's own forward under it."""
    model = tiny_causal_lm(family)
    seqs = pact_group(seed=7, prompt=13, trace=6, header=3, G=3, response=4, sft=5, vocab=60)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = separate_logprobs(model, seqs)
        ours = sequence_logprobs(model, seqs, backend=backend)
    ref_plain = separate_logprobs(model, seqs)
    for o, r, p in zip(ours, ref, ref_plain):
        assert o.dtype == torch.float32
        # bf16's rounding: the autocast forward is ~1e-3 off the fp32 one here; packed is as close to it as that
        assert (o.double() - r).abs().max() < 2 * (r - p).abs().max() + 1e-4
