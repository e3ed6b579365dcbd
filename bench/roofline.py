"""Performance model: speed of every kernel without a GPU (SPEC section 7). Every figure is a prediction.

Two models over the same counts. Work model: a launch costs ``max(flops / F, bytes / B)``, an op the sum
(``predict_ms``). FLOPs are tensor-core FLOPs (2*M*N*K per ``tl.dot`` executed); bytes are the global-memory
bytes of every ``tl.load`` / ``tl.store`` executed, masked-off elements excluded; a cuBLAS GEMM (``torch.mm`` /
``addmm``) at its compulsory bytes. The formulas live beside each launcher (``kernel_costs(...)``);
``count_executed()`` counts what the Triton interpreter really executes so tests/test_roofline*.py hold them equal.

Time model (``predict_time_ms``): a launch costs ``max(compute, memory, issue) + launch overhead`` at the
efficiency classes stated once in ``CLASSES`` (sources in ``SOURCES``): cuBLAS GEMMs by their waves of tiles on
the SMs, Triton attention forward / backward rates, the issue term of each Triton kernel from its sm_90a SASS
(bench/sass.py: warp-instructions per element of its hot loop), and every torch kernel the public op launches
beside them (``count_executed(torch_ops=True)`` driven through ``pact_fast.ops.*``; it raises on an aten op it
has no rule for), probed at small shapes and stored (``--probe``), scaled to the workload. Memory is printed in
MiB = 2^20 bytes, traffic in GiB = 2^30.

    python bench/roofline.py                                    # table, labelled as a model
    python bench/roofline.py --json bench/results/roofline.json # also the rows as JSON
    python bench/roofline.py --stored-sass                      # issue term from the stored SASS table
    python bench/roofline.py --readme                           # README's tables (Markdown)
    python bench/roofline.py --step                             # then the whole W-group step (bench/step_model.py)
    TRITON_INTERPRET=1 python bench/roofline.py --probe         # recount the torch kernels of each public op

API for other tools: ``DEVICES``, ``CLASSES``, ``predict_ms(costs, device)``, ``predict_time_ms(launches, device)``,
``launch_terms``, ``count_executed()``, ``aggregate(costs)``, ``model_rows(devices, table)`` (every row of the
table), ``VARIANTS`` (one line per row kind), ``variant_rows``, ``logprob_rows(workload, N, V, H, devices)``,
``fused_head_rows(...)``, ``ideal_logprob_ms``, ``attention_ideal_launches``, ``w_group_layout()``,
``model_row(workload, op, device, costs, ideal_ms, extra_memory_bytes, launches, ideal_launches, syncs)``.
Each row: workload, op, device; work model: predicted_ms, ideal_ms, ratio (= work_ratio); time model:
predicted_time_ms, ideal_time_ms, time_ratio (None for rows kept from older models), time_split_ms,
launch_count, host_syncs; extra_memory_bytes; kernels (per kernel: flops, bytes, intensity, predicted_ms, and
predicted_time_ms, launches, bound, warp_instructions_per_element); label "model".
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

from pact_fast.kernels.registry import GEMM_TILE, gemm_waves, interpreting  # noqa: E402  (as the launchers plan)


@dataclass(frozen=True)
class Device:
    """What the models assume of a GPU. Work model: ``flops`` (achieved dense bf16 tensor-core rate, FLOP/s) and
    ``bandwidth`` (achieved HBM, byte/s). Time model also: the dense bf16 peak, SMs and a sustained clock (the
    issue rate is ``sms * ISSUE_PER_SM_CLOCK * clock_hz`` warp-instructions per second)."""

    flops: float
    bandwidth: float
    peak_flops: float = 989e12
    sms: int = 132
    clock_hz: float = 1.755e9


DEVICES = {"H100": Device(700e12, 3.0e12), "H200": Device(700e12, 4.3e12)}
TORCH_GEMM = "torch.mm"  # every cuBLAS GEMM the count harness sees is reported under this name
MIB, GIB = 2 ** 20, 2 ** 30  # every memory figure this module prints: MiB = 2^20 bytes, traffic in GiB = 2^30


def launch_ms(cost, device):
    """Work model: milliseconds of one KernelCost on a device name ("H100") or Device, max(FLOPs/F, bytes/B)."""
    dev = DEVICES[device] if isinstance(device, str) else device
    return 1e3 * max(cost.flops / dev.flops, cost.bytes / dev.bandwidth)


def predict_ms(costs, device):
    """Work model: milliseconds of a list of KernelCost, the sum of each launch's max(FLOPs/F, bytes/B)."""
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
    """{kernel name: [flops, bytes]} accumulated while ``count_executed`` is active; ``launches`` {kernel name:
    launches} and ``syncs`` (host synchronisations: ``.item()``, ``nonzero``, ``unique``...) beside it."""

    def __init__(self):
        super().__init__()
        self.launches = defaultdict(int)
        self.syncs = 0

    def add(self, name, flops=0, nbytes=0, launches=0):
        acc = self.setdefault(name, [0, 0])
        acc[0] += int(flops)
        acc[1] += int(nbytes)
        self.launches[name] += launches

    def as_tuples(self):
        return {k: (v[0], v[1]) for k, v in self.items()}


@contextlib.contextmanager
def count_executed(count_torch_gemms=True, torch_ops=False):
    """Count tensor-core FLOPs and global-memory bytes of every Triton kernel run under TRITON_INTERPRET=1.

    Yields a ``Counts`` dict ``{kernel name: [flops, bytes]}`` (and its ``launches``). Triton kernels are
    named by ``kernel_cost_name``; cuBLAS GEMMs (aten mm / addmm / bmm / baddbmm), when ``count_torch_gemms``,
    under ``"torch.mm"`` at compulsory bytes (inputs, including an addmm's C, and the output once).
    ``torch_ops``: also every other aten op, inside the ``pact_fast::`` custom ops too (``_TorchOpCounter``):
    each kernel-launching op under ``"torch.<op>"`` with the bytes of its tensors, views free, host
    synchronisations in ``counts.syncs`` (``Tensor.tolist`` too, which reads host data without an aten op); an
    op it has no rule for raises RuntimeError, so what a public op launches is never left uncounted. Raises
    RuntimeError if Triton is not interpreting or the interpreter's builder API is not the one this harness
    wraps (it never silently counts zero).
    """
    from triton.runtime import interpreter as interp

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
        counts.add(current[-1], launches=1)
        try:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            current.pop()

    patches = {**{name: counted(name) for name in _COUNTED},
               **{name: uncounted(name) for name in _UNCOUNTED if name in originals}}
    orig_tolist = torch.Tensor.tolist

    def tolist(self):  # reads the tensor on the host without an aten op the dispatch mode would see
        if not current:
            counts.syncs += 1
        return orig_tolist(self)

    if torch_ops:
        gemm_mode = _TorchOpCounter(counts, in_kernel=lambda: bool(current))
        patches_tensor = {"tolist": tolist}
    else:
        gemm_mode = _TorchGemmCounter(counts) if count_torch_gemms else contextlib.nullcontext()
        patches_tensor = {}
    try:
        for name, fn in patches.items():
            setattr(builder_cls, name, fn)
        for name, fn in patches_tensor.items():
            setattr(torch.Tensor, name, fn)
        interp.InterpretedFunction.run = run
        with gemm_mode:
            yield counts
    finally:
        for name, fn in originals.items():
            setattr(builder_cls, name, fn)
        torch.Tensor.tolist = orig_tolist
        interp.InterpretedFunction.run = orig_run


def _gemm_cost(name, args, kwargs, out):
    """(flops, bytes) of an aten GEMM at compulsory bytes: 2*M*N*K FLOPs; every tensor operand and the output once."""
    a, b = (args[0], args[1]) if "mm" in name and "add" not in name else (args[1], args[2])
    *batch, m, k = a.shape
    n = b.shape[-1]
    batch_size = 1
    for s in batch:
        batch_size *= s
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    result = out if isinstance(out, torch.Tensor) else kwargs.get("out")
    nbytes = sum(t.numel() * t.element_size() for t in tensors) + result.numel() * result.element_size()
    return 2 * batch_size * m * n * k, nbytes


_GEMMS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default", "aten.mm.out",
          "aten.bmm.out", "aten.addmm.out", "aten.addmm_.default"}


class _TorchGemmCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten GEMMs at compulsory bytes (``_gemm_cost``); every other op passes uncounted."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if str(func) in _GEMMS:
            flops, nbytes = _gemm_cost(str(func), args, kwargs, out)
            self.counts.add(TORCH_GEMM, flops=flops, nbytes=nbytes, launches=1)
        return out


# The torch ops the model knows, by aten name without overload. Views and allocations launch no kernel; the
# rest launch one each, priced at the bytes of their tensors (read and written once, memory-bound); every op
# tagged pointwise is such a kernel too. Host synchronisations also count in Counts.syncs.
TORCH_FREE = frozenset("""view _unsafe_view reshape _reshape_alias t transpose permute expand slice select unsqueeze
squeeze as_strided detach alias lift_fresh split split_with_sizes unbind narrow diagonal unfold empty empty_like
empty_strided new_empty new_empty_strided resize_ set_ sym_size sym_stride sym_numel item""".split())
TORCH_KERNELS = frozenset("""sum mean amax amin max min logsumexp prod any all argmax argmin cumsum norm
linalg_vector_norm var std count_nonzero _softmax _log_softmax _softmax_backward_data _log_softmax_backward_data
full zeros ones zeros_like ones_like full_like fill fill_ zero_ arange scalar_tensor new_zeros new_ones new_full
rand rand_like randn randint bernoulli bernoulli_ copy_ _to_copy clone cat stack index_select index_copy index_copy_
index_put index_put_ _index_put_impl_ index gather scatter scatter_ scatter_add scatter_add_ masked_fill masked_fill_
index_add_ index_add embedding repeat flip roll where scatter_reduce scatter_reduce_ index_reduce bincount sort topk
searchsorted isin lift_fresh_copy slice_scatter select_scatter as_strided_scatter index_fill index_fill_ cumprod
random_ uniform_ normal_ exponential_ masked_scatter embedding_dense_backward copy constant_pad_nd
_assert_async""".split())  # _assert_async: a device-side check (one small kernel, no host synchronisation)
TORCH_SYNCS = frozenset("_local_scalar_dense nonzero _unique2 unique_dim unique_consecutive masked_select is_nonzero "
                        "equal".split())


def flat_tensors(value):
    """The tensors in ``value`` (a tensor, or lists / tuples of them, nested), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat_tensors(v)]
    return []


def _custom_impl(func):
    """The Python implementation behind a ``pact_fast::`` custom op (its aten ops are what it launches)."""
    from torch._library import custom_ops

    opdef = custom_ops.OPDEFS.get(f"{func.namespace}::{func._opname}")
    if opdef is None:
        raise RuntimeError(f"count_executed: cannot see inside the custom op {func}; update bench/roofline.py")
    return opdef._init_fn


class _TorchOpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every aten op a public op runs (``count_executed(torch_ops=True)``); raises on an op it does not
    model. Ops run by the Triton interpreter inside a kernel launch (``in_kernel()``) are that kernel's own."""

    def __init__(self, counts, in_kernel):
        super().__init__()
        self.counts = counts
        self.in_kernel = in_kernel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_kernel():
            return func(*args, **kwargs)
        if func.namespace == "pact_fast":
            with self:
                return _custom_impl(func)(*args, **kwargs)
        if func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:  # e.g. aten.to: the ops it decomposes into are the kernels
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        name = str(func)
        packet = func._opname
        if name in _GEMMS:
            flops, nbytes = _gemm_cost(name, args, kwargs, out)
            self.counts.add(TORCH_GEMM, flops=flops, nbytes=nbytes, launches=1)
        elif packet in TORCH_FREE:
            pass
        elif packet in TORCH_KERNELS or packet in TORCH_SYNCS or torch.Tag.pointwise in func.tags:
            nbytes = sum(t.numel() * t.element_size() for t in flat_tensors(list(args) + list(kwargs.values())) +
                         flat_tensors(out))
            self.counts.add(f"torch.{packet}", nbytes=nbytes, launches=1)
            bool_index = packet == "index" and any(t.dtype == torch.bool for t in flat_tensors(args[1:]))
            self.counts.syncs += packet in TORCH_SYNCS or bool_index  # a mask index is a nonzero on the device
        else:
            raise RuntimeError(f"count_executed: the torch op {name} is not modelled; give it a rule in "
                               "bench/roofline.py (TORCH_FREE, TORCH_KERNELS or TORCH_SYNCS)")
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


# ---------------------------------------------------------------------------------------------
# Time model: efficiency classes, stated once; a launch's time = max(compute, memory, issue) + launch overhead
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Classes:
    """The efficiency classes of the time model (all predictions until a GPU run calibrates them; the GPU suite
    prints each measured time beside the predicted one for that). Sources: ``SOURCES``."""

    gemm_fraction: float = 700 / 989  # cuBLAS bf16, full waves of large tiles: 700 of the 989 TFLOP/s dense peak
    gemm_tile: tuple = GEMM_TILE  # output tile (rows, columns) of cuBLAS's Hopper bf16 GEMMs (as the launchers plan)
    attention_fwd_flops: float = 400e12  # Triton attention forward, FLOP/s (350-500 measured on H100)
    attention_bwd_flops: float = 300e12  # Triton attention backward, FLOP/s (250-350 on H100)
    issue_per_sm_clock: int = 4  # warp-instructions per SM per clock: 4 schedulers, one each
    launch_s: float = 4.5e-6  # per kernel launch (4-5 us from the host, eager PyTorch / Triton)


CLASSES = Classes()
SOURCES = {
    "gemm_fraction": "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16; 700 (71%) is this project's assumption "
                     "for large cuBLAS bf16 GEMMs since issue 11, not measured here",
    "gemm_tile": "NVIDIA Deep Learning Performance guide, 'Matrix Multiplication Background User's Guide': tile "
                 "and wave quantization (one output tile per SM per wave; a partial last wave costs a whole one); "
                 "128x256 is an assumed tile, cuBLAS picks its own",
    "attention": "issue 24: Triton attention without spills reaches ~350-500 TFLOP/s forward and 250-350 "
                 "backward on H100 (in line with the H100 baselines of the FlashAttention-3 paper, Shah et al. "
                 "2024); the middles of those ranges are taken",
    "issue": "NVIDIA H100 whitepaper: 132 SMs, 4 SM partitions each with a warp scheduler issuing one warp-"
             "instruction per clock; 1.755 GHz is an assumed sustained clock (max boost 1.98 GHz)",
    "launch_s": "issue 24: a kernel launch costs ~4-5 us of host time in eager PyTorch",
    "bandwidth": "H100 SXM HBM3 3.35 TB/s and H200 HBM3e 4.8 TB/s peak (datasheets); 3.0 and 4.3 assumed achieved",
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the time model prices it. ``kind``: "gemm" (cuBLAS, needs ``gemm`` = (m, n, k)),
    "attention_fwd" / "attention_bwd" (Triton kernels with tensor-core FLOPs), "epilogue" (Triton, memory or
    issue bound), "torch" (an aten kernel: memory bound). ``elements`` x ``per_element`` warp-instructions is the
    issue term (0 when the kernel's SASS is not read, e.g. cuBLAS and torch kernels)."""

    kernel: str
    flops: int
    bytes: int
    kind: str
    gemm: tuple = None
    elements: int = 0
    per_element: float = 0.0


def gemm_efficiency(m, n, device, classes=CLASSES, batch=1):
    """Fraction of the dense peak a cuBLAS GEMM with an [m, n] output (``batch`` of them in one batched launch)
    reaches: ``gemm_fraction`` times the useful share of its tile waves, batch*m*n / (waves * SMs * tile),
    waves = ceil(batch * tiles / SMs)."""
    dev = DEVICES[device] if isinstance(device, str) else device
    tm, tn = classes.gemm_tile
    waves = gemm_waves(m, n, dev.sms, batch, classes.gemm_tile)
    return classes.gemm_fraction * batch * m * n / (waves * dev.sms * tm * tn)


def launch_terms(launch, device, classes=CLASSES):
    """{compute, memory, issue, launch, total} seconds of one Launch: total = max of the first three + launch."""
    dev = DEVICES[device] if isinstance(device, str) else device
    if launch.kind == "gemm":
        rate = dev.peak_flops * gemm_efficiency(*launch.gemm[:2], dev, classes, *launch.gemm[3:])
    elif launch.kind in ("attention_fwd", "attention_bwd"):
        rate = getattr(classes, launch.kind + "_flops")
    elif launch.kind in ("epilogue", "torch"):
        rate = None
    else:
        raise ValueError(f"time model: unknown launch kind {launch.kind!r}")
    if rate is None and launch.flops:
        raise ValueError(f"time model: {launch.kernel} has tensor-core FLOPs but kind {launch.kind!r}")
    terms = {"compute": launch.flops / rate if rate else 0.0, "memory": launch.bytes / dev.bandwidth,
             "issue": launch.elements * launch.per_element / (dev.sms * classes.issue_per_sm_clock * dev.clock_hz),
             "launch": classes.launch_s}
    terms["total"] = max(terms["compute"], terms["memory"], terms["issue"]) + terms["launch"]
    return terms


def predict_time_ms(launches, device, classes=CLASSES):
    """Time model: milliseconds of a list of Launch, each max(compute, memory, issue) + launch overhead."""
    return 1e3 * sum(launch_terms(x, device, classes)["total"] for x in launches)


def _recording_gemm_cost(modules):
    """Patch ``gemm_cost`` of each of ``modules`` to record each GEMM's (m, n, k, batch) by the KernelCost it
    returns.
    Returns (restore, shapes): call ``restore()`` to put the originals back."""
    shapes = {}
    originals = {m: m.gemm_cost for m in modules}

    def recorder(original):
        def record(tag, m, n, k, c_elems, elem_bytes, batch=1):
            cost = original(tag, m, n, k, c_elems, elem_bytes, batch)
            shapes[id(cost)] = (m, n, k, batch)
            return cost
        return record

    for m, original in originals.items():
        m.gemm_cost = recorder(original)

    def restore():
        for m, original in originals.items():
            m.gemm_cost = original

    return restore, shapes


def _variant(name):
    """``"fused_pact_head.pass[shift]"`` -> ``"shift"``: the gate entries a KernelCost's launch is one of (their
    names contain it); "" for a plain name, priced at the costliest entry of its family."""
    return name.split("[", 1)[1].rstrip("]") if "[" in name else ""


def epilogue_launches(module, table, *args, **kwargs):
    """[Launch] of a GEMM + epilogue launcher (``module.kernel_costs(*args, **kwargs)``): GEMMs with their shapes,
    each Triton kernel handling the output (batch x m x n) of the GEMM launched just before it (the logits of a
    block or slab; the fused head's dX, or its partial products when split: a GEMM of the same [m, n] right after
    another adds into its output, as the split's remainder does), at the warp-instructions per element of its SASS
    (``table``; a tagged cost, e.g. ``fused_pact_head.pass[shift]``, at the entries of that variant). GEMMs priced
    by ``linear_logprobs_launch`` (the fused head's memory_lean recompute) are recorded too."""
    import sass

    from pact_fast.kernels import linear_logprobs_launch

    restore, shapes = _recording_gemm_cost({module, linear_logprobs_launch})
    try:
        costs = module.kernel_costs(*args, **kwargs)
    finally:
        restore()
    out, tile, last = [], None, None
    for c in costs:
        if id(c) in shapes:
            shape = shapes[id(c)]
            if last is None or shape[:2] != last[:2]:  # not a GEMM adding into the one before it
                tile = shape
            last = shape
            out.append(Launch(c.kernel, c.flops, c.bytes, "gemm", gemm=shape))
            continue
        last = None
        if c.flops or tile is None:
            raise ValueError(f"time model: {c.kernel} is not an epilogue after a GEMM; price it explicitly")
        out.append(Launch(c.kernel, 0, c.bytes, "epilogue", elements=tile[0] * tile[1] * tile[3],
                          per_element=sass.per_element(table, kernel_family(c.kernel), _variant(c.kernel))))
    return out


def attention_launches(table, subtree_end, HQ, HKV, D, dtype=torch.bfloat16, **kwargs):
    """[Launch] of tree attention (``tree_attention_launch.kernel_costs``): score elements from each kernel's
    FLOPs (2 matmuls of BLOCK_D per score forward, 3 in dq, 4 in dk/dv or 5 with dq atomics), rows x D for
    delta and cast; issue per element from the SASS of the gate entry this launch uses (head dim, stacked heads,
    dq mode)."""
    import sass
    import triton

    from pact_fast.kernels import tree_attention_launch as launch

    BD = max(16, triton.next_power_of_2(D))
    B, L = subtree_end.shape
    atomic = kwargs.get("dq_mode") == "atomic"
    heads = launch.heads_per_program(HQ // HKV)
    entries = {"tree_attention.fwd": f"tree_attention.fwd[bf16-d{D}-heads{heads}]",
               "tree_attention.dq": f"tree_attention.dq[bf16-d{D}-heads{heads}]",
               "tree_attention.dkdv": f"tree_attention.dkdv[bf16-d{D}{'-atomic' if atomic else ''}]",
               "tree_attention.delta": f"tree_attention.delta[bf16-d{D}]",
               "tree_attention.cast": "tree_attention.cast[bf16]"}
    matmuls = {"tree_attention.fwd": 2, "tree_attention.dq": 3, "tree_attention.dkdv": 5 if atomic else 4}
    out = []
    for c in launch.kernel_costs(subtree_end, HQ, HKV, D, dtype, **kwargs):
        name = kernel_family(c.kernel)
        if name in matmuls:
            kind = "attention_fwd" if name == "tree_attention.fwd" else "attention_bwd"
            elements = c.flops // (2 * matmuls[name] * BD)
        else:
            kind, elements = "epilogue", B * HQ * L * D
        out.append(Launch(c.kernel, c.flops, c.bytes, kind, elements=elements,
                          per_element=sass.entry_per_element(table, entries[name])))
    return out


def gemm_launches(shapes, dtype_bytes=BF16):
    """[Launch] of bare cuBLAS GEMMs [(m, n, k)] at compulsory bytes (the ideals)."""
    return [Launch(TORCH_GEMM, 2 * m * n * k, (m * k + k * n + m * n) * dtype_bytes, "gemm", gemm=(m, n, k))
            for m, n, k in shapes]


# ---------------------------------------------------------------------------------------------
# The torch kernels around the Triton ones: counted through the public ops, stored, scaled to a workload
# ---------------------------------------------------------------------------------------------

TORCH_OPS = ROOT / "bench" / "results" / "roofline_torch_ops.json"
TORCH_OPS_NAME = "torch ops"  # the Launch name (and kernels row) of the torch kernels around the modelled ones


def _probe_logprob(passes, blocks, weight_grad=True):
    """(counts, {"rows": N}) of one linear_logprobs call (fp32, N=24, V=96, H=16) at (row blocks, slabs);
    ``weight_grad`` False: a frozen weight (``requires_grad`` False), as a frozen lm_head calls it."""
    from pact_fast.ops import linear_logprobs

    N, V, H = 24, 96, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(weight_grad)
    t = torch.randint(0, V, (N,), generator=g)
    grad = torch.randn(N, generator=g)
    chunk = N // blocks[0]
    with count_executed(torch_ops=True) as counts:
        logp = linear_logprobs(x, w, t, backend="triton", chunk_rows=chunk, vocab_slab=V // blocks[1])
        if "bwd" in passes:
            torch.autograd.backward(logp, grad)
    return counts, {"rows": N, "row_blocks": blocks[0]}


def _probe_head(passes, blocks, weight_grad=True, memory_lean=False):
    """(counts, {"rows": N}) of one fused_pact_head forward+backward (fp32, a 36-row PACT micro-batch of
    bench_fused_pact_head's layout, default PACTLossConfig) in ``blocks[0]`` row blocks; ``weight_grad`` False:
    a frozen lm_head (``requires_grad`` False); ``memory_lean`` as the op takes it."""
    import bench_fused_pact_head as head

    from pact_fast.losses import PACTLossConfig
    from pact_fast.ops import fused_pact_head

    hidden, weight, targets, rows, batch = head.make_inputs(B=2, T=6, S=1, E=12, H=16, V=96,
                                                            dtype=torch.float32, device="cpu")
    N = hidden.shape[0]
    weight.requires_grad_(weight_grad)
    with count_executed(torch_ops=True) as counts:
        loss, _ = fused_pact_head(hidden, weight, targets, rows, batch, PACTLossConfig(), 0.3, backend="triton",
                                  chunk_rows=-(-N // blocks[0]), memory_lean=memory_lean)
        loss.backward()
    return counts, {"rows": N, "row_blocks": blocks[0]}


def _probe_attention(passes, blocks):
    """(counts, {"rows": L * HQ * D}) of one tree_attention forward+backward (fp32, a 3-sequence trie, 4 / 2
    heads of 16) that builds its own layout, as a call without ``layout=`` does."""
    from pact_fast.ops import tree_attention

    from pact_fast.packing import pack_tree

    ends = pack_tree([[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [1, 2, 9, 10, 11, 12, 13]]).subtree_end[None].int()
    L, HQ, HKV, D = ends.shape[1], 4, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, D, generator=g).requires_grad_() for h in (HQ, HKV, HKV))
    grad = torch.randn(1, HQ, L, D, generator=g)
    with count_executed(torch_ops=True) as counts:
        o = tree_attention(q, k, v, ends, backend="triton")
        torch.autograd.backward(o, grad)
    # scaled by L * HQ * D: right for the fills of [HQ, L, D] buffers, an upper bound for the layout's O(L) ops
    return counts, {"rows": L * HQ * D}


# probe name -> (probe, passes, whether its torch kernels may repeat per row block, (row blocks, vocabulary slabs)
# probed, the probe's keyword arguments: how the op is called)
PROBES = {
    "linear_logprobs fwd": (_probe_logprob, ("fwd",), True, ((1, 1), (2, 2)), {}),
    "linear_logprobs fwd+bwd": (_probe_logprob, ("fwd", "bwd"), True, ((1, 1), (2, 2)), {}),
    "linear_logprobs fwd+bwd frozen": (_probe_logprob, ("fwd", "bwd"), True, ((1, 1), (2, 2)),
                                       dict(weight_grad=False)),
    "fused_pact_head fwd+bwd": (_probe_head, ("fwd", "bwd"), True, ((1, 1), (2, 1)), {}),
    "fused_pact_head fwd+bwd frozen": (_probe_head, ("fwd", "bwd"), True, ((1, 1), (2, 1)), dict(weight_grad=False)),
    # (memory_lean's first-pass blocks keep their logits in dW's rows: at most H=16 rows each here)
    "fused_pact_head fwd+bwd lean": (_probe_head, ("fwd", "bwd"), True, ((3, 1), (6, 1)), dict(memory_lean=True)),
    "tree_attention fwd+bwd": (_probe_attention, ("fwd", "bwd"), False, ((1, 1),), {}),
}
_MODELLED = ("torch.mm",)  # the formulas (kernel_costs) price these and every Triton kernel of the launchers
# Triton kernels an op launches itself, around its launcher (elementwise over rows, memory-bound): priced with the
# op's torch kernels, from the same probe
OP_KERNELS = ("fused_pact_head.grads",)


def probe_torch_ops(op):
    """Count, through the public op at small shapes, the torch kernels (and ``OP_KERNELS``) it launches beyond
    the GEMMs and Triton kernels the formulas price: {"per_call": {...}, "per_unit": {...}, "rows": r} with launches, bytes and
    host synchronisations, fitted as a + b * units over the two blockings probed (units: the op's row blocks;
    per_unit all 0 for an op without them). Needs TRITON_INTERPRET=1."""
    probe, passes, unit, blockings, options = PROBES[op]
    points = []
    for blocks in blockings:
        counts, meta = probe(passes, blocks, **options)
        aux = {k: v for k, v in counts.items() if (k.startswith("torch.") and k not in _MODELLED) or k in OP_KERNELS}
        units = meta["row_blocks"] if unit else 0
        points.append((units, sum(counts.launches[k] for k in aux), sum(v[1] for v in aux.values()), counts.syncs,
                       meta["rows"]))
    (u0, n0, b0, s0, rows), last = points[0], points[-1]
    du = last[0] - u0
    per_unit = {"launches": (last[1] - n0) / du if du else 0.0, "bytes": (last[2] - b0) / du if du else 0.0,
                "syncs": (last[3] - s0) / du if du else 0.0}
    per_call = {"launches": n0 - per_unit["launches"] * u0, "bytes": b0 - per_unit["bytes"] * u0,
                "syncs": s0 - per_unit["syncs"] * u0}
    return {"per_call": per_call, "per_unit": per_unit, "rows": rows, "unit": unit,
            "points": [dict(zip(("units", "launches", "bytes", "syncs", "rows"), p)) for p in points]}


def stored_torch_ops():
    """{op: probe_torch_ops(op)} as stored in bench/results/roofline_torch_ops.json."""
    return json.loads(TORCH_OPS.read_text())["ops"]


def torch_launches(op, row_blocks, rows, stored=None):
    """[Launch] of the torch kernels ``op`` launches around its modelled ones at a workload: launches counted
    through the public op (``probe_torch_ops``, stored), a + b * row_blocks of them; their bytes scaled from the
    probe's rows to ``rows`` (an approximation: tensors of the op's rows, or of L * HQ * D for attention, small
    beside the GEMMs; the probe runs fp32), spread evenly over the launches. Returns (launches, host
    synchronisations)."""
    probe = (stored or stored_torch_ops())[op]
    n = round(probe["per_call"]["launches"] + probe["per_unit"]["launches"] * row_blocks)
    nbytes = (probe["per_call"]["bytes"] + probe["per_unit"]["bytes"] * row_blocks) * rows / probe["rows"]
    syncs = round(probe["per_call"]["syncs"] + probe["per_unit"]["syncs"] * row_blocks)
    return [Launch(TORCH_OPS_NAME, 0, int(nbytes / n), "torch") for _ in range(n)] if n else [], syncs


def ideal_logprob_ms(N, V, H, device, gemms=3):
    """``gemms`` bare bf16 GEMMs of 2NVH FLOPs each at compulsory bytes: 3 for fwd+bwd (logits, dX, dW),
    2 for fwd+bwd with a frozen weight (logits, dX), 1 for the forward (logits)."""
    dev = DEVICES[device]
    gemm_bytes = [(N * H + V * H + N * V) * BF16, (N * V + V * H + N * H) * BF16, (N * V + N * H + V * H) * BF16]
    return sum(1e3 * max(2 * N * V * H / dev.flops, b / dev.bandwidth) for b in gemm_bytes[:gemms])


def aggregate_by_name(costs):
    """{KernelCost name: (flops, bytes)} summed over a list of KernelCost, in first-seen order."""
    out = defaultdict(lambda: [0, 0])
    for c in costs:
        out[c.kernel][0] += c.flops
        out[c.kernel][1] += c.bytes
    return {k: tuple(v) for k, v in out.items()}


def _kernel_detail(costs, device, launches=None):
    """Per kernel name: FLOPs, bytes, intensity, work-model ms; with ``launches`` also the time model's ms,
    launch count and the term that bounds most of its launches."""
    out = []
    for name, (flops, nbytes) in aggregate_by_name(costs).items():
        row = {"kernel": name, "flops": flops, "bytes": nbytes, "intensity": flops / nbytes if nbytes else float("inf"),
               "predicted_ms": predict_ms([c for c in costs if c.kernel == name], device)}
        mine = [x for x in launches or () if x.kernel == name]
        if mine:
            terms = [launch_terms(x, device) for x in mine]
            bounds = [max(("compute", "memory", "issue"), key=t.get) for t in terms]
            row.update(predicted_time_ms=1e3 * sum(t["total"] for t in terms), launches=len(mine),
                       bound=max(set(bounds), key=bounds.count),
                       warp_instructions_per_element=mine[0].per_element)
        out.append(row)
    torch_ops = [x for x in launches or () if x.kind == "torch"]
    if torch_ops:
        nbytes = sum(x.bytes for x in torch_ops)
        out.append({"kernel": TORCH_OPS_NAME, "flops": 0, "bytes": nbytes, "intensity": 0.0, "predicted_ms": None,
                    "predicted_time_ms": predict_time_ms(torch_ops, device), "launches": len(torch_ops),
                    "bound": "memory", "warp_instructions_per_element": 0.0})
    return out


def _time_fields(launches, ideal_launches, device, syncs):
    """The time model's fields of a row: predicted and ideal ms, their ratio, and the predicted ms split by
    term (the bounding term of each launch; launch overheads apart)."""
    pred, ideal = predict_time_ms(launches, device), predict_time_ms(ideal_launches, device)
    split = {"compute": 0.0, "memory": 0.0, "issue": 0.0, "launch": 0.0}
    for x in launches:
        t = launch_terms(x, device)
        split[max(("compute", "memory", "issue"), key=t.get)] += 1e3 * max(t["compute"], t["memory"], t["issue"])
        split["launch"] += 1e3 * t["launch"]
    return {"predicted_time_ms": pred, "ideal_time_ms": ideal, "time_ratio": pred / ideal,
            "time_split_ms": split, "launch_count": len(launches), "host_syncs": syncs}


def model_row(workload, op, device, costs, ideal_ms, extra_memory_bytes, launches=None, ideal_launches=None,
              syncs=None, **extra):
    """One table row for any op: its KernelCost list on a device against an ideal time (ms) by the work model
    (``predicted_ms``, ``ideal_ms``, ``ratio`` = ``work_ratio``) and, given its Launch list and the ideal's, by the
    time model (``predicted_time_ms``, ``ideal_time_ms``, ``time_ratio``; else None)."""
    pred = predict_ms(costs, device)
    row = {"workload": workload, "op": op, "device": device, "predicted_ms": pred, "ideal_ms": ideal_ms,
           "ratio": pred / ideal_ms, "work_ratio": pred / ideal_ms, "extra_memory_bytes": extra_memory_bytes,
           "predicted_time_ms": None, "ideal_time_ms": None, "time_ratio": None,
           "kernels": _kernel_detail(costs, device, launches), "label": "model", **extra}
    if launches is not None:
        row.update(_time_fields(launches, ideal_launches, device, syncs))
    return row


def _accepted(fn, kwargs):
    """The keyword arguments ``fn`` takes, of ``kwargs``."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _logprob_family(table, shape, kwargs, stored):
    """(costs, launches, ideal launches, work ideal fn, extra memory, syncs) of linear_logprobs (bf16, no bias,
    with an entropy gradient) at shape N, V, H; kwargs to ``kernel_costs``."""
    from pact_fast.kernels import linear_logprobs_launch as launch

    N, V, H = shape["N"], shape["V"], shape["H"]
    args = dict(has_bias=False, has_gent=True, **kwargs)
    costs = launch.kernel_costs(N, V, H, torch.bfloat16, **args)
    launches = epilogue_launches(launch, table, N, V, H, torch.bfloat16, **args)
    passes = args.get("passes", ("fwd", "bwd"))
    weight_grad = args.get("weight_grad", True)
    probe = "linear_logprobs fwd" if tuple(passes) == ("fwd",) else \
        "linear_logprobs fwd+bwd" + ("" if weight_grad else " frozen")
    blocking = args.get("blocking") or launch.plan(N, V, H)
    aux, syncs = torch_launches(probe, -(-N // blocking.rows), N, stored)
    gemms = _ideal_gemms(N, V, H, backward="bwd" in passes, weight_grad=weight_grad)
    extra = launch.extra_memory_bytes(N, V, H, torch.bfloat16, **_accepted(launch.extra_memory_bytes, kwargs))
    return (costs, launches + aux, gemm_launches(gemms), lambda d: ideal_logprob_ms(N, V, H, d, len(gemms)), extra,
            syncs)


def _ideal_gemms(N, V, H, backward=True, weight_grad=True):
    """[(m, n, k)] of the bare GEMMs a log-prob head cannot avoid: logits; with the backward dX, and dW unless
    the weight is frozen (``weight_grad`` False: two GEMMs)."""
    return [(N, V, H)] + ([(N, H, V)] if backward else []) + ([(V, H, N)] if backward and weight_grad else [])


def _head_family(table, shape, kwargs, stored):
    """The same for the Triton fused PACT head (bf16, no bias, no row over the shift limit): row blocks of
    ``fused_pact_head_launch.plan`` (or, ``memory_lean``, ``lean_plan``'s first pass; without dW, linear_logprobs'
    blocking); the torch kernels of the op called that way (frozen weight, lean), counted through it
    (``PROBES``)."""
    from pact_fast.kernels import fused_pact_head_launch as launch
    from pact_fast.kernels import linear_logprobs_launch

    N, V, H = shape["N"], shape["V"], shape["H"]
    weight_grad, lean = kwargs.get("weight_grad", True), kwargs.get("memory_lean", False)
    costs = launch.kernel_costs(N, V, H, torch.bfloat16, has_bias=False, **kwargs)
    launches = epilogue_launches(launch, table, N, V, H, torch.bfloat16, has_bias=False, **kwargs)
    if lean and not weight_grad:
        row_blocks = -(-N // (kwargs.get("blocking") or linear_logprobs_launch.plan(N, V, H)).rows)
    elif lean:
        row_blocks = len(launch.lean_plan(N, V, H, torch.bfloat16, kwargs.get("want_entropy", False),
                                          rows_per_block=kwargs.get("rows_per_block")).head.blocks)
    else:
        row_blocks = len(launch.plan(N, V, H, torch.bfloat16, kwargs.get("want_entropy", False),
                                     weight_grad=weight_grad, rows_per_block=kwargs.get("rows_per_block"),
                                     splits=kwargs.get("splits")).blocks)
    probe = "fused_pact_head fwd+bwd" + ("" if weight_grad else " frozen") + (" lean" if lean else "")
    if probe not in (stored or stored_torch_ops()):
        raise ValueError(f"roofline: no torch-op probe {probe!r} for this fused-head variant; add it to PROBES")
    aux, syncs = torch_launches(probe, row_blocks, N, stored)
    extra = launch.extra_memory_bytes(N, V, H, torch.bfloat16, **_accepted(launch.extra_memory_bytes, kwargs))
    gemms = _ideal_gemms(N, V, H, weight_grad=weight_grad)
    return (costs, launches + aux, gemm_launches(gemms), lambda d: ideal_logprob_ms(N, V, H, d, len(gemms)), extra,
            syncs)


def _attention_family(table, shape, kwargs, stored):
    """The same for one layer of tree attention (bf16) over the layout ``shape["subtree_end"]``, against its
    visible-pairs ideal (2 matmuls forward at the forward class, 5 backward at the backward class)."""
    from pact_fast.kernels import tree_attention_launch as launch

    ends, HQ, HKV, D = shape["subtree_end"], shape["HQ"], shape["HKV"], shape["D"]
    costs = launch.kernel_costs(ends, HQ, HKV, D, torch.bfloat16, **kwargs)
    launches = attention_launches(table, ends, HQ, HKV, D, torch.bfloat16, **kwargs)
    aux, syncs = torch_launches("tree_attention fwd+bwd", 0, ends.numel() * HQ * D, stored)
    work_ideal = launch.ideal_costs(ends, HQ, HKV, D, torch.bfloat16)
    ideal = attention_ideal_launches(ends, HQ, HKV, D)
    extra = launch.extra_memory_bytes(ends, HQ, D, **_accepted(launch.extra_memory_bytes, kwargs))
    return costs, launches + aux, ideal, lambda d: predict_ms(work_ideal, d), extra, syncs


def attention_ideal_launches(subtree_end, HQ, HKV, D, passes=("fwd", "bwd")):
    """[Launch] of the visible-pairs ideal of one attention layer (bf16): the forward's 2 matmuls at the forward
    class and the backward's 5 at the backward class, compulsory bytes once."""
    from pact_fast.kernels import tree_attention_launch as launch

    (fwd,) = launch.ideal_costs(subtree_end, HQ, HKV, D, torch.bfloat16, passes=("fwd",))
    out = [Launch("ideal fwd", fwd.flops, fwd.bytes, "attention_fwd")]
    if "bwd" in passes:
        (both,) = launch.ideal_costs(subtree_end, HQ, HKV, D, torch.bfloat16)
        out.append(Launch("ideal bwd", both.flops - fwd.flops, both.bytes - fwd.bytes, "attention_bwd"))
    return out


FAMILIES = {"logprob": _logprob_family, "head": _head_family, "attention": _attention_family}

# Every row of the table: (family, op, keyword arguments of the launcher's kernel_costs). A new variant is one
# line here. Frozen-head rows (weight_grad False) are priced against their own ideal: two GEMMs (logits, dX).
VARIANTS = [
    ("logprob", "linear_logprobs fwd", dict(passes=("fwd",))),
    ("logprob", "linear_logprobs fwd+bwd", dict()),
    ("logprob", "linear_logprobs fwd+bwd (frozen head; ideal 2 GEMMs: logits, dX)", dict(weight_grad=False)),
    ("head", "fused_pact_head fwd+bwd", dict(want_entropy=False)),
    ("head", "fused_pact_head fwd+bwd (entropy or fp16)", dict(want_entropy=True)),
    ("head", "fused_pact_head fwd+bwd (memory_lean)", dict(want_entropy=False, memory_lean=True)),
    ("head", "fused_pact_head fwd+bwd (frozen head; ideal 2 GEMMs: logits, dX)", dict(want_entropy=False,
                                                                                     weight_grad=False)),
    ("attention", "tree_attention fwd+bwd", dict(dq_mode="split")),
    ("attention", "tree_attention fwd+bwd (dq atomics)", dict(dq_mode="atomic")),
]


def variant_rows(workload, family, shape, devices=("H100", "H200"), table=None, stored=None, variants=None):
    """Model rows of every variant of ``family`` (VARIANTS, or ``variants``) at one shape, on each device."""
    import sass

    table = table if table is not None else sass.issue_table()
    rows = []
    for fam, op, kwargs in variants or VARIANTS:
        if fam != family:
            continue
        costs, launches, ideal_launches, work_ideal, extra, syncs = FAMILIES[family](table, shape, kwargs, stored)
        public = {k: v for k, v in shape.items() if k != "subtree_end"}
        if "subtree_end" in shape:
            public["L"] = shape["subtree_end"].shape[1]
        for device in devices:
            rows.append(model_row(workload, op, device, costs, work_ideal(device), extra, launches, ideal_launches,
                                  syncs, shape={**public, "dtype": "bf16"}))
    return rows


def logprob_rows(workload, N, V, H, devices=("H100", "H200"), table=None):
    """Model rows of linear_logprobs (bf16, no bias) at any shape: "linear_logprobs fwd" against one GEMM,
    "linear_logprobs fwd+bwd" against three; plus the pre-issue-11 kernels (work model only) where BEFORE has
    the workload."""
    from pact_fast.kernels.registry import KernelCost

    rows = variant_rows(workload, "logprob", {"N": N, "V": V, "H": H}, devices, table)
    if workload in BEFORE:
        before = [KernelCost(k, f, b) for k, (f, b) in BEFORE[workload]["kernels"].items()]
        rows += [model_row(workload, "linear_logprobs fwd+bwd (before issue 11)", device, before,
                           ideal_logprob_ms(N, V, H, device), BEFORE[workload]["extra_memory_bytes"],
                           shape={"N": N, "V": V, "H": H, "dtype": "bf16"}, note="work model only")
                 for device in devices]
    return rows


def fused_head_rows(workload, N, V, H, devices=("H100", "H200"), table=None):
    """Model rows of the Triton backend of fused_pact_head (bf16, no bias, no row over the shift limit) against
    three GEMMs (two, logits and dX, for a frozen head): "fused_pact_head fwd+bwd" (no entropy bonus: one read
    and write of the logits), "... (entropy or fp16)" (the ordinary epilogue: a read for the statistics, a read
    and a write for the gradient), "... (memory_lean)" (the logits recomputed over vocabulary slabs) and "...
    (frozen head ...)" (no dW). The time model includes the torch kernels the op launches around its passes
    (the loss once per call, counted through the op: ``PROBES``)."""
    return variant_rows(workload, "head", {"N": N, "V": V, "H": H}, devices, table)


def head_block_sweep(workload="W-logprob-H2048", rows=(320, 384, 448, 480, 496, 512, 576, 640), splits=range(1, 17),
                     device="H100", table=None):
    """The default fused head (no entropy bonus): its own plan (``fused_pact_head_launch.plan``), then uniform row
    blocks of every R x dX split S of ``rows`` x ``splits``: one dict each with ``rows`` and ``splits`` (the
    default's: "plan"), ``blocks`` (the plan in runs, ``plan_summary``), ``time_ratio``, ``work_ratio``,
    ``extra_memory_bytes``, ``dw_share`` (extra memory over dW's bytes), ``within_budget`` (``dw_share`` <=
    WORKSPACE_SHARE) and ``default`` (True on the plan's row). It shows what the default's memory budget costs in
    time: the logits workspace of an R-row block is R / H of dW's bytes, so at H = 2,048 a 512-row block's alone
    is the whole 25%, which the default reaches by parking everything else in dX's unwritten rows."""
    from pact_fast.kernels import fused_pact_head_launch as launch

    shape = W_LOGPROB[workload]
    N, V, H = shape["N"], shape["V"], shape["H"]
    dw_bytes = V * H * torch.empty((), dtype=torch.bfloat16).element_size()
    out = []
    for R, S in [(None, None)] + [(R, S) for R in rows for S in splits]:
        kwargs = dict(want_entropy=False, rows_per_block=R, splits=S)
        (row,) = variant_rows(workload, "head", shape, (device,), table,
                              variants=[("head", f"fused_pact_head fwd+bwd R={R} S={S}", kwargs)])
        share = row["extra_memory_bytes"] / dw_bytes
        blocks = launch.plan(N, V, H, torch.bfloat16, rows_per_block=R, splits=S)
        out.append({"rows": R or "plan", "splits": S or "plan", "blocks": launch.plan_summary(blocks),
                    "time_ratio": row["time_ratio"], "work_ratio": row["work_ratio"],
                    "extra_memory_bytes": row["extra_memory_bytes"], "dw_share": share,
                    "within_budget": share <= launch.WORKSPACE_SHARE, "default": R is None})
    return out


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


def _group_rows(devices, table=None):
    """One W-group layer of tree attention, fwd+bwd, bf16, against its visible-pairs ideal: the launcher's model
    for each dq mode, and issue 11's figures for the kernels before it (work model only)."""
    ends, HQ, HKV, D = w_group_layout()
    rows = []
    for device in devices:
        if device in GROUP_BEFORE:
            before = GROUP_BEFORE[device]
            rows.append({"workload": "W-group-layer", "op": "tree_attention fwd+bwd (before issue 11)",
                         "device": device, **before, "ratio": before["predicted_ms"] / before["ideal_ms"],
                         "work_ratio": before["predicted_ms"] / before["ideal_ms"], "predicted_time_ms": None,
                         "ideal_time_ms": None, "time_ratio": None, "extra_memory_bytes": None, "kernels": [],
                         "label": "model", "shape": {"L": ends.shape[1], "HQ": HQ, "HKV": HKV, "D": D, "dtype": "bf16"},
                         "note": "figures from issue 11's model of the kernels before it; work model only"})
    return rows + variant_rows("W-group-layer", "attention", {"subtree_end": ends, "HQ": HQ, "HKV": HKV, "D": D},
                               devices, table)


def model_rows(devices=("H100", "H200"), table=None):
    """Every workload and op the model covers, one dict per (workload, op, device); see the module doc."""
    import sass

    table = table if table is not None else sass.issue_table()
    rows = []
    for workload, shape in W_LOGPROB.items():
        rows += logprob_rows(workload, shape["N"], shape["V"], shape["H"], devices, table)
        rows += fused_head_rows(workload, shape["N"], shape["V"], shape["H"], devices, table)
    return rows + _group_rows(devices, table)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows, source=""):
    print("Performance model: PREDICTIONS, not measurements. work = max(FLOPs/F, bytes/B) per launch at F = 700 "
          "TFLOP/s;\ntime = max(compute, memory, issue) + launch per launch at the efficiency classes (CLASSES, "
          f"SOURCES in bench/roofline.py). MiB = 2^20 bytes, GiB = 2^30.{(' Issue term: ' + source) if source else ''}")
    print(f"{'workload':16} {'op':44} {'dev':5} {'work ms':>8} {'ideal':>7} {'work x':>6} {'time ms':>8} "
          f"{'ideal':>7} {'time x':>6} {'launches':>8} {'syncs':>5} {'extra MiB':>9}")
    for r in rows:
        extra = None if r["extra_memory_bytes"] is None else r["extra_memory_bytes"] / MIB
        print(f"{r['workload']:16} {r['op']:44} {r['device']:5} {_fmt(r['predicted_ms'], '8.2f')} "
              f"{_fmt(r['ideal_ms'], '7.2f')} {_fmt(r['work_ratio'], '6.3f')} {_fmt(r['predicted_time_ms'], '8.2f')} "
              f"{_fmt(r['ideal_time_ms'], '7.2f')} {_fmt(r['time_ratio'], '6.3f')} {_fmt(r.get('launch_count'), '8d')} "
              f"{_fmt(r.get('host_syncs'), '5d')} {_fmt(extra, '9.1f')}")
        for k in r["kernels"]:
            timed = (f" time {k['predicted_time_ms']:8.2f} ms x{k['launches']:<5d} {k['bound']:7} "
                     f"{k['warp_instructions_per_element']:.2f} wi/el") if "predicted_time_ms" in k else ""
            print(f"{'':18}{k['kernel']:28} {k['flops'] / 1e12:8.2f} TFLOP {k['bytes'] / GIB:8.2f} GiB "
                  f"{k['intensity']:8.1f} FLOP/B work {_fmt(k['predicted_ms'], '8.2f'):>8} ms{timed}")


README_TABLES = {  # README table -> the ops of its rows (workload order of model_rows)
    "logprob": tuple(op for fam, op, _ in VARIANTS if fam == "logprob") +
    ("linear_logprobs fwd+bwd (before issue 11)",),
    "head": tuple(op for fam, op, _ in VARIANTS if fam == "head"),
    "attention": ("tree_attention fwd+bwd (before issue 11)",) + tuple(op for fam, op, _ in VARIANTS
                                                                     if fam == "attention"),
}


def markdown_table(rows, ops, device="H100"):
    """README's Markdown table of ``rows`` whose op is in ``ops``, on ``device``: work and time (ms and ratio to
    the row's ideal), the ideal's work / time ms, launches, host synchronisations and extra memory in MiB (with
    its share of a bf16 dW for the log-prob heads). Every figure a prediction of this model."""
    lines = [f"| workload | op (predicted, {device}) | work ms | work x | time ms | time x | ideal ms: work / time "
             "| launches | host syncs | extra MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["device"] != device or r["op"] not in ops:
            continue
        extra = r["extra_memory_bytes"]
        memory = "-" if extra is None else f"{extra / MIB:,.1f}"
        if extra is not None and "V" in r.get("shape", {}):
            memory += f" ({100 * extra / (r['shape']['V'] * r['shape']['H'] * BF16):.1f}% of dW)"
        ideal = f"{r['ideal_ms']:,.2f} / {_fmt(r['ideal_time_ms'], ',.2f')}"
        lines.append(f"| {r['workload']} | {r['op']} | {r['predicted_ms']:,.2f} | {r['work_ratio']:.3f}x | "
                     f"{_fmt(r['predicted_time_ms'], ',.2f')} | {_fmt(r['time_ratio'], '.3f')}"
                     f"{'' if r['time_ratio'] is None else 'x'} | {ideal} | {_fmt(r.get('launch_count'), ',d')} | "
                     f"{_fmt(r.get('host_syncs'), 'd')} | {memory} |")
    return "\n".join(lines)


def provenance(issue_source):
    """When and with what a model's JSON was written, and where its issue term came from (``issue_source``: SASS
    compiled here, or the stored table): a stored prediction says which code and versions made it."""
    import subprocess
    from datetime import datetime, timezone

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "torch": torch.__version__, "triton": triton_version, "issue_term": issue_source}


def main(argv=None):
    import sass
    from common import json_target_error

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write {'rows': [...], 'devices': ..., 'classes': ...} here")
    ap.add_argument("--probe", action="store_true",
                    help="count the torch kernels of each public op (TRITON_INTERPRET=1) into " + TORCH_OPS.name)
    ap.add_argument("--stored-sass", action="store_true", help="read the issue term from the stored SASS table")
    ap.add_argument("--readme", action="store_true", help="print README's tables (Markdown, H100 and H200) instead")
    ap.add_argument("--step", action="store_true",
                    help="then the whole-step model: a W-group step's rollouts, scoring and update per engine "
                         "(bench/step_model.py, built on this module's per-op models)")
    ap.add_argument("--head-sweep", action="store_true",
                    help="instead: the fused head's time ratio and extra memory at W-logprob-H2048 (H100) for row "
                         "blocks x dX splits around the default (head_block_sweep); with --json, written there")
    args = ap.parse_args(argv)
    if args.json and json_target_error(args.json):
        ap.error(json_target_error(args.json))
    others = [flag for flag, on in (("--json", args.json), ("--stored-sass", args.stored_sass),
                                    ("--readme", args.readme), ("--step", args.step), ("--head-sweep", args.head_sweep))
              if on]
    if args.probe and others:  # each would go unread
        ap.error(f"--probe writes {TORCH_OPS.name} and takes no other option (got {' '.join(others)})")
    if args.probe and not interpreting():
        ap.error("--probe counts the ops under the Triton interpreter: set TRITON_INTERPRET=1")
    if args.head_sweep and (args.readme or args.step):
        ap.error("--head-sweep prints the sweep instead of the tables: it takes neither --readme nor --step")
    if args.head_sweep:
        table = sass.issue_table(compile_here=False if args.stored_sass else None)
        sweep = head_block_sweep(table=table)
        print("fused_pact_head fwd+bwd, W-logprob-H2048, H100 (PREDICTED): rows  splits  time x  work x  extra/dW")
        for r in sweep:
            print(f"{r['rows']:>5} {r['splits']:>7} {r['time_ratio']:>8.3f} {r['work_ratio']:>7.3f} "
                  f"{100 * r['dw_share']:>8.1f}%{'' if r['within_budget'] else '  over budget'}"
                  f"{'  <- default: ' + r['blocks'] if r['default'] else ''}")
        if args.json:
            doc = {"note": "performance model (bench/roofline.py --head-sweep): predictions, not measurements",
                   "workload": "W-logprob-H2048", "device": "H100", "op": "fused_pact_head fwd+bwd",
                   "rows": sweep, "generated": provenance(next(iter(table.values()))["source"])}
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        return
    if args.probe:
        doc = {"note": "torch kernels each public op launches beside its modelled GEMMs and Triton kernels, counted "
                       "through the op under TRITON_INTERPRET=1 (bench/roofline.py --probe)",
               "ops": {op: probe_torch_ops(op) for op in PROBES}}
        TORCH_OPS.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc["ops"], indent=1))
        return
    table = sass.issue_table(compile_here=False if args.stored_sass else None)
    rows = model_rows(table=table)
    if args.readme:
        for name, ops in README_TABLES.items():
            for device in DEVICES:
                print(f"{name}, {device}:\n{markdown_table(rows, ops, device)}\n")
    else:
        print_table(rows, next(iter(table.values()))["source"])
    if args.json:
        doc = {"rows": rows, "devices": {k: vars(v) for k, v in DEVICES.items()}, "classes": vars(CLASSES),
               "sources": SOURCES, "units": "bytes; printed as MiB = 2^20 bytes and GiB = 2^30",
               "note": "performance model (bench/roofline.py): predictions, not measurements",
               "generated": provenance(next(iter(table.values()))["source"])}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=list) + "\n")
    if args.step:
        import step_model

        print()
        step_model.main([])


if __name__ == "__main__":
    main()
