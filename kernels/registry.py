"""One table of every Triton kernel and the configurations it is launched with.

Launchers read their tile sizes from here, and the compile gate
(``python -m pact_fast.compile_gate``) compiles every entry for sm_90a and sm_80, so a
configuration cannot be launched without having passed the gate.
"""
import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes (kernel constexprs) plus the compiler knobs of one launch."""

    blocks: dict
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class GateEntry:
    """One kernel at one configuration and dtype, as the compile gate builds it."""

    name: str
    kernel: object  # triton JITFunction
    signature: dict  # argument name -> triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict
    config: LaunchConfig
    expects_mma: bool = True  # tile matmuls on 16-bit inputs must use tensor cores
    note: str = field(default="", compare=False)


@dataclass(frozen=True)
class KernelCost:
    """What one kernel launch moves and multiplies, by the performance model (bench/roofline.py).

    ``flops``: tensor-core FLOPs, 2*M*N*K per ``tl.dot`` executed; ``bytes``: global-memory bytes of
    every ``tl.load`` / ``tl.store`` executed, masked-off elements excluded. A test checks both against
    what the Triton interpreter really executes (tests/test_roofline.py).
    """

    kernel: str  # e.g. "linear_logprobs.fwd"; the name the count harness reports for that kernel
    flops: int
    bytes: int


def cost_name(name):
    """Tag a Triton kernel with the name its ``KernelCost`` entries use (``@cost_name("x.fwd")`` above
    ``@triton.jit``); bench/roofline.py's count harness reports the kernel under that name."""

    def tag(kernel):
        kernel.cost_name = name
        return kernel

    return tag


TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def all_gate_entries() -> list:
    """Every (kernel, config, dtype) the project launches on a GPU."""
    from . import fused_pact_head_launch, linear_logprobs_launch, tree_attention_launch

    return linear_logprobs_launch.gate_entries() + tree_attention_launch.gate_entries() + \
        fused_pact_head_launch.gate_entries()
