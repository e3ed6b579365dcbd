"""Every Hugging Face causal LM scores exactly packed, or is refused in one line before any step.

Tiny random-weight models of many architectures (``AutoConfig.for_model``, fp32), each with a sliding window
shorter than the sequences where the architecture has one: ``sequence_logprobs`` of a group of 4 sequences
sharing a 10-token prefix equals the model's own eager forward of each sequence alone, log-probs and
gradients; or the model is refused with the message ``ARCHITECTURES`` names. README's table of supported
architectures is generated from this list (``python tests/test_architectures.py`` rewrites it).
"""
import re
import sys
from pathlib import Path

import pytest
import torch

from models import param_grads, separate_logprobs

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 8
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, attention_dropout=0.0)

# (test id, model_type, what README's row shows, config overrides, None or the words of the refusal)
ARCHITECTURES = [
    ("llama", "llama", "Llama", {}, None),
    ("qwen2-window", "qwen2", "Qwen2, sliding window", {"use_sliding_window": True, "sliding_window": WINDOW,
                                                        "max_window_layers": 1}, None),
    ("qwen3", "qwen3", "Qwen3", {}, None),
    ("qwen3_moe", "qwen3_moe", "Qwen3-MoE", {"moe_intermediate_size": 32, "num_experts": 4,
                                             "num_experts_per_tok": 2}, None),
    ("mistral", "mistral", "Mistral, sliding window", {"sliding_window": WINDOW}, None),
    ("mixtral", "mixtral", "Mixtral, sliding window", {"sliding_window": WINDOW, "num_local_experts": 4}, None),
    ("phi3", "phi3", "Phi-3, sliding window", {"sliding_window": WINDOW}, None),
    ("gemma", "gemma", "Gemma", {}, None),
    ("gemma2", "gemma2", "Gemma2, default softcaps, alternating windows", {"sliding_window": WINDOW}, None),
    ("gemma2-caps", "gemma2", "Gemma2, softcaps that bite (attention 1, final 2; larger weights)",
     {"sliding_window": WINDOW, "attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0,
      "initializer_range": 0.3}, None),
    ("gemma3_text", "gemma3_text", "Gemma3 text, alternating windows", {"sliding_window": WINDOW}, None),
    ("cohere", "cohere", "Cohere (logit_scale)", {"logit_scale": 0.5}, None),
    ("cohere2", "cohere2", "Cohere2, sliding window (logit_scale)", {"sliding_window": WINDOW, "logit_scale": 0.5},
     None),
    ("granite", "granite", "Granite (logits_scaling)", {"logits_scaling": 4.0}, None),
    ("hyperclovax", "hyperclovax", "HyperCLOVAX (logits_scaling multiplies)", {"logits_scaling": 4.0}, None),
    ("minicpm3", "minicpm3", "MiniCPM3 (MLA, values narrower than keys; logits_scaling = hidden_size / dim_model_base)",
     {"dim_model_base": 16, "head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
      "kv_lora_rank": 16, "q_lora_rank": 32, "num_key_value_heads": 4}, None),
    ("starcoder2", "starcoder2", "Starcoder2, sliding window", {"sliding_window": WINDOW}, None),
    ("olmo", "olmo", "OLMo (clip_qkv)", {"clip_qkv": 0.5}, None),
    ("olmo2", "olmo2", "OLMo2", {}, None),
    ("gpt_neox", "gpt_neox", "GPT-NeoX (partial rotary)", {"rotary_pct": 0.5}, None),
    ("gpt2", "gpt2", "GPT-2", {"attn_pdrop": 0.0, "n_embd": 64, "n_layer": 2, "n_head": 4}, None),
    ("opt", "opt", "OPT", {"ffn_dim": 128, "word_embed_proj_dim": 64}, None),
    ("phi", "phi", "Phi", {}, None),
    ("exaone4", "exaone4", "EXAONE 4, sliding window", {"sliding_window": WINDOW}, None),
    ("qwen2_moe", "qwen2_moe", "Qwen2-MoE", {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                                             "num_experts": 4, "num_experts_per_tok": 2}, None),
    ("deepseek_v3", "deepseek_v3", "DeepSeek-V3 (MLA, values narrower than keys as in its 192 / 128; MoE)",
     {"head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 16,
      "q_lora_rank": 32, "num_key_value_heads": 4, "moe_intermediate_size": 32, "n_routed_experts": 4,
      "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1}, None),
    ("deepseek_v3-wide-values", "deepseek_v3", "DeepSeek-V3 (MLA, values wider than keys)",
     {"head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 32, "kv_lora_rank": 16,
      "q_lora_rank": 32, "num_key_value_heads": 4, "moe_intermediate_size": 32, "n_routed_experts": 4,
      "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1}, None),
    ("deepseek_v2", "deepseek_v2", "DeepSeek-V2 (MLA, values narrower than keys; MoE)",
     {"head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 16,
      "q_lora_rank": 32, "num_key_value_heads": 4, "moe_intermediate_size": 32, "n_routed_experts": 4,
      "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1}, None),
    ("glm4", "glm4", "GLM-4 (partial rotary)", {}, None),
    ("olmo3", "olmo3", "OLMo3, alternating windows", {"sliding_window": WINDOW}, None),
    ("smollm3", "smollm3", "SmolLM3 (NoPE layers)", {"no_rope_layer_interval": 2}, None),
    ("gptj", "gptj", "GPT-J (partial rotary)", {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8}, None),
    ("stablelm", "stablelm", "StableLM", {}, "does not pass keyword arguments"),
    ("mpt", "mpt", "MPT (ALiBi)", {"d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2},
     "(MptModel) takes no position_ids"),
    ("qwen2_moe-window", "qwen2_moe", "Qwen2-MoE, sliding window (in its mask only)",
     {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "moe_intermediate_size": 32,
      "shared_expert_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
     "builds an attention mask limited to 8 tokens"),
    ("smollm3-window-off", "smollm3", "SmolLM3, sliding layer_types with use_sliding_window=False",
     {"sliding_window": WINDOW, "use_sliding_window": False}, "builds an attention mask limited to 8 tokens"),
    ("falcon_h1", "falcon_h1", "Falcon-H1 (Mamba beside attention in every layer)",
     {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1,
      "mamba_chunk_size": 8}, "mix tokens along the sequence outside attention (Conv1d conv1d"),
    ("doge", "doge", "Doge (dynamic mask attention)", {}, "passes an attention mask of its own making"),
    ("bart", "bart", "Bart decoder", {"d_model": 64, "decoder_layers": 2, "encoder_layers": 2, "decoder_ffn_dim": 128,
                                      "decoder_attention_heads": 4, "encoder_attention_heads": 4},
     "(BartDecoder) takes no position_ids"),
    ("llama-bidirectional", "llama", "Llama, is_causal=False (bidirectional)", {"is_causal": False},
     "attends bidirectionally"),
    ("bert-decoder", "bert", "BERT as a decoder (prediction head)", {"is_decoder": True},
     "has layers between its decoder and its output layer (cls.predictions.transform.LayerNorm, "
     "cls.predictions.transform.dense)"),
    ("roberta-decoder", "roberta", "RoBERTa as a decoder (prediction head)", {"is_decoder": True},
     "has layers between its decoder and its output layer (lm_head.dense, lm_head.layer_norm)"),
    ("modernbert-decoder", "modernbert-decoder", "ModernBERT decoder (prediction head)", {},
     "has layers between its decoder and its output layer (lm_head.dense, lm_head.norm)"),
    ("bloom", "bloom", "Bloom (ALiBi)", {"n_layer": 2, "n_head": 4}, "(BloomModel) takes no position_ids"),
    ("llama4_text", "llama4_text", "Llama 4 text (attention temperature of the row index, chunked attention)",
     {"intermediate_size_mlp": 128, "num_local_experts": 2, "attention_chunk_size": WINDOW},
     "scale the queries by a temperature of each token's index in the row"),
    ("gpt_oss", "gpt_oss", "GPT-OSS (attention sinks)", {"sliding_window": WINDOW, "num_local_experts": 4},
     "passes s_aux"),
]
BY_ID = {a[0]: a for a in ARCHITECTURES}


def tiny(arch_id):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, model_type, _, overrides, _ = BY_ID[arch_id]
    config = AutoConfig.for_model(model_type)
    for key, value in {**SMALL, **overrides}.items():
        if hasattr(config, key) or key in overrides:
            setattr(config, key, value)
    if getattr(config, "layer_types", None) is not None and hasattr(config, "sliding_window"):
        config.layer_types = [("sliding_attention" if i % 2 == 0 else "full_attention")
                              if getattr(config, "sliding_window", None) else "full_attention"
                              for i in range(config.num_hidden_layers)]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()


def group(vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab_size, (10,), generator=g).tolist()
    return [prefix + torch.randint(3, vocab_size, (n - 10,), generator=g).tolist() for n in (15, 22, 30, 26)]


def _grads(model, logps):
    """Gradients of the log-probs, each token weighted on its own (not a plain sum)."""
    weights = torch.linspace(0.5, 1.5, sum(len(x) for x in logps)).split([len(x) for x in logps])
    return param_grads(model, logps, weights)


def _assert_same_grads(arch_id, grads, ref_grads):
    """Relative to each parameter's gradient, floored at 1e-3 of the largest (a key bias's gradient is ~0)."""
    assert grads.keys() == ref_grads.keys()
    floor = 1e-3 * max(g.norm() for g in ref_grads.values())
    for name, g in grads.items():
        err = ((g - ref_grads[name]).norm() / torch.maximum(ref_grads[name].norm(), floor)).item()
        assert err < 1e-4, f"{arch_id}: gradient of {name} differs (relative {err:.3g})"


@pytest.mark.parametrize("arch_id", list(BY_ID))
def test_packed_scoring_equals_the_models_own_forward_or_refuses(arch_id):
    from pact_fast.scoring import check_model, sequence_logprobs

    _, _, label, _, refusal = BY_ID[arch_id]
    model = tiny(arch_id)
    sequences = group(model.config.vocab_size)
    if refusal is not None:
        with pytest.raises(ValueError, match=re.escape(refusal)):
            sequence_logprobs(model, sequences)
        with pytest.raises(ValueError, match=re.escape(refusal)):
            check_model(model)
        return
    window = getattr(model.config, "sliding_window", None)
    if "window" in label:
        assert window == WINDOW < max(map(len, sequences)), "the window must be shorter than the sequences"
    ref = separate_logprobs(model, sequences)
    ref_grads = _grads(model, ref)
    packed = sequence_logprobs(model, sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(packed, ref))
    assert diff < 1e-4, f"{arch_id}: packed vs separate log-probs differ by {diff:.3g}"
    _assert_same_grads(arch_id, _grads(model, packed), ref_grads)
    assert check_model(model)["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("arch_id", ["gemma2-caps", "mistral", "granite", "deepseek_v3"])
def test_triton_kernels_score_windows_softcaps_and_logit_scales_exactly(arch_id):
    """The same check through the Triton tree attention and log-prob kernels (the interpreter, fp32); DeepSeek-V3's
    values are narrower than its keys."""
    from pact_fast.scoring import sequence_logprobs

    model = tiny(arch_id)
    sequences = group(model.config.vocab_size)
    ref = separate_logprobs(model, sequences)
    ref_grads = _grads(model, ref)
    packed = sequence_logprobs(model, sequences, backend="triton", logprob_backend="triton")
    diff = max((a - b).abs().max().item() for a, b in zip(packed, ref))
    assert diff < 1e-4, f"{arch_id}: triton packed vs separate log-probs differ by {diff:.3g}"
    _assert_same_grads(arch_id, _grads(model, packed), ref_grads)


@pytest.mark.parametrize("model_type,rope", [
    ("llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    ("phi3", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(8)],
              "long_factor": [2.0 + i for i in range(8)]}),
], ids=["dynamic", "longrope"])
def test_rotary_embeddings_that_depend_on_the_length_are_exact_below_it_and_refused_past_it(model_type, rope):
    """HF's dynamic and longrope rotary embeddings take their frequencies from the largest position id of the
    forward: packed, a short sequence would get its longest neighbour's (0.00046 off at this size). Exact while every
    sequence stays within the limit (dynamic: max_position_embeddings; longrope: original_max_position_embeddings);
    past it, one line naming the rope type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pact_fast.scoring import check_model, sequence_logprobs

    sequences = group(512)  # lengths 15, 22, 30, 26
    for limit in (30, 20):
        lengths = ({"max_position_embeddings": 256, "original_max_position_embeddings": limit}
                   if rope["rope_type"] == "longrope" else {"max_position_embeddings": limit})
        config = AutoConfig.for_model(model_type, **{**SMALL, **lengths, "sliding_window": None,
                                                     "rope_parameters": dict(rope)})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
        if limit == 30:
            ref = separate_logprobs(model, sequences)
            diff = max((a - b).abs().max().item() for a, b in zip(sequence_logprobs(model, sequences), ref))
            assert diff < 1e-4, f"{rope['rope_type']}: packed vs separate log-probs differ by {diff:.3g}"
            check_model(model)
        else:
            with pytest.raises(ValueError, match=f"rope_type '{rope['rope_type']}' changes its rotary frequencies "
                                                 "past 20 positions, and this packed group reaches 30"):
                sequence_logprobs(model, sequences)


def test_a_model_whose_code_breaks_on_the_packed_input_is_refused_in_one_line():
    """Falcon's ALiBi code fails inside the model on the packed input (an AttributeError; DeepSeek-V3.2's indexer
    a TypeError): before any step, check_model turns that into a one-line ModelError naming the model and the error,
    not a traceback or a bare "'NoneType' object is not subscriptable"."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pact_fast.models import ModelError
    from pact_fast.scoring import check_model

    config = AutoConfig.for_model("falcon", vocab_size=512, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                  alibi=True, new_decoder_architecture=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with pytest.raises(ModelError, match=f"{type(model).__name__}: packed scoring failed on this model "
                                         r"\(AttributeError: .*\); it cannot be scored packed") as info:
        check_model(model)
    assert "\n" not in str(info.value)


def test_a_window_only_in_the_mask_is_accepted_while_it_is_longer_than_every_sequence():
    """Phi-3.5-MoE's sliding window (131,072) lives in its mask only, as Qwen2-MoE's does: it never bites while every
    sequence of a group is shorter, so such a group scores exactly; a longer one is refused (``qwen2_moe-window``)."""
    from pact_fast.scoring import check_model, sequence_logprobs

    model = tiny("qwen2_moe-window")
    model.config.sliding_window = 64  # longer than the 30-token sequences, and than check_model's 72-token probe
    sequences = group(model.config.vocab_size)
    ref = separate_logprobs(model, sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(sequence_logprobs(model, sequences), ref))
    assert diff < 1e-4, f"packed vs separate log-probs differ by {diff:.3g}"
    with pytest.raises(ValueError, match="limited to 64 tokens .* on sequences longer than 64 tokens"):
        sequence_logprobs(model, [list(range(3, 80)), list(range(3, 40))])
    with pytest.raises(ValueError, match="limited to 64 tokens"):
        check_model(model)  # its probe crosses windows up to 256 tokens


@pytest.mark.parametrize("model_type,key", [("gpt2", "attn_pdrop"), ("gpt_bigcode", "attn_pdrop"),
                                            ("biogpt", "attention_probs_dropout_prob")])
def test_attention_dropout_by_any_name_is_refused_before_any_step(model_type, key):
    """GPT-2's and GPTBigCode's ``attn_pdrop`` and BioGPT's ``attention_probs_dropout_prob`` (0.1 by default, as
    their checkpoints ship) are attention dropout under other names: the trainer's policy, in training mode, passed
    them to tree attention, which refused them at the first step's scoring (after the evaluation before training
    and the first rollouts); ``check_attention_dropout`` read only ``attention_dropout`` and let them through."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pact_fast.model_setup import check_attention_dropout
    from pact_fast.models import ModelError
    from pact_fast.scoring import PackedScoringError, sequence_logprobs

    config = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4)
    assert getattr(config, key) == 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    with pytest.raises(PackedScoringError, match="attention dropout 0.1 is not supported"):
        sequence_logprobs(model, group(512))
    with pytest.raises(ModelError, match=f"its config has {key}=0.1, which tree attention does not implement; "
                                         f"set \"{key}\": 0.0 in its config.json"):
        check_attention_dropout(model)


def test_dropout_outside_attention_is_found_under_its_names_and_refused_where_passes_are_compared():
    """GPT-2 ships resid_pdrop and embd_pdrop of 0.1, OPT dropout 0.1: in training mode each scoring pass draws its
    own dropout, so the ratio of two passes (several update epochs), the KL to an eval-mode reference or the
    importance weights to the rollout engine were random where the method has them exact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pact_fast.model_setup import check_no_dropout
    from pact_fast.models import ModelError

    for model_type, keys in (("gpt2", ("embd_pdrop", "resid_pdrop")), ("opt", ("dropout",))):
        config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, n_embd=32, num_hidden_layers=1,
                                      n_layer=1, num_attention_heads=2, n_head=2, ffn_dim=64, word_embed_proj_dim=32)
        model = AutoModelForCausalLM.from_config(config)
        said = ", ".join(f"{k}=0.1" for k in keys)
        with pytest.raises(ModelError, match=f"dropout {said}: training-mode dropout .* \\(train.update_"
                                             "epochs=2\\); set " + ", ".join(f'"{k}": 0.0' for k in keys)):
            check_no_dropout(model, ["train.update_epochs=2"])
        for k in keys:
            setattr(config, k, 0.0)
        check_no_dropout(AutoModelForCausalLM.from_config(config), ["train.update_epochs=2"])  # none left: passes


def test_a_multimodal_model_directory_is_refused_in_one_line_before_any_step(tmp_path):
    """``AutoModelForCausalLM`` makes a Gemma3 4B+ checkpoint (``model_type`` gemma3) a
    Gemma3ForConditionalGeneration whose top-level config holds the language model's inside (``text_config``):
    the trainer's start-up check raised a bare "AttributeError: 'Gemma3Config' object has no attribute
    'vocab_size'" traceback (with scoring.check=false, the first step raised one), and the head's
    ``final_logit_softcapping`` lives only in the text config, out of sight of the log-prob ops."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pact_fast.config import load_config
    from pact_fast.envs import build_tokenizer
    from pact_fast.models import ModelError
    from pact_fast.trainer import build
    from test_trainer import tiny_for

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("gemma3")
    for key, value in {**SMALL, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                       "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None,
                       "layer_types": ["sliding_attention", "full_attention"]}.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run = load_config(None, tiny_for(model_path=True) + [f"model.path={tmp_path / 'model'}", "model.chat_template=model",
                                                         f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ModelError, match="a gemma3 model is multimodal or composite .* which pact_fast does not "
                                         "train; give a text-only causal LM directory") as info:
        build(run, log=lambda *a: None)
    assert "\n" not in str(info.value)


def test_a_saved_gemma2_loads_through_model_path_and_scores_exactly(tmp_path):
    """Gemma2 has no sdpa attention (its attention softcap): ``load_pretrained`` asked sdpa of every model, and a
    saved Gemma2 was refused as "the model cannot be read from it (ValueError: ... does not support ...
    scaled_dot_product_attention ...); a file there is damaged", although packed scoring supports it. It loads
    with transformers' own choice (eager), and its packed log-probs equal that model's own forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pact_fast.envs import build_tokenizer
    from pact_fast.models import load_pretrained
    from pact_fast.scoring import check_model, sequence_logprobs

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("gemma2", **{**SMALL, **BY_ID["gemma2-caps"][3], "vocab_size": len(tokenizer)})
    config.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    model, _ = load_pretrained(tmp_path / "gemma2")
    assert model.config._attn_implementation == "eager"
    sequences = group(len(tokenizer))
    ref = separate_logprobs(model, sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(sequence_logprobs(model, sequences), ref))
    assert diff < 1e-4, f"packed vs separate log-probs differ by {diff:.3g}"
    check_model(model)


def readme_table():
    """The README table of architectures, from ``ARCHITECTURES``."""
    lines = ["| architecture (`model_type`) | packed scoring |", "|---|---|"]
    for _, model_type, label, _, refusal in ARCHITECTURES:
        verdict = "exact (log-probs and gradients)" if refusal is None else f"refused: \"{refusal}\""
        lines.append(f"| {label} (`{model_type}`) | {verdict} |")
    return "\n".join(lines)


_TABLE = re.compile(r"(<!-- architectures -->\n)(.*?)\n?(<!-- /architectures -->)", re.S)


def test_readme_table_lists_the_tested_architectures():
    match = _TABLE.search((ROOT / "README.md").read_text())
    assert match, "README.md lacks the <!-- architectures --> table"
    assert match.group(2) == readme_table(), "README's table is stale: run python tests/test_architectures.py"


if __name__ == "__main__" and sys.argv[1:] == []:
    path = ROOT / "README.md"
    path.write_text(_TABLE.sub(lambda m: m.group(1) + readme_table() + "\n" + m.group(3), path.read_text()))
