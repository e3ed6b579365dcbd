"""Score many sequences of a Hugging Face causal LM in one packed forward.

The sequences are merged into a token trie (``pact_fast.packing``); the model runs once over the
packed row with trie-depth ``position_ids`` and tree attention registered through
``transformers.AttentionInterface``; ``linear_logprobs`` turns the predictor rows of the last
hidden state into fp32 log-probs without materialising logits (SPEC section 4).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .ops.linear_logprobs import linear_logprobs
from .ops.tree_attention import TreeAttentionLayout, build_layout, tree_attention
from .packing import PackedTree, pack_tree

ATTN_IMPLEMENTATION = "pact_tree"


@dataclass
class TreeLayout:
    """Forward kwarg ``tree_layout``: what every attention layer of a packed forward needs, built once per
    forward (``build_layout``: validation, tile lists or segment gathers, all host syncs), and a count of the
    layers that used it."""

    attention: TreeAttentionLayout
    calls: int = 0


def _tree_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
    layout = kwargs.get("tree_layout")
    if layout is None:
        raise RuntimeError(f"attention '{ATTN_IMPLEMENTATION}' was called without a tree_layout kwarg; "
                           "run the model through pact_fast.scoring")
    if getattr(module, "sliding_window", None):
        raise ValueError(f"{type(module).__name__} uses sliding-window attention, which the tree layout does not "
                         "implement; disable it in the model config")
    if dropout and module.training:
        raise ValueError("attention dropout is not supported by tree attention; set attention_dropout=0")
    out = tree_attention(query, key, value, layout=layout.attention, scale=scaling, validate=False)
    layout.calls += 1
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Mask function for the registered implementation: the tree layout replaces any [L, L] mask."""
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


def _decoder_and_head(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", None)
    decoder = getattr(model, prefix, None) if prefix else None
    if head is None or decoder is None or not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM with an lm_head "
                        "(get_output_embeddings) and a base model")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers.AttentionInterface, "
                         "so it cannot run the tree layout")
    for knob in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, knob, None) not in (None, 1.0):
            raise ValueError(f"{type(model).__name__} sets config.{knob}; linear_logprobs computes plain "
                             "lm_head logits, so scoring it would be wrong")
    return decoder, head


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


def packed_hidden_states(model, packed, *, backend="auto"):
    """Last hidden states of a packed trie: ``[L, H]`` (one forward of the model's decoder)."""
    decoder, _ = _decoder_and_head(model)
    device = next(model.parameters()).device
    input_ids = packed.input_ids.to(device)[None]  # [1, L]
    subtree_end = packed.subtree_end.to(device=device, dtype=torch.int32)[None]  # [1, L]
    n_layers = model.config.num_hidden_layers
    layout = TreeLayout(build_layout(subtree_end, backend))  # once per forward; the layers only read it
    with tree_attention_enabled(model), _recompute_in_tree(model):
        out = decoder(input_ids=input_ids, position_ids=packed.position_ids.to(device)[None], use_cache=False,
                      tree_layout=layout)
    if layout.calls != n_layers:
        raise ValueError(f"{type(model).__name__}: tree attention ran in {layout.calls} of {n_layers} layers; this "
                         "model's attention does not go through transformers.AttentionInterface")
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
    return linear_logprobs(picked, head.weight, targets.to(device), bias=head.bias, temperature=temperature,
                           return_entropy=return_entropy, backend=logprob_backend)


class PackedScorer(torch.nn.Module):
    """``score_packed`` as a module: ``scorer(packed, rows, targets, **kw) -> logp``; with ``head_loss`` the
    picked hidden rows go to ``head_loss(hidden [M, H], weight [V, H], bias, targets [M])`` instead of the
    log-prob op (a loss fused into the lm_head, e.g. ``pact_fast.ops.fused_pact_head``), whose result it returns.

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
        picked = hidden.index_select(0, rows.to(hidden.device))  # [M, H]
        return head_loss(picked, head.weight, head.bias, targets.to(hidden.device))


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
    rows, targets, offsets = packed.predictor_rows()
    out = score_packed(model, packed, rows, targets, backend=backend, logprob_backend=logprob_backend,
                       temperature=temperature, return_entropy=return_entropy)
    bounds = offsets.tolist()
    if return_entropy:
        logp, ent = out
        return [(logp[a:b], ent[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


__all__ = ["sequence_logprobs", "score_packed", "PackedScorer", "packed_hidden_states", "register_tree_attention", "PackedTree",
           "TreeLayout", "ATTN_IMPLEMENTATION"]
