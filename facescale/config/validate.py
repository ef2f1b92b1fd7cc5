"""Semantic checks of a loaded config, run before any process group starts."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path

from facescale.config.deepspeed import (
    DEEPSPEED_KEYS,
    RESERVED_EXTRA_KEYS,
    reserved_extra_keys,
    unknown_extra_keys,
)
from facescale.config.errors import ConfigError, check, did_you_mean, not_one_of, suggest
from facescale.config.eval_bins import eval_set_name
from facescale.config.schema import Config
from facescale.modes.registry import UnknownModeError, get_mode


def _choice_fields(node: object, prefix: str = "") -> list[tuple[str, object, tuple]]:
    """(dotted key, value, allowed values) of every `Literal`-typed field of the config tree."""
    out = []
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, hint, key = getattr(node, f.name), hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _choice_fields(value, key + ".")
        elif typing.get_origin(hint) is typing.Literal:
            out.append((key, value, typing.get_args(hint)))
    return out


def validate(cfg: Config, source: str = "<config>", world_size: int | None = None, *,
             check_paths: bool = True) -> None:
    """Raise ConfigError for impossible values; `world_size` enables the batch-divisibility check.

    `check_paths=False` leaves out what depends on this machine (data.shards, eval.bins, the wandb package),
    for `facescale plan`, which plans a run anywhere.
    """
    for key, value, allowed in _choice_fields(cfg):
        if value not in allowed:
            raise ConfigError(f"{source}: {key}: {not_one_of(value, list(allowed))}")

    from facescale.models.registry import check_model_config

    try:  # the name (known backbones, a close one), sizes, the keys only some backbones read
        check_model_config(cfg.model)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if cfg.model.compile:
        from facescale.models.compile import known_backends

        backends = known_backends()
        check(cfg.model.compile_backend in backends, source, "model.compile_backend",
               f"unknown torch.compile backend '{cfg.model.compile_backend}';"
               f"{suggest(cfg.model.compile_backend, backends, 'backends')}")

    if check_paths:
        _check_shards(cfg, source)
    check(cfg.data.image_size > 0, source, "data.image_size", "must be > 0")
    check(cfg.data.num_workers >= 0, source, "data.num_workers", "must be >= 0")
    check(cfg.data.dali_threads >= 1, source, "data.dali_threads", "must be >= 1")
    check(cfg.data.shard_sampling == "exact" or cfg.data.reader == "webdataset", source,
           "data.shard_sampling", "resampled shards are a webdataset-reader mode; set data.reader=webdataset "
           "(DALI reads exact epochs)")
    check(0.0 <= cfg.data.max_skip_fraction <= 1.0, source, "data.max_skip_fraction", "must be in [0, 1]")
    check(0 <= cfg.data.random_shift < cfg.data.image_size // 2, source, "data.random_shift",
           f"must be in [0, {cfg.data.image_size // 2}) pixels (0 disables it)")
    for key in ("brightness", "contrast"):
        check(0.0 <= getattr(cfg.data, key) < 1.0, source, f"data.{key}",
               "jitter must be in [0, 1) (0 disables it; 0.2 means factors in [0.8, 1.2])")

    head = cfg.head
    check(
        0.0 <= head.sample_rate <= 1.0,
        source,
        "head.sample_rate",
        f"{head.sample_rate} is outside [0, 1] "
        "(1.0 = all centers, 0.1 = Partial FC at 10%, 0 = positives only)",
    )
    check(head.margin.s > 0, source, "head.margin.s", "scale must be > 0 (64 is usual)")
    check(head.margin.m1 > 0, source, "head.margin.m1", "must be > 0 (1.0 = no multiplicative margin)")
    check(
        0.0 <= head.margin.interclass_filtering_threshold < 1.0,
        source,
        "head.margin.interclass_filtering_threshold",
        "must be in [0, 1) (0 disables filtering)",
    )
    check(0.0 <= head.momentum < 1.0, source, "head.momentum", "must be in [0, 1)")
    check(head.weight_decay >= 0, source, "head.weight_decay", "must be >= 0")
    check(head.lr_scale > 0, source, "head.lr_scale", "must be > 0")

    try:
        mode = get_mode(head.type)
    except UnknownModeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    unread = sorted(set(head.options) - set(mode.options))
    reads = f"it reads {', '.join(mode.options)}" if mode.options else "it reads none"
    check(not unread, source, f"head.options.{unread[0] if unread else ''}",
          f"training mode '{head.type}' has no such option ({reads}); remove it")
    mode.check_config(cfg, source, world_size)

    check(cfg.optim.lr > 0, source, "optim.lr", "must be > 0")
    check(0.0 <= cfg.optim.momentum < 1.0, source, "optim.momentum", "must be in [0, 1)")
    check(cfg.optim.weight_decay >= 0, source, "optim.weight_decay", "must be >= 0")
    check(cfg.optim.grad_clip >= 0, source, "optim.grad_clip", "must be >= 0 (0 disables clipping)")

    check(cfg.data.read_timeout_s == 0 or 0 < cfg.data.read_timeout_s < cfg.dist.timeout_s, source,
          "data.read_timeout_s", f"{cfg.data.read_timeout_s} must be 0 (wait for ever) or positive and "
          f"shorter than dist.timeout_s ({cfg.dist.timeout_s}), which the others wait in while one reads")

    sch = cfg.schedule
    check(sch.steps > 0, source, "schedule.steps", "must be > 0")
    check(
        0 <= sch.warmup_steps and (sch.epochs > 0 or sch.warmup_steps < sch.steps),
        source,
        "schedule.warmup_steps",
        f"{sch.warmup_steps} must be >= 0 and smaller than schedule.steps ({sch.steps})",
    )
    check(min(sch.epochs, sch.warmup_epochs, sch.batch_per_rank) >= 0, source, "schedule",
           "epochs, warmup_epochs and batch_per_rank must be >= 0 (0 = unset)")
    check(not sch.epochs or sch.warmup_epochs < sch.epochs, source, "schedule.warmup_epochs",
           f"{sch.warmup_epochs} must be smaller than schedule.epochs ({sch.epochs})")
    check(
        0 <= sch.start_step and (sch.epochs > 0 or sch.start_step < sch.steps),
        source,
        "schedule.start_step",
        f"{sch.start_step} must be >= 0 and smaller than schedule.steps ({sch.steps})",
    )
    check(sch.power > 0, source, "schedule.power", "must be > 0")
    check(sch.grad_accumulation >= 1, source, "schedule.grad_accumulation", "must be >= 1")
    check(sch.global_batch_size > 0, source, "schedule.global_batch_size", "must be > 0")
    if world_size is not None:
        per_step = world_size * sch.grad_accumulation
        check(
            sch.global_batch_size % per_step == 0,
            source,
            "schedule.global_batch_size",
            f"{sch.global_batch_size} is not divisible by world size {world_size} x grad_accumulation "
            f"{sch.grad_accumulation}; use a multiple of {per_step}, e.g. "
            f"{max(per_step, sch.global_batch_size // per_step * per_step)}",
        )

    for key in reserved_extra_keys(cfg.deepspeed.extra):
        check(False, source, f"deepspeed.extra.{key}", "facescale sets it or cannot follow its effect on the "
              f"batch or gradient scaling behind its surrogate backward; {RESERVED_EXTRA_KEYS[key]}")
    for key in unknown_extra_keys(cfg.deepspeed.extra):
        hint = did_you_mean(key, sorted(DEEPSPEED_KEYS)) or " remove it (see DeepSpeed's config docs)"
        check(False, source, f"deepspeed.extra.{key}",
              f"not a DeepSpeed config key (DeepSpeed would ignore it);{hint}")
    check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), source, "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    check(cfg.checkpoint.keep_last >= 1, source, "checkpoint.keep_last", "must be >= 1")
    check(
        cfg.checkpoint.max_bad_steps >= 0,
        source,
        "checkpoint.max_bad_steps",
        "must be >= 0 (non-finite steps in a row tolerated before the run stops)",
    )
    check(
        cfg.checkpoint.every_steps >= 0,
        source,
        "checkpoint.every_steps",
        "must be >= 0 (0 = only at the end)",
    )
    check(cfg.logging.every_steps >= 1, source, "logging.every_steps", "must be >= 1")
    check(bool(cfg.logging.run_dir), source, "logging.run_dir", "must be set")
    if check_paths:
        check_wandb_installed(cfg, source)
        _check_eval_bins(cfg, source)
    named: dict[str, int] = {}  # set name -> the first entry with it
    for i, b in enumerate(cfg.eval.bins):
        name = eval_set_name(b)
        first = named.setdefault(name, i)
        check(first == i, source, f"eval.bins[{i}]",
              f"'{b}' has the name '{name}' of eval.bins[{first}] '{cfg.eval.bins[first]}' (a set is named "
              "by its file name in TensorBoard tags, best accuracy and result.json); list each set once, and "
              "copy or rename a file that shares another's name")
    check(cfg.eval.every_steps >= 0, source, "eval.every_steps", "must be >= 0")
    check(cfg.eval.batch_size >= 1, source, "eval.batch_size", "must be >= 1")


def _check_shards(cfg: Config, source: str) -> None:
    """data.shards names a shard directory on this machine."""
    shards = Path(cfg.data.shards) if cfg.data.shards else None
    check(
        shards is not None,
        source,
        "data.shards",
        "no shard directory set; make one with `facescale synth --out DIR` or `facescale convert`, "
        "then pass --set data.shards=DIR",
    )
    check(
        shards.is_dir(),
        source,
        "data.shards",
        f"directory '{shards}' does not exist; create it with `facescale synth --out {shards}` "
        "or point data.shards at your converted shards",
    )
    check(
        (shards / "manifest.json").is_file(),
        source,
        "data.shards",
        f"'{shards}' has no manifest.json; it is not a facescale shard directory "
        "(write shards with `facescale synth` or `facescale convert`)",
    )


def _check_eval_bins(cfg: Config, source: str) -> None:
    """Every eval.bins entry is a file on this machine."""
    for i, b in enumerate(cfg.eval.bins):
        check(
            Path(b).is_file(),
            source,
            f"eval.bins[{i}]",
            f"verification set '{b}' not found (a name such as 'lfw' means <data.shards>/lfw.bin, where "
            "`facescale convert rec` copies the sets beside the .rec; or make one with `facescale make-bin`)",
        )


def check_wandb_installed(cfg: Config, source: str) -> None:
    """W&B logging needs the optional `wandb` package; say so before any process starts."""
    wandb = cfg.logging.wandb
    check(not wandb.project or wandb.mode == "disabled" or importlib.util.find_spec("wandb") is not None,
           source, "logging.wandb.project", "is set but the wandb package is not installed; "
           "pip install -e '.[wandb]' in the facescale checkout, or remove logging.wandb.project")
