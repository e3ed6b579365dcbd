"""Which backend an op runs, decided one way for every op (``backend="auto"`` and its checks)."""


def resolve_backend(op, backend, device, choices, cpu_default):
    """``backend`` checked against ``choices``; ``"auto"`` is ``"triton"`` on CUDA and ``cpu_default`` elsewhere;
    ``"triton"`` on CPU tensors needs the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported).

    op: the op's name for messages; device: the inputs' ``torch.device``."""
    if backend not in choices:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {choices}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else cpu_default
    if backend == "triton" and device.type != "cuda":
        from ..kernels.registry import interpreting

        if not interpreting():
            raise ValueError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                             f"imported; use backend='{cpu_default}' on CPU")
    return backend
