"""Save and restore a whole run in `<run_dir>/checkpoints/step_XXXXXXXX/`, on the same or another world size.

Layout of one step directory (names in `facescale.checkpoint.layout`):
  backbone/                      DeepSpeed's files (module, ZeRO partitions; tag "backbone"), same-W resume
  backbone.pt                    consolidated fp32 module state of rank 0 (eval, export, other-W resume)
  backbone_optim.pt              consolidated per-parameter optimizer state (other-W resume)
  head/shard-RRRRR-of-WWWWW.pt   `head.state_dict()` of each rank: its global class range in "meta"
  state/rank-RRRRR.pt            per-rank RNG states, module buffers, data-loader cursor
  trainer.json                   step, epoch, data cursor, seed, world size, guard counters (rank 0)
  config.yaml                    the resolved config
  COMPLETE                       written last, after every rank finished
`checkpoints/latest` names the newest complete step dir; it is replaced atomically after `COMPLETE`.
The learning rate is a pure function of the step (`train/schedule.py`) and Partial FC's sampling of
(seed, rank, step), so the step restores both. fp16's loss scale is part of DeepSpeed's optimizer files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from facescale.checkpoint.atomic import atomic_torch_save, atomic_write_text
from facescale.checkpoint.backbone_state import (
    consolidated_optimizer_state,
    consolidated_weights,
    set_consolidated_state,
)
from facescale.checkpoint.layout import (
    BACKBONE_OPTIMIZER,
    BACKBONE_WEIGHTS,
    COMPLETE,
    CONFIG,
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    HEAD_DIR,
    LATEST,
    STATE_DIR,
    TRAINER_STATE,
    CheckpointError,
    head_shard_name,
    missing_files,
    rank_state_name,
    resolve_checkpoint,
    step_dir_name,
)
from facescale.checkpoint.rank_state import (
    load_module_buffers,
    module_buffers,
    rng_state,
    seed_fresh_rng,
    set_rng_state,
)
from facescale.checkpoint.reshard import load_head_shards, reshard_head


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Collective save/load of one run; every rank must call `save` and `load` together.

    `on_file_written(name)`, if set, is called after each file this rank writes (a test seam for crashes
    between writes)."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, keep_last: int = 3) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.on_file_written: Callable[[str], None] | None = None

    def latest(self) -> Path | None:
        """The complete checkpoint `latest` names, or None when there is none yet."""
        if not (self.root / LATEST).is_file():
            return None
        return resolve_checkpoint(self.root)

    def _written(self, name: str) -> None:
        if self.on_file_written is not None:
            self.on_file_written(name)

    def save(
        self,
        step: int,
        engine,
        head,
        trainer_state: dict[str, Any],
        config_yaml: str,
        rank_extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write step dir `step` (collective); `rank_extra` (e.g. loader cursor) goes to this rank's file."""
        step_dir = self.root / step_dir_name(step)
        if self.rank == 0:
            if step_dir.exists():
                shutil.rmtree(step_dir)  # an earlier, interrupted save of the same step
            for sub in (HEAD_DIR, STATE_DIR):
                (step_dir / sub).mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(step_dir), tag=DEEPSPEED_TAG, save_latest=False)
        self._written(DEEPSPEED_DIR)
        shard = f"{HEAD_DIR}/{head_shard_name(self.rank, self.world_size)}"
        atomic_torch_save(head.state_dict(), step_dir / shard)
        self._written(shard)
        own = {"rng": rng_state(), "buffers": module_buffers(engine.module), **(rank_extra or {})}
        rank_file = f"{STATE_DIR}/{rank_state_name(self.rank)}"
        atomic_torch_save(own, step_dir / rank_file)
        self._written(rank_file)
        weights, optim = consolidated_weights(engine), consolidated_optimizer_state(engine)
        if self.rank == 0:
            atomic_torch_save(weights, step_dir / BACKBONE_WEIGHTS)
            atomic_torch_save(optim, step_dir / BACKBONE_OPTIMIZER)
            state = {
                **trainer_state,
                "step": step,
                "world_size": self.world_size,
                "has_deepspeed_files": True,
            }
            atomic_write_text(step_dir / TRAINER_STATE, json.dumps(state, indent=2))
            atomic_write_text(step_dir / CONFIG, config_yaml)
            self._written(TRAINER_STATE)
        _barrier()  # every rank's files are on disk
        if self.rank == 0:
            gaps = missing_files(step_dir, self.world_size, with_deepspeed=True)
            if gaps:
                raise CheckpointError(
                    f"saving '{step_dir}': {', '.join(gaps)} did not appear after every rank "
                    "finished (is checkpoints/ on a filesystem all ranks share?)"
                )
            atomic_write_text(step_dir / COMPLETE, f"{step}\n")
            atomic_write_text(self.root / LATEST, step_dir.name + "\n")
            self._purge()
        _barrier()
        return step_dir

    def _purge(self) -> None:
        """Delete all but the newest `keep_last` complete step dirs, and incomplete ones older than them."""
        steps = sorted(self.root.glob("step_*"))
        complete = [p for p in steps if (p / COMPLETE).is_file()]
        keep = set(complete[-self.keep_last :])
        newest_kept = min(keep) if keep else None
        for old in steps:
            if old not in keep and (old in complete or (newest_kept is not None and old < newest_kept)):
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | Path, engine, head) -> dict[str, Any]:
        """Restore engine, head shard, RNG and buffers (collective); return trainer.json plus, under
        "rank_state", this rank's extra state (e.g. its loader cursor)."""
        step_dir = resolve_checkpoint(path)
        trainer = json.loads((step_dir / TRAINER_STATE).read_text())
        saved_world = int(trainer["world_size"])
        same_world = saved_world == self.world_size and trainer.get("has_deepspeed_files", True)
        if same_world:
            loaded, _ = engine.load_checkpoint(
                str(step_dir), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load '{step_dir / DEEPSPEED_DIR}'")
        else:
            self._load_consolidated_backbone(step_dir, engine)
        self._load_head(step_dir, head, saved_world, same_world)
        rank_path = step_dir / STATE_DIR / rank_state_name(self.rank)
        own = torch.load(rank_path, weights_only=False) if rank_path.is_file() else {}
        if "rng" in own:
            set_rng_state(own["rng"])
        else:
            seed_fresh_rng(int(trainer.get("seed", 0)), self.rank, int(trainer["step"]))
        if same_world and "buffers" in own:
            load_module_buffers(engine.module, own["buffers"])
        trainer["rank_state"] = {k: v for k, v in own.items() if k not in ("rng", "buffers")}
        _barrier()
        return trainer

    def _load_consolidated_backbone(self, step_dir: Path, engine) -> None:
        weights = torch.load(step_dir / BACKBONE_WEIGHTS, map_location="cpu", weights_only=True)
        optim = torch.load(step_dir / BACKBONE_OPTIMIZER, map_location="cpu", weights_only=False)
        if optim is not None and not optim.get("supported", True):
            raise CheckpointError(
                f"'{step_dir}' was saved under ZeRO-3 without consolidated optimizer state; "
                "resume it on its saving world size"
            )
        try:
            set_consolidated_state(engine, weights, optim)
        except ValueError as exc:
            raise CheckpointError(f"'{step_dir}': {exc}") from exc

    def _load_head(self, step_dir: Path, head, saved_world: int, same_world: bool) -> None:
        if same_world:
            shard = step_dir / HEAD_DIR / head_shard_name(self.rank, saved_world)
            state = torch.load(shard, map_location="cpu", weights_only=False)
        else:
            shards = load_head_shards(step_dir, saved_world)
            state = reshard_head(shards, self.world_size, self.rank)
        try:
            head.load_state_dict(state)
        except ValueError as exc:
            raise CheckpointError(f"'{step_dir / HEAD_DIR}' does not fit this run's head: {exc}") from exc


def load_backbone(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """Build a saved run's backbone in eval mode with its consolidated weights; returns (model, config)."""
    from facescale.config.load import load_config_text
    from facescale.models.legacy_names import upgrade_legacy_names
    from facescale.models.registry import build_backbone

    step_dir = resolve_checkpoint(path)
    cfg = load_config_text((step_dir / CONFIG).read_text(), str(step_dir / CONFIG))
    model = build_backbone(cfg.model)
    state = torch.load(step_dir / BACKBONE_WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(upgrade_legacy_names(state)[0])  # mbf/ViT runs saved before arcface_torch names
    return model.eval(), cfg


consolidated_backbone_state = consolidated_weights  # the name tests/test_train_equivalence.py imports
