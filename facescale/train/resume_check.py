"""Which checkpoint a run continues from, whether it was saved by a run of the same shape, and the global
batch it keeps from it.

A resumed run rebuilds its backbone, head and optimizers from the config and then loads the step into them, so
a config that changed a setting that fixes the saved tensors' names, shapes or kinds cannot continue: it is
refused before the process group starts, naming the keys and both values, instead of failing inside
DeepSpeed's or torch's state-dict loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facescale.checkpoint.layout import (
    CONFIG,
    LATEST,
    read_saved_config,
    resolve_checkpoint,
    trained_world_size,
)
from facescale.config.errors import ConfigError
from facescale.config.load import config_to_dict
from facescale.config.schema import Config
from facescale.modes.registry import get_mode

# settings that fix what any step holds (backbone parameters, head kind, backbone optimizer state); a mode
# adds its own (TrainingMode.resume_keys, e.g. Partial FC's head.optimizer)
STATE_KEYS = ("model.name", "model.embedding_size", "head.type", "optim.name")


def _named_step(cfg: Config) -> Path | None:
    """What checkpoint.resume names, unresolved: `latest` under this run's checkpoints for "auto" (when it
    exists), the given path, or None for a fresh start."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode == "auto":
        root = Path(cfg.logging.run_dir) / "checkpoints"
        return root if (root / LATEST).is_file() else None
    return Path(mode)


def resumes(cfg: Config) -> bool:
    """Whether this run will continue from a checkpoint (checkpoint.resume), so no `init_from` applies; cheap
    (the step it names is checked by `resume_step_dir`)."""
    return _named_step(cfg) is not None


def resume_step_dir(cfg: Config) -> Path | None:
    """The complete step directory this run continues from (checkpoint.resume), or None for a fresh start."""
    named = _named_step(cfg)
    return None if named is None else resolve_checkpoint(named)


def keep_saved_global_batch(cfg: Config, step_dir: Path | None) -> str:
    """A resumed run set up with schedule.batch_per_rank (arcface_torch style: the global batch follows the
    GPU count) keeps the global batch it was saved with, so its step count, learning rate and data position
    stay the run's when it resumes on another GPU count; the per-rank batch follows the new count instead.
    `step_dir`: `resume_step_dir(cfg)`. Call before resolve_schedule; returns the console line ("" when
    nothing changed)."""
    if not cfg.schedule.batch_per_rank or step_dir is None:
        return ""
    saved = _value(read_saved_config(step_dir), "schedule.global_batch_size")
    if not saved:
        return ""
    cfg.schedule.global_batch_size, cfg.schedule.batch_per_rank = int(saved), 0
    return (f"[facescale] schedule: resumed from {step_dir}, so the global batch stays {saved} as saved "
            "(schedule.batch_per_rank sets it for a fresh start only)")


def _value(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def check_resume_fits(cfg: Config, step_dir: Path | None, source: str = "config") -> None:
    """Raise ConfigError when `step_dir` (`resume_step_dir(cfg)`), the step this run resumes from, was saved
    with other STATE_KEYS (or the mode's resume_keys) values, or another global batch, read from the step's
    own config.yaml (a step without one is not checked)."""
    if step_dir is None:
        return
    saved, current = read_saved_config(step_dir), config_to_dict(cfg)
    keys = (*STATE_KEYS, *get_mode(cfg.head.type).resume_keys)
    changed = [(key, _value(saved, key), _value(current, key)) for key in keys
               if _value(saved, key) is not None and _value(saved, key) != _value(current, key)]
    if not changed:
        _check_global_batch(_value(saved, "schedule.global_batch_size"), cfg, step_dir, source)
        return
    diffs = ", ".join(f"{key} {old!r} (now {new!r})" for key, old, new in changed)
    same_backbone = not any(key.startswith("model.") for key, _, _ in changed)
    weights = f" with model.init_from: {step_dir} to take its backbone weights" if same_backbone else ""
    raise ConfigError(
        f"checkpoint.resume: {step_dir} was saved with {diffs}, so it cannot continue with this config",
        where=source,
        fix=f"set those keys back to the saved values (its {CONFIG}) to continue, or start a new run "
            f"(another logging.run_dir, or checkpoint.resume: none){weights}")


def _check_global_batch(saved: int | None, cfg: Config, step_dir: Path, source: str) -> None:
    """Raise ConfigError when the step was saved with another schedule.global_batch_size (resolved, so
    batch_per_rank's too): its step count, learning rate schedule and data position count steps of the
    saved batch, so the resumed run would skip or repeat data and rescale its schedule."""
    now = cfg.schedule.global_batch_size
    if saved is None or int(saved) == now:
        return
    raise ConfigError(
        f"checkpoint.resume: {step_dir} was saved with schedule.global_batch_size {saved} (now {now}); its "
        f"step count, learning rate schedule and data position count steps of {saved} samples, so it cannot "
        "continue with another global batch",
        where=source,
        fix=f"set schedule.global_batch_size: {saved} (or use schedule.batch_per_rank, which keeps the saved "
            "global batch on any GPU count) to continue, or start a new run (another logging.run_dir, or "
            f"checkpoint.resume: none) with model.init_from: {step_dir} to take its backbone weights")


def cursor_batch(state: dict[str, Any], step_dir: Path) -> int | None:
    """The samples, over all ranks, of one batch of a step's data cursor (its `step_in_epoch` counts
    micro-batches): trainer.json's `cursor_batch`, or for a step saved before it was kept, its config's
    global batch / grad accumulation; None when neither says."""
    if state.get("cursor_batch"):
        return int(state["cursor_batch"])
    saved = read_saved_config(step_dir)
    batch, steps = _value(saved, "schedule.global_batch_size"), _value(saved, "schedule.grad_accumulation")
    return int(batch) // int(steps) if batch and steps else None


def recount_cursor(cursor: dict, saved_batch: int, batch: int, steps_per_epoch: int) -> dict:
    """`cursor`, saved in batches of `saved_batch` samples (over all ranks), in this run's batches of `batch`
    (another schedule.grad_accumulation): the same position in samples where it divides, else the start of
    the batch that holds it (see `epoch_plan_change`); at most the end of this run's epoch."""
    if saved_batch == batch or not cursor.get("step_in_epoch"):
        return cursor
    samples = int(cursor["step_in_epoch"]) * saved_batch
    return {**cursor, "step_in_epoch": min(samples // batch, steps_per_epoch)}


def epoch_plan_change(cfg: Config, step_dir: Path, state: dict[str, Any], world_size: int,
                      cursor: dict | None, planned_by_workers: bool, batch: int | None = None) -> str | None:
    """A line saying that the epoch in progress is planned anew, or None: each rank's part of an epoch (and,
    where `planned_by_workers`, each worker's) follows the world size and data.num_workers, so a resume with
    other ones draws the rest of that epoch from the new plan; the samples of its first batches may then
    repeat or be missed in that epoch (later epochs are whole). `state`: the step's trainer.json; its cursor
    (as saved) was planned for the ranks that trained it, also where `facescale reshard` cut it for others.
    `batch`: this run's samples per cursor batch over all ranks; another one (schedule.grad_accumulation)
    keeps the position only where it divides the samples done and one reader stream cuts a rank's batches
    (several workers take turns by batch)."""
    if not cursor or not cursor.get("step_in_epoch"):
        return None
    saved_world = trained_world_size(state)
    changes = [f"world size {saved_world} -> {world_size}"] if saved_world != world_size else []
    saved_workers = _value(read_saved_config(step_dir), "data.num_workers")
    if planned_by_workers and saved_workers is not None and saved_workers != cfg.data.num_workers:
        changes.append(f"data.num_workers {saved_workers} -> {cfg.data.num_workers}")
    epoch, done = cursor["epoch"], cursor["step_in_epoch"]
    saved_batch = cursor_batch(state, step_dir) or batch
    if batch and saved_batch != batch:
        split = done * saved_batch % batch != 0
        if split or (planned_by_workers and cfg.data.num_workers > 1):
            now = cfg.schedule.grad_accumulation
            changes.append(f"schedule.grad_accumulation {now * batch // saved_batch} -> {now}")
        done = done * saved_batch // batch
    if not changes:
        return None
    return (f"[facescale] {', '.join(changes)}: the rest of epoch {epoch} is drawn from the new plan, so "
            f"samples of its first {done} batches may repeat or be missed in it; later epochs are whole")
