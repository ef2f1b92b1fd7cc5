"""Count the ops that make the host wait for a CUDA device, on any device (so CPU runs can check it too).

On CUDA these ops copy a value or a data-dependent shape to the host: `.item()`/`bool()`/`int()` of a tensor
(`_local_scalar_dense`), `nonzero`, `unique`, `masked_select`, `repeat_interleave` without an output size,
indexing with a boolean mask, and copies from the device to the CPU. Counting them at dispatch works on CPU
tensors as well, which is what lets the no-sync property of the head be tested without a GPU.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
               "masked_select", "is_nonzero", "equal", "repeat_interleave"}
INDEX_OPS = {"index", "index_put", "index_put_"}  # sync when an index is a boolean mask


def _is_bool_mask(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    if isinstance(value, list | tuple):
        return any(_is_bool_mask(v) for v in value)
    return False


class SyncCounter(TorchDispatchMode):
    """Within, `hits` collects (op, "file:function" of the innermost facescale frame) of every op that would
    sync on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        syncs = name in SYNCING_OPS
        syncs = syncs or (name in INDEX_OPS and len(args) > 1 and _is_bool_mask(args[1]))
        to_host = name == "_to_copy" and kwargs.get("device") == torch.device("cpu")
        syncs = syncs or (to_host and args[0].is_cuda)
        if syncs:
            frames = [f for f in traceback.extract_stack() if "/facescale/" in f.filename]
            where = f"{frames[-1].filename.split('/facescale/')[-1]}:{frames[-1].name}" if frames else "?"
            self.hits.append((name, where))
        return func(*args, **kwargs)
