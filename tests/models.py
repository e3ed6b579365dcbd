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
    config = config_cls(**{**common, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    return model.eval()


def separate_logprobs(model, sequences):
    """Reference for packed scoring: each sequence alone through the model's own forward, log_softmax in
    float64, gather: a list of ``logp [n_j - 1]``."""
    out = []
    for seq in sequences:
        ids = torch.tensor(seq)[None]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        out.append(torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1))
    return out


def param_grads(model, logps, weights):
    """Gradients of ``sum_j (logps[j] * weights[j]).sum()``: ``{name: grad}`` of the parameters that get one."""
    model.zero_grad(set_to_none=True)
    sum((lp * w).sum() for lp, w in zip(logps, weights)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
