"""Which backend an op runs, decided one way for every op (``backend="auto"`` and its checks), and the autocast
state the ops compute under."""
import contextlib

import torch


def resolve_backend(op, backend, device, choices, cpu_default, dtype=None):
    """``backend`` checked against ``choices``; ``"auto"`` is ``"triton"`` on CUDA and ``cpu_default`` elsewhere,
    or for a ``dtype`` the Triton kernels do not take (float64); ``"triton"`` refuses such a dtype, and on CPU
    tensors needs the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported).

    op: the op's name for messages; device: the inputs' ``torch.device``; dtype: their dtype (None: not
    checked)."""
    from ..kernels.registry import TRITON_DTYPE

    if backend not in choices:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {choices}")
    triton_dtype = dtype is None or dtype in TRITON_DTYPE
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_dtype else cpu_default
    if backend == "triton" and not triton_dtype:
        raise TypeError(f"{op}: backend='triton' takes fp32, fp16 or bf16 inputs, got {dtype}; use "
                        f"backend='{cpu_default}'")
    if backend == "triton" and device.type != "cuda":
        from ..kernels.registry import interpreting

        if not interpreting():
            raise ValueError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                             f"imported; use backend='{cpu_default}' on CPU")
    return backend


def autocast_off(device):
    """A context with autocast off for ``device``'s type: an op computes in its inputs' dtype inside a caller's
    autocast region (a bf16 one ran the torch path's fp32 GEMMs in bf16, and, as backward runs outside the
    region, linear_logprobs' forward and backward on different logits)."""
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    return torch.autocast(device.type, enabled=False) if available(device.type) else contextlib.nullcontext()
