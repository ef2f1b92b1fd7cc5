"""DeepSpeed starts without JIT-building its inference-only shared-memory comm op (100-150 s, a lock file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# a hang in the child prints every thread's stack and exits, well before the test's own timeout
WATCHDOG = "import faulthandler; faulthandler.dump_traceback_later(240, exit=True)\n"
# as the trainer does: gloo threads left running at exit can abort or hang the interpreter
TEARDOWN = textwrap.dedent("""
    from facescale.parallel.init import shutdown_distributed

    shutdown_distributed()
""")

SCRIPT = WATCHDOG + textwrap.dedent("""
    import os
    import torch
    import deepspeed
    from facescale.deepspeed_ops import skip_unused_ops

    skip_unused_ops()
    model = torch.nn.Linear(3, 2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config={"train_batch_size": 1, "zero_allow_untested_optimizer": True})
    print("shm_comm_op", deepspeed.comm.comm.cdb.shm_comm_op)
""") + TEARDOWN


def test_engine_starts_without_building_the_shm_op(tmp_path):
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(extensions), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shm_comm_op None" in proc.stdout
    built = [p.name for p in extensions.rglob("*")] if extensions.exists() else []
    assert not built, f"DeepSpeed built native ops at start-up: {built}"


def _free_port() -> int:
    from launcher.ports import free_port

    return free_port()


WAIT_SCRIPT = WATCHDOG + textwrap.dedent("""
    import signal

    import torch
    import deepspeed
    from facescale.deepspeed_ops import JitLockError, jit_lock_watchdog

    model = torch.nn.Linear(3, 2)
    try:
        with jit_lock_watchdog(timeout_s=3, warn_after_s=1):  # without skip_unused_ops: it builds the op
            deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 config={"train_batch_size": 1, "zero_allow_untested_optimizer": True})
    except JitLockError as exc:
        print("LINE", exc.line())
    handler = signal.getsignal(signal.SIGINT)  # as it was before the watchdog
    names = {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default"}
    print("SIGINT", names.get(handler) or getattr(handler, "__name__", handler))
""") + TEARDOWN


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_a_stale_build_lock_ends_in_an_error_naming_it(tmp_path, sigint):
    """A lock left by a killed build: torch waits forever; the watchdog names the file and how to clear it.
    "ignored": started as `cmd &` or under nohup, where the process inherits SIGINT ignored."""
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(extensions), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    disposition = signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL  # DFL: Python handles it
    proc = subprocess.run([sys.executable, "-c", WAIT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"waiting 1 s on the JIT build lock {lock}" in proc.stderr
    line = next(text for text in proc.stdout.splitlines() if text.startswith("LINE "))
    assert f"{lock}: waited 3 s on the JIT build lock of op 'deepspeed_shm_comm'" in line
    assert f"rm {lock}" in line
    before = "ignored" if sigint == "ignored" else "default_int_handler"
    assert f"SIGINT {before}" in proc.stdout  # the watchdog put SIGINT's handling back as it found it


def test_a_real_sigint_under_the_watchdog_does_what_it_did_before():
    """The watchdog's SIGINT handler passes a real Ctrl-C on: ignored stays ignored, handled still raises."""
    from facescale.deepspeed_ops import jit_lock_watchdog

    saved = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with jit_lock_watchdog(timeout_s=60):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # a Python handler runs at the next bytecode; nothing may happen
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt), jit_lock_watchdog(timeout_s=60):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, saved)
