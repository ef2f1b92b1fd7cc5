"""The largest tensor any op allocates while it is active: the head promises no C x D temporary per step, and
benchmarks/head.py reports this figure while the tests assert it."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor an op allocates (forward, backward and optimizer alike) and that op."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.largest_op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        input_storages = {a.untyped_storage().data_ptr() for a in inputs}
        for value in result if isinstance(result, tuple | list) else (result,):
            # in-place ops and views hand back (part of) an input: not an allocation
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in input_storages:
                if value.numel() > self.largest:
                    self.largest, self.largest_op = value.numel(), str(func)
        return result
