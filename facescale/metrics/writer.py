"""Scalars and images to TensorBoard, metrics.jsonl and optionally W&B (rank 0); console lines via logging."""

from __future__ import annotations

import json
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


class MetricsWriter:
    """Writes TensorBoard events and a JSON-lines log on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, wandb: Any = None,
                 config: dict | None = None) -> None:
        """`wandb`: a WandbConfig; W&B is used when its `project` is set (and `config` is logged with it)."""
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb is not None and wandb.project and wandb.mode != "disabled":
            from facescale.metrics.wandb_logger import WandbLogger

            self._wandb = WandbLogger(wandb, run_dir, config or {})
        self._jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - kept open for the run

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
