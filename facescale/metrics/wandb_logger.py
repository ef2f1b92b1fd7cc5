"""Weights & Biases output (rank 0): the scalars and ROC images TensorBoard gets, one W&B run per run dir.

The W&B run id is kept in `<run_dir>/wandb_run_id`, so a requeued job resumes the same W&B run. Steps the
resumed job repeats (those after the last checkpoint) are ones W&B already holds; exact resume makes them
equal, and W&B keeps the first copy.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np

from facescale.config.schema import WandbConfig

RUN_ID_FILE = "wandb_run_id"


def import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise ImportError("logging.wandb.project is set but the wandb package is not installed; "
                          "pip install -e '.[wandb]' in the facescale checkout, "
                          "or unset logging.wandb.project") from None
    return wandb


class WandbLogger:
    """A thin writer over one W&B run; `wandb` is imported only when this is built."""

    def __init__(self, cfg: WandbConfig, run_dir: str | Path, config: dict[str, Any]) -> None:
        self._wandb = import_wandb()
        run_dir = Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B run ids: letters and digits
            id_file.write_text(run_id + "\n")
        self.run = self._wandb.init(
            project=cfg.project, entity=cfg.entity or None, name=cfg.name or run_dir.name, mode=cfg.mode,
            id=run_id, resume="allow", dir=str(run_dir), config=config,
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, tag: str, image_hwc: np.ndarray) -> None:
        self.run.log({tag: self._wandb.Image(image_hwc)}, step=step)

    def close(self) -> None:
        self.run.finish()
