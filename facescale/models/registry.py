"""Backbone registry: `@register_backbone("r50")` on factories, `build_backbone(cfg)` builds by name."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from facescale.config.schema import ModelConfig, NormKind, choices
from facescale.errors import InputError

BackboneFactory = Callable[..., nn.Module]

NORM_CHOICES = choices(NormKind)

_REGISTRY: dict[str, BackboneFactory] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}  # the optional `model.*` keys each backbone reads
OPTIONAL_KEYS = ("drop_path_rate", "mask_ratio")  # `model.*` keys some built-in backbones read


class UnknownBackboneError(InputError, ValueError):
    """`model.name` is not a registered backbone; the message lists the known ones."""


def register_backbone(
    name: str, options: tuple[str, ...] = ()
) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator adding `factory(cfg: ModelConfig, **overrides) -> nn.Module` to the registry under `name`;
    `options` are the optional keys the factory reads: `model.*` keys of OPTIONAL_KEYS, and any other name is
    a key of `model.options` (a plug-in backbone's own settings, read from `cfg.options`)."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"backbone '{name}' is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = factory
        _OPTIONS[name] = options
        return factory

    return decorator


def list_backbones() -> list[str]:
    """Sorted names accepted by `build_backbone` (the valid values of `model.name`)."""
    return sorted(_REGISTRY)


def unknown_backbone_message(name: str) -> str:
    """Error text for an unknown name: the known names plus a difflib 'did you mean' when one is close."""
    known = list_backbones()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"model.name: unknown backbone '{name}'.{hint} Known backbones: {', '.join(known)} (a plug-in's "
            f"backbone is known once its module is loaded: FACESCALE_PLUGINS=module).")


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the `model.*` key when a ModelConfig value cannot build a backbone."""
    if cfg.name not in _REGISTRY:
        raise UnknownBackboneError(unknown_backbone_message(cfg.name))
    if cfg.norm not in NORM_CHOICES:
        raise ValueError(f"model.norm: '{cfg.norm}' is not one of {', '.join(NORM_CHOICES)}")
    if not isinstance(cfg.embedding_size, int) or cfg.embedding_size <= 0:
        raise ValueError(f"model.embedding_size: must be a positive integer, got {cfg.embedding_size!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout: must be in [0, 1), got {cfg.dropout!r}")
    reads = _OPTIONS.get(cfg.name, ())
    for key in cfg.options:
        if key not in reads:
            own = [k for k in reads if k not in OPTIONAL_KEYS]
            raise ValueError(f"model.options.{key}: backbone '{cfg.name}' has no such option (it reads "
                             f"{', '.join(own) if own else 'none'}); remove it")
    for key in OPTIONAL_KEYS:
        value = getattr(cfg, key)
        if value is None:
            continue
        if key not in _OPTIONS.get(cfg.name, ()):
            takers = ", ".join(n for n in list_backbones() if key in _OPTIONS.get(n, ()))
            raise ValueError(
                f"model.{key}: backbone '{cfg.name}' does not use it (only {takers} do); remove it"
            )
        if not 0.0 <= value < 1.0:
            raise ValueError(f"model.{key}: must be in [0, 1), got {value!r}")


def build_backbone(cfg: ModelConfig, **overrides: Any) -> nn.Module:
    """Instantiate the backbone `cfg.name`: images [B, 3, 112, 112] -> embeddings [B, cfg.embedding_size].

    `overrides` go to the factory as keyword arguments (e.g. `drop_path_rate=0.0` for the ViTs).
    """
    check_model_config(cfg)
    factory = _REGISTRY[cfg.name]
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [key for key in overrides if not takes_any and key not in accepted]
    if unknown:
        raise TypeError(f"backbone '{cfg.name}' takes no option(s) {', '.join(unknown)}")
    return factory(cfg, **overrides)
