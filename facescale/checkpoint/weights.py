"""Backbone weights from outside a run: arcface_torch `backbone.pth`, facescale `backbone.pt` or step dir.

Files are read with `torch.load(weights_only=True)` (tensors and containers only: an untrusted file cannot run
code), memory-mapped, so the class centers and optimizer state beside an arcface_torch backbone stay unread.
Loading compares names and shapes first, so a mismatch is reported key by key with the setting that fixes it,
instead of torch's wall of text.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from facescale.checkpoint.arcface_torch import BACKBONE_KEY, read_checkpoint
from facescale.checkpoint.layout import BACKBONE_WEIGHTS, LATEST, CheckpointError, resolve_checkpoint
from facescale.checkpoint.safe_load import TRUST_FIX, unsafe_reason
from facescale.errors import InputError
from facescale.models.legacy_names import upgrade_legacy_names

SHOWN = 6  # keys listed per kind in a mismatch report


class WeightsError(InputError, ValueError):
    """Backbone weights that cannot be read or do not fit the model; the message says what to change."""


@dataclass
class Settings:
    """How the caller names the settings a mismatch report points at (config keys or CLI options)."""

    model: str = "model.name"
    embedding_size: str = "model.embedding_size"
    lenient: str | None = "model.init_strict: false"  # None: no partial load where the caller needs all keys


@dataclass
class LoadReport:
    """What a load took and what it left out (non-strict loads only leave anything out)."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: list[str] = field(default_factory=list)

    def skipped_lines(self) -> list[str]:
        return [f"{kind}: {_shown(keys)}" for kind, keys in (
            ("kept at their initial values (not in the file)", self.missing),
            ("ignored (not in the model)", self.unexpected),
            ("ignored (other shape)", self.misshaped)) if keys]


def _shown(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def read_backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone state dict at `path`: a .pth/.pt file, or a facescale run/checkpoints/step directory
    (or checkpoints/latest)."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory; give an arcface_torch backbone.pth, a facescale "
                           f"backbone.pt or a facescale run/step directory")
    if p.is_dir() or (p.name == LATEST and p.is_file()):  # a run, checkpoints/, its `latest`, a step
        try:
            p = resolve_checkpoint(p) / BACKBONE_WEIGHTS
        except CheckpointError as exc:
            raise WeightsError(f"{path}: {exc}") from None
    try:
        obj = read_checkpoint(p)  # memory-mapped: of a checkpoint_gpu_<r>.pt only the backbone is read
    except pickle.UnpicklingError as exc:  # the weights-only loader refused it: nothing in it ran
        raise WeightsError(f"{p}: refusing to load it: {unsafe_reason(exc)}; {TRUST_FIX}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable or unsafe file gets the same advice
        raise WeightsError(f"{p}: not a readable torch state dict ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); give a file written by "
                           f"torch.save(model.state_dict())") from None
    if isinstance(obj, dict) and isinstance(obj.get(BACKBONE_KEY), dict):
        obj = obj[BACKBONE_KEY]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items()):
        raise WeightsError(f"{p}: holds no backbone state dict (a mapping of parameter names to tensors); "
                           f"export one with `facescale export torch` or torch.save(backbone.state_dict())")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)  # facescale's legacy mbf/ViT names are renamed against the model (compare_weights)


def infer_embedding_size(state: dict[str, torch.Tensor], default: int = 512) -> int:
    """The width of the last BatchNorm (every insightface backbone ends in one over the embedding)."""
    last = [v for k, v in state.items() if k.endswith("running_mean")]
    return int(last[-1].shape[0]) if last else default


def fitting_backbones(state: dict[str, torch.Tensor]) -> list[str]:
    """The registered backbones whose parameter names and shapes are exactly the file's, at the file's
    embedding size (each built on the meta device: no memory); how a bare backbone.pth names its network."""
    from facescale.config.schema import ModelConfig
    from facescale.models.registry import build_backbone, list_backbones

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    size, fits = infer_embedding_size(state), []
    for name in list_backbones():
        try:
            with torch.device("meta"):
                own = build_backbone(ModelConfig(name=name, embedding_size=size)).state_dict()
        except (ValueError, TypeError):
            continue
        if {k: tuple(v.shape) for k, v in own.items()} == shapes:
            fits.append(name)
    return fits


def _diagnose(missing: list[str], unexpected: list[str], misshaped: list[str], settings: Settings,
              state: dict[str, torch.Tensor]) -> str:
    if missing or unexpected:
        fits = fitting_backbones(state)
        which = (f"it fits {' or '.join(fits)}" if fits else "no registered backbone has exactly its keys")
        lenient = f", or use {settings.lenient} to load only the keys that match" if settings.lenient else ""
        return (f"the file was saved from another backbone ({which}): set {settings.model} to its "
                f"architecture{lenient}")
    file_embedding = infer_embedding_size(state, 0)
    hint = f" (the file's is {file_embedding})" if file_embedding else ""
    lenient = f", or use {settings.lenient} to keep a new embedding layer" if settings.lenient else ""
    return f"set {settings.embedding_size}{hint} to the file's embedding size{lenient}"


def compare_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True,
                    source: str = "weights", settings: Settings | None = None) -> LoadReport:
    """What loading `state` into `model` would take and leave out, without copying (a meta-device model
    works). Strict: any missing / unexpected / mis-shaped key raises WeightsError listing them."""
    settings = settings or Settings()
    own = model.state_dict()
    state = upgrade_legacy_names(state, own.keys())[0]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if strict and (missing or unexpected or misshaped):
        shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in misshaped]
        lines = [f"{kind} {len(keys)}: {_shown(keys)}" for kind, keys in (
            ("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        fix = _diagnose(missing, unexpected, misshaped, settings, state)
        raise WeightsError(f"{source} does not fit the model ({'; '.join(lines)}); {fix}")
    loaded = len(own) - len(missing) - len(misshaped)
    if not loaded:
        raise WeightsError(f"{source}: no key matches the model; set {settings.model} to the file's backbone")
    return LoadReport(loaded, missing, unexpected, misshaped)


def load_backbone_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True,
                          source: str = "weights", settings: Settings | None = None) -> LoadReport:
    """Copy `state` into `model` (see `compare_weights`); lenient: the matching keys load, the report lists
    the rest."""
    report = compare_weights(model, state, strict=strict, source=source, settings=settings)
    own = model.state_dict()
    state = upgrade_legacy_names(state, own.keys())[0]
    skipped = set(report.missing) | set(report.misshaped)
    take = {k: state[k].to(dtype=v.dtype) for k, v in own.items() if k not in skipped}
    model.load_state_dict({**own, **take})
    return report


def backbone_from_weights(path: str | Path, name: str, embedding_size: int | None = None,
                          settings: Settings | None = None) -> torch.nn.Module:
    """Build backbone `name` and load the weights at `path` strictly; eval mode. `embedding_size` None: the
    file's own (read from its last BatchNorm)."""
    from facescale.config.schema import ModelConfig
    from facescale.models.registry import build_backbone

    state = read_backbone_weights(path)
    size = embedding_size or infer_embedding_size(state)
    try:
        model = build_backbone(ModelConfig(name=name, embedding_size=size))
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    load_backbone_weights(model, state, strict=True, source=str(path), settings=settings)
    return model.eval()
