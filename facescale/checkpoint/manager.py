"""Save and restore a whole run in `<run_dir>/checkpoints/step_XXXXXXXX/`, on the same or another world size.

Layout of one step directory (names in `facescale.checkpoint.layout`):
  backbone/                      DeepSpeed's files (module, ZeRO partitions; tag "backbone"): resume at the
                                 same W and ZeRO stage
  backbone.pt                    consolidated fp32 module state of rank 0 (eval, export, other-W/stage resume)
  backbone_optim.pt              consolidated per-parameter optimizer state (other-W or other-stage resume)
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
from facescale.checkpoint.commit import commit_step, prepare_staging, purge, retire_dir, staging_dir
from facescale.checkpoint.deepspeed_io import WriteFailures, deferred_write_errors, safe_deepspeed_loads
from facescale.checkpoint.disk_space import (
    CheckpointSaveError,
    free_bytes,
    shortage_message,
    tensor_bytes,
    write_failure_message,
)
from facescale.checkpoint.layout import (
    BACKBONE_OPTIMIZER,
    BACKBONE_WEIGHTS,
    CONFIG,
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    HEAD_DIR,
    LATEST,
    STATE_DIR,
    TRAINER_STATE,
    CheckpointError,
    head_shard_name,
    rank_state_name,
    read_saved_config,
    read_text,
    read_trainer_state,
    resolve_checkpoint,
)
from facescale.checkpoint.rank_state import (
    load_module_buffers,
    module_buffers,
    rng_state,
    seed_fresh_rng,
    set_rng_state,
)
from facescale.checkpoint.reshard import load_head_shards, reshard_head
from facescale.checkpoint.safe_load import LEGACY_RANK_STATE_GLOBALS, plain_state, safe_load


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_text(text: str, path: Path) -> None:
    atomic_write_text(path, text)


def _collective_device() -> torch.device:
    """Where a small tensor for a collective must live (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
        """Write step `step` (collective) through a staging directory; `rank_extra` (e.g. loader cursor) goes
        to this rank's file. Any rank's write failure ends on every rank with a CheckpointSaveError and
        leaves `latest` as it was (see facescale/checkpoint/commit.py)."""
        failures = WriteFailures()
        staging = staging_dir(self.root, step)
        if self.rank == 0:
            failures.run(f"creating {staging}", prepare_staging, self.root, step)
        _barrier()
        head_state = plain_state(head.state_dict(), "head state")
        own = plain_state(
            {"rng": rng_state(), "buffers": module_buffers(engine.module), **(rank_extra or {})}, "rank state"
        )
        weights, optim = consolidated_weights(engine), consolidated_optimizer_state(engine)  # collective
        needed = self._bytes_needed(head_state, own, weights, optim)
        if self.rank == 0 and failures.error is None:
            free = free_bytes(self.root)
            if free < needed:
                failures.error = CheckpointSaveError(shortage_message(staging, needed, free))
        self._agree(failures, staging, needed)  # nothing was written yet when space is short
        with deferred_write_errors(engine, failures):
            engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, save_latest=False)
        self._written(DEEPSPEED_DIR)
        shard = f"{HEAD_DIR}/{head_shard_name(self.rank, self.world_size)}"
        self._write(failures, staging, shard, atomic_torch_save, head_state)
        rank_file = f"{STATE_DIR}/{rank_state_name(self.rank)}"
        self._write(failures, staging, rank_file, atomic_torch_save, own)
        if self.rank == 0:
            state = {**trainer_state, "step": step, "world_size": self.world_size}
            state["has_deepspeed_files"] = True
            self._write(failures, staging, BACKBONE_WEIGHTS, atomic_torch_save, plain_state(weights))
            self._write(failures, staging, BACKBONE_OPTIMIZER, atomic_torch_save, plain_state(optim))
            self._write(failures, staging, TRAINER_STATE, _write_text, json.dumps(state, indent=2))
            self._write(failures, staging, CONFIG, _write_text, config_yaml)
        self._agree(failures, staging, needed)  # every rank's files are on disk
        step_dir = None
        if self.rank == 0:
            step_dir = failures.run(f"committing {staging}", commit_step, self.root, staging, step,
                                    self.world_size, self._written)
            if step_dir is not None:
                failures.run(f"pruning {self.root}", purge, self.root, self.keep_last, step_dir)
                self._written("purge")
        self._agree(failures, staging, needed)
        return self._broadcast_path(step_dir)

    def _write(self, failures: WriteFailures, staging: Path, name: str, write: Callable, obj: Any) -> None:
        failures.run(f"writing {staging / name}", write, obj, staging / name)
        if failures.error is None:
            self._written(name)

    def _bytes_needed(self, head_state, own, weights, optim) -> int:
        """Bytes this save writes on all ranks: head shards, rank states, the consolidated backbone and
        DeepSpeed's files (module weights, fp32 master weights and optimizer moments once more)."""
        weights_bytes, optim_bytes = tensor_bytes(weights), tensor_bytes(optim)
        local = tensor_bytes(head_state) + tensor_bytes(own) + 3 * weights_bytes + 2 * optim_bytes
        total = torch.tensor([float(local)], dtype=torch.float64)
        if dist.is_initialized() and self.world_size > 1:
            total = total.to(_collective_device())
            dist.all_reduce(total)
        return int(total.item())

    def _agree(self, failures: WriteFailures, staging: Path, needed: int) -> None:
        """Collective: if any rank failed, rank 0 removes the staging directory and every rank raises the
        first failure's message."""
        messages = [self._failure_message(failures, staging, needed)]
        if dist.is_initialized() and self.world_size > 1:
            messages = [None] * self.world_size
            dist.all_gather_object(messages, self._failure_message(failures, staging, needed))
        first = next((m for m in messages if m), None)
        if first is None:
            return
        if self.rank == 0:
            retire_dir(staging)
        _barrier()
        raise CheckpointSaveError(first)

    def _failure_message(self, failures: WriteFailures, staging: Path, needed: int) -> str | None:
        if failures.error is None:
            return None
        if isinstance(failures.error, CheckpointError):
            return str(failures.error)
        return write_failure_message(staging, failures.what, failures.error, needed, self.rank)

    def _broadcast_path(self, step_dir: Path | None) -> Path:
        """Rank 0's committed step directory, on every rank."""
        names = [step_dir.name if step_dir is not None else None]
        if dist.is_initialized() and self.world_size > 1:
            dist.broadcast_object_list(names, src=0)
        return self.root / names[0]

    def load(self, path: str | Path, engine, head) -> dict[str, Any]:
        """Restore engine, head shard, RNG and buffers (collective); return trainer.json plus, under
        "rank_state", this rank's extra state (e.g. its loader cursor)."""
        step_dir = resolve_checkpoint(path)
        trainer = read_trainer_state(step_dir)
        saved_world = int(trainer["world_size"])
        same_world = saved_world == self.world_size and trainer.get("has_deepspeed_files", True)
        # DeepSpeed's files hold its partitioning: another ZeRO stage loads the consolidated copy
        saved_stage = (read_saved_config(step_dir).get("deepspeed") or {}).get("zero_stage")
        same_stage = saved_stage is None or int(saved_stage) == engine.zero_optimization_stage()
        if same_world and same_stage:
            with safe_deepspeed_loads(engine):  # DeepSpeed's own loader unpickles without a guard
                loaded, _ = engine.load_checkpoint(str(step_dir), tag=DEEPSPEED_TAG,
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load '{step_dir / DEEPSPEED_DIR}'")
        else:
            self._load_consolidated_backbone(step_dir, engine)
        self._load_head(step_dir, head, saved_world, same_world, trainer.get("head_type"))
        rank_path = step_dir / STATE_DIR / rank_state_name(self.rank)
        own = safe_load(rank_path, LEGACY_RANK_STATE_GLOBALS) if rank_path.is_file() else {}
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
        weights = safe_load(step_dir / BACKBONE_WEIGHTS)
        optim = safe_load(step_dir / BACKBONE_OPTIMIZER)
        if optim is not None and not optim.get("supported", True):
            raise CheckpointError(
                f"'{step_dir}' was saved under ZeRO-3 without consolidated optimizer state; "
                "resume it on its saving world size"
            )
        try:
            set_consolidated_state(engine, weights, optim)
        except ValueError as exc:
            raise CheckpointError(f"'{step_dir}': {exc}") from exc

    def _load_head(self, step_dir: Path, head, saved_world: int, same_world: bool,
                   head_type: str | None) -> None:
        if same_world:
            shard = step_dir / HEAD_DIR / head_shard_name(self.rank, saved_world)
            state = safe_load(shard)
        else:
            shards = load_head_shards(step_dir, saved_world)
            state = reshard_head(shards, self.world_size, self.rank, head_type)
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
    cfg = load_config_text(read_text(step_dir / CONFIG), str(step_dir / CONFIG))
    model = build_backbone(cfg.model)
    state = safe_load(step_dir / BACKBONE_WEIGHTS)
    try:
        model.load_state_dict(upgrade_legacy_names(state, model.state_dict().keys())[0])  # mbf/ViT: old names
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"'{step_dir / BACKBONE_WEIGHTS}' does not fit model.name={cfg.model.name} of its config.yaml: "
            f"{str(exc).splitlines()[0]}; the checkpoint is damaged"
        ) from None
    return model.eval(), cfg


consolidated_backbone_state = consolidated_weights  # the name tests/test_train_equivalence.py imports
