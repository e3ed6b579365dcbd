"""Timing and peak-memory helpers shared by the benchmarks.

Peak memory is the increase of live tensor bytes over those live before the call:
``torch.cuda.max_memory_allocated`` on CUDA, the CPU allocator's running total from the
profiler's allocation events on CPU (measured in one extra, untimed call).
"""
import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from pact_fast.tables import text_table


def allocator_peak(fn):
    """``(peak, fn's result)``: the peak of PyTorch's CPU allocator's running total during one ``fn()`` call,
    above its value before, in bytes; peak is None where the profiler records no allocation events.

    Read from the profiler's allocation events (each carries the allocator's running total), so it counts
    tensors, not the process's resident set, which glibc's allocator keeps inflated after frees."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = []

    def walk(node):
        kind, fields = node.typed
        if "Allocation" in str(kind):
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        for child in node.children:
            walk(child)

    try:
        for root in prof.profiler.kineto_results.experimental_event_tree():
            walk(root)
    except (AttributeError, RuntimeError):
        events = []
    if not events:
        return None, out
    events.sort()
    before = events[0][2] - events[0][1]
    return max(0, max(total for _, _, total in events) - before), out


def cpu_peak_bytes(fn):
    """Peak live bytes of PyTorch's CPU allocator during one ``fn()`` call, above what was live before
    (``allocator_peak``); falls back to the resident-set high-water mark of a second call where the profiler
    offers no allocation events."""
    peak, _ = allocator_peak(fn)
    if peak is not None:
        return peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_bytes("VmRSS:")
    fn()
    return max(0, _rss_bytes("VmHWM:") - base)


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, reps=3, warmup=1):
    """Run ``fn()`` warmup + reps times; returns (median seconds, peak extra bytes of one call).
    Times come from CUDA events on CUDA, the wall clock otherwise."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":  # CUDA events: device time of the call, launch queue included
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            continue
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = max(0, torch.cuda.max_memory_allocated(device) - base)
    else:
        gc.collect()
        peak = cpu_peak_bytes(fn)  # one more call, under the profiler, after the timed ones
    return statistics.median(times), peak


def machine_info(device):
    device = torch.device(device)
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    for dist in ("transformers", "liger-kernel", "cut-cross-entropy"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def print_table(rows, cols):
    print(text_table(rows, cols, cell=_fmt, missing=None))


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def json_target_error(path, flag="--json"):
    """Why results could not be written to ``path`` (given as ``flag``) at the end of a run (a missing folder, a
    folder in its place), or None: checked before the run, so a benchmark does not time for an hour and then lose
    its results."""
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{flag} {path}: no directory {folder}; create it first"
    return None


def bench_args(description, workloads, gpu_workload, cpu_workload, gpu_reps, cpu_reps, argv=None):
    """Parse the options every benchmark takes; returns (args, device, workload, reps). A device this torch cannot
    use, repetitions below 1, a ``--json`` path that cannot be written (``json_target_error``), or a GPU workload
    (any but ``cpu_workload`` and tiny) on a CPU are argparse errors (one line, exit 2)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", default=None, choices=sorted(workloads),
                        help=f"default: {gpu_workload} on CUDA, {cpu_workload} otherwise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"timed repetitions (default {cpu_reps} on CPU, {gpu_reps} on CUDA)")
    parser.add_argument("--providers", nargs="*", help="subset of providers (the baseline of the ratios always runs)")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: the benchmarks time cpu and cuda devices")
    if args.json and json_target_error(args.json):
        parser.error(json_target_error(args.json))
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps {args.reps}: at least 1 timed repetition")
    cuda = device.type == "cuda"
    workload = args.workload or (gpu_workload if cuda else cpu_workload)
    if not cuda and workload not in (cpu_workload, "tiny"):
        parser.error(f"--workload {workload} is a GPU workload (hours and tens of GB on a CPU); on CPU use "
                     f"{cpu_workload}" + (" or tiny" if "tiny" in workloads else ""))
    return args, device, workload, args.reps or (gpu_reps if cuda else cpu_reps)


def select_providers(names, available, baseline, device, skipped=()):
    """The providers to run, in the order of ``available``: every one, or those ``names`` lists plus ``baseline``
    (the ratios' denominator, always run). A name neither ``available`` nor ``skipped`` (a provider this device
    lacks, reported by the benchmark) exits with the ones there are on ``device``."""
    if not names:
        return list(available)
    unknown = [n for n in names if n not in available and n not in skipped]
    if unknown:
        raise SystemExit(f"--providers: {', '.join(unknown)} not among this benchmark's providers on {device}: "
                         f"{', '.join([*available, *skipped])}")
    return [n for n in available if n in names or n == baseline]
