"""The launch configurations of every Triton kernel, and the types the launchers, the compile gate and
the performance model share.

Launchers read their tile sizes from ``GPU_CONFIGS`` / ``INTERPRET_CONFIGS`` here (by op name), and the
compile gate (``python -m pact_fast.compile_gate``, entries from ``kernels/gate_entries.py``) compiles every
GPU configuration for sm_90a and sm_80, so a configuration cannot be launched without having passed the
gate. This module imports no launcher.
"""
import os
from dataclasses import dataclass

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
    min_ctas_per_sm: int = 1  # the gate fails a build with fewer resident CTAs per SM (registers, shared memory)
    # arguments every launch passes divisible by 16 (a pointer's address: torch allocations are 16-byte aligned; an
    # int's value, e.g. a stride that is a multiple of the head dim), compiled with that hint as Triton's runtime
    # specialisation does when it launches them
    aligned: tuple = ()
    archs: tuple = (90, 80)  # the architectures this entry is launched on (its config may be one arch's)


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


def gemm_cost(tag, m, n, k, c_elems, elem_bytes, batch=1):
    """KernelCost of a cuBLAS GEMM [m, k] @ [k, n] (``batch`` of them in one batched launch) named
    ``torch.mm[tag]``: 2*batch*m*n*k FLOPs and compulsory bytes (both operands, the output, and ``c_elems``
    elements of an addmm's C read once)."""
    return KernelCost(f"torch.mm[{tag}]", 2 * batch * m * n * k,
                      (batch * (m * k + k * n + m * n) + c_elems) * elem_bytes)


# How the launchers size their row blocks and vocabulary slabs for cuBLAS (the same assumptions bench/roofline.py's
# time model prices GEMMs with): an output tile per SM per wave, a partial last wave costing a whole one.
GEMM_TILE = (128, 256)  # output tile (rows, columns) of cuBLAS's Hopper bf16 GEMMs: assumed, cuBLAS picks its own
DEFAULT_SMS = 132  # H100 / H200 SXM; a CUDA device's own count is read where a launcher runs on one
# FLOPs per byte at which a GEMM turns memory-bound: 700 TFLOP/s of cuBLAS bf16 over 3.0 TB/s of HBM (an H100's;
# bench/roofline.py's classes). An H200's 163 would plan the same blocks at every SPEC workload.
GEMM_RIDGE = 700 / 3.0
LAUNCH_WORK = 4.5e-6 * 700e12  # a launch (4.5 us of host time, bench/roofline.py's class) in FLOPs at 700 TFLOP/s


def device_sms(device):
    """Streaming multiprocessors of a CUDA ``device``; DEFAULT_SMS elsewhere (the interpreter, the model)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def block_sizes(n, size):
    """[(block size, how many)] of ``n`` items cut into blocks of ``size``: the full blocks and the remainder's,
    each present only when it has items (what a blocking plan prices: each size once)."""
    return [(b, k) for b, k in ((size, n // size), (n % size, 1)) if b and k]


def gemm_waves(m, n, sms=DEFAULT_SMS, batch=1, tile=GEMM_TILE):
    """Waves of output tiles of a cuBLAS GEMM with an [m, n] output (``batch`` of them in one batched launch) on
    ``sms`` SMs: ceil(batch * ceil(m / tile rows) * ceil(n / tile columns) / sms)."""
    tiles = batch * -(-m // tile[0]) * -(-n // tile[1])
    return -(-tiles // sms)


def gemm_work(m, n, k, c_elems, elem_bytes, sms=DEFAULT_SMS, batch=1):
    """What a launcher plans a cuBLAS GEMM to cost, in FLOPs at full waves: max(the FLOPs its waves of tiles take
    (``gemm_waves``, each tile reducing over k), its compulsory bytes (``gemm_cost``) times GEMM_RIDGE), plus
    its launch (LAUNCH_WORK)."""
    waves = gemm_waves(m, n, sms, batch)
    return max(2 * waves * sms * GEMM_TILE[0] * GEMM_TILE[1] * k,
               gemm_cost("", m, n, k, c_elems, elem_bytes, batch).bytes * GEMM_RIDGE) + LAUNCH_WORK


ODD_VOCAB = "-odd"  # the tag of an entry's build for a vocabulary that is not a multiple of 16


def vocab_variants(name, kernel, signature, constexprs, config, sizes, **kw):
    """The two builds a logits epilogue gets at launch: Triton specialises every argument divisible by 16 (a
    torch allocation's address, a size or stride that is a multiple of 16). With a vocabulary that is a multiple
    of 16 (Qwen3's 151,936, Llama 3's 128,256, every SPEC workload) the pointers and ``sizes`` (the row stride,
    slab offsets and widths) all are, and the loads vectorise: ``name`` is that build; ``name`` with "-odd" before
    its closing bracket is the build for any other vocabulary, with no hint. The gate checks both; the
    performance model prices the first (bench/sass.py leaves "-odd" out)."""
    aligned = tuple(n for n, t in signature.items() if t.startswith("*")) + tuple(sizes)
    return [GateEntry(name, kernel, signature, constexprs, config, aligned=aligned, **kw),
            GateEntry(name[:-1] + ODD_VOCAB + "]", kernel, signature, constexprs, config, **kw)]


def odd_vocab(entry_name):
    """True for the build ``vocab_variants`` makes for a vocabulary that is not a multiple of 16."""
    return entry_name.endswith(ODD_VOCAB + "]")


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


# linear_logprobs' backward epilogue, also the fused head's gradient pass in its ordinary mode. 8 warps: at 4, its
# bf16 build with bias and entropy gradient kept 16 B of stack with STL/LDL on sm_80 (96 registers, triton 3.9)
_LOGPROB_BWD_GPU = LaunchConfig({"BLOCK_R": 8, "BLOCK_S": 512}, num_warps=8, num_stages=2)
_LOGPROB_BWD_INTERPRET = LaunchConfig({"BLOCK_R": 4, "BLOCK_S": 32})

GPU_CONFIGS = {
    # linear_logprobs: forward, 4 rows per program (512 programs per 2048-row block) and 1024-column tiles held
    # as SPLIT=4 chunks per thread, so each row reduction crosses the warp's lanes once per 32 of a thread's
    # logits (0.27 SASS warp-instructions per bf16 logit on sm_90a, 56 registers; 8x256 tiles: 0.38);
    # backward, 8 rows per program, 512 columns per elementwise tile. Memory-bound epilogues: no MMA.
    "linear_logprobs": {
        "fwd": LaunchConfig({"BLOCK_R": 4, "BLOCK_S": 1024, "SPLIT": 4}, num_warps=4, num_stages=2),
        "bwd": _LOGPROB_BWD_GPU,
    },
    # tree_attention (kernels/tree_attention_launch.py): one query head per program, 4 warps; forward over 128-query
    # tiles against 16-key tiles (each K/V tile read once per 128 query rows: half the forward's bytes of 64-row
    # tiles), dq over 64-query tiles against 32-key tiles (its own tile list), dk/dv over 64-key tiles against
    # 16-query tiles (sm_80: 32-key tiles, ARCH_CONFIGS). The largest tiles the compile gate builds with no spill and
    # 2 CTAs per SM on sm_90a and sm_80 at head dim 128 with every option (triton 3.9): a 128x32 forward and a
    # 128-row dq (either key tile) spilled, 8 warps fell to 1 CTA per SM.
    "tree_attention": {
        "fwd": LaunchConfig({"BLOCK_M": 128, "BLOCK_N": 16}, num_warps=4, num_stages=2),
        "dq": LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        "dkdv": LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        "delta": LaunchConfig({"BLOCK_R": 32}, num_warps=4, num_stages=1),
        "cast": LaunchConfig({"BLOCK": 1024}, num_warps=4, num_stages=1),
    },
    # fused_pact_head: 4 rows per program x 256 columns per tile: the shift pass takes 75 registers
    # (triton 3.9, sm_90a) and 0.50 warp-instructions per logit; 512- and 1024-column tiles save 1-2% of its
    # instructions at 114 and 180 registers, 8 rows x 1024 columns at 8 warps none (bench/sass.py, 2026-12-05).
    # Memory-bound epilogues, no MMA. "grad" is linear_logprobs' own backward epilogue (ordinary mode).
    "fused_pact_head": {
        "pass": LaunchConfig({"BLOCK_R": 4, "BLOCK_V": 256}, num_warps=4, num_stages=2),
        "scale": LaunchConfig({"BLOCK_R": 8, "BLOCK_H": 256}, num_warps=4, num_stages=2),
        "grads": LaunchConfig({"BLOCK": 1024}, num_warps=4, num_stages=1),
        "grad": _LOGPROB_BWD_GPU,
    },
}
# Replacements of GPU_CONFIGS entries on one architecture (80: A100 and any GPU below sm_90; GPU_CONFIGS itself is
# sm_90a's). tree_attention's dk/dv at 64 keys spills on sm_80, where mma.sync holds the k and v operands in registers
# beside the dk and dv accumulators; 32-key tiles fit (sm_90a keeps 64: wgmma needs 64 rows per warp group).
ARCH_CONFIGS = {
    80: {"tree_attention": {"dkdv": LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2)}},
}
GATE_ARCHS = (90, 80)  # what the compile gate builds: sm_90a and sm_80


def gpu_configs(op, arch=90):
    """Launch configurations of ``op`` (a GPU_CONFIGS key) on architecture ``arch`` (90 or 80)."""
    if arch not in GATE_ARCHS:
        raise ValueError(f"gpu_configs: arch must be one of {GATE_ARCHS}, got {arch!r}")
    return {**GPU_CONFIGS[op], **ARCH_CONFIGS.get(arch, {}).get(op, {})}


def device_arch(device) -> int:
    """The GATE_ARCHS entry whose configurations a CUDA ``device`` launches: 90 from sm_90 up, else 80."""
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


# Interpreter: small tiles, so small test shapes still span several tiles (tree attention's forward query tiles
# twice its dq tiles, and its backward key tiles twice its query tiles, as on the GPU).
INTERPRET_CONFIGS = {
    "linear_logprobs": {
        "fwd": LaunchConfig({"BLOCK_R": 4, "BLOCK_S": 32, "SPLIT": 2}),
        "bwd": _LOGPROB_BWD_INTERPRET,
    },
    "tree_attention": {
        "fwd": LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 16}),
        "dq": LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 16}),
        "dkdv": LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 32}),
        "delta": LaunchConfig({"BLOCK_R": 16}),
        "cast": LaunchConfig({"BLOCK": 256}),
    },
    "fused_pact_head": {
        "pass": LaunchConfig({"BLOCK_R": 4, "BLOCK_V": 16}),
        "scale": LaunchConfig({"BLOCK_R": 4, "BLOCK_H": 8}),
        "grads": LaunchConfig({"BLOCK": 16}),
        "grad": _LOGPROB_BWD_INTERPRET,
    },
}
