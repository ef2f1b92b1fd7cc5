"""Names inside a step directory, and the checks that tell a complete checkpoint from a broken one.

A step directory is complete when `COMPLETE` exists (written last, after every rank finished) and every file
the saving world promised is there; anything else is refused with a message that names what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from facescale.errors import InputError

COMPLETE = "COMPLETE"
LATEST = "latest"
DEEPSPEED_DIR = "backbone"  # DeepSpeed's own files (tag "backbone"); valid only at the saving world size
DEEPSPEED_TAG = "backbone"
BACKBONE_WEIGHTS = "backbone.pt"  # consolidated fp32 module state (parameters and buffers of rank 0)
BACKBONE_OPTIMIZER = "backbone_optim.pt"  # consolidated per-parameter optimizer state (world-size free)
TRAINER_STATE = "trainer.json"
CONFIG = "config.yaml"
HEAD_DIR = "head"
STATE_DIR = "state"


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit this run."""

    default_fix = "point --checkpoint (or checkpoint.resume) at a complete step directory"


STAGING_SUFFIX = ".incomplete"  # a step being written; renamed to its step dir name once COMPLETE


def step_dir_name(step: int, version: int = 1) -> str:
    """`step_00001200`: zero-padded so that names sort by step; a later save of a step that already has a
    COMPLETE directory gets a new one, `step_00001200.2` (nothing complete is ever overwritten)."""
    return f"step_{step:08d}" + (f".{version}" if version > 1 else "")


def parse_step_dir(name: str) -> tuple[int, int] | None:
    """(step, version) of a step directory name, None for anything else (e.g. a staging directory)."""
    head, _, version = name.partition(".")
    if not head.startswith("step_") or not head[5:].isdigit() or (version and not version.isdigit()):
        return None
    return int(head[5:]), int(version or 1)


def head_shard_name(rank: int, world_size: int) -> str:
    """File of one rank's head shard, e.g. `shard-00001-of-00004.pt`."""
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


def rank_state_name(rank: int) -> str:
    """File of one rank's RNG, module buffers and data cursor, e.g. `rank-00001.pt`."""
    return f"rank-{rank:05d}.pt"


def expected_files(world_size: int, with_deepspeed: bool) -> list[str]:
    """Every path (relative to the step dir) a complete checkpoint of `world_size` ranks holds."""
    names = [BACKBONE_WEIGHTS, BACKBONE_OPTIMIZER, TRAINER_STATE, CONFIG]
    names += [f"{HEAD_DIR}/{head_shard_name(r, world_size)}" for r in range(world_size)]
    names += [f"{STATE_DIR}/{rank_state_name(r)}" for r in range(world_size)]
    if with_deepspeed:
        names.append(DEEPSPEED_DIR)
    return names


def missing_files(step_dir: Path, world_size: int, with_deepspeed: bool) -> list[str]:
    """The expected files that are absent from `step_dir`."""
    return [n for n in expected_files(world_size, with_deepspeed) if not (step_dir / n).exists()]


def read_text(path: Path) -> str:
    """A text file of a checkpoint (trainer.json, config.yaml, latest), or a CheckpointError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(
            f"{path} is not a text file ({exc.reason} at byte {exc.start}); the checkpoint is damaged or was "
            "altered"
        ) from None


def read_trainer_state(step_dir: Path) -> dict[str, Any]:
    """trainer.json of a step dir, or a CheckpointError naming the file."""
    path = step_dir / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{step_dir}' has no {TRAINER_STATE}; it is not a facescale step dir"
        )
    try:
        state = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    problem = _trainer_state_problem(state)
    if problem:
        raise CheckpointError(f"{path}: {problem}; the checkpoint is damaged. {_alternatives(step_dir)}")
    return state


def _is_count(value: Any, least: int) -> bool:
    """A JSON whole number (not true / false) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _trainer_state_problem(state: Any) -> str:
    """What makes a parsed trainer.json unusable for resume and export ('' when nothing): an object with a
    `step` >= 0, a `world_size` >= 1 and, when present, a `best_eval` of eval set -> [best value, step]."""
    if not isinstance(state, dict):
        return f"not a JSON object ({type(state).__name__})"
    for key, least in (("step", 0), ("world_size", 1)):
        if key not in state:
            return f"no {key}"
        if not _is_count(state[key], least):
            return f"{key} {repr(state[key])[:60]} is not a whole number >= {least}"
    best = state.get("best_eval")
    pairs = best.values() if isinstance(best, dict) else [] if best is None else [None]
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], (int, float)) and _is_count(p[1], 0)
               for p in pairs):
        return f"best_eval {repr(best)[:60]} is not a mapping of eval set to [best value, step]"
    return ""


def trained_world_size(state: dict[str, Any]) -> int:
    """The world size whose ranks trained a step (`state`: its trainer.json): `world_size`, or for a copy
    that `facescale reshard` cut for another one, `resharded_from.world_size`; the step's data cursor was
    planned for that one."""
    return int((state.get("resharded_from") or {}).get("world_size", state["world_size"]))


def read_saved_config(step_dir: Path) -> dict[str, Any]:
    """The config a step was saved with (its config.yaml as a plain dict; {} for a step without one), or a
    CheckpointError naming the file."""
    import yaml

    path = step_dir / CONFIG
    if not path.is_file():
        return {}
    try:
        saved = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not YAML ({str(exc).splitlines()[0]}); the checkpoint is damaged "
                              "or was altered") from None
    return saved if isinstance(saved, dict) else {}


def _saving_world(step_dir: Path) -> int | None:
    """World size of an interrupted save: from trainer.json when written, else from a head shard's name."""
    if (step_dir / TRAINER_STATE).is_file():
        try:
            return int(json.loads(read_text(step_dir / TRAINER_STATE))["world_size"])
        except (ValueError, KeyError, TypeError, CheckpointError):
            pass
    for shard in sorted((step_dir / HEAD_DIR).glob("shard-*-of-*.pt")):
        return int(shard.stem.rsplit("-", 1)[1])
    return None


def _alternatives(broken: Path) -> str:
    """Where to resume from instead of `broken`: the other complete step dirs beside it, newest first."""
    beside = list(broken.parent.iterdir()) if broken.parent.is_dir() else []
    others = sorted(
        (p for p in beside if p != broken and parse_step_dir(p.name) and (p / COMPLETE).is_file()),
        key=lambda p: parse_step_dir(p.name), reverse=True,
    )
    if not others:
        return f"No other complete step directory is in '{broken.parent}'; start afresh"
    return f"Resume from a complete one instead: {', '.join(str(p) for p in others[:3])}"


def verify_step_dir(step_dir: Path) -> dict[str, Any]:
    """Check that `step_dir` is a complete checkpoint; return its trainer state, else name the gaps."""
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint '{step_dir}' does not exist")
    if not (step_dir / COMPLETE).is_file():
        world = _saving_world(step_dir)
        gaps = missing_files(step_dir, world or 1, True)
        if world is None:
            gaps.append(f"{HEAD_DIR}/shard-*")
        raise CheckpointError(
            f"checkpoint '{step_dir}' is incomplete: no {COMPLETE} marker (missing: "
            f"{', '.join(gaps + [COMPLETE])}); it was interrupted while saving. {_alternatives(step_dir)}"
        )
    state = read_trainer_state(step_dir)
    world = state["world_size"]
    gaps = missing_files(step_dir, world, bool(state.get("has_deepspeed_files", True)))
    if gaps:
        raise CheckpointError(
            f"checkpoint '{step_dir}' is marked {COMPLETE} but lacks {', '.join(gaps)} (saved by {world} "
            f"ranks); it was damaged after saving. {_alternatives(step_dir)}"
        )
    return state


def _latest_step(latest: Path) -> str:
    """The step directory name a `latest` file holds; an empty one (a partial copy of the run) is named."""
    name = read_text(latest).strip()
    if not name:
        raise CheckpointError(f"'{latest}' is empty, where it names the newest complete step directory; "
                              "write that name into it (e.g. step_00000050) or point at a step directory")
    return name


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run dir, its `checkpoints` dir, its `latest` file or a step dir; return the complete step dir
    it means."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist")
    if p.is_file() and p.name == LATEST:
        p = p.parent / _latest_step(p)
    elif p.is_file():
        raise CheckpointError(f"checkpoint '{p}' is a file; point at a run directory, its checkpoints/ or a "
                              "step directory (checkpoints/step_XXXXXXXX)")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / LATEST).is_file():
        p = p / _latest_step(p / LATEST)
    elif not (p / TRAINER_STATE).exists() and not (p / COMPLETE).exists() and any(p.glob("step_*")):
        raise CheckpointError(f"'{p}' holds step directories but no '{LATEST}'; name one step dir explicitly")
    verify_step_dir(p)
    return p
