"""`build_dcp_mode`: what the trainer builds instead of the Partial FC head when `head.type` is "f2c"."""

from __future__ import annotations

from typing import Any

import torch

from facescale.config.schema import Config
from facescale.f2c.dual_loader import DualLoader
from facescale.f2c.ema import GalleryNet
from facescale.f2c.head import DcpHead
from facescale.f2c.identity_loader import IdentityPairs, build_identity_loader
from facescale.f2c.step import dcp_train_step
from facescale.heads.margins import build_margin

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def build_dcp_mode(
    cfg: Config,
    engine,
    manifest,
    *,
    rank: int,
    world_size: int,
    micro_batch: int,
    precision: str,
    device: torch.device,
) -> tuple[DcpHead, DualLoader, Any]:
    """(head, loader, step function) of F2C: G-Net from the engine's backbone, the pool, the dual loader."""
    from facescale.data.identity_index import IdentityIndex
    from facescale.data.loader import build_train_loader
    from facescale.models.registry import build_backbone

    if engine.zero_optimization_stage() == 3:
        raise ValueError(
            "head.type f2c needs deepspeed.zero_stage 1 or 2: G-Net is a full EMA replica of "
            "the backbone on every rank, which ZeRO-3's partitioned parameters cannot feed"
        )
    dcp = cfg.head.f2c
    gallery_net = GalleryNet(
        engine.module, dcp.momentum, blank=build_backbone(cfg.model), autocast_dtype=AUTOCAST.get(precision)
    ).to(device)
    head = DcpHead(
        gallery_net,
        cfg.model.embedding_size,
        build_margin(cfg.head.margin),
        queue_size=dcp.queue_size,
        seed=cfg.schedule.seed,
        pool_mode=dcp.pool,
        device=device,
    )
    instances = build_train_loader(
        cfg.data,
        rank=rank,
        world_size=world_size,
        batch_size=micro_batch,
        seed=cfg.schedule.seed,
        device=device,
    )
    pairs = IdentityPairs(
        IdentityIndex.build(manifest.directory),
        rank=rank,
        world_size=world_size,
        identities_per_batch=dcp.identities_per_rank or micro_batch,
        seed=cfg.schedule.seed,
        mirror=cfg.data.random_mirror,
        image_size=cfg.data.image_size,
    )
    loader = DualLoader(instances, build_identity_loader(pairs, cfg.data.num_workers), device)
    return head, loader, dcp_train_step
