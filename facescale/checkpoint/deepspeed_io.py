"""DeepSpeed's own checkpoint files, read safely and written without leaving ranks out of step.

DeepSpeed 0.19's `TorchCheckpointEngine.load` calls `torch.load(..., weights_only=False)`, which runs
whatever a crafted file asks. While facescale loads, the engine's checkpoint engine is wrapped so that every
file DeepSpeed opens goes through `safe_load` with DeepSpeed's allow-list instead.

While saving, a write that fails on one rank (disk full, quota, read-only directory) must not leave that
rank out of the collectives DeepSpeed runs between its writes (a barrier at the end of `save_checkpoint`):
`deferred_write_errors` records the first failure, skips this rank's remaining writes, and lets the save's
collectives finish, so that every rank then learns of the failure together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from facescale.checkpoint.safe_load import DEEPSPEED_GLOBALS, safe_load

WRITE_ERRORS = (OSError, RuntimeError)  # torch.save reports ENOSPC as RuntimeError("... iostream error")


class _SafeLoads:
    """A checkpoint engine whose `load` is `safe_load`; everything else is the wrapped engine's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, DEEPSPEED_GLOBALS, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def safe_deepspeed_loads(engine) -> Iterator[None]:
    """Within the block, DeepSpeed reads its checkpoint files only through the weights-only loader."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeLoads(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


class WriteFailures:
    """The first write error of this rank during one save (None while every write succeeded)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.what = ""

    def run(self, what: str, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`write(*args, **kwargs)`, recording its error instead of raising; skipped after a failure."""
        if self.error is not None:
            return None
        try:
            return write(*args, **kwargs)
        except WRITE_ERRORS as exc:
            self.error, self.what = exc, what
            return None


class _GuardedSaves:
    """A checkpoint engine whose writes go through `WriteFailures.run`."""

    def __init__(self, inner: Any, failures: WriteFailures) -> None:
        self._inner, self._failures = inner, failures

    def save(self, state_dict: Any, path: str) -> None:
        self._failures.run(f"writing {path}", self._inner.save, state_dict, path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._failures.run(f"creating {path}", self._inner.makedirs, path, exist_ok=exist_ok)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def deferred_write_errors(engine, failures: WriteFailures) -> Iterator[None]:
    """Within the block, DeepSpeed's file writes record into `failures` instead of raising."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _GuardedSaves(inner, failures)
    copy_script = getattr(engine, "_copy_recovery_script", None)  # rank 0 copies zero_to_fp32.py directly
    if copy_script is not None:
        engine._copy_recovery_script = lambda path: failures.run(f"copying into {path}", copy_script, path)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
        if copy_script is not None:
            del engine._copy_recovery_script
