"""The DCP head: G-Net, the pool and the two-pass F2C loss of one iteration (reference §1.2).

    pass A (trial):  probes x (P-Net) against the pool + gallery y (G-Net); the insertion is not kept
    pass B (commit): probes y (P-Net) against the pool + gallery x (G-Net); the insertion is kept
    loss = sum over both passes and both pool views (row 0, mixed) of L_cls + L_neg

Gallery features and labels are all-gathered (rank-major order) before insertion. Replicated pool: every rank
holds all Q slots and replays the same insertion, so the pools stay identical; each rank scores its own
probes. Sharded pool: slot owner = hash(label) mod W, each rank holds Q/W slots (`class_partition`) with its
own LRU, and all probes are scored against every shard (distributed softmax and top-K). The pool lives here,
outside the DeepSpeed engine, so it is never broadcast; `state_dict` carries pool, label map, recency, row
pointers, G-Net and the iteration count, so a resume is exact.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from facescale.config.schema import PoolKind, choices
from facescale.f2c.ema import GalleryNet
from facescale.f2c.loss import local_view_loss, outlier_top_k, sharded_view_loss
from facescale.f2c.pool import ClassPool, PoolTooSmallError, PoolView
from facescale.heads.margins import MarginSoftmaxSpec
from facescale.parallel.collectives import (
    all_gather_ints,
    all_gather_rows,
    all_gather_rows_with_grad,
    all_reduce_,
    rank_and_world,
)
from facescale.parallel.partition import class_partition

POOL_MODES = choices(PoolKind)


def label_owner(labels: Tensor, world_size: int) -> Tensor:
    """The rank holding a label's slot in a sharded pool: a multiplicative hash of the label, mod W."""
    hashed = (labels.to(torch.int64) * 0x9E3779B1) & 0xFFFFFFFF  # labels < 2**31: no int64 overflow
    return ((hashed >> 15) ^ hashed) % world_size


class DcpHead(nn.Module):
    """G-Net + Dynamic Class Pool + loss; `forward` takes one iteration's P-Net and G-Net features."""

    def __init__(
        self,
        gallery_net: GalleryNet,
        embedding_size: int,
        margin: MarginSoftmaxSpec,
        *,
        queue_size: int,
        seed: int,
        pool_mode: str = "replicated",
        process_group: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if pool_mode not in POOL_MODES:
            raise ValueError(f"head.f2c.pool = {pool_mode!r}: choose one of {', '.join(POOL_MODES)}")
        self.group = process_group
        self.rank, self.world_size = rank_and_world(process_group)
        self.pool_mode, self.queue_size, self.margin = pool_mode, queue_size, margin
        self.embedding_size = embedding_size
        start, count = (0, queue_size)
        if pool_mode == "sharded":
            start, count = class_partition(queue_size, self.world_size, self.rank)
            if queue_size < self.world_size:
                raise ValueError(f"a sharded pool of {queue_size} slots leaves ranks without slots")
        self.gallery_net = gallery_net
        self.pool = ClassPool(count, embedding_size, seed=seed, first_slot=start, device=device)
        self.top_k = outlier_top_k(queue_size)
        self.iteration = 0
        self.spilled_labels, self._warned_spill = 0, False  # sharded pool overflow (see `_spill`)

    def update_gallery_net(self, pnet: nn.Module) -> None:
        """The once-per-iteration EMA step of G-Net towards P-Net (call before `gallery_features`)."""
        self.gallery_net.update(pnet)
        self.iteration += 1

    def gallery_features(self, images: Tensor) -> Tensor:
        """G-Net features of gallery images: normalised, fp32, no gradient."""
        return self.gallery_net(images)

    def forward(
        self,
        probe_x: Tensor,
        probe_y: Tensor,
        labels_x: Tensor,
        labels_y: Tensor,
        gallery_x: Tensor,
        gallery_y: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of one iteration (identical on every rank) and its stats; probes are raw P-Net outputs."""
        stats = {"cls": 0.0, "neg": 0.0, "pooled": 0.0, "probes": 0.0}
        trial = self._pass(probe_x, labels_x, gallery_y, labels_y, commit=False, stats=stats)
        commit = self._pass(probe_y, labels_y, gallery_x, labels_x, commit=True, stats=stats)
        fill = self.pool.fill()
        if self.pool_mode == "sharded":
            fill = sum(row[0] for row in all_gather_ints([fill], self.pool.features.device, self.group))
        out = {
            "classification_loss": stats["cls"],
            "outlier_loss": stats["neg"],
            "pooled_probe_fraction": stats["pooled"] / max(1.0, stats["probes"]),
            "pool_fill": fill / self.queue_size,
            "top_k": float(self.top_k),
        }
        if self.pool_mode == "sharded":
            out["pool_spilled_labels"] = float(self.spilled_labels)
        return trial + commit, out

    def _gather_gallery(self, gallery: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """All ranks' gallery features and labels in rank order; a sharded pool keeps those it owns."""
        device = self.pool.features.device
        features = all_gather_rows(gallery.detach().to(device, torch.float32), self.group)
        labels = all_gather_rows(labels.to(device, torch.int64), self.group)
        if self.pool_mode == "sharded":
            own = label_owner(labels, self.world_size) == self.rank
            features, labels = features[own], labels[own]
        return features, labels

    def _check_capacity(self, labels: Tensor) -> int:
        """Refuse, on every rank at once, a batch with more distinct labels than a replicated pool holds; a
        sharded pool spills instead (see `_spill`). Returns the labels spilled over all shards."""
        distinct = self.pool.distinct_labels(labels)
        worst = all_gather_ints([distinct, self.pool.num_slots], labels.device, self.group)
        if self.pool_mode == "sharded":
            return sum(max(0, count - slots) for count, slots in worst)
        for rank, (count, slots) in enumerate(worst):
            if count > slots:
                where = f" (rank {rank}'s shard)" if self.pool_mode == "sharded" else ""
                raise PoolTooSmallError(
                    f"one gathered pass holds {count} distinct labels for {slots} pool slots{where}: labels "
                    f"would evict each other within the step. Raise head.f2c.queue_size (it is "
                    f"{self.queue_size}) or lower the batch / head.f2c.identities_per_rank"
                )
        return 0

    def _spill(self, features: Tensor, labels: Tensor, spilled: int) -> tuple[Tensor, Tensor]:
        """A sharded pool whose owner hash sends one shard more distinct labels in a pass than it has slots
        keeps the most recently gathered ones and leaves the rest out of the pool (their probes count as
        unpooled), with a warning and the `pool_spilled_labels` count, instead of stopping the run."""
        self.spilled_labels += spilled
        if spilled and not self._warned_spill and self.rank == 0:
            self._warned_spill = True
            warnings.warn(
                f"F2C sharded pool: {spilled} labels of one pass did not fit their owner's "
                f"{self.pool.num_slots} slots and were left out (counted in head/pool_spilled_labels); raise "
                "head.f2c.queue_size if this recurs", RuntimeWarning, stacklevel=3)
        unique, inverse = torch.unique(labels, return_inverse=True)
        if unique.numel() <= self.pool.num_slots:
            return features, labels
        last_seen = torch.full((unique.numel(),), -1, dtype=torch.int64, device=labels.device)
        last_seen.scatter_reduce_(0, inverse, torch.arange(labels.numel(), device=labels.device), "amax")
        kept = unique[torch.argsort(last_seen, descending=True)[: self.pool.num_slots]]
        keep = torch.isin(labels, kept)
        return features[keep], labels[keep]

    def _pass(
        self,
        probe: Tensor,
        probe_labels: Tensor,
        gallery: Tensor,
        gallery_labels: Tensor,
        *,
        commit: bool,
        stats: dict[str, float],
    ) -> Tensor:
        features, labels = self._gather_gallery(gallery, gallery_labels)
        spilled = self._check_capacity(labels)
        if self.pool_mode == "sharded":
            features, labels = self._spill(features, labels, spilled)
        view = self.pool.insert(features, labels, commit=commit)
        probes = nn.functional.normalize(probe.to(self.pool.features.device).float(), dim=1)
        probe_labels = probe_labels.to(self.pool.features.device, torch.int64)
        if self.pool_mode == "replicated":
            return self._replicated_loss(probes, probe_labels, view, stats)
        return self._sharded_loss(probes, probe_labels, view, stats)

    def _replicated_loss(self, probes: Tensor, labels: Tensor, view: PoolView, stats: dict) -> Tensor:
        targets = view.lookup(labels)
        num_pooled = int((targets >= 0).sum())
        counts = all_gather_ints([num_pooled, len(targets)], probes.device, self.group)
        pooled_total = sum(row[0] for row in counts)
        totals = (pooled_total, sum(row[1] for row in counts) - pooled_total)
        loss = probes.sum() * 0.0
        parts = torch.zeros(2, dtype=torch.float64, device=probes.device)
        for weight in (view.weight0, view.weight_mix):
            cls, neg = local_view_loss(probes, targets, weight, self.margin, self.top_k, totals)
            loss = loss + cls + neg
            parts += torch.stack([cls.detach(), neg.detach()]).double()
        all_reduce_(parts, torch.distributed.ReduceOp.SUM, self.group)
        self._add_stats(stats, parts, pooled_total, totals[0] + totals[1])
        loss_value = parts.sum().to(loss.dtype)
        return loss + (loss_value - loss.detach())  # the global value, the local gradient

    def _sharded_loss(self, probes: Tensor, labels: Tensor, view: PoolView, stats: dict) -> Tensor:
        all_probes = all_gather_rows_with_grad(probes, self.group)
        all_labels = all_gather_rows(labels, self.group)
        targets = view.lookup(all_labels)
        pooled = (targets >= 0).to(torch.int32)
        all_reduce_(pooled, torch.distributed.ReduceOp.MAX, self.group)
        pooled = pooled.bool()
        loss = all_probes.sum() * 0.0
        parts = torch.zeros(2, dtype=torch.float64, device=probes.device)
        for weight in (view.weight0, view.weight_mix):
            cls, neg = sharded_view_loss(
                all_probes, targets, pooled, weight, self.margin, self.top_k, self.group
            )
            loss = loss + cls + neg
            parts += torch.stack([cls.detach(), neg.detach()]).double()
        self._add_stats(stats, parts, int(pooled.sum()), len(pooled))
        return loss

    @staticmethod
    def _add_stats(stats: dict, parts: Tensor, pooled: int, probes: int) -> None:
        stats["cls"] += float(parts[0])
        stats["neg"] += float(parts[1])
        stats["pooled"] += pooled
        stats["probes"] += probes

    def metadata(self) -> dict[str, Any]:
        """What a saved state must match: pool layout, this rank's shard and the embedding size."""
        return {
            "queue_size": self.queue_size,
            "pool_mode": self.pool_mode,
            "world_size": self.world_size if self.pool_mode == "sharded" else 1,
            "rank": self.rank if self.pool_mode == "sharded" else 0,
            "slots": self.pool.num_slots,
            "embedding_size": self.embedding_size,
        }

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """{"meta", "pool": features/labels/recency/row pointers/clock, "gallery_net", "iteration"}."""
        return {
            "meta": self.metadata(),
            "pool": self.pool.pool_state(),
            "gallery_net": {k: v.detach().clone() for k, v in self.gallery_net.net.state_dict().items()},
            "iteration": self.iteration,
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Restore a state saved by `state_dict` for the same pool layout (else a clear error)."""
        meta = state_dict.get("meta") if isinstance(state_dict, dict) else None
        if meta is None or "pool" not in state_dict or "gallery_net" not in state_dict:
            raise ValueError(
                "not a DCP head state (expected meta, pool, gallery_net): was the checkpoint "
                "written with head.type partial_fc?"
            )
        if meta != self.metadata():
            raise ValueError(
                f"saved DCP pool {meta} does not match this run's {self.metadata()}; resume "
                "with the same head.f2c settings, embedding size and (sharded) world size"
            )
        self.pool.load_pool_state(state_dict["pool"])
        self.gallery_net.net.load_state_dict(state_dict["gallery_net"])
        self.iteration = int(state_dict["iteration"])
        return None
