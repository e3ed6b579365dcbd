"""Score many sequences of a Hugging Face causal LM in one packed forward.

The sequences are merged into a token trie (``pact_fast.packing``); the model runs once over the
packed row with trie-depth ``position_ids`` and tree attention registered through
``transformers.AttentionInterface``; ``linear_logprobs`` turns the predictor rows of the last
hidden state into fp32 log-probs without materialising logits (SPEC section 4).
"""
import inspect
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .ops.linear_logprobs import linear_logprobs
from .ops.tree_attention import TreeAttentionLayout, build_layout, tree_attention
from .packing import PackedTree, pack_tree

ATTN_IMPLEMENTATION = "pact_tree"


class TreeLayout:
    """Forward kwarg ``tree_layout``: what every attention layer of a packed forward needs, built once per
    forward (``build_layout``: validation, tile lists or segment gathers, all host syncs), and what the forward
    did with it: the layers that used it (``calls``), the windows they were passed (``windows``: each attention
    call's ``sliding_window``, None for none), the windows of the masks the model built (``mask_windows``; None:
    causal). Not a dataclass: FSDP2's mixed precision (bf16 under torchrun) copies a dataclass argument field by
    field on its way into each sharded layer, and the layers counted on the copies."""

    def __init__(self, attention: TreeAttentionLayout):
        self.attention = attention
        self.calls = 0
        self.windows = set()
        self.mask_windows = set()


class PackedScoringError(ValueError):
    """A model (or config) that packed scoring does not reproduce, refused in one line that says why."""


_BUILDING = ContextVar("pact_fast_tree_layout", default=None)  # the TreeLayout of the packed forward under way


# Attention keyword arguments that do not change what attention computes: the packed forward's bookkeeping
# (position ids, cache flags, MoE router flags, our layout) and the causal flag that the tree layout subsumes (a
# False one is refused).
_NEUTRAL_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_router_logits", "is_causal",
                             "tree_layout", "past_key_values", "past_key_value"})


def _tree_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, **kwargs):
    """``AttentionInterface`` function: query [B, Hq, L, D], key [B, Hkv, L, D], value [B, Hkv, L, Dv] ->
    ([B, L, Hq, Dv], None); inside an autocast region in its dtype, as SDPA's inputs are cast (under bf16 autocast a
    model's rotary or q/k norm leaves query and key fp32 beside a bf16 value).

    Implements what the model passes: ``scaling``, ``sliding_window`` (positions along each query's own path,
    as the model attends over that sequence alone) and ``softcap`` (attention logit soft-capping). Any other
    keyword with a value, e.g. attention sinks (``s_aux``) or a head mask, is refused by name: never dropped;
    so are a bidirectional layer (``is_causal=False`` passed, or set on the module) and an ``attention_mask``:
    transformers' mask builders return None here (``_no_mask``), so a mask is one the model made itself (Doge's
    dynamic mask)."""
    layout = kwargs.get("tree_layout")
    if layout is None:
        raise PackedScoringError(f"{type(module).__name__} was called without the tree layout: the model's decoder "
                                 "does not pass keyword arguments through to its attention (it cannot be scored "
                                 f"packed), or the model was set to attention '{ATTN_IMPLEMENTATION}' outside "
                                 "pact_fast.scoring")
    unknown = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL_KWARGS and v is not None and v is not False)
    if unknown:
        raise PackedScoringError(f"{type(module).__name__} passes {', '.join(unknown)} to its attention, which tree "
                                 "attention does not implement: this model cannot be scored packed")
    if attention_mask is not None:
        raise PackedScoringError(f"{type(module).__name__} passes an attention mask of its own making (shape "
                                 f"{tuple(attention_mask.shape)}) that tree attention would drop: this model cannot be "
                                 "scored packed")
    causal = kwargs.get("is_causal")
    if causal is False or (causal is None and getattr(module, "is_causal", True) is False):
        raise PackedScoringError(f"{type(module).__name__} attends bidirectionally (is_causal=False; e.g. an encoder "
                                 "without config.is_decoder=True): tree attention is causal, so this model cannot be "
                                 "scored packed")
    if dropout and module.training:
        raise PackedScoringError(f"{type(module).__name__}: attention dropout {dropout} is not supported by tree "
                                 "attention; set the config's attention dropout to 0")
    query, key, value = _autocast_dtype(query, key, value)  # (rotary or a q/k norm left q, k fp32 beside a bf16 v)
    out = tree_attention(query, key, value, layout=layout.attention, scale=scaling, window=sliding_window or None,
                         softcap=softcap or None, validate=False)
    layout.calls += 1
    layout.windows.add(sliding_window or None)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, local_size=None, **kwargs):
    """Mask function for the registered implementation: the tree layout replaces any [L, L] mask. Notes the
    mask's window (transformers passes a sliding window's or an attention chunk's size as ``local_size``), which
    ``packed_hidden_states`` checks against the windows the attention layers were passed."""
    layout = _BUILDING.get()
    if layout is not None:
        layout.mask_windows.add(local_size or None)
    return None


def register_tree_attention():
    """Register the tree attention (and a no-op mask builder) with transformers; idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _tree_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers build masks without this registry
        return
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


# Model types refused by name, for what they do to a packed row that no generic check below sees.
_REFUSED_TYPES = {
    "llama4_text": "its NoPE layers scale the queries by a temperature of each token's index in the row "
                   "(attn_temperature_tuning), not of its position in its own sequence",
}


def _decoder_and_head(model):
    """``(decoder, lm_head)`` of a causal LM whose logits are the lm_head of the decoder's last hidden state (up to
    ``logit_transform``). Refused by name: a model with weights outside both (BERT's and RoBERTa's prediction heads:
    a dense layer and a norm before the output layer), which packed scoring would skip, and a decoder that takes no
    ``position_ids`` (Bart's numbers its input 0..L-1 itself: tokens past a branch point came out 0.09-0.6 off),
    and the model types of ``_REFUSED_TYPES``."""
    reason = _REFUSED_TYPES.get(getattr(getattr(model, "config", None), "model_type", None))
    if reason:
        raise PackedScoringError(f"{type(model).__name__}: {reason}; this model cannot be scored packed")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", None)
    decoder = getattr(model, prefix, None) if prefix else None
    if head is None or decoder is None or not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM with an lm_head "
                        f"(get_output_embeddings) and a base model at its base_model_prefix ({prefix!r})")
    body = getattr(decoder, "decoder", decoder)  # Bart-style ForCausalLM: a wrapper around the decoder
    if "position_ids" not in inspect.signature(body.forward).parameters:
        raise PackedScoringError(f"{type(model).__name__}: its decoder ({type(body).__name__}) takes no position_ids, "
                                 "so it would number the packed row 0..L-1 instead of each token's position in its "
                                 "own sequence: this model cannot be scored packed")
    known = {id(p) for p in decoder.parameters()} | {id(p) for p in head.parameters()}
    extra = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters() if id(p) not in known})
    if extra:
        raise PackedScoringError(f"{type(model).__name__} has layers between its decoder and its output layer "
                                 f"({', '.join(extra)}) that packed scoring would skip: this model cannot be scored "
                                 "packed")
    return decoder, head


# Model types whose head multiplies the logits by ``config.logits_scaling``; Granite's and MiniCPM3's divide by it.
_LOGITS_SCALING_MULTIPLIES = frozenset({"hyperclovax"})


def logit_transform(config):
    """``{"logit_scale": float, "softcap": float or None}``: what a model's causal-LM head does to the lm_head
    logits before the softmax, read from its config: Cohere's ``logit_scale`` multiplies, Granite's
    ``logits_scaling`` divides (HyperCLOVAX's multiplies), Gemma2/3's ``final_logit_softcapping`` caps
    (``c * tanh(z / c)``), in that order. The log-prob ops take both as parameters; a transform the config does not
    name is caught by ``check_model``."""
    scale = 1.0
    divides = getattr(config, "model_type", None) not in _LOGITS_SCALING_MULTIPLIES
    for knob, multiplies in (("logit_scale", True), ("logits_scaling", not divides)):
        value = getattr(config, knob, None)
        if value is not None:
            if not isinstance(value, (int, float)) or not value > 0:
                raise PackedScoringError(f"config.{knob}={value!r}: expected a positive number")
            scale = scale * float(value) if multiplies else scale / float(value)
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"logit_scale": scale, "softcap": float(softcap) if softcap else None}


@contextmanager
def tree_attention_enabled(model):
    """Switch the model to the registered tree attention for the duration of the block."""
    register_tree_attention()
    previous = model.config._attn_implementation
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def _checkpoint_in_tree(checkpoint_func, model):
    """Wrap an activation-checkpointing function so that the function it runs, and so its recomputation in
    the backward pass, runs with the tree attention: by then ``tree_attention_enabled`` has restored the
    model's own attention, and a recomputation without the tree layout gives wrong gradients."""
    def checkpoint(function, *args, **kwargs):
        def run(*a, **k):
            with tree_attention_enabled(model):
                return function(*a, **k)
        return checkpoint_func(run, *args, **kwargs)
    return checkpoint


@contextmanager
def _recompute_in_tree(model):
    """Route every activation-checkpointed module of ``model`` through ``_checkpoint_in_tree`` for the block."""
    patched = [m for m in model.modules()
               if getattr(m, "gradient_checkpointing", False) and "_gradient_checkpointing_func" in vars(m)]
    originals = [m._gradient_checkpointing_func for m in patched]
    for m, func in zip(patched, originals):
        m._gradient_checkpointing_func = _checkpoint_in_tree(func, model)
    try:
        yield
    finally:
        for m, func in zip(patched, originals):
            m._gradient_checkpointing_func = func


def length_dependent_rope(config):
    """``(rope_type, limit)`` when the model's rotary frequencies depend on the length of the forward's input: HF's
    ``dynamic`` (NTK) and ``longrope`` rotary embeddings switch or rescale them once the largest position id reaches
    ``limit`` (``max_position_embeddings``, ``original_max_position_embeddings``), for every token of the forward.
    None otherwise."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return None
    per_layer = [p for p in params.values() if isinstance(p, dict)] or [params]  # per layer type, or one
    for p in per_layer:
        rope_type = str(p.get("rope_type", p.get("type", "default")))
        if "dynamic" in rope_type:
            return rope_type, config.max_position_embeddings
        if rope_type == "longrope":
            return rope_type, (p.get("original_max_position_embeddings")
                               or getattr(config, "original_max_position_embeddings", None)
                               or config.max_position_embeddings)
    return None


def _check_rope_length(model, packed):
    """Refuse a packed trie whose longest sequence reaches the length where the rotary frequencies change: alone,
    each sequence gets the frequencies of its own length; packed, all would get those of the longest."""
    rope = length_dependent_rope(model.config)
    if rope is None or not packed.position_ids.numel():
        return
    longest = int(packed.position_ids.max()) + 1  # the only host sync, and only for such a model
    if longest > rope[1]:
        raise PackedScoringError(f"{type(model).__name__}: rope_type {rope[0]!r} changes its rotary frequencies past "
                                 f"{rope[1]} positions, and this packed group reaches {longest}: sequences of other "
                                 "lengths would be scored with the longest one's frequencies; pact_fast scores such a "
                                 f"model only on sequences of at most {rope[1]} tokens")


def _check_sequence_mixers(model, decoder):
    """Refuse decoder layers that mix tokens along the sequence outside attention: the causal convolutions of
    state-space, short-convolution and linear-attention mixers (Falcon-H1's Mamba runs beside attention in every
    layer) would run along the packed row, across branches."""
    stacks = [m for m in decoder.modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) == model.config.num_hidden_layers]
    convs = sorted({name.rsplit(".", 1)[-1] for stack in stacks for name, m in stack.named_modules()
                    if isinstance(m, torch.nn.Conv1d)})
    if convs:
        raise PackedScoringError(f"{type(model).__name__}: its decoder layers mix tokens along the sequence outside "
                                 f"attention (Conv1d {', '.join(convs)}: a state-space, short-convolution or "
                                 "linear-attention mixer), which would run across the branches of the packed row: "
                                 "this model cannot be scored packed")


def _check_token_ids(model, packed):
    """Refuse a token id outside the model's input embedding, ``[0, num_embeddings)`` (a tokenizer with more tokens
    than the model's vocabulary, say): the lookup failed with "index out of range in self" on the CPU, naming
    nothing, and with a device-side assert on CUDA. ``packed.input_ids`` is a CPU tensor (``pack_tree``): no device
    sync."""
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    ids = packed.input_ids
    if rows is None or not ids.numel():
        return
    low, high = (int(v) for v in ids.aminmax())
    if low < 0 or high >= rows:
        raise PackedScoringError(f"{type(model).__name__}: token id {low if low < 0 else high} is outside its input "
                                 f"embedding's [0, {rows}) (a tokenizer with more tokens than the model's vocabulary? "
                                 "model.resize_token_embeddings)")


def packed_hidden_states(model, packed, *, backend="auto"):
    """Last hidden states of a packed trie: ``[L, H]`` (one forward of the model's decoder)."""
    decoder, _ = _decoder_and_head(model)
    _check_sequence_mixers(model, decoder)
    _check_rope_length(model, packed)
    _check_token_ids(model, packed)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    input_ids = packed.input_ids.to(device)[None]  # [1, L]
    subtree_end = packed.subtree_end.to(device=device, dtype=torch.int32)[None]  # [1, L]
    n_layers = model.config.num_hidden_layers
    position_ids = packed.position_ids.to(device)[None]  # [1, L]: trie depths
    # once per forward; "auto" takes varlen for a float64 model, whose dtype the Triton kernels do not take
    layout = TreeLayout(build_layout(subtree_end, backend, position_ids=position_ids, dtype=dtype))
    building = _BUILDING.set(layout)
    try:
        with tree_attention_enabled(model), _recompute_in_tree(model):
            out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, tree_layout=layout)
    finally:
        _BUILDING.reset(building)
    if layout.calls != n_layers:
        raise PackedScoringError(f"{type(model).__name__}: tree attention ran in {layout.calls} of {n_layers} layers; "
                                 "this model's attention does not go through transformers.AttentionInterface, or "
                                 "some of its layers are not attention layers")
    unpassed = sorted(w for w in layout.mask_windows - layout.windows if w is not None)
    if unpassed and unpassed[0] < int(packed.position_ids.max()) + 1:  # a window as long as every sequence is moot
        raise PackedScoringError(f"{type(model).__name__} builds an attention mask limited to {unpassed[0]} tokens (a "
                                 "sliding window or attention chunk) but passes no such sliding_window to its "
                                 "attention, where tree attention takes windows from: this model (or this config) "
                                 f"cannot be scored packed on sequences longer than {unpassed[0]} tokens")
    return out.last_hidden_state[0]


def score_packed(model, packed, rows, targets, *, backend="auto", logprob_backend="auto", temperature=1.0,
                 return_entropy=False):
    """Log-probs of ``targets [M]`` predicted by packed ``rows [M]`` (``PackedTree.predictor_rows``).

    Returns fp32 ``logp [M]`` (and ``entropy [M]``), differentiable w.r.t. the model's parameters.
    """
    _, head = _decoder_and_head(model)
    hidden = packed_hidden_states(model, packed, backend=backend)  # [L, H]
    device = hidden.device
    picked = hidden.index_select(0, rows.to(device))  # [M, H]; a branch row repeats, its prefix never re-runs
    picked, weight, bias = head_inputs(picked, head)
    return linear_logprobs(picked, weight, targets.to(device), bias=bias, temperature=temperature,
                           return_entropy=return_entropy, backend=logprob_backend, **logit_transform(model.config))


def head_inputs(hidden, head):
    """``(hidden, weight, bias)`` for an lm_head op, inside an autocast region cast to its dtype as autocast casts a
    linear layer's (``_autocast_dtype``; the trainer's bf16 autocast on CUDA keeps fp32 weights; the ops compute in
    their inputs' dtype, and their backward runs outside the region)."""
    return _autocast_dtype(hidden, head.weight, head.bias)


def _autocast_dtype(*tensors):
    """``tensors`` (None passes) inside an autocast region cast to its dtype, as autocast casts a matmul's or SDPA's
    inputs: floating ones but float64; outside one, as they are."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


class PackedScorer(torch.nn.Module):
    """``score_packed`` as a module: ``scorer(packed, rows, targets, **kw) -> logp``; with ``head_loss`` the
    picked hidden rows go to ``head_loss(hidden [M, H], weight [V, H], bias, targets [M], logit_scale=...,
    softcap=...)`` instead of the log-prob op (a loss fused into the lm_head, e.g.
    ``pact_fast.ops.fused_pact_head``), whose result it returns; the keywords are the model's
    ``logit_transform``.

    Wrap the causal LM in it before FSDP2's ``fully_shard`` (per decoder layer, then this module as the
    root): the root's hooks then gather the embedding, final norm and lm_head for the packed pass and
    reduce-scatter their gradients, although the pass calls the decoder and the lm_head weight directly.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, packed, rows, targets, head_loss=None, **kwargs):
        if head_loss is None:
            return score_packed(self.model, packed, rows, targets, **kwargs)
        _, head = _decoder_and_head(self.model)
        hidden = packed_hidden_states(self.model, packed, backend=kwargs.get("backend", "auto"))  # [L, H]
        picked, weight, bias = head_inputs(hidden.index_select(0, rows.to(hidden.device)), head)  # [M, H]
        return head_loss(picked, weight, bias, targets.to(hidden.device), **logit_transform(self.model.config))


def sequence_logprobs(model, sequences, *, backend="auto", logprob_backend="auto", temperature=1.0,
                      return_entropy=False):
    """Per-sequence log-probs of tokens 1..n-1 from one packed forward.

    Args:
        model: a Hugging Face causal LM whose attention dispatches through ``AttentionInterface``
            (Llama, Qwen2, Qwen3, Mistral, ...).
        sequences: token id sequences (lists or 1-D tensors); shared prefixes go through the model once.
        backend: tree-attention backend (``pact_fast.ops.tree_attention``).
        logprob_backend: ``linear_logprobs`` backend.
        temperature: logits are divided by it.
        return_entropy: also return per-token entropies.

    Returns:
        A list with, for sequence j of length n_j, fp32 ``logp [n_j - 1]`` (the same numbers as a separate
        forward, log_softmax and gather), or a list of ``(logp, entropy)`` pairs with ``return_entropy``.
    """
    packed = pack_tree(sequences)
    if not packed.input_ids.numel():  # no sequences: an empty row failed inside transformers' mask preparation
        return []
    rows, targets, offsets = packed.predictor_rows()
    out = score_packed(model, packed, rows, targets, backend=backend, logprob_backend=logprob_backend,
                       temperature=temperature, return_entropy=return_entropy)
    bounds = offsets.tolist()
    if return_entropy:
        logp, ent = out
        return [(logp[a:b], ent[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# (max, mean) |log-prob difference| between packed scoring and the model's own forward that check_model accepts.
# 16-bit models differ from themselves: SmolLM2-135M's own bf16 forward is 0.43 max / 0.12 mean off its fp32
# one, and packed bf16 scoring 0.25 / 0.066 off its own bf16 forward; a logit scale of 1.1 that one path misses
# moves the mean by 0.94 (fp16: 0.035 / 0.011 and 0.94).
CHECK_TOLERANCE = {torch.float64: (1e-6, 1e-6), torch.float32: (1e-3, 1e-3), torch.float16: (0.25, 0.05),
                   torch.bfloat16: (1.0, 0.2)}


def _smallest_window(config):
    """The smallest sliding window any layer of ``config`` may use, or None."""
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def _probe_group(config, seed):
    """Three token sequences sharing a prefix, the longest crossing the model's smallest sliding window when
    that is at most 256 tokens (a window longer than every sequence is never exercised)."""
    window = _smallest_window(config)
    length = min(max(24, (window or 0) + 8), 264)
    prefix = length // 3
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (3, length), generator=g)
    ids[:, :prefix] = ids[0, :prefix]
    return [ids[0].tolist(), ids[1, : length - 5].tolist(), ids[2, : prefix + (length - prefix) // 2].tolist()]


def check_model(model, *, seed=0, backend="auto", logprob_backend="auto", log=None):
    """Score a small built-in group packed (``sequence_logprobs``) and through the model's own forward, one
    sequence at a time; refuse the model when they differ, so an architecture whose attention or head pact_fast
    does not reproduce (a mask, a scaling or a transform it does not know) never trains on wrong numbers.

    Runs without gradients, in eval mode (restored after), in the parameters' dtype, with tolerances
    ``CHECK_TOLERANCE[dtype]`` on the max and the mean absolute log-prob difference. Returns ``{"max_abs_diff",
    "mean_abs_diff", "tolerance": (max, mean), "tokens", "seconds"}``; raises ``ModelError`` (one line: the
    numbers, or why the packed path refused the model) otherwise."""
    import time

    from .models import ModelError

    t0 = time.perf_counter()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    sequences = _probe_group(model.config, seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                packed = sequence_logprobs(model, sequences, backend=backend, logprob_backend=logprob_backend)
            except PackedScoringError as exc:  # a refusal: its message says why
                raise ModelError(f"{exc} (pact_fast.scoring.check_model)") from exc
            except Exception as exc:  # e.g. the model's own code broke on the packed input (Falcon's ALiBi)
                detail = " ".join(str(exc).split())[:200]
                raise ModelError(f"{type(model).__name__}: packed scoring failed on this model ({type(exc).__name__}: "
                                 f"{detail}); it cannot be scored packed (pact_fast.scoring.check_model)") from exc
            diffs = []
            for seq, logp in zip(sequences, packed):
                ids = torch.tensor(seq, device=device)[None]
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
                own = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
                diffs.append((logp.double() - own).abs().cpu())
    finally:
        model.train(was_training)
    diff = torch.cat(diffs)
    worst, mean = diff.max().item(), diff.mean().item()
    tolerance = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.bfloat16])
    result = {"max_abs_diff": worst, "mean_abs_diff": mean, "tolerance": tolerance, "tokens": len(diff),
              "seconds": time.perf_counter() - t0}
    name, dtype_name = type(model).__name__, str(dtype).replace("torch.", "")
    if not (worst <= tolerance[0] and mean <= tolerance[1]):
        raise ModelError(f"{name}: packed log-probs differ from the model's own forward by {worst:.3g} max, "
                         f"{mean:.3g} mean (tolerance {tolerance[0]:g} / {tolerance[1]:g} in {dtype_name}): "
                         "pact_fast does not reproduce this architecture, so it refuses to train it "
                         "(scoring.check=off skips this check)")
    if log:
        log(f"[pact_fast] packed scoring of {name} matches its own forward: |logp diff| {worst:.2g} max, "
            f"{mean:.2g} mean in {dtype_name}, {result['seconds']:.2f} s")
    return result


__all__ = ["sequence_logprobs", "score_packed", "check_model", "logit_transform", "PackedScorer", "PackedScoringError",
           "packed_hidden_states", "length_dependent_rope", "register_tree_attention", "PackedTree", "TreeLayout",
           "ATTN_IMPLEMENTATION"]
