"""The F2C training mode: G-Net from the engine's backbone, the Dynamic Class Pool head, the dual loader; one
pool iteration per micro-step, the G-Net EMA step before the first micro-step's G-Net forward.

Per micro-step the engine runs two forwards (x, then y, so BatchNorm sees 1.5B-image batches as in the
reference) and the skeleton one backward through both P-Net feature leaves. Loss guard (in the skeleton):
a skipped step keeps that iteration's pool insertions: G-Net is an EMA of P-Net, which only ever takes
finite updates, so its features stay finite.
"""

from __future__ import annotations

from typing import Any

import torch

from facescale.data.hang_guard import read_hang_limit_s
from facescale.data.identity_index import IdentityIndex
from facescale.data.loader import build_train_loader
from facescale.data.shard_scan import scan_shards
from facescale.f2c.config_check import check_f2c_config
from facescale.f2c.dual_loader import DualLoader
from facescale.f2c.ema import GalleryNet
from facescale.f2c.head import DcpHead
from facescale.f2c.identity_loader import IdentityPairs, build_identity_loader
from facescale.f2c.plan import F2CPlan, plan_f2c
from facescale.f2c.reshard import is_sharded_pool, reshard_pool
from facescale.heads.margins import build_margin
from facescale.models.registry import build_backbone
from facescale.modes.base import MicroOutput, ModeRun, StepContext, TrainingMode, detached_leaf
from facescale.runtime import PRECISION_DTYPES


class F2CRun(ModeRun):
    """One rank's G-Net + pool head and its dual (instance, identity) loader."""

    def __init__(self, head: DcpHead, loader: DualLoader) -> None:
        self.head, self.loader = head, loader

    def describe(self, cfg: Any, num_classes: int, world_size: int) -> str:
        f2c = cfg.head.f2c
        return (f"F2C Dynamic Class Pool of {f2c.queue_size} identities ({f2c.pool}), "
                f"G-Net momentum {f2c.momentum}")

    def micro_step(self, ctx: StepContext, batch: Any) -> MicroOutput:
        (x_images, x_labels), (y_images, y_labels) = batch
        t0 = ctx.clock()
        if ctx.micro == 0:  # once per iteration, after the last optimizer step, before any G-Net forward
            self.head.update_gallery_net(ctx.engine.module)
        gallery_y = self.head.gallery_features(y_images)
        gallery_x = self.head.gallery_features(x_images)
        head_s = ctx.clock() - t0
        probe_x, probe_y = ctx.engine(x_images), ctx.engine(y_images)
        leaf_x, leaf_y = detached_leaf(probe_x), detached_leaf(probe_y)
        t1 = ctx.clock()
        loss, stats = self.head(leaf_x, leaf_y, x_labels, y_labels, gallery_x, gallery_y)
        return MicroOutput(loss, [(probe_x, leaf_x), (probe_y, leaf_y)], stats, head_s + ctx.clock() - t1)


class F2CMode(TrainingMode):
    """F2C: margin softmax over a pool of EMA-encoder features instead of a class-center matrix."""

    name = "f2c"

    def check_config(self, cfg: Any, source: str, world_size: int | None) -> None:
        check_f2c_config(cfg, source, world_size)

    def build(self, cfg: Any, engine: Any, manifest: Any, *, rank: int, world_size: int, micro_batch: int,
              precision: str, device: torch.device) -> F2CRun:
        if engine.zero_optimization_stage() == 3:
            raise ValueError(
                "head.type f2c needs deepspeed.zero_stage 0, 1 or 2: G-Net is a full EMA replica of "
                "the backbone on every rank, which ZeRO-3's partitioned parameters cannot feed"
            )
        f2c = cfg.head.f2c
        blank = build_backbone(cfg.model)
        autocast = None if precision == "fp32" else PRECISION_DTYPES[precision]  # G-Net as the backbone runs
        gallery_net = GalleryNet(engine.module, f2c.momentum, blank=blank, autocast_dtype=autocast).to(device)
        head = DcpHead(gallery_net, cfg.model.embedding_size, build_margin(cfg.head.margin),
                       queue_size=f2c.queue_size, seed=cfg.schedule.seed, pool_mode=f2c.pool, device=device)
        instances = build_train_loader(cfg.data, rank=rank, world_size=world_size, batch_size=micro_batch,
                                       seed=cfg.schedule.seed, device=device,
                                       hang_limit_s=read_hang_limit_s(cfg))
        skip = cfg.data.on_bad_sample == "skip"  # leave out the bad samples (found as the DALI reader does)
        pairs = IdentityPairs(
            IdentityIndex.build(manifest.directory, scan_shards(manifest, world_size) if skip else None),
            rank=rank,
            world_size=world_size,
            identities_per_batch=f2c.identities_per_rank or micro_batch,
            seed=cfg.schedule.seed,
            mirror=cfg.data.random_mirror,
            image_size=cfg.data.image_size,
            on_bad_sample=cfg.data.on_bad_sample,
        )
        identities = build_identity_loader(pairs, cfg.data.num_workers, cfg.data.read_timeout_s)
        return F2CRun(head, DualLoader(instances, identities, device))

    def reshard_head_state(self, shards: list[dict[str, Any]], world_size: int,
                           rank: int) -> dict[str, Any] | None:
        if not is_sharded_pool(shards[0]):
            return None  # a replicated pool is copied by the generic rule
        return reshard_pool(shards, world_size, rank)

    def plan(self, cfg: Any, data: Any, world: int, micro_batch: int, backbone: Any,
             rank: int | None = None) -> F2CPlan:
        return plan_f2c(cfg, data, world, micro_batch, backbone, rank)


MODE = F2CMode()
