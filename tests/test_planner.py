"""The memory planner (pact_fast.planner, ``pact-fast plan``): sizes, model shapes, and its predictions against
peaks measured on this CPU (a real trainer step of small models here; SmolLM2-135M's stored by
bench/bench_memory.py in bench/results/memory_cpu.json)."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pact_fast import planner
from pact_fast.cli import main

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "bench"))

import bench_memory  # noqa: E402

TOLERANCE = 0.15  # the bound on |predicted - measured| / measured


@pytest.mark.parametrize("text,expected", [("24GB", 24 * 10 ** 9), ("24GiB", 24 * 2 ** 30), ("24000MB", 24 * 10 ** 9),
                                           ("512MiB", 512 * 2 ** 20), ("80", 80 * 10 ** 9), ("1.5 gib", 3 * 2 ** 29)])
def test_sizes_parse_in_decimal_and_binary_units(text, expected):
    assert planner.parse_size(text) == expected


@pytest.mark.parametrize("text", ["24XB", "", "GB", "-3GB", "0GB", "24 G B", "twenty"])
def test_garbage_sizes_are_refused(text):
    with pytest.raises(planner.PlanError, match="--gpu-memory"):
        planner.parse_size(text)


# Parameter counts the models' cards publish (total; Qwen's also without the embedding and an untied lm_head).
PUBLISHED = {"smollm2-135m": (134.5e6, None), "smollm2-360m": (361.8e6, None), "smollm2-1.7b": (1.71e9, None),
             "qwen2.5-0.5b": (0.49e9, 0.36e9), "qwen2.5-1.5b": (1.54e9, 1.31e9), "qwen2.5-3b": (3.09e9, 2.77e9),
             "qwen2.5-7b": (7.61e9, 6.53e9), "qwen3-0.6b": (0.6e9, 0.44e9), "qwen3-1.7b": (1.7e9, 1.4e9),
             "qwen3-4b": (4.0e9, 3.6e9), "qwen3-8b": (8.2e9, 6.95e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_known_shapes_give_the_published_parameter_counts(name):
    counts = planner.param_counts(planner.KNOWN_SHAPES[name])
    total, body = PUBLISHED[name]
    assert abs(counts["total"] - total) / total < 0.02
    if body is not None:
        assert abs(counts["total"] - counts["embedding"] - counts["lm_head"] - body) / body < 0.03
    assert set(PUBLISHED) == set(planner.KNOWN_SHAPES)


def test_a_model_directory_gives_the_shape_and_parameter_count_of_the_model(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=301, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(config.to_json_string())
    shape = planner.resolve_model(str(tmp_path))
    model = AutoModelForCausalLM.from_config(config)
    assert (shape.head_dim, shape.num_kv_heads, shape.attention_bias) == (8, 2, True)
    assert planner.param_counts(shape)["total"] == sum(p.numel() for p in model.parameters())


def test_keys_a_config_json_leaves_out_take_the_defaults_the_model_is_built_with(tmp_path):
    """Gemma-2's config.json has no tie_word_embeddings (Gemma2Config's default: true): read as untied, Gemma-2-2B
    was planned at 3.20B parameters for 2.61B (Gemma-3-1B 1.30B for 1.00B). Gemma-3-4B's text config holds a few
    keys (no heads, no vocab_size), which was refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gemma2 = {"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96, "vocab_size": 1024}
    (tmp_path / "config.json").write_text(json.dumps(gemma2))
    shape = planner.resolve_model(str(tmp_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**gemma2))
    assert shape.tie_word_embeddings
    assert abs(planner.param_counts(shape)["total"] - sum(p.numel() for p in model.parameters())) <= 4 * 64
    gemma3 = {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34}
    shape = planner.shape_from_config(gemma3, "gemma-3-4b-text")
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.vocab_size, shape.tie_word_embeddings) == \
        (8, 4, 256, 262208, True)
    for bad, words in (({"model_type": "llama", "hidden_size": "big"}, "transformers cannot read this config.json"),
                       ({"model_type": "gemma3", "text_config": "x"}, "transformers cannot read this config.json"),
                       ({"model_type": "nosuch", "hidden_size": 64}, "model_type 'nosuch' is not one")):
        with pytest.raises(planner.PlanError, match=words):
            planner.shape_from_config(bad, "bad")


@pytest.mark.parametrize("config,words", [
    ({"model_type": "starcoder2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 1024},
     r"the starcoder2 model transformers builds holds 0.0001573B parameters where the planner's Llama-style decoder "
     r"of these sizes holds 0.0001887B \(\+20.0%\)"),
    ({"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 256, "vocab_size": 1024, "tie_word_embeddings": False}, "the gpt_neox model"),
    ({"model_type": "minicpm3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 1024, "kv_lora_rank": 16, "q_lora_rank": 32,
      "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16}, r"multi-head latent attention \(kv_lora_rank"),
    ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 2560,
                                              "intermediate_size": 10240, "num_hidden_layers": 34}},
     r"the gemma3 model transformers builds holds 3.975B parameters .* \(-2.4%; towers beside its text model\)"),
], ids=["starcoder2-plain-mlp", "gpt-neox", "minicpm3-mla", "gemma3-multimodal"])
def test_architectures_whose_layers_the_planner_does_not_count_are_refused(config, words):
    """A plain (non-gated) MLP, biases everywhere or latent attention read as a Llama layer: Starcoder2-7B was
    planned at 9.89B parameters for 7.17B (+38%), Pythia-1B +27%, Phi-2 +30%, Gemma-3-4B's text model without its
    vision tower -9.8%; MiniCPM3's latent attention planned as heads of head_dim."""
    with pytest.raises(planner.PlanError, match=words):
        planner.shape_from_config(config, "m")


def test_unknown_models_and_directories_without_a_config_are_refused_by_name(tmp_path):
    with pytest.raises(planner.PlanError, match="known: smollm2-135m, .*qwen3-8b"):
        planner.resolve_model("qwen9-1b")
    with pytest.raises(planner.PlanError, match="no config.json"):
        planner.resolve_model(str(tmp_path))


def test_the_largest_micro_batch_fits_and_the_next_one_does_not():
    shape = planner.KNOWN_SHAPES["qwen3-1.7b"]
    for options in (planner.PlanOptions(lora=True), planner.PlanOptions(lora=True, grad_checkpointing=True),
                    planner.PlanOptions(fused_head=False, lora=True)):
        best = planner.max_micro_batch_tokens(shape, 24 * 10 ** 9, options)
        assert best > 0 and best % 64 == 0
        assert planner.predict(shape, best, options).total <= 24 * 10 ** 9 < \
            planner.predict(shape, best + 64, options).total
    full = planner.predict(shape, 64, planner.PlanOptions())
    assert full.moment == "optimizer step" and full.total > 24 * 10 ** 9  # 4+4+8+4 bytes per parameter
    assert planner.max_micro_batch_tokens(shape, 24 * 10 ** 9, planner.PlanOptions()) == 0


def test_plan_options_default_to_the_trainers_rollout_length():
    from pact_fast.rollout import RolloutConfig

    assert planner.PlanOptions().rollout_new_tokens == RolloutConfig().max_new_tokens


def test_the_rollout_kv_cache_term_is_the_cache_a_prefill_allocates():
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_config(config).eval()
    g, context = 3, 37
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 97, (g, context)), use_cache=True)
    cache = out.past_key_values
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    shape = planner.shape_from_config(config.to_dict(), "tiny")
    rollout = planner.predict_rollout(shape, planner.PlanOptions(rollout_group_size=g, rollout_context=context,
                                                                 rollout_new_tokens=0))
    assert rollout.terms["rollout_kv_cache"] == cached
    with torch.no_grad():  # the engine asks for the last position's logits only
        last = model(input_ids=torch.randint(0, 97, (g, context)), logits_to_keep=1).logits
    assert rollout.terms["rollout_prefill_logits"] == last.numel() * last.element_size()


def test_a_mixture_of_experts_config_is_refused():
    """Mixtral's config read as dense: 7.2B parameters planned for 46.7B."""
    mixtral = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8}
    with pytest.raises(planner.PlanError, match="mixture-of-experts model \\(num_local_experts = 8\\)"):
        planner.shape_from_config(mixtral, "mixtral")
    with pytest.raises(planner.PlanError, match="must be a mapping"):
        planner.shape_from_config([1, 2], "listcfg")


def _tiny_llama(**kw):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=448, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                         max_position_embeddings=2048, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float(), config


def _tiny_qwen3():
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float(), config


@pytest.mark.parametrize("build,rows,context,bf16_base", [
    pytest.param(_tiny_llama, 6, 96, False, id="llama"), pytest.param(_tiny_qwen3, 3, 200, False, id="qwen3"),
    pytest.param(_tiny_llama, 4, 256, True, id="llama-bf16-base"),
    pytest.param(_tiny_qwen3, 3, 200, True, id="qwen3-bf16-base")])
def test_the_rollout_prefill_peak_is_what_the_engine_allocates(build, rows, context, bf16_base):
    """KV cache, transient activations and last-position logits of a prefill as HFRolloutEngine runs it
    (left padding, logits_to_keep=1), against the allocator's peak on other shapes than the constants were
    fitted on (the prefill term was every position's logits before, which the engine never allocates); a bf16
    base's prefill runs in bf16 (``model.lora.base_dtype=bfloat16``)."""
    from pact_fast.rollout import _last_logits_only

    model, config = build()
    model.to(torch.bfloat16 if bf16_base else torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (rows, context))
    attn = torch.ones(rows, context, dtype=torch.long)
    attn[0, :7] = 0
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=True,
                         **_last_logits_only(model))

    measured, _ = bench_memory.allocator_peak(prefill)
    shape = planner.shape_from_config(config.to_dict(), "tiny")
    base = {"lora": True, "lora_base_dtype": "bfloat16"} if bf16_base else {}
    terms = planner.predict_rollout(shape, planner.PlanOptions(rollout_group_size=rows, rollout_context=context,
                                                               rollout_new_tokens=0, **base)).terms
    predicted = sum(terms[k] for k in ("rollout_kv_cache", "rollout_prefill_activations", "rollout_prefill_logits"))
    assert abs(predicted - measured) / measured < 0.1, (predicted, measured, terms)


@pytest.mark.parametrize("rows,hidden", [(300, 128), (1048, 128), (1048, 576)], ids=["one-chunk", "two-chunks",
                                                                                   "two-chunks-h576"])
def test_a_bf16_base_linear_logprobs_peak_is_what_the_planner_predicts(rows, hidden):
    """linear_logprobs alone (train.fused_head=false) on a bf16 lm_head and bf16 rows, forward and backward on the
    CPU, against ``logprob_op_bytes`` for a bf16 base: the chunks' fp32 logits plus the fp32 copies the op multiplies
    in (the chunk's rows and one vocabulary slab of the head; a trainer step's peak lies elsewhere on these tiny
    models, so the step cases above do not see this term). V=32000: 524-row chunks, two of them for 1048 rows."""
    from pact_fast.ops import linear_logprobs

    vocab = 32000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).bfloat16()
    t = torch.randint(0, vocab, (rows,), generator=g)

    def step():
        linear_logprobs(x, w, t, backend="torch").sum().backward()

    measured, _ = bench_memory.allocator_peak(step)
    shape = planner.ModelShape("tiny", hidden, 1, 4, 4, hidden // 4, 4 * hidden, vocab, False)
    options = planner.PlanOptions(dtype="float32", device="cpu", lora=True, fused_head=False, attn_backend="sdpa",
                                  lora_base_dtype="bfloat16")
    predicted = planner.logprob_op_bytes(shape, rows, options)
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)


def _measure_and_predict(build, lora, ckpt, fused, attn, tokens=512, frozen_head=False, lean=False, bf16_base=False):
    """Measured peak of a trainer step of the model ``build()`` makes (LoRA by the trainer's
    ``model_setup.apply_lora``, a frozen head by ``model_setup.freeze_lm_head``; ``bf16_base``: the model cast to
    bf16 before the adapters are injected, as ``model_setup.build_policy`` does for ``model.lora.base_dtype=
    bfloat16``) and the planner's predictions, with checkpointing as measured and the other way."""
    from pact_fast.model_setup import freeze_lm_head

    model, config = build()
    if bf16_base:
        model.to(torch.bfloat16)
    if lora:
        model = bench_memory.lora_wrap(model)
    if frozen_head:
        freeze_lm_head(model)
    shape = planner.shape_from_config(config.to_dict(), "tiny")
    episodes, inputs = bench_memory.synthetic_group(shape.vocab_size, tokens)
    sizes = bench_memory.packed_sizes(episodes, inputs)
    measured = bench_memory.measure_step(model, episodes, inputs, fused_head=fused, grad_checkpointing=ckpt,
                                         attn_backend=attn, memory_lean=lean)
    predictions = []
    for checkpointing in (ckpt, not ckpt):
        options = planner.PlanOptions(dtype="float32", device="cpu", lora=lora, grad_checkpointing=checkpointing,
                                      fused_head=fused, attn_backend=attn, freeze_lm_head=frozen_head,
                                      memory_lean=lean, lora_base_dtype="bfloat16" if bf16_base else "float32")
        predictions.append(planner.predict(shape, sizes["tokens"], options, scored_rows=sizes["scored_rows"],
                                           varlen=planner.VarlenSizes(sizes["varlen_keys"], sizes["varlen_pairs"])))
    return measured["peak_bytes"], predictions


def _tiny_gemma3():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma3_text", vocab_size=2048, hidden_size=128, intermediate_size=448,
                                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                  max_position_embeddings=2048, sliding_window=4096, attention_dropout=0.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float(), config


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gemma3s_four_norms_and_qk_norms_are_planned(lora):
    """Gemma-3's layers norm before and after attention and MLP (4 RMSNorms, Llama's 2) and norm q and k; planned
    as Llama's, this step was predicted 13% (full; LoRA 8%) under its measured peak, Gemma-3-1B's activations at
    real size 31% under. Now within 1% here."""
    measured, (predicted, _) = _measure_and_predict(_tiny_gemma3, lora, False, True, "varlen")
    assert abs(predicted.total - measured) / measured < 0.03, (predicted.total, measured, predicted.terms)


CASES = [
    pytest.param(_tiny_llama, False, False, True, "varlen", {}, id="llama-full"),
    pytest.param(_tiny_llama, True, False, True, "varlen", {}, id="llama-lora"),
    pytest.param(_tiny_llama, True, True, True, "varlen", {}, id="llama-lora-ckpt"),
    pytest.param(_tiny_llama, False, True, True, "sdpa", {}, id="llama-full-ckpt-sdpa"),
    pytest.param(_tiny_llama, True, False, False, "sdpa", {}, id="llama-lora-linear_logprobs-sdpa"),
    pytest.param(_tiny_llama, False, False, True, "varlen", {"frozen_head": True}, id="llama-full-frozen-tied-head"),
    pytest.param(_tiny_llama, True, False, True, "varlen", {"lean": True}, id="llama-lora-memory-lean"),
    pytest.param(_tiny_qwen3, False, False, True, "varlen", {}, id="qwen3-full"),
    pytest.param(_tiny_qwen3, False, False, False, "varlen", {"frozen_head": True},
                 id="qwen3-full-frozen-head-linear_logprobs"),
    pytest.param(_tiny_qwen3, True, False, False, "varlen", {}, id="qwen3-lora-linear_logprobs"),
    # model.lora.base_dtype=bfloat16 on the CPU (no autocast: the base runs in bf16, the adapters in fp32)
    pytest.param(_tiny_llama, True, False, True, "varlen", {"bf16_base": True}, id="llama-lora-bf16-base"),
    pytest.param(_tiny_llama, True, True, True, "varlen", {"bf16_base": True}, id="llama-lora-ckpt-bf16-base"),
    pytest.param(_tiny_llama, True, False, False, "sdpa", {"bf16_base": True},
                 id="llama-lora-linear_logprobs-sdpa-bf16-base"),
    pytest.param(_tiny_llama, True, False, True, "varlen", {"lean": True, "bf16_base": True},
                 id="llama-lora-memory-lean-bf16-base"),
    pytest.param(_tiny_qwen3, True, False, False, "varlen", {"bf16_base": True},
                 id="qwen3-lora-linear_logprobs-bf16-base"),
    pytest.param(_tiny_qwen3, True, True, False, "varlen", {"bf16_base": True},
                 id="qwen3-lora-ckpt-linear_logprobs-bf16-base"),
]


@pytest.mark.parametrize("build,lora,ckpt,fused,attn,kw", CASES)
def test_prediction_is_within_15_percent_of_a_measured_trainer_step(build, lora, ckpt, fused, attn, kw):
    measured, (predicted, flipped) = _measure_and_predict(build, lora, ckpt, fused, attn, **kw)
    assert abs(predicted.total - measured) / measured < TOLERANCE, (predicted.total, measured, predicted.terms)
    # the case exercises the activation formulas: predicted with checkpointing the other way, it misses by more
    assert abs(flipped.total - measured) / measured > TOLERANCE, (flipped.total, measured)


def test_lora_saves_the_memory_the_planner_predicts():
    full, (full_pred, _) = _measure_and_predict(_tiny_llama, False, False, True, "varlen")
    lora, (lora_pred, _) = _measure_and_predict(_tiny_llama, True, False, True, "varlen")
    saved, predicted = full - lora, full_pred.total - lora_pred.total
    assert saved > 0 and abs(predicted - saved) / saved < TOLERANCE, (predicted, saved)


def test_a_bf16_base_saves_the_memory_the_planner_predicts():
    """model.lora.base_dtype=bfloat16 against float32, the same LoRA step: what the bf16 base saves (half the base's
    weights, bf16 activations, less the adapters' own fp32 copies of their inputs) as predicted. (With checkpointing
    the saving is a small difference of two peaks, each predicted within a few percent: not held to 15%.)"""
    f32, (f32_pred, _) = _measure_and_predict(_tiny_llama, True, False, True, "varlen")
    b16, (b16_pred, _) = _measure_and_predict(_tiny_llama, True, False, True, "varlen", bf16_base=True)
    saved, predicted = f32 - b16, f32_pred.total - b16_pred.total
    assert saved > 0 and abs(predicted - saved) / saved < TOLERANCE, (predicted, saved, f32_pred.terms, b16_pred.terms)


def test_a_bf16_base_halves_the_base_weights_and_models_autocast_on_cuda():
    """The bf16 base's terms, CUDA ones (predictions only, not measured here) included: 2 bytes per base parameter,
    4 per adapter parameter; under autocast no cast copy of a bf16 weight, only of the fp32 adapters."""
    shape = planner.KNOWN_SHAPES["qwen3-8b"]
    adapters = planner.lora_params(shape, 16, planner.DEFAULT_LORA_TARGETS)
    total = planner.param_counts(shape)["total"]
    for device, dtype, attn in (("cpu", "float32", "sdpa"), ("cuda", "bf16", "flash"), ("cuda", "float32", "flash")):
        for ckpt in (False, True):
            p32, p16 = (planner.predict(shape, 4096, planner.PlanOptions(
                device=device, dtype=dtype, attn_backend=attn, lora=True, grad_checkpointing=ckpt, lora_base_dtype=d))
                for d in ("float32", "bfloat16"))
            assert p32.terms["weights"] == 4 * (total + adapters)
            assert p16.terms["weights"] == 2 * total + 4 * adapters
            assert p16.terms["adamw_state"] == p32.terms["adamw_state"] == 8 * adapters
            assert p16.terms.get("autocast_weight_copies", 0) == (2 * adapters if dtype == "bf16" else 0)
            assert p16.total < p32.total, (device, dtype, ckpt)


def _optimizer_and_gradient_share(full, lora):
    """What LoRA's predicted peak leaves out of full fine-tuning's in AdamW state, gradients and the lm_head's dW
    (the log-prob op's difference: the same workspace, no dW for LoRA's frozen head)."""
    return sum(full.terms.get(k, 0) - lora.terms.get(k, 0) for k in ("adamw_state", "gradients", "logprob_op"))


def test_frozen_head_plans_no_dw_nor_its_optimizer_state():
    shape = planner.KNOWN_SHAPES["qwen3-8b"]  # untied: only the lm_head freezes
    dw = 4 * shape.vocab_size * shape.hidden_size
    for device, dtype, attn in (("cpu", "float32", "sdpa"), ("cuda", "bf16", "flash")):
        for fused in (True, False):
            trained, frozen = (planner.PlanOptions(device=device, dtype=dtype, attn_backend=attn, fused_head=fused,
                                                   freeze_lm_head=f) for f in (False, True))
            state = [planner.predict(shape, 4096, o).terms["adamw_state"] for o in (trained, frozen)]
            assert state[1] == state[0] - 2 * dw  # no exp_avg, exp_avg_sq of the head
            op = [planner.logprob_op_bytes(shape, 4096, o) for o in (trained, frozen)]
            if device == "cuda":  # bf16 inputs under autocast; a frozen fused head may take a larger row block
                from pact_fast.kernels import fused_pact_head_launch, linear_logprobs_launch

                workspace = (fused_pact_head_launch.extra_memory_bytes(4096, shape.vocab_size, shape.hidden_size,
                                                                       torch.bfloat16, weight_grad=False) if fused
                             else linear_logprobs_launch.extra_memory_bytes(4096, shape.vocab_size,
                                                                            shape.hidden_size, torch.bfloat16))
                assert op[0] - op[1] >= dw - workspace
            elif fused:  # linear_logprobs on the CPU may peak in its forward, before any dW
                assert op[1] <= op[0] - dw
            else:
                assert op[1] < op[0]
        fused_frozen, lean = (planner.PlanOptions(device=device, dtype=dtype, attn_backend=attn, freeze_lm_head=True,
                                                  memory_lean=m) for m in (False, True))
        assert planner.logprob_op_bytes(shape, 4096, lean) < planner.logprob_op_bytes(shape, 4096, fused_frozen)
    tied = planner.KNOWN_SHAPES["qwen3-1.7b"]  # tied: the embedding freezes with the head
    adapters, trainable, _ = planner.trained_params(tied, planner.PlanOptions(freeze_lm_head=True))
    assert adapters == 0 and trainable == planner.param_counts(tied)["total"] - tied.vocab_size * tied.hidden_size


def test_stored_smollm2_135m_lora_saves_the_optimizer_and_gradient_share_the_planner_predicts():
    """The issue's Done-when on the measured SmolLM2-135M: LoRA's peak is below full fine-tuning's by the optimizer
    and gradient share the planner predicts, within 15%."""
    data = json.loads((HERE.parent / "bench" / "results" / "memory_cpu.json").read_text())
    rows = {row["name"]: row for row in data["rows"]}
    shape = planner.KNOWN_SHAPES["smollm2-135m"]

    def predicted(row, lora):
        options = planner.PlanOptions(dtype="float32", device="cpu", lora=lora, attn_backend="varlen",
                                      **({"lora_targets": tuple(row["lora_targets"])} if lora else {}))
        return planner.predict(shape, row["tokens"], options, scored_rows=row["scored_rows"],
                               varlen=planner.VarlenSizes(row["varlen_keys"], row["varlen_pairs"]))

    full, lora = rows["full"], rows["lora"]
    assert (full["tokens"], full["scored_rows"]) == (lora["tokens"], lora["scored_rows"])  # the same step
    saved = full["peak_bytes"] - lora["peak_bytes"]
    share = _optimizer_and_gradient_share(predicted(full, False), predicted(lora, True))
    assert saved > 0 and abs(share - saved) / saved < TOLERANCE, (share, saved)


def test_default_lora_targets_are_the_trainers_for_llama_and_qwen():
    from pact_fast.model_setup import default_lora_targets

    for build in (_tiny_llama, _tiny_qwen3):
        assert sorted(default_lora_targets(build()[0])) == sorted(planner.DEFAULT_LORA_TARGETS)


def test_stored_smollm2_135m_measurements_match_the_planner():
    """bench/results/memory_cpu.json (bench/bench_memory.py): SmolLM2-135M's measured peaks, full and LoRA (on a
    float32 and a bf16 base), against the planner's prediction recomputed now from the stored packed sizes."""
    data = json.loads((HERE.parent / "bench" / "results" / "memory_cpu.json").read_text())
    shape = planner.KNOWN_SHAPES["smollm2-135m"]
    assert planner.ModelShape(**{**data["shape"], "name": shape.name}) == shape
    names = {row["name"] for row in data["rows"]}
    assert {"full", "lora", "lora-bf16-base", "lora-bf16-base+ckpt"} <= names
    for row in data["rows"]:
        lora = row["name"].startswith("lora")
        options = planner.PlanOptions(dtype="float32", device="cpu", lora=lora,
                                      grad_checkpointing=row["name"].endswith("ckpt"), attn_backend="varlen",
                                      lora_base_dtype=row["lora_base_dtype"],
                                      **({"lora_targets": tuple(row["lora_targets"])} if lora else {}))
        predicted = planner.predict(shape, row["tokens"], options, scored_rows=row["scored_rows"],
                                    varlen=planner.VarlenSizes(row["varlen_keys"], row["varlen_pairs"])).total
        assert abs(predicted - row["peak_bytes"]) / row["peak_bytes"] < TOLERANCE, (row["name"], predicted,
                                                                                   row["peak_bytes"])


def _plan(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["plan", *args])
    return rc, out.getvalue(), err.getvalue()


def test_plan_prints_the_largest_micro_batch_that_fits():
    rc, out, _ = _plan("--model", "Qwen3-1.7B", "--gpu-memory", "24GB", "--lora", "--grad-checkpointing")
    options = planner.PlanOptions(lora=True, grad_checkpointing=True)
    best = planner.max_micro_batch_tokens(planner.KNOWN_SHAPES["qwen3-1.7b"], 24 * 10 ** 9, options)
    assert rc == 0 and f"fits: train.micro_batch_tokens={best} " in out
    rc, out, _ = _plan("--model", "qwen3-8b", "--gpu-memory", "24GiB")
    assert rc == 1 and "does not fit" in out


def test_plan_says_when_its_search_limit_fits_rather_than_calling_it_the_largest():
    """On a budget past what 2^22 tokens need (80 TB), the search stops at its limit: the line called 4,194,304 the
    largest micro-batch predicted to fit, yet 8,388,608 fits too."""
    shape, budget = planner.KNOWN_SHAPES["qwen3-1.7b"], 80 * 10 ** 12
    assert planner.predict(shape, 2 * planner.SEARCH_LIMIT, planner.PlanOptions()).total <= budget
    rc, out, _ = _plan("--model", "qwen3-1.7b", "--gpu-memory", "80TB")
    assert rc == 0 and out.splitlines()[-1] == (f"fits: train.micro_batch_tokens={planner.SEARCH_LIMIT} and beyond "
                                                "(the planner searches no further)")
    # --tokens past what fits: "at most 4194304 does" understated it the same way
    asked = 64 * planner.SEARCH_LIMIT
    assert planner.predict(shape, asked, planner.PlanOptions()).total > budget
    rc, out, _ = _plan("--model", "qwen3-1.7b", "--gpu-memory", "80TB", "--tokens", str(asked))
    assert rc == 1 and out.splitlines()[-1].endswith(f"does not fit; {planner.SEARCH_LIMIT} does, and beyond (the "
                                                     "planner searches no further)"), out


@pytest.mark.parametrize("args,message", [
    (["--model", "qwen3-1.7b", "--gpu-memory", "lots"], "pact-fast: --gpu-memory 'lots' is not a size"),
    (["--model", "llama-70b", "--gpu-memory", "24GB"], "pact-fast: unknown model 'llama-70b' (not a known name nor "
                                                       "a directory); known: smollm2-135m"),
    (["--model", "qwen3-1.7b", "--gpu-memory", "24GB", "--lora", "--lora-targets", "q_proj,lm_head"],
     "pact-fast: LoRA target modules lm_head"),
    (["--model", "qwen3-1.7b", "--gpu-memory", "24GB", "--device", "cpu", "--dtype", "bf16"],
     "pact-fast: --dtype bf16 on the CPU"),
    (["--gpu-memory", "24GB"], "pact-fast: plan: give --model"),
    (["--model", "qwen3-4b", "--gpu-memory", "24GB", "--rollout-group-size", "8"],
     "pact-fast: --rollout-group-size / --rollout-new-tokens plan the rollout phase only with --rollout-context"),
    (["--model", "qwen3-4b", "--gpu-memory", "24GB", "--rollout-context", "4096"],
     "pact-fast: --rollout-context plans the rollout phase with --rollout-group-size"),
    (["--model", "qwen3-4b", "--gpu-memory", "24GB", "--lora-r", "64"],
     "pact-fast: --lora-r without LoRA (--lora, or model.lora.enabled in --config) plan nothing"),
    (["--model", "qwen3-4b", "--gpu-memory", "24GB", "--lora", "--lora-targets", "q_proj,q_proj"],
     "pact-fast: LoRA target modules q_proj, q_proj name a module twice"),
    (["--model", "qwen3-4b", "--gpu-memory", "24GB", "--lora-base-dtype", "bfloat16"],
     "pact-fast: --lora-base-dtype bfloat16 without LoRA: a full fine-tune's AdamW updates float32 weights"),
    (["--model", "qwen3-4b", "--gpu-memory", "24GB", "--lora-base-dtype", "float32"],
     "pact-fast: --lora-base-dtype without LoRA (--lora, or model.lora.enabled in --config) plan nothing"),
    (["--model", "qwen3-4b", "--gpu-memory", "24GB", "--lora", "--lora-targets", ""],  # planned the default targets
     "pact-fast: --lora-targets '' names an empty module"),
    (["--model", "qwen3-4b", "--gpu-memory", "24GB", "--lora", "--lora-targets", "q_proj,"],
     "pact-fast: --lora-targets 'q_proj,' names an empty module"),
], ids=["bad-size", "unknown-model", "bad-target", "bf16-cpu", "no-model", "rollout-without-context",
        "context-without-group-size", "lora-flag-without-lora", "lora-target-twice", "bf16-base-without-lora",
        "base-dtype-without-lora", "empty-targets", "empty-target-in-list"])
def test_plan_mistakes_are_one_line_with_status_2(args, message):
    rc, out, err = _plan(*args)
    assert rc == 2 and out == "" and err.startswith(message) and err.count("\n") == 1


def test_unreadable_or_nonsense_model_configs_are_one_line_with_status_2(tmp_path):
    """A config.json that is a directory or not UTF-8, zero heads, a head_dim that is not a number, a GPU of less
    than a byte: each was a traceback (IsADirectoryError, UnicodeDecodeError, ZeroDivisionError, TypeError) or a
    plan for a 0-byte GPU. A text hidden_size was said to be missing; heads that do not divide the hidden size
    (no head_dim) or kv heads that do not divide the heads, which no model loads with, were planned."""
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
             "vocab_size": 128}
    cases = {"dir": None, "binary": b"\xff\xfe{", "zero-heads": {**sizes, "num_attention_heads": 0},
             "text-head-dim": {**sizes, "head_dim": "x"}, "text-size": {**sizes, "hidden_size": "big"},
             "heads-not-dividing": {**sizes, "num_attention_heads": 3},
             "kv-heads-not-dividing": {**sizes, "num_key_value_heads": 3}}
    messages = {"dir": "config.json cannot be read (Is a directory)", "binary": "config.json is not valid JSON",
                "zero-heads": "config.json has num_attention_heads = 0; each must be a positive integer",
                "text-head-dim": "config.json has head_dim = 'x'; each must be a positive integer",
                "text-size": "config.json has hidden_size = 'big'; each must be a positive integer",
                "heads-not-dividing": "hidden_size = 64, not a multiple of num_attention_heads = 3, and no head_dim",
                "kv-heads-not-dividing": "num_attention_heads = 4, not a multiple of num_key_value_heads = 3"}
    for case, content in cases.items():
        (tmp_path / case).mkdir()
        if content is None:
            (tmp_path / case / "config.json").mkdir()
        else:
            (tmp_path / case / "config.json").write_bytes(content if isinstance(content, bytes)
                                                          else json.dumps(content).encode())
        rc, out, err = _plan("--model", str(tmp_path / case), "--gpu-memory", "24GB")
        assert rc == 2 and out == "" and err.count("\n") == 1 and messages[case] in err, (case, err)
    rc, out, err = _plan("--model", "qwen3-0.6b", "--gpu-memory", "0.5B")
    assert rc == 2 and err == "pact-fast: --gpu-memory '0.5B' must be at least one byte\n"


def test_plan_reads_a_run_config(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  grad_checkpointing: true\n  fused_head: false\n")
    rc, out, _ = _plan("--model", "qwen2.5-1.5b", "--gpu-memory", "40GB", "--config", str(tmp_path / "run.yaml"),
                       "--lora")
    options = planner.PlanOptions(lora=True, grad_checkpointing=True, fused_head=False, rollout_group_size=2,
                                  rollout_new_tokens=48)
    best = planner.max_micro_batch_tokens(planner.KNOWN_SHAPES["qwen2.5-1.5b"], 40 * 10 ** 9, options)
    assert rc == 0 and "activation checkpointing on, linear_logprobs" in out
    assert f"train.micro_batch_tokens={best} " in out
    (tmp_path / "cpu.yaml").write_text("train:\n  device: cpu\n")
    rc, _, err = _plan("--model", "qwen3-0.6b", "--gpu-memory", "24GB", "--config", str(tmp_path / "cpu.yaml"))
    assert rc == 2 and "train.attn_backend=sdpa" in err


def test_plan_says_whether_the_size_asked_about_fits(tmp_path):
    """`plan --config run.yaml` printed the largest size that fits and status 0 while the config's own
    train.micro_batch_tokens, what its run trains with, was predicted far over the GPU's memory; `--tokens N`
    likewise for N."""
    from pact_fast.config import load_config

    shape, budget = planner.KNOWN_SHAPES["qwen3-0.6b"], 24 * 10 ** 9
    best = planner.max_micro_batch_tokens(shape, budget, planner.options_from_config(load_config()))
    for tokens, rc_expected in ((best // 2, 0), (best * 2, 1)):
        (tmp_path / "run.yaml").write_text(f"train:\n  micro_batch_tokens: {tokens}\n")
        rc, out, _ = _plan("--model", "qwen3-0.6b", "--gpu-memory", "24GB", "--config", str(tmp_path / "run.yaml"))
        verdict = out.splitlines()[-1]
        assert rc == rc_expected and f"train.micro_batch_tokens={tokens} " in verdict, out
        assert ("does not fit" in verdict) == (rc_expected == 1), verdict
        rc, out, _ = _plan("--model", "qwen3-0.6b", "--gpu-memory", "24GB", "--tokens", str(tokens))
        assert rc == rc_expected and out.splitlines()[-1].startswith(f"--tokens {tokens} is predicted"), out


def test_plan_of_a_config_with_model_takes_the_pretrained_default_size_the_run_would(tmp_path):
    """`plan --model M --config run.yaml` (README's form) with a file that does not set micro_batch_tokens: the run
    (`train --config run.yaml --model M`) trains with the pretrained default, but the plan judged the built-in
    model's 8192 and said "does not fit", status 1."""
    from pact_fast.models import pretrained_defaults

    (tmp_path / "run.yaml").write_text("train:\n  lr: 0.00003\n")
    rc, out, _ = _plan("--model", "qwen3-1.7b", "--gpu-memory", "32GB", "--config", str(tmp_path / "run.yaml"),
                       "--lora")
    tokens = pretrained_defaults()["train.micro_batch_tokens"]
    assert f"train.micro_batch_tokens={tokens} is predicted" in out.splitlines()[-1] and rc == 0, out


def test_options_come_from_a_real_run_config():
    from pact_fast.config import load_config

    config = load_config(None, ["model.lora.enabled=true", "model.lora.r=8", "model.lora.dropout=0.1",
                                "model.lora.target_modules=[q_proj,v_proj]", "train.fused_head_memory_lean=true",
                                "train.grad_checkpointing=true"])
    options = planner.options_from_config(config)
    assert (options.lora, options.lora_r, options.lora_dropout, options.lora_targets) == (True, 8, 0.1,
                                                                                            ("q_proj", "v_proj"))
    assert options.memory_lean and options.grad_checkpointing and not options.head_trainable
    default = planner.options_from_config(load_config(None, ["model.lora.enabled=true"]))
    assert default.lora_targets == planner.DEFAULT_LORA_TARGETS and default.lora_r == 16
    frozen = planner.options_from_config(load_config(None, ["model.freeze_lm_head=true"]))
    assert not frozen.lora and frozen.freeze_lm_head and not frozen.head_trainable
    assert planner.options_from_config(load_config()).head_trainable


def test_plan_takes_the_lora_base_dtype():
    shape = planner.KNOWN_SHAPES["qwen3-8b"]
    best = {d: planner.max_micro_batch_tokens(shape, 24 * 10 ** 9, planner.PlanOptions(
        lora=True, grad_checkpointing=True, lora_base_dtype=d)) for d in ("float32", "bfloat16")}
    assert best["float32"] == 0 < best["bfloat16"]  # 33 GB of float32 weights; 16 GB in bf16
    rc, out, _ = _plan("--model", "qwen3-8b", "--gpu-memory", "24GB", "--lora", "--grad-checkpointing",
                       "--lora-base-dtype", "bfloat16")
    assert rc == 0 and "bf16 (bf16 base, fp32 adapters, bf16 autocast)" in out
    assert f"train.micro_batch_tokens={best['bfloat16']} " in out
    with pytest.raises(planner.PlanError, match="--lora-base-dtype 'float16': choose float32 or bfloat16"):
        planner.PlanOptions(lora=True, lora_base_dtype="float16")


def test_plan_takes_the_frozen_head_and_memory_lean_flags():
    shape = planner.KNOWN_SHAPES["qwen3-4b"]
    options = planner.PlanOptions(freeze_lm_head=True, memory_lean=True, grad_checkpointing=True)
    best = planner.max_micro_batch_tokens(shape, 80 * 10 ** 9, options)
    rc, out, _ = _plan("--model", "qwen3-4b", "--gpu-memory", "80GB", "--freeze-lm-head", "--memory-lean",
                       "--grad-checkpointing")
    assert rc == 0 and "lm_head frozen (no dW)" in out and f"train.micro_batch_tokens={best} " in out
    rc, _, err = _plan("--model", "qwen3-4b", "--gpu-memory", "80GB", "--memory-lean", "--no-fused-head")
    assert rc == 2 and err.startswith("pact-fast: --memory-lean needs the fused head")


def test_the_reference_term_is_the_copy_the_trainer_builds_and_none_with_lora():
    """loss.beta_kl > 0: full fine-tuning builds a second model (build_policy) as the reference; LoRA turns its
    adapters off instead, so the planner adds the copy's bytes for the one and nothing for the other."""
    from pact_fast.config import load_config
    from pact_fast.model_setup import build_policy

    config = load_config(None, ["loss.beta_kl=0.1", "train.device=cpu", "train.attn_backend=sdpa"])
    reference = build_policy(config.model, torch.device("cpu"), 0).model
    shape = planner.shape_from_config(reference.config.to_dict(), "builtin")
    options = planner.options_from_config(config)
    copy = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert options.reference_model and planner.predict(shape, 256, options).terms["reference_weights"] == copy
    lora = planner.options_from_config(load_config(None, ["loss.beta_kl=0.1", "model.lora.enabled=true",
                                                          "train.device=cpu", "train.attn_backend=sdpa"]))
    assert planner.predict(shape, 256, lora).terms["reference_weights"] == 0
    assert not planner.options_from_config(load_config(None, ["train.device=cpu", "train.attn_backend=sdpa"])) \
        .reference_model


def test_device_on_the_command_line_sets_that_devices_defaults_over_a_config(tmp_path):
    """`plan --config run.yaml --device cpu` blamed a --dtype bf16 nobody gave (the config's CUDA default)."""
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  steps: 2\n  micro_batch_tokens: 1024\n")  # one that fits: status 0
    rc, out, err = _plan("--config", str(run), "--model", "qwen3-0.6b", "--gpu-memory", "24GB", "--device", "cpu")
    assert rc == 0 and "float32" in out and ", cpu;" in out, err


def test_the_cpu_adamw_step_keeps_two_temporaries_of_its_largest_tensor():
    """The CPU's single-tensor AdamW forms ``exp_avg_sq.sqrt() / bias_correction2_sqrt``: the root and the
    quotient are alive together. The planner counted one (4 bytes x the largest tensor), and under-predicted a
    full fine-tune whose peak is the optimizer step by the tied embedding's 108 MiB (SmolLM2-135M, 64 tokens)."""
    from common import allocator_peak

    big, small = torch.nn.Parameter(torch.randn(1 << 20)), torch.nn.Parameter(torch.randn(1000))
    optimizer = torch.optim.AdamW([big, small], lr=1e-3)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    optimizer.step()  # the state (exp_avg, exp_avg_sq) exists from here on
    peak, _ = allocator_peak(optimizer.step)
    predicted = 8 * big.numel()  # planner.predict's CPU adamw_temporaries: 8 * (largest trainable tensor)
    assert predicted <= peak <= predicted * 1.05, (peak, predicted)


def test_a_vllm_config_is_planned_only_where_the_planners_terms_hold(tmp_path):
    """`plan --config` of a run with rollout.engine=vllm planned the hf engine's KV cache for --rollout-context (vLLM
    sizes its own, in its own memory) and, with vllm_sleep=false, a step beside an engine that keeps its weights and
    KV cache through the update, uncounted: the numbers fitted a GPU the run would not. The default (sleep mode on
    CUDA: the engine's memory is freed while the trainer updates) plans the step as an hf run's."""
    from pact_fast.config import load_config

    def plan(*overrides, **flags):
        return planner.options_from_config(load_config(None, list(overrides)), **flags)

    hf = plan()
    assert plan("rollout.engine=vllm") == hf
    with pytest.raises(planner.PlanError, match="rollout.engine=vllm without sleep mode"):
        plan("rollout.engine=vllm", "rollout.vllm_sleep=false")
    with pytest.raises(planner.PlanError, match="rollout.engine=vllm without sleep mode"):
        plan("rollout.engine=vllm", "train.device=cpu", "train.attn_backend=sdpa")  # no sleep mode on the CPU
    with pytest.raises(planner.PlanError, match="--rollout-context plans the hf rollout engine"):
        plan("rollout.engine=vllm", rollout_context=1024)
    assert plan(rollout_context=1024).rollout_context == 1024
    config = tmp_path / "run.yaml"
    config.write_text("rollout:\n  engine: vllm\n  vllm_sleep: false\n")
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "plan", "--model", "qwen3-0.6b", "--gpu-memory", "24GB",
                           "--config", str(config)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "without sleep mode" in proc.stderr


def test_attn_backend_on_the_command_line_wins_and_varlen_is_not_planned_as_flash():
    """`plan --config cpu-run.yaml --attn-backend sdpa` was refused for the config's attn_backend (auto) although the
    flag named the one the planner predicts on the CPU; a CUDA config with train.attn_backend=varlen (each segment
    gathers its ancestors' keys and values) was planned as flash's O(T) attention, without a word."""
    from pact_fast.config import load_config

    cpu = load_config(None, ["train.device=cpu"])
    with pytest.raises(planner.PlanError, match="on the CPU the planner predicts train.attn_backend=sdpa only"):
        planner.options_from_config(cpu)
    options = planner.options_from_config(cpu, attn_backend="sdpa")
    assert (options.device, options.attn_backend, options.dtype) == ("cpu", "sdpa", "float32")
    varlen = load_config(None, ["train.attn_backend=varlen"])
    with pytest.raises(planner.PlanError, match="train.attn_backend=varlen: its memory depends on the packed trie"):
        planner.options_from_config(varlen)
    assert planner.options_from_config(varlen, attn_backend="flash").attn_backend == "flash"
    for backend in ("auto", "triton", "flex"):  # flash-like: O(T) saved state
        assert planner.options_from_config(load_config(None, [f"train.attn_backend={backend}"])).attn_backend == "flash"


def test_readmes_table_of_predictions_is_the_planners():
    """README's table of the largest micro-batch per model and GPU size must be what the planner predicts today."""
    rows = planner.readme_table()
    readme = (HERE.parent / "README.md").read_text().splitlines()
    start = readme.index(rows[0])
    assert readme[start:start + len(rows)] == rows
