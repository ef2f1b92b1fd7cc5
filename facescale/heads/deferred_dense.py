"""Dense SGD without streaming the unsampled rows every step (the CPU fused-kernel path).

`update: dense` moves every row each step: a row that was not sampled still takes a zero-gradient step
(momentum and weight decay). Streaming the whole shard and its momentum for that costs more than the step's
GEMMs at small batches (benchmarks/results/head_cpu.md). Instead each row records how many steps it has seen,
and the steps it missed are replayed - one by one, with their own learning rates, through the kernel code of
the every-step pass - just before the row is read again: when a forward samples it, or when anything reads
the whole shard (a checkpoint, an export, `head.centers`). Every `history` steps all rows are brought up to
date, so no row misses more steps than the learning-rate history holds. The values are bit for bit those of
the every-step pass (tests/test_deferred_dense.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from facescale.heads.native import CenterKernels

HISTORY_STEPS = 1024  # learning rates kept; all rows are brought up to date at least this often


class DeferredDense:
    """Per-row step counts and the recent learning rates of one shard (see the module docstring)."""

    def __init__(self, num_rows: int, history: int = HISTORY_STEPS) -> None:
        self.row_steps = torch.zeros(num_rows, dtype=torch.int64)  # steps each row has taken
        self.lr_history = torch.zeros(history, dtype=torch.float32)  # lr of step n at [n % history]
        self.applied = 0  # steps recorded since the last reset
        self.oldest = 0  # every row has taken at least this many
        self.lagging = False  # some row has missed steps
        self._rows: tuple | None = None  # (kernels, centers, state, inv_norms, mu, wd, eps): see bind

    def reset(self) -> None:
        """Every row is current (after a load or an every-step pass): forget the counts."""
        if self.applied:  # else they are all zero already (no pass over the counts on every eager step)
            self.row_steps.zero_()
        self.applied = self.oldest = 0
        self.lagging, self._rows = False, None

    def bind(
        self, kernels: CenterKernels, centers: Tensor, state: dict[str, Tensor], inv_norms: Tensor | None,
        mu: float, wd: float, eps: float,
    ) -> None:  # fmt: skip
        """The shard, its optimizer state and its cached norms that deferred steps apply to."""
        self._rows = (kernels, centers, state, inv_norms, mu, wd, eps)

    def catch_up(self, rows: Tensor | None, out: Tensor | None = None) -> None:
        """Replay the steps `rows` (None = every row) missed; `out` gets their current values, in order."""
        if self._rows is None or (not self.lagging and out is None):
            return
        kernels, centers, state, inv_norms, mu, wd, eps = self._rows
        kernels.catch_up(
            centers, rows, self.row_steps, self.applied, self.lr_history,
            residual=state.get("center_residual"), momentum=state.get("momentum_buffer"), inv_norms=inv_norms,
            mu=mu, wd=wd, eps=eps, out=out,
        )  # fmt: skip
        if rows is None:
            self.oldest, self.lagging = self.applied, False

    def make_room(self) -> None:
        """Before recording a step: bring every row up to date if one could fall out of the lr history."""
        if self.applied + 1 - self.oldest >= self.lr_history.numel():
            self.catch_up(None)

    def record(self, rows: Tensor, lr: float) -> None:
        """`rows` (current before it) took step `applied + 1` at learning rate `lr`; the others missed it."""
        self.applied += 1
        self.lr_history[self.applied % self.lr_history.numel()] = lr
        self.row_steps.index_fill_(0, rows, self.applied)
        self.lagging = rows.numel() < self.row_steps.numel()
