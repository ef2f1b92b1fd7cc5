"""`model.init_from`: a new run starts from existing backbone weights (class centers: `head.init_from`)."""

from __future__ import annotations

from collections.abc import Callable

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
    from facescale.checkpoint.weights import WeightsError, arcface_torch_progress, load_backbone_weights

    state = _read_state(cfg)
    try:
        report = load_backbone_weights(backbone, state, strict=cfg.init_strict,
                                       source=f"model.init_from '{cfg.init_from}'")
    except WeightsError as exc:
        raise ConfigError(str(exc)) from None
    log(f"[facescale] model.init_from: loaded {report.loaded} backbone tensors from {cfg.init_from} "
        f"(class centers and optimizer start fresh)")
    for line in report.skipped_lines():
        log(f"[facescale] model.init_from (init_strict false): {line}")
    progress = arcface_torch_progress(cfg.init_from)
    if progress is not None and not start_step:
        step, epoch = progress
        log(f"[facescale] model.init_from: arcface_torch saved it at global_step {step} (epoch {epoch}) and "
            f"this run starts its schedule at step 0; to go on with that run's learning rate and epochs, set "
            f"schedule.start_step={step} (divided by its gradient_acc, if above 1)")
