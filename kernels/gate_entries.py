"""Every (kernel, configuration, dtype) the project launches on a GPU, for the compile gate."""
from . import fused_pact_head_launch, linear_logprobs_launch, tree_attention_launch


def all_gate_entries() -> list:
    """GateEntry's of every launcher, in a fixed order."""
    return (linear_logprobs_launch.gate_entries() + tree_attention_launch.gate_entries()
            + fused_pact_head_launch.gate_entries())
