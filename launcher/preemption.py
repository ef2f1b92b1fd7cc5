"""Preemption: a signal sets a flag; all ranks agree on it at a step boundary, save, and exit for requeue.
The requeue signals are SIGUSR1/SIGUSR2, the ones the batch scripts ask Slurm for before the time limit
(`--signal=USR2@300`). SIGTERM (scancel, a Slurm preemption, which requeues the job itself where its
PreemptMode says so) saves and stops without asking for a requeue (TERMINATE_EXIT_CODE): a cancelled job
must not come back. Ctrl-C (SIGINT, where the trainer asks for it) stops the same way with
INTERRUPT_EXIT_CODE, and a rank whose next batch cannot be read (bad or vanished data) the same way, without
requeue, raising its error.

Never exit inside the handler (a collective may be in flight): the handler only records the signal.
The trainer calls `should_stop()` once per step; it MAX-reduces the flag so every rank stops at the same step,
saves, and exits with REQUEUE_EXIT_CODE; `slurm/train_42m.sh` turns that code into `scontrol requeue`.
Under a per-node agent (torchrun) the exit code does not reach the batch script, so when
FACESCALE_REQUEUE_MARKER names a file, rank 0 also writes it (the signal name) once the ranks agree to stop.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUEUE_EXIT_CODE = 3  # the batch script requeues the job when the trainer exits with this code
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C saved and stopped the run (no requeue)
TERMINATE_EXIT_CODE = 143  # 128 + SIGTERM: scancel (or a preemption Slurm requeues itself) saved and stopped
DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")
STOP_SIGNAL = "SIGTERM"  # saves and stops; the others in DEFAULT_SIGNALS save and ask for a requeue
# what a rank saw, MAX-reduced: a preemption outranks a Ctrl-C, a SIGTERM a preemption (a cancelled job must
# not be requeued), and an input failure all of them (a requeued job would meet the same bad input)
_NONE, _INTERRUPT, _PREEMPT, _TERMINATE, _INPUT_FAILED = 0, 1, 2, 3, 4
REQUEUE_MARKER_ENV = "FACESCALE_REQUEUE_MARKER"

_first_check_hooks: list[Callable[[], None]] = []


def after_first_stop_check(hook: Callable[[], None]) -> None:
    """Run `hook` once, right after the first `should_stop()` of this process (the end of training step 1).

    `facescale.parallel.init` uses it to switch from the start-up to the training collective timeout.
    """
    _first_check_hooks.append(hook)


def _run_first_check_hooks() -> None:
    while _first_check_hooks:
        _first_check_hooks.pop(0)()


class PreemptionFlag:
    """Records a preemption signal; `should_stop` is a collective every rank calls at the same step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.interrupted = False  # Ctrl-C (SIGINT) on this rank
        self.terminated = False  # SIGTERM on this rank
        self.requeue = False  # set by should_stop: the agreed stop is a preemption to requeue
        self.terminate = False  # set by should_stop: the agreed stop is a SIGTERM (save, stop, no requeue)
        self.input_failed = False  # set by should_stop: some rank's input failed (it raises its own error)

    def _handle(self, signum: int, _frame) -> None:
        first = self.signal_name is None
        self.signal_name = signal.Signals(signum).name
        self.terminated |= self.signal_name == STOP_SIGNAL
        if first:
            sys.stderr.write(f"[facescale] received {self.signal_name}: saving at the next step boundary\n")

    def _interrupt(self, _signum: int, _frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once (the last checkpoint stays loadable)
        self.interrupted = True
        sys.stderr.write("[facescale] received SIGINT (Ctrl-C): saving at the next step boundary, then "
                         "stopping; Ctrl-C again stops at once\n")

    @classmethod
    def install(cls, names: tuple[str, ...] = DEFAULT_SIGNALS, interrupt: bool = False) -> PreemptionFlag:
        """Create a flag and make each signal in `names` set it (replacing any earlier handler); `interrupt`:
        Ctrl-C too (see catch_interrupt). `facescale train` installs it first thing, so that a signal during
        start-up (imports, the process group, the engine) is kept for the first step boundary instead of
        killing the rank by its default action."""
        flag = cls()
        for name in names:
            signal.signal(getattr(signal, name), flag._handle)
        if interrupt:
            flag.catch_interrupt()
        return flag

    def catch_interrupt(self) -> None:
        """Make Ctrl-C set this flag (once training runs), unless SIGINT is ignored here (nohup, a background
        job), which is left as it is."""
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._interrupt)

    def should_stop(self, device: Any = None, input_failed: bool = False) -> bool:
        """True on every rank once any rank has been signalled or says `input_failed` (its next batch could
        not be read); then `input_failed` says whether any rank's input failed, else `terminate` whether any
        rank got SIGTERM, else `requeue` whether any rank was preempted (a Ctrl-C alone stops without
        requeue)."""
        import torch
        import torch.distributed as dist

        seen = (_INPUT_FAILED if input_failed else _TERMINATE if self.terminated
                else _PREEMPT if self.signal_name else _INTERRUPT if self.interrupted else _NONE)
        local = torch.tensor([seen], dtype=torch.int32, device=device)
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        agreed = int(local.item())
        self.input_failed = agreed == _INPUT_FAILED
        self.requeue = agreed == _PREEMPT
        self.terminate = agreed == _TERMINATE
        if self.requeue and (not distributed or dist.get_rank() == 0):
            write_requeue_marker(self.signal_name or "peer")
        _run_first_check_hooks()
        return agreed != _NONE


def write_requeue_marker(reason: str, environ: dict | None = None) -> Path | None:
    """Write the file named by FACESCALE_REQUEUE_MARKER (if set) so the batch script knows to requeue."""
    path = (os.environ if environ is None else environ).get(REQUEUE_MARKER_ENV)
    if not path:
        return None
    marker = Path(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{reason}\n")
    return marker


def clear_requeue_marker(environ: dict | None = None) -> None:
    """Remove the requeue marker (the run stopped for a reason a restart cannot fix)."""
    path = (os.environ if environ is None else environ).get(REQUEUE_MARKER_ENV)
    if path:
        Path(path).unlink(missing_ok=True)
