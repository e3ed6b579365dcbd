"""Public ops: pure functions over tensors that any trainer can call."""
from .fused_pact_head import fused_pact_head
from .linear_logprobs import linear_logprobs, linear_logprobs_reference
from .tree_attention import tree_attention, tree_attention_reference

__all__ = ["fused_pact_head", "linear_logprobs", "linear_logprobs_reference", "tree_attention", "tree_attention_reference"]
