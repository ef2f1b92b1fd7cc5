"""Scalars and images to TensorBoard, metrics.jsonl and optionally W&B (rank 0); console lines via logging."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return (min(later_steps), max(later_steps)) if later_steps else None


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
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None:
            self.superseded = set_aside_lines_after(run_dir, resumed_at)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_at is None else resumed_at + 1  # TensorBoard hides events at >= this
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if wandb is not None and wandb.project and wandb.mode != "disabled":
            from facescale.metrics.wandb_logger import WandbLogger

            self._wandb = WandbLogger(wandb, run_dir, config or {})
        self._jsonl = open(run_dir / JSONL, "a")  # noqa: SIM115 - kept open for the run

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.scalars(step, clean)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, tag: str, image_hwc: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc, step, dataformats="HWC")
        if self.enabled and self._wandb is not None:
            self._wandb.image(step, tag, image_hwc)

    def console(self, line: str) -> None:
        """An INFO line on rank 0's console and train.log (see facescale.metrics.console)."""
        if self.enabled:
            from facescale.metrics.console import run_logger

            run_logger().info(line)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
