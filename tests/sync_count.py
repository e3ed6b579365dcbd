"""Count host synchronisations: every aten op that makes the host wait for a device value (a scalar read,
a data-dependent output shape, a boolean-mask index) and every ``Tensor.tolist``, as the ops are dispatched.
On a CPU nothing waits, but the same calls on CUDA would each stall the host; counting them here is how the
tests bound the syncs of an op without a GPU."""
import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default: "item/bool/int/float", aten.nonzero.default: "nonzero",
           aten._unique2.default: "unique", aten.unique_dim.default: "unique",
           aten.unique_consecutive.default: "unique",
           aten.masked_select.default: "masked_select", aten.repeat_interleave.Tensor: "repeat_interleave",
           aten.is_nonzero.default: "bool"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    @property
    def total(self):
        return sum(self.calls.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = SYNCING.get(func)
        if name is None and func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                name = "boolean index"
        if name is not None:
            self.calls[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    """with count_syncs() as syncs: ...; syncs.total, syncs.calls (Counter by kind)."""
    counter = SyncCounter()
    original = torch.Tensor.tolist

    def tolist(self):
        counter.calls["tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = original
