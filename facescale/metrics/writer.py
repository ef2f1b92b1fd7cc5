"""Scalars and images to TensorBoard, metrics.jsonl and optionally W&B (rank 0); console lines via logging."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facescale.checkpoint.atomic import atomic_write_text


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory of this process on CUDA, else its peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


JSONL = "metrics.jsonl"
SUPERSEDED_JSONL = "metrics.superseded.jsonl"


def _logged_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line a crash cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def set_aside_lines_after(run_dir: Path, step: int) -> tuple[int, int] | None:
    """Move the metrics.jsonl lines of steps after `step` (logged by a job that went on past the checkpoint a
    run now resumes from), and any line a crash cut short, to metrics.superseded.jsonl; return the (first,
    last) step set aside, None if none. The set-aside lines are synced before metrics.jsonl is replaced."""
    path = run_dir / JSONL
    if not path.is_file():
        return None
    kept, later, later_steps = [], [], []
    for line in path.read_text().splitlines():
        logged_at = _logged_step(line)
        if logged_at is not None and logged_at <= step:
            kept.append(line + "\n")
        elif line.strip():
            later.append(line + "\n")
            later_steps += [] if logged_at is None else [logged_at]
    if not later:
        return None
    with open(run_dir / SUPERSEDED_JSONL, "a") as f:
        f.writelines(later)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_text(path, "".join(kept))
    return (min(later_steps), max(later_steps)) if later_steps else None


def _quiet_tensorboard_thread_errors() -> None:
    """TensorBoard's writer thread prints a traceback when a write fails (a full disk); the same error is
    raised to the writer's next call, which MetricsWriter reports in one line, so the thread's is dropped."""
    previous = threading.excepthook
    if getattr(previous, "facescale_quiet_tensorboard", False):
        return

    def hook(args: Any) -> None:
        thread_module = type(args.thread).__module__ if args.thread is not None else ""
        if not (thread_module.startswith("tensorboard.") and issubclass(args.exc_type, OSError)):
            previous(args)

    hook.facescale_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class MetricsWriter:
    """Writes TensorBoard events and a JSON-lines log on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, wandb: Any = None,
                 config: dict | None = None, resumed_at: int | None = None) -> None:
        """`wandb`: a WandbConfig; W&B is used when its `project` is set (and `config` is logged with it).
        `resumed_at`: the checkpoint's step a resumed run continues from. What an earlier job logged after
        it (its work past the checkpoint, lost and now done again) is hidden from TensorBoard (purge_step)
        and moved out of metrics.jsonl, so each step is shown once, as the resumed run computes it."""
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._wandb = None
        self.superseded: tuple[int, int] | None = None  # the steps set aside on resume
        if not enabled:
            return
        run_dir = Path(run_dir)
        self._names = {"_tb": f"TensorBoard's events in {run_dir / 'tensorboard'}", "_wandb": "W&B",
                       "_jsonl": str(run_dir / JSONL)}
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None:
            self.superseded = set_aside_lines_after(run_dir, resumed_at)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread_errors()
            purge = None if resumed_at is None else resumed_at + 1  # TensorBoard hides events at >= this
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if wandb is not None and wandb.project and wandb.mode != "disabled":
            from facescale.metrics.wandb_logger import WandbLogger

            def start_wandb() -> None:
                self._wandb = WandbLogger(wandb, run_dir, config or {})

            self._guarded("_wandb", start_wandb)  # a start that fails (no API key) warns as a failing write
        self._jsonl = open(run_dir / JSONL, "a")  # noqa: SIM115 - kept open for the run

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if self._tb is not None:
            self._guarded("_tb", lambda: [self._tb.add_scalar(k, v, step) for k, v in clean.items()])
        if self._wandb is not None:
            self._guarded("_wandb", lambda: self._wandb.scalars(step, clean))
        if self._jsonl is not None:
            line = json.dumps({"step": step, "time": time.time(), **clean}) + "\n"
            self._guarded("_jsonl", lambda: (self._jsonl.write(line), self._jsonl.flush()))

    def image(self, step: int, tag: str, image_hwc: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._guarded("_tb", lambda: self._tb.add_image(tag, image_hwc, step, dataformats="HWC"))
        if self.enabled and self._wandb is not None:
            self._guarded("_wandb", lambda: self._wandb.image(step, tag, image_hwc))

    def console(self, line: str) -> None:
        """An INFO line on rank 0's console and train.log (see facescale.metrics.console)."""
        if self.enabled:
            from facescale.metrics.console import run_logger

            run_logger().info(line)

    def close(self) -> None:
        if self._tb is not None:
            self._guarded("_tb", lambda: (self._tb.flush(), self._tb.close()))
        if self._jsonl is not None:
            self._guarded("_jsonl", self._jsonl.close)
        if self._wandb is not None:
            self._guarded("_wandb", self._wandb.close)
        self._tb = self._jsonl = self._wandb = None

    def _guarded(self, sink: str, write: Callable[[], Any]) -> None:
        """One sink's write; if it fails (a full disk, a lost mount, W&B's service), say so once and stop
        that sink for the rest of this process: the metrics never end the training (the next checkpoint
        still meets a full disk on its own terms, and a resume sets aside a line cut here)."""
        try:
            write()
        except Exception as error:  # noqa: BLE001 - any failure of a metrics sink is reported the same way
            failed = getattr(self, sink)
            setattr(self, sink, None)
            if sink == "_jsonl":
                with contextlib.suppress(Exception):
                    failed.close()
            self.console(f"[facescale] warning: {self._names[sink]} cannot be written ({error}); training "
                         "goes on without it until the run is started again")
