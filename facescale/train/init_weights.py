"""`model.init_from`: a new run starts from existing backbone weights (never class centers or optimizer)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from facescale.config.errors import ConfigError
from facescale.config.schema import ModelConfig


def init_backbone_from(cfg: ModelConfig, backbone: torch.nn.Module, log: Callable[[str], None]) -> None:
    """Load `cfg.init_from` into the freshly built `backbone` (strict unless `cfg.init_strict` is false).

    Called once at build time, before the engine wraps the backbone; a resumed run never calls it.
    """
    if not cfg.init_from:
        return
    from facescale.checkpoint.weights import WeightsError, load_backbone_weights, read_backbone_weights

    try:
        state = read_backbone_weights(cfg.init_from)
        report = load_backbone_weights(backbone, state, strict=cfg.init_strict,
                                       source=f"model.init_from '{cfg.init_from}'")
    except WeightsError as exc:
        raise ConfigError(str(exc) if str(exc).startswith("model.init_from") else
                          f"model.init_from: {exc}") from None
    log(f"[facescale] model.init_from: loaded {report.loaded} backbone tensors from {cfg.init_from} "
        f"(class centers and optimizer start fresh)")
    for line in report.skipped_lines():
        log(f"[facescale] model.init_from (init_strict false): {line}")
