"""Timing and peak-memory helpers shared by the benchmarks.

Peak memory is the increase of the high-water mark over the memory in use before the call:
``torch.cuda.max_memory_allocated`` on CUDA, the process's resident set (VmHWM, reset through
/proc/self/clear_refs) on CPU.
"""
import gc
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch


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
    """Run ``fn()`` warmup + reps times; returns (median seconds, peak extra bytes of one call)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _rss_bytes("VmRSS:")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_bytes("VmHWM:")
    return statistics.median(times), max(0, peak - base)


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
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def print_table(rows, cols):
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for cell in cells:
        print("  ".join(x.ljust(w) for x, w in zip(cell, widths)))


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
