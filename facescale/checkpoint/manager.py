"""Save and restore a whole run in `<run_dir>/checkpoints/step_XXXXXXXX/`.

Layout of one step directory:
  backbone/            DeepSpeed's files for the engine (module, ZeRO optimizer partitions)
  backbone.pt          consolidated fp32 backbone weights (rank 0), for eval and export
  head/shard-RRRRR-of-WWWWW.pt   class centers + their optimizer state, with their global class range
  state/rank-RRRRR.pt  per-rank RNG states
  trainer.json         step, epoch, data cursor, sampler seed (rank 0's view; identical on all ranks)
  config.yaml          the resolved config
  COMPLETE             written last, after every rank finished
`checkpoints/latest` names the newest complete step directory and is replaced atomically.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from facescale.checkpoint.atomic import atomic_torch_save, atomic_write_text

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run dir, a checkpoints dir or a step dir; return the complete step directory it means."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / COMPLETE).is_file():
        missing = [
            n for n in ("backbone", "backbone.pt", "head", "trainer.json", COMPLETE) if not (p / n).exists()
        ]
        raise CheckpointError(
            f"checkpoint '{p}' is incomplete (missing: {', '.join(missing)}); it was "
            "interrupted while saving. Use an earlier step directory or checkpoints/latest"
        )
    return p


class CheckpointManager:
    """Collective save/load of one run; every rank must call `save` and `load` together."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, keep_last: int = 3) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        try:
            return resolve_checkpoint(self.root) if (self.root / "latest").is_file() else None
        except CheckpointError:
            return None

    def save(self, step: int, engine, head, trainer_state: dict[str, Any], config_yaml: str) -> Path:
        step_dir = self.root / f"step_{step:08d}"
        if self.rank == 0:
            if step_dir.exists():
                shutil.rmtree(step_dir)  # a previous, interrupted save of the same step
            for sub in ("head", "state"):
                (step_dir / sub).mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(step_dir), tag="backbone", save_latest=False)
        atomic_torch_save(
            head.state_dict(), step_dir / "head" / f"shard-{self.rank:05d}-of-{self.world_size:05d}.pt"
        )
        atomic_torch_save(rng_state(), step_dir / "state" / f"rank-{self.rank:05d}.pt")
        weights = consolidated_backbone_state(engine)
        if self.rank == 0:
            atomic_torch_save(weights, step_dir / "backbone.pt")
            atomic_write_text(
                step_dir / "trainer.json", json.dumps({**trainer_state, "world_size": self.world_size})
            )
            atomic_write_text(step_dir / "config.yaml", config_yaml)
        _barrier()
        if self.rank == 0:
            atomic_write_text(step_dir / COMPLETE, f"{step}\n")
            atomic_write_text(self.root / "latest", step_dir.name + "\n")
            self._purge()
        _barrier()
        return step_dir

    def _purge(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if (p / COMPLETE).is_file())
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | Path, engine, head) -> dict[str, Any]:
        """Restore engine, head shard and RNG; return the trainer state."""
        step_dir = resolve_checkpoint(path)
        trainer = json.loads((step_dir / "trainer.json").read_text())
        saved_world = trainer.get("world_size")
        if saved_world != self.world_size:
            raise CheckpointError(
                f"checkpoint '{step_dir}' was saved by {saved_world} ranks, this run has "
                f"{self.world_size}; reshard it first with `facescale reshard`"
            )
        loaded, _ = engine.load_checkpoint(
            str(step_dir), tag="backbone", load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load '{step_dir / 'backbone'}'")
        shard = step_dir / "head" / f"shard-{self.rank:05d}-of-{self.world_size:05d}.pt"
        if not shard.is_file():
            raise CheckpointError(
                f"checkpoint '{step_dir}' has no head shard for rank {self.rank} ({shard.name})"
            )
        head.load_state_dict(torch.load(shard, map_location="cpu", weights_only=False))
        rank_state = step_dir / "state" / f"rank-{self.rank:05d}.pt"
        if rank_state.is_file():
            set_rng_state(torch.load(rank_state, weights_only=False))
        return trainer


def consolidated_backbone_state(engine) -> dict[str, torch.Tensor] | None:
    """Full fp32 backbone weights on rank 0 (gathers ZeRO-3 partitions collectively); None elsewhere."""
    module = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    else:
        state = {
            k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in module.state_dict().items()
        }
    return state if rank == 0 else None


def load_backbone(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """Build a saved run's backbone in eval mode with its consolidated weights; returns (model, config)."""
    from facescale.config.load import load_config_text
    from facescale.models.registry import build_backbone

    step_dir = resolve_checkpoint(path)
    cfg = load_config_text((step_dir / "config.yaml").read_text(), str(step_dir / "config.yaml"))
    model = build_backbone(cfg.model)
    state = torch.load(step_dir / "backbone.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), cfg
