"""A dispatch mode that records the largest tensor any op allocates: tests that a step makes no C x D copy."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op allocates (forward, backward and optimizer alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        input_storages = {a.untyped_storage().data_ptr() for a in inputs}
        for value in result if isinstance(result, tuple | list) else (result,):
            # in-place ops and views hand back (part of) an input: not an allocation
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in input_storages:
                self.largest = max(self.largest, value.numel())
        return result
