"""DeepSpeed native ops facescale does not use, kept from being JIT-compiled at start-up.

On the CPU accelerator, DeepSpeed 0.19's `TorchBackend` JIT-builds `deepspeed_shm_comm` (a shared-memory
all-reduce) whenever it starts its communication backend, i.e. in every `deepspeed.initialize`. The op
serves only `inference_all_reduce` (DeepSpeed inference's tensor parallelism); training runs every
collective through torch.distributed. The build costs 100-150 s on a busy host, waits without a word on
the cache lock (`~/.cache/torch_extensions/py3*_cpu/deepspeed_shm_comm/lock`) that a killed build leaves
behind, and is redone whenever another environment (another venv or checkout: the sources' absolute paths
are in its build.ninja) used the same cache. Without the op DeepSpeed falls back to torch.distributed.
Any other JIT build (e.g. an op a `deepspeed.extra` setting asks for) runs under `jit_lock_watchdog`, so a
wait on its lock is named after 30 s and ends with an error saying how to clear it.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from facescale.errors import InputError


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


class JitLockError(InputError):
    """A JIT build lock waited on for too long (another build runs, or a killed one left the lock)."""


def _waited_lock(thread_id: int) -> str | None:
    """The lock file `thread_id` is waiting on inside torch's FileBaton.wait, if it is."""
    from torch.utils.file_baton import FileBaton

    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code is FileBaton.wait.__code__:
            return getattr(frame.f_locals.get("self"), "lock_file_path", None)
        frame = frame.f_back
    return None


@contextmanager
def _interruptible_main(expired: list) -> Iterator[None]:
    """Make the watchdog's `_thread.interrupt_main` raise KeyboardInterrupt once `expired` is set, whatever
    SIGINT's disposition. A process started in the background (`&`, nohup) inherits SIGINT ignored; Python
    then installs no handler and interrupt_main does nothing, so the wait would go on forever. A real
    SIGINT meanwhile does what it did before (raise, call the handler, be ignored or end the process)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # not ours to change: another thread, or a handler installed outside Python
        return

    def on_sigint(signum: int, frame: Any) -> Any:
        if expired:
            raise KeyboardInterrupt
        if callable(previous):
            return previous(signum, frame)
        if previous == signal.SIG_DFL:  # the default action: end the process by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return None  # SIG_IGN

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def jit_lock_watchdog(timeout_s: float | None = None, warn_after_s: float = 30.0) -> Iterator[None]:
    """Bound the start-up's wait on a torch/DeepSpeed JIT build lock (torch waits on it without end).

    After `warn_after_s` of waiting a line names the lock; after `timeout_s` (default
    $FACESCALE_JIT_LOCK_TIMEOUT_S or 600 s) the wait ends in a JitLockError saying how to clear the lock.
    Use in the main thread, around `deepspeed.initialize` or anything else that may JIT-build an op.
    """
    timeout = float(os.environ.get("FACESCALE_JIT_LOCK_TIMEOUT_S", 600)) if timeout_s is None else timeout_s
    caller, stop, expired = threading.get_ident(), threading.Event(), []

    def watch() -> None:
        waited, lock = 0.0, None
        while not stop.wait(0.5):
            current = _waited_lock(caller)
            waited, lock = (waited + 0.5, current) if current and current == lock else (0.0, current)
            if lock and waited == warn_after_s:
                sys.stderr.write(f"[facescale] waiting {waited:g} s on the JIT build lock {lock} (another "
                                 "process builds the op, or a killed build left the lock behind)\n")
            if lock and waited >= timeout:
                expired.append((lock, waited))
                _thread.interrupt_main()
                return

    watcher = threading.Thread(target=watch, name="facescale-jit-lock-watchdog", daemon=True)
    try:
        with _interruptible_main(expired):
            watcher.start()
            yield
    except KeyboardInterrupt:
        if not expired:
            raise
        lock, waited = expired[0]
        raise JitLockError(f"waited {waited:g} s on the JIT build lock of op '{Path(lock).parent.name}'",
                           where=lock, fix="if no other build of it is running (a killed build leaves the "
                                           f"lock), delete it: rm {lock}") from None
    finally:
        stop.set()
