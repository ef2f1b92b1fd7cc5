"""DeepSpeed native ops facescale does not use, kept from being JIT-compiled at start-up.

On the CPU accelerator, DeepSpeed 0.19's `TorchBackend` JIT-builds `deepspeed_shm_comm` (a shared-memory
all-reduce) whenever it starts its communication backend, i.e. in every `deepspeed.initialize`. The op
serves only `inference_all_reduce` (DeepSpeed inference's tensor parallelism); training runs every
collective through torch.distributed. The build costs 100-150 s on a busy host, waits without a word on
the cache lock (`~/.cache/torch_extensions/py3*_cpu/deepspeed_shm_comm/lock`) that a killed build leaves
behind, and is redone whenever another environment (another venv or checkout: the sources' absolute paths
are in its build.ninja) used the same cache. Without the op DeepSpeed falls back to torch.distributed.
"""

from __future__ import annotations


def _no_shm_op() -> None:
    """DeepSpeed's `build_shm_op` stand-in: no op, so `inference_all_reduce` uses torch.distributed."""
    return None


def skip_unused_ops() -> None:
    """Stop DeepSpeed from building its inference-only shared-memory op (call after `import deepspeed`)."""
    import importlib

    # by module name: the package attribute `deepspeed.comm.torch` is the torch package (a star import)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if not hasattr(ds_torch_comm, "build_shm_op"):
        raise RuntimeError("deepspeed.comm.torch.build_shm_op is gone: update facescale/deepspeed_ops.py for "
                           "this DeepSpeed version")
    ds_torch_comm.build_shm_op = _no_shm_op
