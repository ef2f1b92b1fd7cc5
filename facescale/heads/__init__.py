"""Class-center heads; `build_head` turns a `HeadConfig` into this rank's Partial FC head."""

from __future__ import annotations

from typing import Any

import torch

from facescale.config.schema import HeadConfig, StorageDtype, choices
from facescale.heads.margins import build_margin
from facescale.heads.partial_fc import PartialFCHead

STORAGE_DTYPES = dict(zip(choices(StorageDtype), (torch.float32, torch.bfloat16), strict=True))

__all__ = ["PartialFCHead", "build_head", "STORAGE_DTYPES"]


def build_head(
    cfg: HeadConfig,
    num_classes: int,
    embedding_size: int,
    *,
    seed: int,
    betas: tuple[float, float] = (0.9, 0.999),
    process_group: Any = None,
    device: torch.device | str | None = None,
) -> PartialFCHead:
    """Build this rank's Partial FC head (centers on `device`, default CPU) from the `head:` config; `betas`:
    AdamW's (the run's `optim.betas`: arcface_torch steps backbone and centers with one optimizer)."""
    if cfg.storage_dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"head.storage_dtype = {cfg.storage_dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}"
        )
    if cfg.init_std <= 0:
        raise ValueError(f"head.init_std = {cfg.init_std!r} must be > 0 (0.01 is usual)")
    return PartialFCHead(
        num_classes,
        embedding_size,
        build_margin(cfg.margin),
        seed=seed,
        sample_rate=cfg.sample_rate,
        optimizer=cfg.optimizer,
        update=cfg.update,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        betas=betas,
        storage_dtype=STORAGE_DTYPES[cfg.storage_dtype],
        init_std=cfg.init_std,
        process_group=process_group,
        device=device,
    )
