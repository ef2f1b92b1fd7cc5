"""`model.init_from`: a new run starts from existing backbone weights (class centers: `head.init_from`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from facescale.config.errors import ConfigError
from facescale.config.schema import Config, ModelConfig
from facescale.train.resume_check import resumes


def _read_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from facescale.checkpoint.weights import WeightsError, read_backbone_weights

    try:
        return read_backbone_weights(cfg.init_from)
    except WeightsError as exc:
        raise ConfigError(f"model.init_from: {exc}") from None


def check_init_from(cfg: Config) -> None:
    """Before any process group: the file exists, reads, and fits the model (built on the meta device, no
    memory); a run that will resume skips it, since it never reads init_from."""
    if not cfg.model.init_from or resumes(cfg):
        return
    from facescale.checkpoint.weights import WeightsError, compare_weights
    from facescale.models.registry import build_backbone

    state = _read_state(cfg.model)
    with torch.device("meta"):
        model = build_backbone(cfg.model)
    try:
        compare_weights(model, state, strict=cfg.model.init_strict,
                        source=f"model.init_from '{cfg.model.init_from}'")
    except WeightsError as exc:
        raise ConfigError(str(exc)) from None


def init_backbone_from(cfg: ModelConfig, backbone: torch.nn.Module, log: Callable[[str], None],
                       start_step: int = 0) -> None:
    """Load `cfg.init_from` into the freshly built `backbone` (strict unless `cfg.init_strict` is false).

    Called once at build time, before the engine wraps the backbone; a resumed run never calls it. An
    arcface_torch checkpoint_gpu_N.pt says where its run was: without `start_step` the log says how to go on.
    """
    if not cfg.init_from:
        return
    from facescale.checkpoint.arcface_torch import progress as arcface_torch_progress
    from facescale.checkpoint.weights import WeightsError, load_backbone_weights

    state = _read_state(cfg)
    try:
        report = load_backbone_weights(backbone, state, strict=cfg.init_strict,
                                       source=f"model.init_from '{cfg.init_from}'")
    except WeightsError as exc:
        raise ConfigError(str(exc)) from None
    fresh = "" if start_step else " (class centers and optimizer start fresh)"
    log(f"[facescale] model.init_from: loaded {report.loaded} backbone tensors from {cfg.init_from}{fresh}")
    for line in report.skipped_lines():
        log(f"[facescale] model.init_from (init_strict false): {line}")
    progress = arcface_torch_progress(cfg.init_from)
    if progress is not None and not start_step:
        step, epoch = progress
        log(f"[facescale] model.init_from: arcface_torch saved it at global_step {step} (epoch {epoch}) and "
            f"this run starts its schedule at step 0; to go on with that run's learning rate, epochs and "
            f"optimizer state, set "
            f"schedule.start_step={step} (divided by its gradient_acc, if above 1)")


def carry_backbone_optimizer(cfg: Config, engine: Any, log: Callable[[str], None]) -> None:
    """schedule.start_step from an arcface_torch checkpoint_gpu_N.pt (model.init_from): that run's backbone
    optimizer state (SGD momentum or AdamW moments) goes on in `engine`, at any world size and ZeRO stage."""
    from facescale.checkpoint.arcface_torch import (
        BACKBONE_KEY,
        NotCarried,
        backbone_state,
        read_checkpoint,
        saved_optimizer,
        saved_parameter_names,
    )
    from facescale.checkpoint.backbone_state import full_shape, set_optimizer_state

    source = cfg.model.init_from
    try:
        checkpoint = read_checkpoint(source) if Path(source).is_file() else None
        if not (isinstance(checkpoint, dict) and BACKBONE_KEY in checkpoint):
            raise NotCarried("model.init_from holds weights only")
        saved = saved_optimizer(checkpoint)
        if saved.kind != cfg.optim.name:
            raise NotCarried(f"it was saved by {saved.kind}, optim.name is {cfg.optim.name}")
        if saved.kind == "sgd" and not cfg.optim.momentum:
            raise NotCarried("optim.momentum is 0: this run keeps no momentum")
        named = list(engine.module.named_parameters())
        trainable = {n: full_shape(p) for n, p in named if p.requires_grad}
        state = backbone_state(saved, saved_parameter_names(checkpoint), [n for n, _ in named], trainable)
    except NotCarried as exc:
        log(f"[facescale] schedule.start_step: the backbone's optimizer state starts fresh: {exc}")
        return
    set_optimizer_state(engine, state)
    log(f"[facescale] schedule.start_step: the backbone's {', '.join(saved.state_names)} of "
        f"{len(trainable)} parameters go on from {source}'s state_optimizer")
