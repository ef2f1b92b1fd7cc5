"""Preemption: a signal sets a flag; all ranks agree on it at a step boundary, save, and exit for requeue.

Never exit inside the handler (a collective may be in flight): the handler only records the signal.
The trainer calls `should_stop()` once per step; it MAX-reduces the flag so every rank stops at the same step.
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 3  # the batch script requeues the job when the trainer exits with this code
DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")


class PreemptionFlag:
    """Records a preemption signal; `should_stop` is a collective every rank calls at the same step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def _handle(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        sys.stderr.write(f"[facescale] received {self.signal_name}: saving at the next step boundary\n")

    @classmethod
    def install(cls, names: tuple[str, ...] = DEFAULT_SIGNALS) -> PreemptionFlag:
        flag = cls()
        for name in names:
            signal.signal(getattr(signal, name), flag._handle)
        return flag

    def should_stop(self, device: torch.device | None = None) -> bool:
        """True on every rank once any rank has been signalled."""
        local = torch.tensor([1 if self.signal_name else 0], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return bool(local.item())
