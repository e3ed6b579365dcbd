"""Registering an op as a ``torch.library.custom_op``, so ``torch.compile(fullgraph=True)`` traces through it.

An op is a function over tensors (and ints, floats, bools, strings) with type annotations; ``fake`` computes
its outputs' shapes and dtypes without running it (what the compiler traces with); ``backward`` and
``setup_context`` follow ``torch.library.register_autograd``. Under a torch without ``custom_op`` (before 2.4)
the same pieces make a plain ``torch.autograd.Function`` instead, so eager code runs the same either way.
"""
import torch

_LIBRARY = "pact_fast"


def custom_op(name, fn, *, fake, backward=None, setup_context=None):
    """``fn`` as the op ``pact_fast::name`` with its fake (meta) implementation and, when ``backward`` is
    given, its autograd formula. Returns the callable to use in place of ``fn`` (positional arguments)."""
    if hasattr(torch.library, "custom_op"):
        op = torch.library.custom_op(f"{_LIBRARY}::{name}", fn, mutates_args=())
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        return op
    if backward is None:
        return fn

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = fn(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _Function.__name__ = name
    return _Function.apply
