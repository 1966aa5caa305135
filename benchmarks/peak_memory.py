"""Peak bytes of the tensors an operation allocates, on any device (the CPU has no allocator statistics).

A ``TorchDispatchMode`` sees every tensor an op returns. A result whose storage is none of the op's
inputs' storages is a new allocation: its bytes count from then until the storage is freed (a weak
reference on the storage says when). Views and in-place results share an input's storage and do not
count; tensors made before the mode (weights, inputs) are not counted either. ``peak`` is the highest
total seen, ``where`` the op that reached it.

    with PeakTensorBytes() as tracker:
        model.generate(...)
    print(tracker.peak / 2**20, "MiB at", tracker.where)
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the storages allocated inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.where = ""
        self._sizes: dict[int, int] = {}  # id of a tracked storage -> its bytes

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if storage.data_ptr() in inputs or key in self._sizes or storage.nbytes() == 0:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, key)
        if self.live > self.peak:
            self.peak, self.where = self.live, str(func)
        return out
