"""Performance model: speed of every kernel without a GPU (SPEC section 7).

A launch costs ``max(flops / F, bytes / B)`` on a device; an op costs the sum over its launches.
FLOPs are tensor-core FLOPs (2*M*N*K per ``tl.dot`` executed); bytes are the global-memory bytes of
every ``tl.load`` / ``tl.store`` executed, masked-off elements excluded. A cuBLAS GEMM
(``torch.mm`` / ``addmm``) is modelled at its compulsory bytes (each operand and the output once).
The formulas live beside each launcher (``kernel_costs(...)``); ``count_executed()`` counts what the
Triton interpreter really executes so the tests (tests/test_roofline*.py) can hold them equal.

    python bench/roofline.py                                    # table, labelled as a model
    python bench/roofline.py --json bench/results/roofline.json # also the rows as JSON

API for other tools: ``DEVICES``, ``predict_ms(costs, device)``, ``count_executed()``,
``aggregate(costs)``, ``model_rows(devices=("H100", "H200"))`` (every row of the table),
``logprob_rows(workload, N, V, H, devices)`` (linear_logprobs at any shape), ``fused_head_rows(...)``
(the Triton fused PACT head at any shape), ``ideal_logprob_ms``, ``w_group_layout()`` (the W-group trie and
heads; with ``kernels/tree_attention_launch.kernel_costs`` / ``ideal_costs``, tree attention at any layout),
``model_row(workload, op, device, costs, ideal_ms, extra_memory_bytes)`` (a row for any other op).
Each row: workload, op, device, predicted_ms, ideal_ms, ratio, extra_memory_bytes, kernels
(per-kernel flops, bytes, intensity, predicted_ms), label "model".
"""
import argparse
import contextlib
import inspect
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Device:
    """Peak dense bf16 tensor-core rate (FLOP/s) and HBM bandwidth (byte/s) the model assumes."""

    flops: float
    bandwidth: float


DEVICES = {"H100": Device(700e12, 3.0e12), "H200": Device(700e12, 4.3e12)}
TORCH_GEMM = "torch.mm"  # every cuBLAS GEMM the count harness sees is reported under this name


def launch_ms(cost, device):
    """Predicted milliseconds of one KernelCost on a device name ("H100") or Device."""
    dev = DEVICES[device] if isinstance(device, str) else device
    return 1e3 * max(cost.flops / dev.flops, cost.bytes / dev.bandwidth)


def predict_ms(costs, device):
    """Predicted milliseconds of a list of KernelCost: the sum of each launch's roofline time."""
    return sum(launch_ms(c, device) for c in costs)


def kernel_family(name):
    """Name the count harness reports for a KernelCost name: ``"torch.mm[dx]"`` -> ``"torch.mm"``."""
    return name.split("[", 1)[0]


def aggregate(costs):
    """{kernel family: (flops, bytes)} summed over a list of KernelCost, comparable to count_executed()."""
    out = defaultdict(lambda: [0, 0])
    for c in costs:
        acc = out[kernel_family(c.kernel)]
        acc[0] += c.flops
        acc[1] += c.bytes
    return {k: tuple(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Count harness: what the Triton interpreter executes, per kernel
# ---------------------------------------------------------------------------------------------

# Builder methods wrapped, with the arguments each rule reads (looked up by name, so the harness
# follows triton versions whose other arguments differ, e.g. cache_policy vs cache_modifier).
_COUNTED = {
    "create_masked_load": ("ptrs", "mask"),
    "create_masked_store": ("ptrs", "mask"),
    "create_dot": ("a", "b"),
    "create_atomic_rmw": ("ptr", "mask"),
    "create_atomic_cas": ("ptr",),
}
# Unmasked and atomic loads/stores must reach the masked builders above (checked in their source).
_DELEGATES = {"create_load": "create_masked_load", "create_store": "create_masked_store",
              "create_atomic_load": "create_masked_load", "create_atomic_store": "create_masked_store"}
# Memory ops the kernels of this project do not use; counting them would need their own rule.
_UNCOUNTED = ("create_descriptor_load", "create_descriptor_store", "create_descriptor_gather",
              "create_descriptor_scatter", "create_tensor_pointer_load", "create_tensor_pointer_store",
              "create_dot_scaled")


def _element_bytes(ptrs):
    ty = ptrs.dtype
    while hasattr(ty, "element_ty"):
        ty = ty.element_ty
    return max(1, ty.primitive_bitwidth // 8)


def _check_interpreter_api(interp):
    """The builder methods and arguments the harness wraps exist; raise RuntimeError naming what changed."""
    builder_cls = interp.InterpreterBuilder
    for name, needed in _COUNTED.items():
        method = getattr(builder_cls, name, None)
        params = list(inspect.signature(method).parameters) if method is not None else []
        if not set(needed) <= set(params):
            raise RuntimeError(f"count_executed: triton's InterpreterBuilder.{name} is missing or lost arguments "
                               f"{needed} (has {params}); update bench/roofline.py for this triton")
    for name, target in _DELEGATES.items():
        method = getattr(builder_cls, name, None)
        if method is not None and target not in inspect.getsource(method):
            raise RuntimeError(f"count_executed: InterpreterBuilder.{name} no longer goes through {target}; "
                               "update bench/roofline.py for this triton")
    run = getattr(interp.InterpretedFunction, "run", None)
    if run is None or not {"grid", "warmup"} <= set(inspect.signature(run).parameters):
        raise RuntimeError("count_executed: triton's InterpretedFunction.run changed; update bench/roofline.py")


def kernel_cost_name(kernel):
    """The name a launched kernel is counted under: its ``registry.cost_name`` tag, else module.function."""
    tag = getattr(kernel, "cost_name", None)
    if tag:
        return tag
    fn = kernel.fn
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


class Counts(dict):
    """{kernel name: [flops, bytes]} accumulated while ``count_executed`` is active."""

    def add(self, name, flops=0, nbytes=0):
        acc = self.setdefault(name, [0, 0])
        acc[0] += int(flops)
        acc[1] += int(nbytes)

    def as_tuples(self):
        return {k: (v[0], v[1]) for k, v in self.items()}


@contextlib.contextmanager
def count_executed(count_torch_gemms=True):
    """Count tensor-core FLOPs and global-memory bytes of every Triton kernel run under TRITON_INTERPRET=1.

    Yields a ``Counts`` dict ``{kernel name: [flops, bytes]}``. Triton kernels are named by
    ``kernel_cost_name``; cuBLAS GEMMs (aten mm / addmm / bmm / baddbmm), when ``count_torch_gemms``,
    under ``"torch.mm"`` at compulsory bytes (inputs, including an addmm's C, and the output once).
    Raises RuntimeError if Triton is not interpreting or the interpreter's builder API is not the
    one this harness wraps (it never silently counts zero).
    """
    from triton.runtime import interpreter as interp

    from pact_fast.kernels.registry import interpreting

    if not interpreting():
        raise RuntimeError("count_executed needs TRITON_INTERPRET=1 set before triton is imported")
    _check_interpreter_api(interp)
    builder_cls = interp.InterpreterBuilder

    counts = Counts()
    current = []  # stack of kernel names being launched
    originals = {name: getattr(builder_cls, name) for name in list(_COUNTED) + list(_UNCOUNTED)
                 if hasattr(builder_cls, name)}
    orig_run = interp.InterpretedFunction.run

    def owner():
        if not current:
            raise RuntimeError("count_executed: a memory op ran outside any kernel launch")
        return current[-1]

    def masked_bytes(a):
        return int(a["mask"].data.sum()) * _element_bytes(a.get("ptrs", a.get("ptr")))

    def dot_flops(a):
        *batch, m, k = a["a"].data.shape
        batch_size = 1
        for s in batch:
            batch_size *= s
        return 2 * batch_size * m * a["b"].data.shape[-1] * k

    rules = {  # name -> (flops, bytes) of one call, from its bound arguments
        "create_masked_load": lambda a: (0, masked_bytes(a)),
        "create_masked_store": lambda a: (0, masked_bytes(a)),
        "create_dot": lambda a: (dot_flops(a), 0),
        "create_atomic_rmw": lambda a: (0, 2 * masked_bytes(a)),  # a load and a store per true element
        "create_atomic_cas": lambda a: (0, 2 * int(a["ptr"].data.size) * _element_bytes(a["ptr"])),
    }

    def counted(name):
        original, rule = originals[name], rules[name]
        signature = inspect.signature(original)

        def wrapper(self, *args, **kwargs):
            flops, nbytes = rule(signature.bind(self, *args, **kwargs).arguments)
            counts.add(owner(), flops=flops, nbytes=nbytes)
            return original(self, *args, **kwargs)
        return wrapper

    def uncounted(name):
        def refuse(self, *args, **kwargs):
            raise RuntimeError(f"count_executed: {name} is not modelled; add a counting rule to bench/roofline.py")
        return refuse

    def run(self, *args, grid, warmup, **kwargs):
        current.append(kernel_cost_name(self))
        counts.setdefault(current[-1], [0, 0])
        try:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            current.pop()

    patches = {**{name: counted(name) for name in _COUNTED},
               **{name: uncounted(name) for name in _UNCOUNTED if name in originals}}
    gemm_mode = _TorchGemmCounter(counts) if count_torch_gemms else contextlib.nullcontext()
    try:
        for name, fn in patches.items():
            setattr(builder_cls, name, fn)
        interp.InterpretedFunction.run = run
        with gemm_mode:
            yield counts
    finally:
        for name, fn in originals.items():
            setattr(builder_cls, name, fn)
        interp.InterpretedFunction.run = orig_run


class _TorchGemmCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten GEMMs at compulsory bytes: 2*M*N*K FLOPs; every tensor operand and the output once."""

    _GEMMS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
              "aten.mm.out", "aten.addmm.out", "aten.addmm_.default"}

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name in self._GEMMS:
            a, b = (args[0], args[1]) if "mm" in name and "add" not in name else (args[1], args[2])
            *batch, m, k = a.shape
            n = b.shape[-1]
            batch_size = 1
            for s in batch:
                batch_size *= s
            tensors = [t for t in args if isinstance(t, torch.Tensor)]
            result = out if isinstance(out, torch.Tensor) else kwargs.get("out")
            nbytes = sum(t.numel() * t.element_size() for t in tensors) + result.numel() * result.element_size()
            self.counts.add(TORCH_GEMM, flops=2 * batch_size * m * n * k, nbytes=nbytes)
        return out


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

W_LOGPROB = {"W-logprob-H2048": dict(N=32768, H=2048, V=151936), "W-logprob-H4096": dict(N=32768, H=4096, V=151936)}
BF16 = 2

# The Triton kernels before issue 11 (64x128x64 tiles, fp32 accumulators read-modify-written in HBM),
# by their formulas, which the interpreter counts matched exactly at commit ba13c6a; kept as
# data so README can show before/after. g_ent given, no bias. Extra memory: fp32 dX and dW.
BEFORE = {
    "W-logprob-H2048": {"kernels": {"linear_logprobs.fwd": (20_392_504_721_408, 477_949_984_768),
                                    "linear_logprobs.dx": (40_785_009_442_816, 1_433_848_774_656),
                                    "linear_logprobs.dw": (40_785_009_442_816, 1_912_730_812_416)},
                        "extra_memory_bytes": 32768 * 2048 * 4 + 151936 * 2048 * 4},
    "W-logprob-H4096": {"kernels": {"linear_logprobs.fwd": (40_785_009_442_816, 955_899_314_176),
                                    "linear_logprobs.dx": (81_570_018_885_632, 2_867_696_762_880),
                                    "linear_logprobs.dw": (81_570_018_885_632, 3_824_528_130_048)},
                        "extra_memory_bytes": 32768 * 4096 * 4 + 151936 * 4096 * 4},
}


def ideal_logprob_ms(N, V, H, device, gemms=3):
    """``gemms`` bare bf16 GEMMs of 2NVH FLOPs each at compulsory bytes: 3 for fwd+bwd (logits, dX, dW),
    1 for the forward (logits)."""
    dev = DEVICES[device]
    gemm_bytes = [(N * H + V * H + N * V) * BF16, (N * V + V * H + N * H) * BF16, (N * V + N * H + V * H) * BF16]
    return sum(1e3 * max(2 * N * V * H / dev.flops, b / dev.bandwidth) for b in gemm_bytes[:gemms])


def _kernel_detail(costs, device):
    out = []
    for name, (flops, nbytes) in aggregate_by_name(costs).items():
        out.append({"kernel": name, "flops": flops, "bytes": nbytes,
                    "intensity": flops / nbytes if nbytes else float("inf"),
                    "predicted_ms": predict_ms([c for c in costs if c.kernel == name], device)})
    return out


def aggregate_by_name(costs):
    """{KernelCost name: (flops, bytes)} summed over a list of KernelCost, in first-seen order."""
    out = defaultdict(lambda: [0, 0])
    for c in costs:
        out[c.kernel][0] += c.flops
        out[c.kernel][1] += c.bytes
    return {k: tuple(v) for k, v in out.items()}


def model_row(workload, op, device, costs, ideal_ms, extra_memory_bytes, **extra):
    """One table row for any op: its KernelCost list on a device against an ideal time (ms)."""
    pred = predict_ms(costs, device)
    return {"workload": workload, "op": op, "device": device, "predicted_ms": pred, "ideal_ms": ideal_ms,
            "ratio": pred / ideal_ms, "extra_memory_bytes": extra_memory_bytes,
            "kernels": _kernel_detail(costs, device), "label": "model", **extra}


def logprob_rows(workload, N, V, H, devices=("H100", "H200"), has_gent=True):
    """Model rows of linear_logprobs (bf16, no bias) at any shape: "linear_logprobs fwd" against one GEMM,
    "linear_logprobs fwd+bwd" against three; plus the pre-issue-11 kernels where BEFORE has the workload."""
    from pact_fast.kernels import linear_logprobs_launch as launch
    from pact_fast.kernels.registry import KernelCost

    shape = {"N": N, "V": V, "H": H, "dtype": "bf16"}
    extra = launch.extra_memory_bytes(N, V, H, torch.bfloat16)
    rows = []
    for device in devices:
        for op, passes, gemms in (("linear_logprobs fwd", ("fwd",), 1), ("linear_logprobs fwd+bwd", ("fwd", "bwd"), 3)):
            costs = launch.kernel_costs(N, V, H, torch.bfloat16, has_bias=False, has_gent=has_gent, passes=passes)
            rows.append(model_row(workload, op, device, costs, ideal_logprob_ms(N, V, H, device, gemms), extra,
                             shape=shape))
        if workload in BEFORE:
            before = [KernelCost(k, f, b) for k, (f, b) in BEFORE[workload]["kernels"].items()]
            rows.append(model_row(workload, "linear_logprobs fwd+bwd (before issue 11)", device, before,
                             ideal_logprob_ms(N, V, H, device), BEFORE[workload]["extra_memory_bytes"], shape=shape))
    return rows


# Issue 11's model of the tree-attention kernels before it (H100 only, no per-kernel split recorded): 64x64 tiles,
# one query head per program, dq recomputing QK^T and dO V^T in its own kernel.
GROUP_BEFORE = {"H100": {"predicted_ms": 16.3, "ideal_ms": 5.0}}


def w_group_layout():
    """(subtree_end [1, L] int32, HQ, HKV, D): the packed token trie of one W-group (SPEC section 6:
    P=4k, T=2k, U=16, E=2k, G=8, R=1k; L = 24,592) and the heads of its Qwen3-1.7B-shaped model."""
    from bench_group import WORKLOADS, make_group

    from pact_fast.packing import pack_tree

    w = WORKLOADS["W-group"]
    seqs, _ = make_group(w)
    return pack_tree(seqs).subtree_end[None].to(torch.int32), w["heads"], w["kv_heads"], w["head_dim"]


def _group_rows(devices):
    """One W-group layer of tree attention, fwd+bwd, bf16, against its visible-pairs ideal (2 matmuls forward,
    5 backward over visible pairs, compulsory bytes once): the launcher's model
    (``kernels/tree_attention_launch.kernel_costs``) for each dq mode, and issue 11's figures for the kernels
    before it."""
    from pact_fast.kernels import tree_attention_launch as launch

    ends, HQ, HKV, D = w_group_layout()
    shape = {"L": ends.shape[1], "HQ": HQ, "HKV": HKV, "D": D, "dtype": "bf16"}
    ideal = launch.ideal_costs(ends, HQ, HKV, D, torch.bfloat16)
    rows = []
    for device in devices:
        if device in GROUP_BEFORE:
            before = GROUP_BEFORE[device]
            rows.append({"workload": "W-group-layer", "op": "tree_attention fwd+bwd (before issue 11)",
                         "device": device, **before, "ratio": before["predicted_ms"] / before["ideal_ms"],
                         "extra_memory_bytes": None, "kernels": [], "label": "model", "shape": shape,
                         "note": "figures from issue 11's model of the kernels before it"})
        for dq_mode, op in (("split", "tree_attention fwd+bwd"), ("atomic", "tree_attention fwd+bwd (dq atomics)")):
            costs = launch.kernel_costs(ends, HQ, HKV, D, torch.bfloat16, dq_mode=dq_mode)
            rows.append(model_row("W-group-layer", op, device, costs, predict_ms(ideal, device),
                                  launch.extra_memory_bytes(ends, HQ, D, dq_mode=dq_mode), shape=shape))
    return rows


def fused_head_rows(workload, N, V, H, devices=("H100", "H200")):
    """Model rows of the Triton backend of fused_pact_head (bf16, no bias, no row over the shift limit)
    against three GEMMs: "fused_pact_head fwd+bwd" (no entropy bonus: one read and write of the logits)
    and "... (entropy or fp16)" (the entropy bonus or fp16 inputs take the ordinary epilogue: a read for the
    statistics, a read and a write for the gradient). The upstream gradients from pact_loss between the
    passes are not modelled."""
    from pact_fast.kernels import fused_pact_head_launch as launch

    shape = {"N": N, "V": V, "H": H, "dtype": "bf16"}
    rows = []
    for device in devices:
        for op, want_entropy in (("fused_pact_head fwd+bwd", False),
                                 ("fused_pact_head fwd+bwd (entropy or fp16)", True)):
            costs = launch.kernel_costs(N, V, H, torch.bfloat16, has_bias=False, want_entropy=want_entropy)
            rows.append(model_row(workload, op, device, costs, ideal_logprob_ms(N, V, H, device),
                                  launch.extra_memory_bytes(N, V, H, torch.bfloat16, want_entropy=want_entropy),
                                  shape=shape))
    return rows


def model_rows(devices=("H100", "H200")):
    """Every workload and op the model covers, one dict per (workload, op, device); see the module doc."""
    rows = []
    for workload, shape in W_LOGPROB.items():
        rows += logprob_rows(workload, shape["N"], shape["V"], shape["H"], devices)
        rows += fused_head_rows(workload, shape["N"], shape["V"], shape["H"], devices)
    return rows + _group_rows(devices)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows):
    print("Performance model (predicted, not measured): max(FLOPs/F, bytes/B) per launch, summed.")
    print(f"{'workload':18} {'op':42} {'dev':5} {'pred ms':>9} {'ideal ms':>9} {'ratio':>6} {'extra MB':>9}")
    for r in rows:
        extra = None if r["extra_memory_bytes"] is None else r["extra_memory_bytes"] / 2**20
        print(f"{r['workload']:18} {r['op']:42} {r['device']:5} {_fmt(r['predicted_ms'], '9.2f')} "
              f"{_fmt(r['ideal_ms'], '9.2f')} {_fmt(r['ratio'], '6.3f')} {_fmt(extra, '9.1f')}")
        for k in r["kernels"]:
            print(f"{'':20}{k['kernel']:40} {k['flops'] / 1e12:8.2f} TFLOP {k['bytes'] / 1e9:9.2f} GB "
                  f"{k['intensity']:8.1f} FLOP/B {k['predicted_ms']:9.2f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write {'rows': [...], 'devices': ...} here")
    args = ap.parse_args(argv)
    rows = model_rows()
    print_table(rows)
    if args.json:
        doc = {"rows": rows, "devices": {k: vars(v) for k, v in DEVICES.items()},
               "note": "performance model (bench/roofline.py), not measurements"}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
