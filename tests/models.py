"""Tiny randomly initialised Hugging Face causal LMs (nothing is downloaded)."""
import torch

FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_causal_lm(family, vocab_size=67, seed=0, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, attention_dropout=0.0)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    extra = {"head_dim": 8} if family == "qwen3" else {}
    config = config_cls(**common, **extra, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    return model.eval()
