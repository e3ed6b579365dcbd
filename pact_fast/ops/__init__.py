"""Public ops: pure functions over tensors that any trainer can call."""
from .linear_logprobs import linear_logprobs, linear_logprobs_reference
from .tree_attention import tree_attention, tree_attention_reference

__all__ = ["linear_logprobs", "linear_logprobs_reference", "tree_attention", "tree_attention_reference"]
