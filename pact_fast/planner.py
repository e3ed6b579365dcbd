"""Memory planner: will a model train on a GPU of a given size, and with how large a micro-batch?

    pact-fast plan --model qwen3-1.7b --gpu-memory 24GB --lora --grad-checkpointing
    pact-fast plan --model qwen3-8b --gpu-memory 24GB --lora --lora-base-dtype bfloat16 --grad-checkpointing
    pact-fast plan --model ./my-model-dir --gpu-memory 80GiB --config run.yaml

``predict(shape, tokens, options)`` is the peak of one training step of ``tokens`` packed tokens (one
micro-batch: ``train.micro_batch_tokens``), as a sum of named terms, each a formula of the model's shape;
``max_micro_batch_tokens`` is the largest budget whose peak fits. Everything here is a prediction: the
formulas follow what the trainer allocates (``pact_fast.trainer``: fp32 weights, or with LoRA and
``model.lora.base_dtype=bfloat16`` a bf16 base beside fp32 adapters; bf16 autocast on CUDA;
``torch.optim.AdamW``, the packed forward through ``pact_fast.scoring``, the log-prob op).

Notation: P parameters (P_t trainable, P_a LoRA's adapters), h hidden size, n layers, q = heads * head_dim,
kv = kv_heads * head_dim, I MLP width, V vocabulary, T packed tokens, M lm_head rows scored (at most T; default
T), 4 bytes for fp32 and a = 2 (bf16 autocast) or 4 (float32) bytes per activation element. "bf16 base"
marks each formula's variant for ``lora_base_dtype="bfloat16"`` (``--lora-base-dtype``, LoRA only): the frozen
base (embeddings, decoder layers, lm_head) is held and run in bf16 with or without autocast (on the CPU there
is none, so its residual stream, norms' outputs, MLP and attention are bf16 there too); peft casts each
adapter's input to the adapters' fp32 and the sum back to bf16.

A training step peaks at the largest of these moments (each a sum of the terms below):

- ``lm_head``: the log-prob op runs at the end of the forward, every saved activation alive: weights, AdamW
  state, autocast weight copies, activations (or, with checkpointing, the checkpointed layer inputs), the final
  norm and scored rows, the op's buffers;
- ``layer recompute`` (checkpointing only): the same minus the op's buffers plus one recomputed layer's
  activations and the gradients (all of them, as when the first layer is recomputed; the gradient buffers of
  the layer's own backward are left out), and for a bf16 base ``adapter_output_sum``;
- ``adapter output`` (bf16 base without checkpointing): weights, AdamW state, autocast copies, every layer's
  activations and ``adapter_output_sum`` (the last layer's widest adapted module, in the forward);
- ``optimizer step``: weights, gradients, AdamW state and AdamW's temporaries.

The terms:

- ``weights`` = 4P (the trainer keeps fp32 weights; LoRA adds its adapters' r * (in + out) per module, P_a);
  bf16 base: 2P + 4P_a.
- ``reference_weights`` (``loss.beta_kl`` > 0, full fine-tuning only) = 4P: the trainer builds a frozen copy of the
  starting model as the KL reference; with LoRA the reference is the base with the adapters off, no copy.
- P_t: LoRA, the adapters' parameters; full fine-tuning, P, less the lm_head's V h with ``model.freeze_lm_head``
  (with tied embeddings the embedding is the same tensor and freezes with it: ``model_setup.freeze_lm_head``).
- ``gradients`` = 4P_t (fp32, one per trainable parameter; the adapters' also on a bf16 base).
- ``adamw_state`` = 8P_t (``exp_avg`` and ``exp_avg_sq``, fp32; also on a bf16 base).
- ``adamw_temporaries``: on CUDA the foreach implementation's sqrt(exp_avg_sq) list, 4P_t; on the CPU the
  single-tensor loop's ``exp_avg_sq.sqrt() / bias_correction2_sqrt``, the root and its quotient alive together,
  8 * (largest trainable tensor) (measured: SmolLM2-135M's full fine-tune at 64 tokens peaks in the optimizer
  step 108 MiB, its tied embedding's fp32 bytes, above the 4 * largest this term once said).
- ``autocast_weight_copies`` (bf16 only) = 2 * (decoder linear weights): autocast casts each weight to bf16
  for its matmul and the backward keeps the copy (frozen weights too, for the input gradient; trainable ones
  stay in autocast's cache, so also with checkpointing); while a checkpointed layer is recomputed, one layer's.
  bf16 base: 2P_a at every moment (a bf16 weight needs no cast; the fp32 adapters' casts stay cached); none
  without autocast (the CPU).
- ``activations`` = n * per_layer(T) without checkpointing; with it ``checkpointed_inputs`` = 4nTh (each
  layer's fp32 input; bf16 base: 2nTh) and ``recomputed_layer`` = per_layer(T). per_layer(T) is what autograd
  keeps of one HF Llama/Qwen decoder layer, T times the bytes per token:
  - RMSNorms, N of them (``layer_norms``: Llama 2, Gemma-2/3 4; fp32 in both modes): each keeps x * rsqrt for
    the norm weight's gradient (h; none with LoRA's frozen weights), a fp32 rsqrt (4 bytes) and its input (h;
    Llama's the two residual sums): N * (4 * 2h + 4), LoRA N * (4h + 4); bf16 base: the same N * (4h + 4), the
    fp32 copy the norm makes of its bf16 input (HF's RMSNorm upcasts) in place of the input;
  - the projections' inputs: float32, the norms' outputs (4 * 2h); bf16, each projection's own bf16 cast of
    its input (2 * 5h: q, k, v, gate, up); bf16 base: none (a frozen bf16 projection keeps nothing; the
    adapters keep their own copies, below);
  - MLP: gate, up, silu(gate) and their product, a * 4I; bf16 base: gate, up and silu(gate) in bf16, 2 * 3I (the
    product is kept only as down_proj's adapter input);
  - attention, by backend: ``flash`` (triton, flex, flash-attn on CUDA) q, k, v after RoPE, the output and
    the o_proj input, a * (3q + 2kv), and a fp32 log-sum-exp per head (bf16 base: 2 * (2q + 2kv), the o_proj
    input being its adapter's); ``sdpa`` (dense mask, PyTorch's flash kernel) q, k and v repeated to q's heads
    and the output, a * 4q (bf16 base: 2 * 4q), the log-sum-exp, and the mask turned into an additive float mask,
    a * T per token (bf16 base: 2 * T); ``varlen`` (the CPU's default: SDPA's math path per trie segment) the
    scaled q and the output a * 2q per token (bf16 base: the scaled q, 4q: the math path computes bf16 inputs
    in fp32), plus 4 * (2q * keys + heads * pairs) per layer for the gathered, repeated keys and values and the
    softmax weights (``VarlenSizes`` of the packed trie; fp32 on a bf16 base too);
  - Qwen3's and Gemma-3's q/k RMSNorms: their fp32 input and x * rsqrt (input only with LoRA), 4 * 2(q + kv),
    and rsqrts; bf16 base: the fp32 copy of their input, 4(q + kv), and rsqrts;
  - LoRA per adapted module: the r-wide middle a * r; in bf16 lora_A's own cast of its input 2 * in; with
    dropout the dropped input and its mask (a + 1) * in. bf16 base: ad * (in + r), ad = 4 without autocast
    (lora_A keeps peft's fp32 cast of its bf16 input, one per module, and the fp32 middle) or 2 under autocast
    (autocast's bf16 cast of that fp32 input), plus the 1-byte dropout mask, in, with dropout (lora_A then keeps
    the dropped input in place of the cast).
- ``adapter_output_sum`` (bf16 base only): peft adds the scaled adapter output to the base's bf16 output and casts
  the sum back to bf16; at the widest adapted module (out features) without autocast the scaled fp32 delta, the
  base output's fp32 upcast and their fp32 sum, 3 * 4 * T * out, transient (under autocast 2 * 2 * T * out). It is
  added to the whole recomputed layer, although the modules after the widest one are not yet recomputed then: an
  upper bound (measured: 6-7% over the step's peak on small models).
- ``final_norm_and_rows`` = 4 * (3T + M) * h (LoRA: 2T + M): the final RMSNorm's saved tensors and the
  scored rows; bf16 base: (6T + 2M) * h, the norm's fp32 copy of its input, its bf16 output, the bf16 rows.
- ``logprob_op``: dX 4Mh (bf16 base: 2Mh, dX in the rows' dtype; bf16 autocast: the rows and the lm_head cast to
  bf16, ``scoring.head_inputs``, so 6Mh, dX in bf16 and its fp32 cast, 2Vh for the weight's bf16 copy and, trained,
  6Vh in place of 4Vh, dW in bf16 and its fp32 cast, with the workspace of bf16 inputs) and, for a trained lm_head
  only, dW 4Vh (the
  fused head forms both in its forward and hands them to the backward in place; a frozen head, i.e. LoRA or
  ``model.freeze_lm_head``, gets no dW GEMM and no dW buffer from either op), plus the workspace of [C, V] fp32
  chunks on the CPU (torch backend; fp32 on a bf16 base too), C the op's own chunk rows: the fused head's
  ``_chunk_rows`` (min(M, max(256, 64 MiB / 4V)); with ``train.fused_head_memory_lean`` its two live buffers
  within 5% of dW's bytes, 2Vh for a bf16 head), ``linear_logprobs``' ``_torch_chunk_rows`` (max(512, 64 MiB /
  4V)). The fused head holds two such buffers, three when M > C (the previous chunk's gradient is still
  referenced when the next chunk's logits and probabilities are allocated; a bf16 base's fp32 copies of a chunk's
  rows and of one vocabulary slab of the lm_head stay below that); ``linear_logprobs`` peaks either in its forward
  (two, three when M > C) with no dX or dW yet, or in its backward (dX, dW and one buffer, two when M > C); a
  bf16 base adds to either the fp32 copies it multiplies in, 4(C + S)h: a chunk's rows (or dX's accumulator) and
  one vocabulary slab of the lm_head, S = ``linear_logprobs.upcast_slab_cols`` (logits never rounded to bf16,
  no [V, H] fp32 copy of the head). On CUDA (triton backend)
  ``kernels.fused_pact_head_launch.extra_memory_bytes`` (its default ``plan``: workspace
  within 25% of dW's bytes, the dW-sized share also for a frozen head; ``memory_lean``: ``lean_plan``, within 5%) or
  ``kernels.linear_logprobs_launch.extra_memory_bytes`` (``train.fused_head`` false), in the rows' dtype (fp32,
  bf16 on a bf16 base).
- rollout phase (``predict_rollout``; only when a rollout is planned, it runs before the step's backward
  with no gradients alive): weights + AdamW state + ``rollout_kv_cache`` 4 * 2 * n * kv * G * (context + new
  tokens) + ``rollout_prefill_activations`` 4 * G * context * (PREFILL_MLP * I + PREFILL_HIDDEN * h) +
  ``rollout_prefill_logits`` 4 * G * V (the engine runs the fp32 model without autocast and asks the prefill
  for the last position's logits only, ``logits_to_keep=1``). G is every episode the engine samples at once:
  ``train.prompts_per_step`` x ``rollout.group_size`` (on one GPU). bf16 base: the engine runs the bf16 model,
  2 bytes in place of 4 in the three rollout terms (the adapters' transients in the prefill are left out, as
  they are for a float32 base).

Measured on the CPU (float32 without autocast; ``bench/bench_memory.py``, ``tests/test_planner.py``): full
fine-tuning, LoRA (the trainer's ``model_setup.apply_lora``) and checkpointing, a frozen lm_head (tied and
untied), the fused head (also memory_lean) and linear_logprobs, varlen and sdpa; LoRA on a bf16 base (its CPU
variant: no autocast), with and without checkpointing, fused head and linear_logprobs, varlen and sdpa, and its
prefill. The bf16 autocast and CUDA terms (autocast copies, a bf16 base's autocast variants, the flash backend,
the triton workspaces, foreach AdamW) are not measured here.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

# model_setup.default_lora_targets of a Llama/Qwen model: every nn.Linear of a decoder layer
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """A bad planner input (size, model, option); the message is one line."""


class ModelShape(NamedTuple):
    """What the planner needs of a decoder-only model (its Hugging Face config values)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v biases (Qwen2, Qwen2.5)
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3, Gemma-3)
    layer_norms: int = 2  # hidden-wide norms per decoder layer (Gemma-2/3: 4, before and after attention and MLP)


def _shape(name, h, n, heads, kv, d, inter, vocab, tied, bias=False, qk_norm=False):
    return ModelShape(name, h, n, heads, kv, d, inter, vocab, tied, bias, qk_norm)


# Public config.json values of each model (hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, head_dim, intermediate_size, vocab_size, tie_word_embeddings); nothing is downloaded.
KNOWN_SHAPES = {s.name: s for s in (
    _shape("smollm2-135m", 576, 30, 9, 3, 64, 1536, 49152, True),
    _shape("smollm2-360m", 960, 32, 15, 5, 64, 2560, 49152, True),
    _shape("smollm2-1.7b", 2048, 24, 32, 32, 64, 8192, 49152, True),
    _shape("qwen2.5-0.5b", 896, 24, 14, 2, 64, 4864, 151936, True, bias=True),
    _shape("qwen2.5-1.5b", 1536, 28, 12, 2, 128, 8960, 151936, True, bias=True),
    _shape("qwen2.5-3b", 2048, 36, 16, 2, 128, 11008, 151936, True, bias=True),
    _shape("qwen2.5-7b", 3584, 28, 28, 4, 128, 18944, 152064, False, bias=True),
    _shape("qwen3-0.6b", 1024, 28, 16, 8, 128, 3072, 151936, True, qk_norm=True),
    _shape("qwen3-1.7b", 2048, 28, 16, 8, 128, 6144, 151936, True, qk_norm=True),
    _shape("qwen3-4b", 2560, 36, 32, 8, 128, 9728, 151936, True, qk_norm=True),
    _shape("qwen3-8b", 4096, 36, 32, 8, 128, 12288, 151936, False, qk_norm=True),
)}

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text):
    """Bytes of a size such as ``24GB`` (10^9), ``24GiB`` (2^30), ``24000MB``, ``512MiB``; a bare number is
    GB. Raises ``PlanError`` on anything else or on a size that is not positive."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise PlanError(f"--gpu-memory {text!r} is not a size; write e.g. 24GB, 24GiB or 24000MB")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "GB").lower()])
    if value <= 0:
        raise PlanError(f"--gpu-memory {text!r} must be at least one byte")
    return value


# config.json keys that mark a mixture-of-experts model (Mixtral, Qwen2/3-MoE, DeepSeek, OLMoE)
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def _with_defaults(config, name):
    """The text model's settings of config.json ``config`` (a multimodal model's ``text_config``) with every key the
    file leaves out at the default of its transformers config class, as the trainer builds the model (Gemma's and
    Cohere2's config.json omit ``tie_word_embeddings``, whose default there is true; Gemma-3's ``text_config`` holds
    a few keys only). Returns ``(settings, the transformers config)``; a config.json without a ``model_type`` is
    read as it stands, ``(settings, None)``."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        text = config.get("text_config") or config
        if not isinstance(text, dict):
            raise PlanError(f"{name}: config.json's text_config must be a mapping, got {type(text).__name__}")
        return dict(text), None
    from transformers import CONFIG_MAPPING, AutoConfig

    if model_type not in CONFIG_MAPPING:
        raise PlanError(f"{name}: model_type {model_type!r} is not one this transformers knows, so the trainer cannot "
                        "load it either")
    try:
        full = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
        return full.get_text_config().to_dict(), full
    except Exception as exc:  # transformers' validation of a bad value (its strict dataclass errors, ValueError, ...)
        reason = " ".join(str(exc).split())[:200]
        raise PlanError(f"{name}: transformers cannot read this config.json (model_type {model_type!r}): "
                        f"{reason}") from None


def shape_from_config(config, name="model"):
    """A ``ModelShape`` from a Hugging Face ``config.json`` mapping (a Llama/Qwen2/Qwen3/Mistral-like decoder).
    A mixture-of-experts config is refused: the planner counts one dense MLP per layer; so is latent attention, and
    (with a ``model_type``) a config whose model, counted on the meta device (``exact_param_count``), is more than
    ``PARAM_TOLERANCE`` off ``param_counts``: layers the planner's formulas do not describe."""
    if not isinstance(config, dict):
        raise PlanError(f"{name}: config.json must be a mapping of a model's settings, got {type(config).__name__}")
    config, full = _with_defaults(config, name)
    experts = next((config[k] for k in MOE_KEYS if config.get(k)), None)
    if experts:
        raise PlanError(f"{name}: a mixture-of-experts model ({', '.join(k for k in MOE_KEYS if config.get(k))} = "
                        f"{experts}); the planner counts one dense MLP per layer and would under-count its weights")
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if config.get(k) is None]
    if missing:
        raise PlanError(f"{name}: config.json lacks {', '.join(missing)}; the planner needs a decoder-only "
                        "model's config (hidden_size, num_hidden_layers, num_attention_heads, ...)")
    bad = [f"{k} = {config[k]!r}" for k in need + ("num_key_value_heads", "head_dim") if config.get(k) is not None
           and (not isinstance(config[k], int) or isinstance(config[k], bool) or config[k] < 1)]
    if bad:
        raise PlanError(f"{name}: config.json has {', '.join(bad)}; each must be a positive integer")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if not config.get("head_dim") and config["hidden_size"] % heads:
        raise PlanError(f"{name}: config.json has hidden_size = {config['hidden_size']}, not a multiple of "
                        f"num_attention_heads = {heads}, and no head_dim")
    if heads % kv_heads:
        raise PlanError(f"{name}: config.json has num_attention_heads = {heads}, not a multiple of "
                        f"num_key_value_heads = {kv_heads}")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    model_type = str(config.get("model_type", ""))
    if config.get("kv_lora_rank"):
        raise PlanError(f"{name}: multi-head latent attention (kv_lora_rank = {config['kv_lora_rank']}, model_type "
                        f"{model_type!r}); the planner counts q/k/v projections of head_dim per head")
    shape = ModelShape(name, config["hidden_size"], config["num_hidden_layers"], heads, kv_heads, head_dim,
                       config["intermediate_size"],
                       config["vocab_size"], bool(config.get("tie_word_embeddings", False)),
                       bool(config.get("attention_bias", model_type == "qwen2")), model_type.startswith("qwen3"))
    if full is not None:
        model = _meta_model(full, name)
        exact = sum(p.numel() for p in model.parameters())
        shape = shape._replace(**_layer_norms(model, shape.hidden_size))
        planned = param_counts(shape)["total"]
        if abs(planned - exact) > PARAM_TOLERANCE * exact:
            raise PlanError(f"{name}: the {full.model_type} model transformers builds holds {exact / 1e9:.4g}B "
                            "parameters where the planner's Llama-style decoder of these sizes holds "
                            f"{planned / 1e9:.4g}B "
                            f"({(planned - exact) / exact:+.1%}"
                            f"{'; towers beside its text model' if full.get_text_config() is not full else ''}): the "
                            "planner does not model this architecture")
    return shape


# How far param_counts may be from the model transformers builds (Gemma's extra norms: 0.003%) before a config is
# refused as an architecture the planner's formulas do not describe
PARAM_TOLERANCE = 0.01


def exact_param_count(config, name="model"):
    """Parameters of the causal LM transformers builds from ``config`` (a ``PretrainedConfig``), on the meta device
    (no memory, no weights): every tensor once, tied ones too."""
    return sum(p.numel() for p in _meta_model(config, name).parameters())


def _layer_norms(model, hidden):
    """``{"layer_norms": n, "qk_norm": bool}`` of ``model``'s first decoder layer: its norms of hidden width (the
    weights named ``*norm*``; Llama 2, Gemma-2/3 4) and whether it norms q and k (``q_norm``: Qwen3, Gemma-3)."""
    from .distributed import decoder_layers

    try:
        layer = decoder_layers(model)[0]
    except (ValueError, IndexError, TypeError):
        return {}
    names = [n for n, p in layer.named_parameters() if n.endswith("norm.weight") and p.numel() == hidden]
    return {"layer_norms": len([n for n in names if "q_norm" not in n and "k_norm" not in n]) or 2,
            "qk_norm": any("q_norm" in n for n, _ in layer.named_parameters())}


def _meta_model(config, name):
    """The causal LM transformers builds from ``config``, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # no causal LM class for this model_type, or one its config cannot build
        reason = " ".join(str(exc).split())[:200]
        raise PlanError(f"{name}: transformers builds no causal LM from this config.json: {reason}") from None
    return model


def shape_from_dir(path):
    """The ``ModelShape`` of a local Hugging Face model directory (its config.json)."""
    path = Path(path)
    try:
        with open(path / "config.json") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise PlanError(f"{path}: no config.json (not a Hugging Face model directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}/config.json is not valid JSON ({exc})") from None
    except OSError as exc:  # a directory of that name, no permission to read it
        raise PlanError(f"{path}/config.json cannot be read ({exc.strerror or exc})") from None
    return shape_from_config(config, path.name)


def resolve_model(name_or_dir):
    """A known name (case-insensitive) or a local directory -> ``ModelShape``; else a ``PlanError`` that lists
    the known names."""
    key = str(name_or_dir).lower()
    if Path(name_or_dir).is_dir():  # a directory of that name is the user's model, even where a known name matches
        return shape_from_dir(name_or_dir)
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key]
    raise PlanError(f"unknown model {name_or_dir!r} (not a known name nor a directory); known: "
                    f"{', '.join(KNOWN_SHAPES)}")


def module_dims(shape):
    """``{module name: (in_features, out_features)}`` of one decoder layer's linear layers."""
    h, q, kv, inter = shape.hidden_size, shape.num_heads * shape.head_dim, \
        shape.num_kv_heads * shape.head_dim, shape.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def param_counts(shape):
    """Parameters by part: ``embedding`` (V h), ``layers`` (n * (linear weights + q/k/v biases + N norms h
    (+ q/k norms 2 head_dim))), ``layer_linear`` (the linear weights alone), ``final_norm`` (h),
    ``lm_head`` (V h, 0 when tied), ``largest`` (the largest single tensor) and ``total``."""
    dims = module_dims(shape)
    linear = sum(i * o for i, o in dims.values())
    per_layer = linear + shape.layer_norms * shape.hidden_size
    if shape.attention_bias:
        per_layer += sum(dims[m][1] for m in ("q_proj", "k_proj", "v_proj"))
    if shape.qk_norm:
        per_layer += 2 * shape.head_dim
    embed = shape.vocab_size * shape.hidden_size
    counts = {"embedding": embed, "layers": shape.num_layers * per_layer,
              "layer_linear": shape.num_layers * linear, "final_norm": shape.hidden_size,
              "lm_head": 0 if shape.tie_word_embeddings else embed}
    counts["total"] = counts["embedding"] + counts["layers"] + counts["final_norm"] + counts["lm_head"]
    counts["largest"] = max(embed, max(i * o for i, o in dims.values()))
    return counts


def lora_params(shape, r, targets):
    """Adapter parameters: n * sum over targeted modules of r * (in + out)."""
    dims = module_dims(shape)
    return shape.num_layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


@dataclass
class PlanOptions:
    """How the run trains; the defaults are the trainer's on CUDA."""

    dtype: str = "bf16"  # bf16: fp32 weights under bf16 autocast (train.bf16 on CUDA); float32: no autocast
    device: str = "cuda"  # cuda or cpu (which kernels and AdamW implementation run)
    lora: bool = False
    lora_r: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple = DEFAULT_LORA_TARGETS
    grad_checkpointing: bool = False
    fused_head: bool = True  # train.fused_head
    attn_backend: str = "flash"  # flash: triton / flex / flash-attn (O(T) saved state); sdpa: dense [T, T] mask
    rollout_group_size: int = 0  # G episodes sampled together (prompts per step x group size); 0 = no rollout
    rollout_context: int = 0  # tokens of the longest rollout context (prompt + earlier turns)
    rollout_new_tokens: int = 48  # rollout.max_new_tokens (its default)
    freeze_lm_head: bool = False  # model.freeze_lm_head (tied embeddings freeze with it); LoRA freezes it anyway
    memory_lean: bool = False  # train.fused_head_memory_lean
    reference_model: bool = False  # loss.beta_kl > 0: a frozen copy of the weights (full fine-tuning only)
    lora_base_dtype: str = "float32"  # model.lora.base_dtype; bfloat16: the frozen base in bf16 (LoRA only)

    @property
    def bf16_base(self):
        """Whether the frozen base (embeddings, decoder layers, lm_head) is held and run in bf16."""
        return self.lora_base_dtype == "bfloat16"

    @property
    def head_trainable(self):
        """Whether the lm_head weight trains (gets dW and optimizer state): not with LoRA nor freeze_lm_head."""
        return not (self.lora or self.freeze_lm_head)

    def __post_init__(self):
        if self.dtype not in ("bf16", "float32"):
            raise PlanError(f"--dtype {self.dtype!r}: choose bf16 (fp32 weights, bf16 autocast: the trainer on "
                            "CUDA) or float32")
        if self.device not in ("cuda", "cpu"):
            raise PlanError(f"device {self.device!r}: choose cuda or cpu")
        if self.dtype == "bf16" and self.device == "cpu":
            raise PlanError("--dtype bf16 on the CPU: the trainer autocasts to bf16 on CUDA only; use float32")
        allowed = ("sdpa", "varlen") if self.device == "cpu" else ("flash", "sdpa")
        if self.attn_backend not in allowed:
            raise PlanError(f"attention backend {self.attn_backend!r} on {self.device}: choose {' or '.join(allowed)}"
                            " (flash = triton, flex or flash-attn, which run on CUDA; varlen's memory needs the "
                            "packed trie, so only the library call predict(varlen=...) plans it)")
        if self.lora:
            if self.lora_r < 1:
                raise PlanError(f"--lora-r {self.lora_r} must be >= 1")
            unknown = [t for t in self.lora_targets if t not in DEFAULT_LORA_TARGETS]
            if unknown or not self.lora_targets:
                raise PlanError(f"LoRA target modules {', '.join(unknown) or '(none)'}: choose from "
                                f"{', '.join(DEFAULT_LORA_TARGETS)}")
            if len(set(self.lora_targets)) < len(self.lora_targets):
                raise PlanError(f"LoRA target modules {', '.join(self.lora_targets)} name a module twice")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise PlanError(f"--lora-dropout {self.lora_dropout} must lie in [0, 1)")
        if self.lora_base_dtype not in ("float32", "bfloat16"):
            raise PlanError(f"--lora-base-dtype {self.lora_base_dtype!r}: choose float32 or bfloat16")
        if self.bf16_base and not self.lora:
            raise PlanError("--lora-base-dtype bfloat16 without LoRA: a full fine-tune's AdamW updates float32 "
                            "weights (add --lora, or model.lora.enabled in --config)")
        if self.memory_lean and not self.fused_head:
            raise PlanError("--memory-lean needs the fused head (train.fused_head_memory_lean is the fused head's)")
        for name in ("rollout_group_size", "rollout_context", "rollout_new_tokens"):
            if getattr(self, name) < 0:
                raise PlanError(f"{name.replace('_', '-')} must be >= 0")


class Prediction(NamedTuple):
    """A predicted peak: ``total`` bytes, ``terms`` (name -> bytes of the moment that peaks) and ``moment``
    ("lm_head", "layer recompute", "optimizer step" or "rollout")."""

    total: int
    terms: dict
    moment: str


def layer_activation_bytes(shape, tokens, options, varlen=None):
    """Bytes one decoder layer keeps for its backward over ``tokens`` packed tokens (see the module doc);
    ``varlen``: the packed trie's ``VarlenSizes`` (the varlen backend only)."""
    a = 2 if options.dtype == "bf16" else 4
    per_token = _bf16_base_bytes_per_token(shape, options) if options.bf16_base else \
        _fp32_base_bytes_per_token(shape, options)
    total = tokens * per_token
    if options.attn_backend == "sdpa":
        # the [T, T] mask, made in the model's dtype (a bf16 base: bf16), turned into an additive float mask and kept
        total += (2 if options.bf16_base else a) * tokens * tokens
    if options.attn_backend == "varlen":
        if varlen is None:
            raise PlanError("the varlen attention backend's memory depends on the packed trie: pass varlen="
                            "planner.varlen_sizes(subtree_end) of the micro-batch, or plan train.attn_backend=sdpa")
        # per segment, SDPA's math path (3-D inputs): the scaled keys and the values repeated to q's heads, and
        # the softmax weights [heads, length, keys]; no log-sum-exp. fp32 also for a bf16 base: the math path
        # computes bf16 inputs in fp32 and keeps those
        total += 4 * 2 * shape.num_heads * shape.head_dim * varlen.keys + 4 * shape.num_heads * varlen.pairs
    return total


def _fp32_base_bytes_per_token(shape, options):
    """Bytes per packed token one decoder layer of a model with float32 weights keeps (``a`` per activation
    element: 2 under bf16 autocast, 4 without), the varlen keys and the sdpa mask left to
    ``layer_activation_bytes``."""
    h, inter = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    a = 2 if options.dtype == "bf16" else 4
    lora = options.lora
    # each RMSNorm (Llama 2, Gemma 4), fp32 in both modes: x * rsqrt (kept for the weight's gradient: not with
    # LoRA's frozen weights), the rsqrt and its input (Llama: the layer's two residual sums)
    per_token = shape.layer_norms * (4 * (0 if lora else h) + 4 + 4 * h)
    # what the projections keep: float32, the norms' outputs (2h); bf16, a bf16 cast of the input per call
    per_token += 4 * 2 * h if options.dtype == "float32" else 2 * 5 * h
    per_token += a * 4 * inter  # gate, up, silu(gate), silu(gate) * up
    per_token += {"flash": a * (3 * q + 2 * kv) + 4 * shape.num_heads,  # q, k, v after RoPE, out, o_proj input, lse
                  "sdpa": a * 4 * q + 4 * shape.num_heads,  # q, k and v repeated to q's heads, out, lse
                  "varlen": a * 2 * q}[options.attn_backend]  # scaled q, out (keys and weights: below)
    if shape.qk_norm:  # Qwen3's per-head RMSNorms of q and k, fp32
        per_token += 4 * (1 if lora else 2) * (q + kv) + 4 * (shape.num_heads + shape.num_kv_heads)
    if lora:
        dims = module_dims(shape)
        for t in options.lora_targets:
            per_token += a * options.lora_r  # the adapter's r-wide middle
            per_token += 2 * dims[t][0] if options.dtype == "bf16" else 0  # lora_A's own bf16 cast of its input
            per_token += (a + 1) * dims[t][0] if options.lora_dropout > 0 else 0  # dropped input and its mask
    return per_token


def _bf16_base_bytes_per_token(shape, options):
    """Bytes per packed token one decoder layer of a bf16 base (LoRA, ``model.lora.base_dtype=bfloat16``) keeps:
    the base runs in bf16 (autocast or not); its frozen projections keep nothing (no weight gradient); each
    adapter keeps its own copy of its input, which peft casts to the adapters' float32 (under autocast lora_A keeps
    autocast's bf16 cast of that instead). The varlen keys and the sdpa mask: ``layer_activation_bytes``."""
    h, inter = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    ad = 2 if options.dtype == "bf16" else 4  # an adapter activation: autocast's bf16, else the adapters' float32
    # each RMSNorm upcasts its bf16 input: it keeps that fp32 copy and the fp32 rsqrt (bf16 output, not kept)
    per_token = shape.layer_norms * (4 * h + 4)
    per_token += 2 * 3 * inter  # gate, up, silu(gate) in bf16; their product is kept only as down_proj's adapter input
    per_token += {"flash": 2 * (2 * q + 2 * kv) + 4 * shape.num_heads,  # q, k, v after RoPE, out (bf16), lse
                  "sdpa": 2 * 4 * q + 4 * shape.num_heads,  # q, k and v repeated to q's heads, out (bf16), lse
                  "varlen": 4 * q}[options.attn_backend]  # the math path's fp32 scaled q (keys and weights: below)
    if shape.qk_norm:  # Qwen3's per-head RMSNorms of q and k: their fp32 copies of the input, rsqrts
        per_token += 4 * (q + kv) + 4 * (shape.num_heads + shape.num_kv_heads)
    dims = module_dims(shape)
    for t in options.lora_targets:
        fan_in = dims[t][0]
        # lora_A's input (with dropout: the dropped input, plus its 1-byte mask) and the r-wide middle
        per_token += ad * (fan_in + options.lora_r) + (fan_in if options.lora_dropout > 0 else 0)
    return per_token


class VarlenSizes(NamedTuple):
    """What the varlen backend's memory depends on: ``keys`` = sum over the trie's segments of (ancestor
    tokens + own tokens), ``pairs`` = sum over segments of own tokens * (ancestor tokens + own tokens)."""

    keys: int
    pairs: int


def varlen_sizes(subtree_end):
    """``VarlenSizes`` of a packed trie, from ``subtree_end [L]`` (``PackedTree.subtree_end``)."""
    from .ops.tree_attention import segments

    segs = [(e - s, len(anc) + e - s) for s, e, anc in segments(subtree_end)]
    return VarlenSizes(sum(k for _, k in segs), sum(n * k for n, k in segs))


def logprob_op_bytes(shape, rows, options):
    """Bytes of the log-prob op at its peak, every activation alive: dX, dW (a trained lm_head only) and the
    workspace (see the module doc). The hidden rows and the lm_head weight are float32, or bf16 for a bf16 base or
    under bf16 autocast (cast on the way in); the workspace is float32 on the CPU either way."""
    import torch

    h, vocab = shape.hidden_size, shape.vocab_size
    e = 2 if options.bf16_base else 4  # bytes of a hidden (and dX) element and of an lm_head weight element
    dtype = torch.bfloat16 if options.bf16_base else torch.float32
    grads = e * rows * h + (4 * vocab * h if options.head_trainable else 0)
    if options.dtype == "bf16" and not options.bf16_base:
        # under autocast the rows and the lm_head go in cast to bf16 (scoring.head_inputs): the weight's bf16 copy
        # (2Vh); dX and dW come out in bf16 and are cast to the fp32 parameters' (2 + 4 bytes each)
        dtype = torch.bfloat16
        grads = 6 * rows * h + (6 if options.head_trainable else 2) * vocab * h
    if options.device == "cpu":
        if options.fused_head:
            from .ops.fused_pact_head import _chunk_rows

            chunk = _chunk_rows(rows, vocab, h, torch.float32, e, options.memory_lean)
            # a chunk's logits and probabilities; with more than one chunk the previous chunk's gradient (built in
            # place of its probabilities) is still referenced when the next chunk's two are allocated: three (a bf16
            # base's fp32 copies of the rows and of one vocabulary slab of the weight, made while a chunk's logits
            # are computed, stay below that)
            return grads + (3 if rows > chunk else 2) * 4 * chunk * vocab
        from .ops.linear_logprobs import _torch_chunk_rows, upcast_slab_cols

        chunk = min(rows, _torch_chunk_rows(vocab))
        more = rows > chunk
        # A bf16 base's lm_head is multiplied in fp32 over vocabulary slabs beside a chunk's logits: the chunk's rows
        # in fp32 (in backward dX's fp32 accumulator), 4Ch, and one slab of the weight in fp32, 4Sh.
        # forward: logits and exp; with more chunks the previous chunk's two are still referenced while the next
        # chunk's logits are made. backward: d logits built in place of the logits (and the previous chunk's),
        # after dX and dW are allocated
        upcast = 4 * (chunk + upcast_slab_cols(vocab, h, chunk)) * h if options.bf16_base else 0
        cv = 4 * chunk * vocab
        forward = 3 * cv + upcast if more else max(2 * cv, cv + upcast)
        return max(forward, grads + (2 if more else 1) * cv + upcast)
    if options.fused_head:
        from .kernels import fused_pact_head_launch as launch

        return grads + launch.extra_memory_bytes(rows, vocab, h, dtype, memory_lean=options.memory_lean,
                                                 weight_grad=options.head_trainable)
    from .kernels import linear_logprobs_launch as launch

    return grads + launch.extra_memory_bytes(rows, vocab, h, dtype)


def trained_params(shape, options):
    """``(adapter parameters, trainable parameters, largest trainable tensor)``: LoRA trains its adapters only;
    full fine-tuning everything but, with ``freeze_lm_head``, the lm_head (the embedding with it when tied)."""
    counts = param_counts(shape)
    if options.lora:
        adapters = lora_params(shape, options.lora_r, options.lora_targets)
        return adapters, adapters, max(options.lora_r * max(max(d) for d in module_dims(shape).values()), 1)
    if options.head_trainable:
        return 0, counts["total"], counts["largest"]
    frozen = counts["embedding"] if shape.tie_word_embeddings else counts["lm_head"]
    embed = 0 if shape.tie_word_embeddings else counts["embedding"]
    return 0, counts["total"] - frozen, max(embed, max(i * o for i, o in module_dims(shape).values()))


def adapter_output_sum_bytes(shape, tokens, options):
    """A bf16 base's transient at its widest adapted module (``out`` features), over ``tokens`` packed tokens: peft
    adds the scaled adapter output to the base's bf16 output and casts the sum back to bf16. Without autocast the
    scaled delta, the base output's fp32 upcast and their fp32 sum, 3 * 4 * out bytes per token; under autocast the
    bf16 delta and sum, 2 * 2 * out. 0 for a float32 base (whose adapter sums, like the other transients, the
    planner leaves out)."""
    if not options.bf16_base:
        return 0
    widest = max(module_dims(shape)[t][1] for t in options.lora_targets)
    return tokens * (2 * 2 if options.dtype == "bf16" else 3 * 4) * widest


def weight_bytes(shape, options):
    """Bytes of the model's weights: 4 per parameter, 2 per base parameter of a bf16 base (its adapters: 4)."""
    adapters, _, _ = trained_params(shape, options)
    return (2 if options.bf16_base else 4) * param_counts(shape)["total"] + 4 * adapters


def reference_bytes(shape, options):
    """The KL reference's fp32 weights: a second model for full fine-tuning with ``reference_model``; 0 with LoRA
    (the base with the adapters off) or without a KL term."""
    return 4 * param_counts(shape)["total"] if options.reference_model and not options.lora else 0


def predict(shape, tokens, options=None, *, scored_rows=None, varlen=None):
    """Predicted peak bytes of one training step on a micro-batch of ``tokens`` packed tokens, ``scored_rows``
    of them through the lm_head (default: all); ``varlen``: the trie's ``VarlenSizes`` (varlen backend).
    Returns the ``Prediction`` of the moment that peaks (see the module doc)."""
    options = options or PlanOptions()
    if tokens < 1:
        raise PlanError(f"tokens must be >= 1, got {tokens}")
    rows = tokens if scored_rows is None else scored_rows
    counts = param_counts(shape)
    adapters, trainable, largest = trained_params(shape, options)
    state = 8 * trainable
    bf16 = options.dtype == "bf16"
    h, base16 = shape.hidden_size, options.bf16_base
    layer = layer_activation_bytes(shape, tokens, options, varlen)
    base = {"weights": weight_bytes(shape, options), "reference_weights": reference_bytes(shape, options),
            "adamw_state": state}
    # the final norm's saved tensors and output and the scored rows: a bf16 base, the norm's fp32 copy of its input,
    # its bf16 output and the bf16 rows
    final = (6 * tokens + 2 * rows) * h if base16 else 4 * ((2 if options.lora else 3) * tokens + rows) * h
    rows_bytes = {"final_norm_and_rows": final}
    moments = []
    if options.grad_checkpointing:
        inputs = {"checkpointed_inputs": shape.num_layers * tokens * (2 if base16 else 4) * h}
        if base16:  # a bf16 base's weights need no cast: the adapters' casts, cached until autocast exits
            copies = recompute_copies = 2 * adapters if bf16 else 0
        else:  # full fine-tuning under autocast: the cast of every trainable weight stays cached until autocast exits
            copies = 2 * counts["layer_linear"] if bf16 and not options.lora else 0
            recompute_copies = 2 * counts["layer_linear"] // shape.num_layers if bf16 else 0  # one layer's casts
        moments.append(("lm_head", {**base, "autocast_weight_copies": copies, **inputs, **rows_bytes,
                                    "logprob_op": logprob_op_bytes(shape, rows, options)}))
        moments.append(("layer recompute", {**base, "autocast_weight_copies": recompute_copies,
                                            **inputs, **rows_bytes, "gradients": 4 * trainable,
                                            "recomputed_layer": layer,
                                            "adapter_output_sum": adapter_output_sum_bytes(shape, tokens, options)}))
    else:
        copies = 2 * (adapters if base16 else counts["layer_linear"]) if bf16 else 0
        activations = {"autocast_weight_copies": copies, "activations": shape.num_layers * layer}
        moments.append(("lm_head", {**base, **activations, **rows_bytes,
                                    "logprob_op": logprob_op_bytes(shape, rows, options)}))
        if base16:  # the last layer's widest adapted module, nearly every activation alive
            moments.append(("adapter output", {**base, **activations, "adapter_output_sum":
                                               adapter_output_sum_bytes(shape, tokens, options)}))
    moments.append(("optimizer step", {**base, "gradients": 4 * trainable,
                                       "adamw_temporaries": 4 * trainable if options.device == "cuda" else 8 * largest}))
    moment, terms = max(moments, key=lambda m: sum(m[1].values()))
    return Prediction(sum(terms.values()), terms, moment)


# A prefill's transient activations per context token, fp32: PREFILL_MLP MLP widths (gate, up, their product
# alive together) and PREFILL_HIDDEN hidden widths (residual stream, norms, rotary tables, attention output).
# Fitted to the allocator peaks of prefills of a tiny Qwen3 (h 128, I 384) and Llama (h 256, I 512) on the CPU
# (sdpa, 4-16 rows x 64-256 tokens): within 2% there; tests/test_planner.py holds them to other shapes. A bf16
# model's prefill (a bf16 base) is the same count of bf16 elements: within 6% of its measured activations there.
PREFILL_MLP = 3.0
PREFILL_HIDDEN = 4.5


def predict_rollout(shape, options):
    """Predicted peak of the rollout phase, or None without a configured rollout (see the module doc)."""
    g = options.rollout_group_size
    if not g or not options.rollout_context:
        return None
    _, trainable, _ = trained_params(shape, options)
    kv = shape.num_kv_heads * shape.head_dim
    rows = g * options.rollout_context
    e = 2 if options.bf16_base else 4  # the engine runs the model in its own dtype: a bf16 base's cache is bf16
    terms = {"weights": weight_bytes(shape, options), "reference_weights": reference_bytes(shape, options),
             "adamw_state": 8 * trainable,
             "rollout_kv_cache": e * 2 * shape.num_layers * kv * g * (options.rollout_context +
                                                                     options.rollout_new_tokens),
             "rollout_prefill_activations": e * rows * (PREFILL_MLP * shape.intermediate_size +
                                                        PREFILL_HIDDEN * shape.hidden_size),
             "rollout_prefill_logits": e * g * shape.vocab_size}
    return Prediction(sum(terms.values()), {k: v for k, v in terms.items() if v}, "rollout")


# The largest micro_batch_tokens max_micro_batch_tokens searches (4,194,304): a budget that fits it may fit more
SEARCH_LIMIT = 1 << 22


def max_micro_batch_tokens(shape, budget, options=None, *, limit=SEARCH_LIMIT):
    """The largest ``train.micro_batch_tokens`` (a multiple of 64, at most ``limit``) whose predicted step
    peak fits in ``budget`` bytes; 0 when not even 64 tokens fit (or the rollout phase does not fit)."""
    options = options or PlanOptions()
    rollout = predict_rollout(shape, options)
    if rollout is not None and rollout.total > budget:
        return 0
    lo, hi = 0, limit // 64  # in units of 64 tokens; predict grows with tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predict(shape, 64 * mid, options).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return 64 * lo


def gib(n):
    return n / 2 ** 30


def report(shape, budget, options, tokens=None):
    """The lines ``pact-fast plan`` prints: the model, the options, each term at the largest budget that fits
    (or at ``tokens``), and that budget."""
    counts = param_counts(shape)
    best = max_micro_batch_tokens(shape, budget, options)
    at = tokens or best or 64
    pred = predict(shape, at, options)
    mode = f"LoRA r={options.lora_r} on {','.join(options.lora_targets)}" if options.lora else "full fine-tuning"
    weights = "bf16 base, fp32 adapters" if options.bf16_base else "fp32 weights"
    lines = [f"model {shape.name}: {counts['total'] / 1e9:.3g}B parameters (h={shape.hidden_size}, "
             f"layers={shape.num_layers}, heads={shape.num_heads}/{shape.num_kv_heads} kv, vocab={shape.vocab_size}"
             f"{', tied embeddings' if shape.tie_word_embeddings else ''})",
             f"plan: {mode}, {options.dtype} ({weights}{', bf16 autocast' if options.dtype == 'bf16' else ''}), "
             f"activation checkpointing {'on' if options.grad_checkpointing else 'off'}, "
             f"{'fused head' if options.fused_head else 'linear_logprobs'}"
             f"{' (memory_lean)' if options.memory_lean else ''}, lm_head "
             f"{'trained' if options.head_trainable else 'frozen (no dW)'}"
             f"{', KL reference copy' if reference_bytes(shape, options) else ''}, {options.device}; "
             f"GPU memory {gib(budget):.1f} GiB",
             f"predicted peak at micro_batch_tokens={at} ({pred.moment}): {gib(pred.total):.2f} GiB"]
    lines += [f"  {name:<28} {gib(value):8.3f} GiB" for name, value in pred.terms.items() if value]
    rollout = predict_rollout(shape, options)
    if rollout is not None:
        lines.append(f"predicted rollout peak (G={options.rollout_group_size}, context {options.rollout_context}"
                     f" + {options.rollout_new_tokens} new): {gib(rollout.total):.2f} GiB")
        lines += [f"  {name:<28} {gib(value):8.3f} GiB" for name, value in rollout.terms.items()]
    if best >= SEARCH_LIMIT:  # the search stopped there: "largest" would understate what fits
        lines.append(f"fits: train.micro_batch_tokens={best} and beyond (the planner searches no further)")
    elif best:
        lines.append(f"fits: train.micro_batch_tokens={best} (largest multiple of 64 predicted to fit)")
    elif rollout is not None and rollout.total > budget:
        lines.append(f"does not fit: the rollout phase alone is predicted at {gib(rollout.total):.2f} GiB (fewer "
                     "episodes sampled together or a shorter context)")
    else:
        lines.append("does not fit: not even 64 tokens per micro-batch (try --lora, --grad-checkpointing or a "
                     "larger GPU)")
    return lines, best


def readme_table(sizes=(24, 40, 80)):
    """Markdown rows: per known model, the largest micro_batch_tokens predicted to fit on each GPU size (GB),
    full fine-tuning and LoRA, without / with checkpointing (bf16 autocast on CUDA, fused head)."""
    header = "| model | params | " + " | ".join(
        f"{s} GB {m}" for s in sizes for m in ("full", "full+ckpt", "LoRA", "LoRA+ckpt")) + " |"
    rows = [header, "|" + "---|" * (2 + 4 * len(sizes))]
    for shape in KNOWN_SHAPES.values():
        cells = []
        for s in sizes:
            for lora, ckpt in ((False, False), (False, True), (True, False), (True, True)):
                best = max_micro_batch_tokens(shape, s * 10 ** 9, PlanOptions(lora=lora, grad_checkpointing=ckpt))
                cells.append(f"{best:,}" if best else "-")
        rows.append(f"| {shape.name} | {param_counts(shape)['total'] / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return rows


def options_from_config(config, **overrides):
    """``PlanOptions`` from a resolved ``pact_fast.config.Config`` (train.bf16, grad_checkpointing, fused_head,
    fused_head_memory_lean, attn_backend, device; model.lora, its base_dtype too, and model.freeze_lm_head;
    loss.beta_kl > 0: a reference model; the rollout's group size and new tokens), then ``overrides`` (the command
    line's explicit options). With ``rollout.engine=vllm`` the step is planned only when the engine sleeps while
    the trainer updates (its memory is vLLM's own, not predicted here): a rollout phase (``rollout_context``) or an
    engine awake through the update is a ``PlanError``. An empty ``model.lora.target_modules`` is the trainer's default
    (``model_setup.default_lora_targets``: every linear layer of a Llama/Qwen decoder layer,
    ``DEFAULT_LORA_TARGETS``)."""
    train, lora = config.train, config.model.lora
    if overrides.get("device"):  # --device wins, with that device's defaults (float32 and sdpa on the CPU)
        device = overrides["device"]
        attn = "sdpa" if device == "cpu" or train.attn_backend == "sdpa" else "flash"
    else:
        device = "cpu" if train.device == "cpu" else "cuda"
        attn = "sdpa" if train.attn_backend == "sdpa" else "flash"
    if config.rollout.engine == "vllm":  # vLLM holds its own copy of the weights and its own KV cache
        if overrides.get("rollout_context"):
            raise PlanError("--rollout-context plans the hf rollout engine (its KV cache among the trainer's tensors); "
                            "with rollout.engine=vllm the engine's memory is vLLM's own (rollout.vllm_kv_cache_gb, "
                            "vllm_gpu_memory_utilization), which the planner does not predict: leave it out")
        sleeps = config.rollout.vllm_sleep if config.rollout.vllm_sleep is not None else device == "cuda"
        if not sleeps:
            raise PlanError("rollout.engine=vllm without sleep mode (rollout.vllm_sleep false, or on the CPU): the "
                            "engine keeps its weights and KV cache in memory while the trainer updates, which the "
                            "planner does not count; plan with rollout.vllm_sleep=true (CUDA)")
    if not overrides.get("attn_backend"):  # --attn-backend wins over the config's
        if device == "cpu" and not overrides.get("device") and train.attn_backend != "sdpa":
            raise PlanError(f"train.device=cpu with train.attn_backend={train.attn_backend}: on the CPU the planner "
                            "predicts train.attn_backend=sdpa only (varlen's memory depends on the packed trie)")
        if device == "cuda" and train.attn_backend == "varlen":  # its gathered keys are not flash's O(T) state
            raise PlanError("train.attn_backend=varlen: its memory depends on the packed trie (each segment gathers "
                            "its ancestors' keys and values), which the planner does not know; plan triton, flex or "
                            "sdpa (--attn-backend flash or sdpa)")
    kw = dict(dtype="bf16" if train.bf16 and device == "cuda" else "float32", device=device,
              grad_checkpointing=train.grad_checkpointing, fused_head=train.fused_head,
              memory_lean=train.fused_head_memory_lean,
              attn_backend=attn,
              rollout_group_size=config.rollout.group_size * train.prompts_per_step,  # sampled in one batch
              rollout_new_tokens=config.rollout.max_new_tokens,
              lora=bool(lora.enabled), lora_r=lora.r, lora_dropout=float(lora.dropout),
              lora_targets=tuple(lora.target_modules) or DEFAULT_LORA_TARGETS, lora_base_dtype=lora.base_dtype,
              freeze_lm_head=config.model.freeze_lm_head, reference_model=config.loss.beta_kl > 0)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if not kw["lora"] and overrides.get("lora_base_dtype") is None:
        kw["lora_base_dtype"] = "float32"  # model_setup.base_dtype: without LoRA the base trains, in float32
    return PlanOptions(**kw)


__all__ = ["ModelShape", "KNOWN_SHAPES", "PlanOptions", "Prediction", "PlanError", "parse_size", "resolve_model",
           "shape_from_config", "shape_from_dir", "param_counts", "lora_params", "predict", "predict_rollout",
           "max_micro_batch_tokens", "report", "readme_table", "options_from_config", "DEFAULT_LORA_TARGETS",
           "varlen_sizes", "VarlenSizes", "trained_params", "logprob_op_bytes", "reference_bytes", "exact_param_count",
           "weight_bytes", "adapter_output_sum_bytes"]
