"""arcface_torch's `save_all_states` checkpoints (checkpoint_gpu_<r>.pt): where their run was, and its
optimizer state (`state_optimizer`) in facescale's forms, so that a run going on from such a checkpoint
(`schedule.start_step`) keeps its SGD momentum or Adam moments, not only its weights and schedule position.

arcface_torch builds one torch optimizer over two parameter groups: the backbone's parameters in
`backbone.parameters()` order, then the rank's Partial FC weight (its block of the class centers). Its
state_dict keys the state by position in that order; the backbone's state is the same on every rank (DDP
averages the gradients), the centers' state is each rank's own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facescale.models.legacy_names import upgrade_legacy_names

OPTIMIZER_KEY = "state_optimizer"
BACKBONE_KEY = "state_dict_backbone"  # its backbone's state_dict
_KIND_BY_STATE = {"momentum_buffer": "sgd", "exp_avg": "adamw"}  # torch's names for the two state kinds


class NotCarried(Exception):
    """The saved optimizer state cannot go on here; the message says why (the run starts it fresh)."""


@dataclass(frozen=True)
class SavedOptimizer:
    """One arcface_torch rank's optimizer state, split by its two parameter groups."""

    kind: str  # "sgd" | "adamw"
    backbone: tuple[dict[str, torch.Tensor], ...]  # per backbone parameter, in backbone.parameters() order
    centers: dict[str, torch.Tensor]  # that rank's center rows ([rows, D] each); {} before its first step
    step: Any  # Adam's step count (every parameter steps together), None for SGD

    @property
    def state_names(self) -> list[str]:
        names = {k for entry in (*self.backbone, self.centers) for k in entry}
        return sorted(names)


def _kind(state: dict[Any, dict[str, Any]]) -> str:
    found = {_KIND_BY_STATE[k] for entry in state.values() for k in entry if k in _KIND_BY_STATE}
    if len(found) == 1:
        return found.pop()
    if not found:
        raise NotCarried("the saved optimizer holds no state (no step taken, or SGD without momentum)")
    raise NotCarried("the saved optimizer is neither torch's SGD nor AdamW")


def _tensors(entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The per-element state of one parameter (scalars such as Adam's `step` and unset buffers left out)."""
    return {k: v for k, v in entry.items() if torch.is_tensor(v) and v.dim() > 0}


def saved_optimizer(checkpoint: Any) -> SavedOptimizer:
    """The optimizer state of a loaded checkpoint_gpu_<r>.pt; NotCarried says why there is none to use."""
    if not isinstance(checkpoint, dict):
        raise NotCarried("it holds no optimizer state (a tensor, not an arcface_torch checkpoint)")
    saved = checkpoint.get(OPTIMIZER_KEY)
    if not isinstance(saved, dict) or not saved.get("param_groups"):
        raise NotCarried(f"the checkpoint has no {OPTIMIZER_KEY} (save_all_states writes it)")
    groups, state = saved["param_groups"], saved.get("state", {})
    _check_torch_layout(groups, state)
    if len(groups) != 2 or len(groups[1]["params"]) != 1:
        raise NotCarried(f"its {OPTIMIZER_KEY} has {len(groups)} parameter groups, not arcface_torch's two "
                         "(backbone, then the Partial FC weight)")
    kind = _kind(state)
    backbone = tuple(_tensors(state.get(i, {})) for i in groups[0]["params"])
    center_entry = state.get(groups[1]["params"][0], {})
    step = next((e["step"] for e in state.values() if "step" in e), None) if kind == "adamw" else None
    return SavedOptimizer(kind, backbone, _tensors(center_entry), step)


def _is_scalar(value: Any) -> bool:
    """A number or a one-element tensor (torch keeps Adam's `step` as either, by version)."""
    return isinstance(value, (int, float)) or torch.is_tensor(value) and value.numel() == 1


def _check_torch_layout(groups: Any, state: Any) -> None:
    """NotCarried unless `groups` and `state` have the shape of torch's Optimizer.state_dict(): a list of
    groups each listing its parameters' positions, and position -> that parameter's state with a numeric
    `step` (a damaged or hand-made file would otherwise fail on the first lookup)."""
    positions = [g.get("params") if isinstance(g, dict) else None for g in groups] \
        if isinstance(groups, list) else [None]
    if not all(isinstance(p, list) and all(isinstance(i, int) for i in p) for p in positions):
        raise NotCarried(f"its {OPTIMIZER_KEY}'s param_groups are not torch's (a list of groups, each with "
                         "its parameters' positions)")
    if not (isinstance(state, dict) and all(isinstance(entry, dict) for entry in state.values())):
        raise NotCarried(f"its {OPTIMIZER_KEY}'s state is not torch's (parameter position -> its state)")
    if not all(_is_scalar(entry["step"]) for entry in state.values() if "step" in entry):
        raise NotCarried(f"its {OPTIMIZER_KEY}'s state holds a step that is not a number")


def read_checkpoint(path: str | Path) -> Any:
    """A checkpoint_gpu_<r>.pt, memory-mapped, weights_only (no code runs; only what is used is read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (pre-zip) file cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def progress(path: str | Path) -> tuple[int, int] | None:
    """(global_step, epoch) a checkpoint_gpu_N.pt was saved at, or None for any other file or directory."""
    if not Path(path).is_file():
        return None
    try:
        obj = read_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a torch checkpoint that loads safely: no progress to report
        return None
    if not (isinstance(obj, dict) and BACKBONE_KEY in obj):
        return None
    step, epoch = obj.get("global_step"), obj.get("epoch")
    return (step, epoch) if isinstance(step, int) and isinstance(epoch, int) else None


def saved_parameter_names(checkpoint: dict[str, Any]) -> list[str]:
    """The backbone's state_dict keys in the file's order under facescale's names (buffers included): the
    order `backbone.parameters()` follows, so with the model's parameter names it maps positions to names."""
    raw = checkpoint.get(BACKBONE_KEY)
    if not isinstance(raw, dict):
        raise NotCarried(f"the checkpoint has no {BACKBONE_KEY}")
    keys = [k.removeprefix("module.") for k in raw]
    renamed = upgrade_legacy_names(dict.fromkeys(keys, torch.empty(0)))[0]  # order-preserving renames
    return list(renamed)[: len(keys)]  # keys the renaming adds (ViT's mask_token) were not in the file


def backbone_state(saved: SavedOptimizer, file_names: list[str], model_params: list[str],
                   trainable: dict[str, torch.Size]) -> dict[str, Any]:
    """facescale's consolidated optimizer state (checkpoint/backbone_state.py) for a backbone whose
    parameters are `model_params` and whose optimizer holds `trainable` (name -> shape); zero state where
    arcface_torch had none yet, or for a parameter its file lacks (a non-strict model.init_from)."""
    own = set(model_params)
    names = [n for n in file_names if n in own]
    if len(names) != len(saved.backbone):
        raise NotCarried(f"its first parameter group has {len(saved.backbone)} parameters and the file's "
                         f"backbone {len(names)} of this model's; they are not one model's")
    keys = sorted({k for entry in saved.backbone for k in entry})
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for name, entry in zip(names, saved.backbone, strict=True):
        if name not in trainable:  # frozen here: facescale's optimizer leaves it out
            continue
        for value in entry.values():
            if tuple(value.shape) != tuple(trainable[name]):
                raise NotCarried(f"its state for {name} has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(trainable[name])}")
        per_param[name] = {k: entry[k].float() if k in entry else torch.zeros(trainable[name]) for k in keys}
    for name, shape in trainable.items():
        per_param.setdefault(name, {k: torch.zeros(shape) for k in keys})
    scalars = {"step": saved.step} if saved.step is not None else {}
    return {"params": per_param, "scalars": scalars}
