"""The Partial FC training mode: build the center shard and the instance loader, one loss per micro-batch,
the center optimizer's step once per optimizer step; its checkpoint state is row-sharded by class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from facescale.checkpoint.arcface_torch import NotCarried
from facescale.data.hang_guard import read_hang_limit_s
from facescale.data.loader import build_train_loader
from facescale.heads import build_head
from facescale.modes.base import MicroOutput, ModeRun, StepContext, TrainingMode, detached_leaf
from facescale.parallel.partition import class_partition
from facescale.partial_fc.init_centers import (
    check_center_source,
    open_center_source,
    read_center_rows,
    read_center_state_rows,
)
from facescale.partial_fc.plan import PartialFCPlan, plan_partial_fc


class PartialFCRun(ModeRun):
    """One rank's Partial FC head and instance loader."""

    def __init__(self, head: torch.nn.Module, loader: Any) -> None:
        self.head, self.loader = head, loader

    def describe(self, cfg: Any, num_classes: int, world_size: int) -> str:
        centers = class_partition(num_classes, world_size, 0)[1]
        return (f"Partial FC: {centers} centers per rank (of {num_classes}), {self.head.num_sample} sampled "
                f"per step (sample_rate {cfg.head.sample_rate}; all the positives of the global batch in its "
                f"shard when they are more), {cfg.head.update} update, margin {cfg.head.margin.type}")

    def begin_step(self, ctx: StepContext) -> None:
        self.head.zero_grad()

    def micro_step(self, ctx: StepContext, batch: Any) -> MicroOutput:
        images, labels = batch
        embeddings = ctx.engine(images)
        detached = detached_leaf(embeddings)
        t0 = ctx.clock()
        loss, stats = self.head(detached, labels, ctx.step, ctx.micro)
        return MicroOutput(loss, [(embeddings, detached)], stats, ctx.clock() - t0)

    def finish_step(self, ctx: StepContext, skipped: bool) -> None:
        if skipped:
            self.head.zero_grad()
        else:
            self.head.optimizer_step(ctx.lr_head)


class PartialFCMode(TrainingMode):
    """Model-parallel margin softmax over all identities (or a Partial FC sample of them)."""

    name = "partial_fc"
    resume_keys = ("head.optimizer",)  # the centers' optimizer state (momentum or Adam moments)

    def check_config(self, cfg: Any, source: str, world_size: int | None) -> None:
        """At the training start (`world_size` given; load_config's own pass runs first without it, and the
        files are opened once): head.init_from's files read and fit the data and the model. Not on a resume,
        which ignores them: a requeued job must not fail on files removed since it started."""
        from facescale.train.resume_check import resumes

        if cfg.head.init_from and world_size is not None and not resumes(cfg):
            from facescale.data.manifest import Manifest

            num_classes = Manifest.load(cfg.data.shards).num_classes
            check_center_source(open_center_source(cfg.head.init_from), num_classes, cfg.model.embedding_size)

    def start_fresh(self, run: ModeRun, cfg: Any, log: Callable[[str], None]) -> None:
        if not cfg.head.init_from:
            return
        head = run.head
        source = open_center_source(cfg.head.init_from)
        check_center_source(source, head.num_classes, head.embedding_size)
        state, note = _carried_state(source, head, cfg.head.optimizer) if cfg.schedule.start_step else (
            {}, "optimizer state starts fresh, as schedule.start_step is 0")
        head.load_center_values(read_center_rows(source, head.start, head.count), state)
        log(f"[facescale] head.init_from: class centers {head.start}..{head.start + head.count - 1} of "
            f"{head.num_classes} from {cfg.head.init_from} ({note})")

    def resume_notes(self, saved: dict[str, Any], cfg: Any) -> list[str]:
        """What PartialFCHead.load_state_dict does with centers and momentum saved at other settings."""
        head, notes = saved.get("head") or {}, []
        momentum = head.get("momentum")
        if cfg.head.optimizer == "sgd" and momentum is not None and (momentum > 0) != (cfg.head.momentum > 0):
            what = ("the saved momentum of the centers is dropped" if cfg.head.momentum == 0 else
                    "the centers' momentum starts at zero (none was saved)")
            notes.append(f"[facescale] head.momentum {momentum} -> {cfg.head.momentum}: {what}")
        dtype = head.get("storage_dtype")
        if dtype is not None and dtype != cfg.head.storage_dtype:
            how = ("the saved centers plus their residual" if cfg.head.storage_dtype == "fp32" else
                   f"the saved centers rounded to {cfg.head.storage_dtype}, the rounding error kept in "
                   "their residual")
            notes.append(f"[facescale] head.storage_dtype {dtype} -> {cfg.head.storage_dtype}: the centers "
                         f"load as {how}")
        return notes

    def build(self, cfg: Any, engine: Any, manifest: Any, *, rank: int, world_size: int, micro_batch: int,
              precision: str, device: torch.device) -> PartialFCRun:
        head = build_head(cfg.head, manifest.num_classes, cfg.model.embedding_size, seed=cfg.schedule.seed,
                          betas=cfg.optim.betas, device=device)  # built there: its optimizer's GPU blocks
        loader = build_train_loader(cfg.data, rank=rank, world_size=world_size, batch_size=micro_batch,
                                    seed=cfg.schedule.seed, device=device,
                                    hang_limit_s=read_hang_limit_s(cfg))
        return PartialFCRun(head, loader)

    def plan(self, cfg: Any, data: Any, world: int, micro_batch: int, backbone: Any,
             rank: int | None = None) -> PartialFCPlan:
        return plan_partial_fc(cfg, data.num_classes, world, micro_batch, rank)


def _carried_state(source: Any, head: Any, optimizer: str) -> tuple[dict[str, torch.Tensor], str]:
    """The optimizer state of this rank's center rows from arcface_torch's files (schedule.start_step goes on
    from their run), by the center optimizer's buffer names, and the log's note on it."""
    try:
        kind, rows, step = read_center_state_rows(source, head.start, head.count)
        if kind is not None and kind != optimizer:
            raise NotCarried(f"it was saved by {kind}, head.optimizer is {optimizer}")
    except NotCarried as exc:
        return {}, f"optimizer state starts fresh: {exc}"
    if not rows:
        return {}, "no optimizer state saved for these rows"
    kept = set(head.center_optimizer.state_tensors())
    if not set(rows) <= kept:  # e.g. head.momentum 0: no momentum buffer here
        return {}, ("optimizer state starts fresh: this run's center optimizer keeps no "
                    f"{', '.join(sorted(set(rows) - kept))}")
    if kind == "adamw" and step is not None:  # every row stepped together there
        rows["row_steps"] = torch.full((head.count,), int(step), dtype=torch.int64)
    return rows, f"with their saved {', '.join(sorted(rows))}"


MODE = PartialFCMode()
