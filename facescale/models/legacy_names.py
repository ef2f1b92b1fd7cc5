"""State dicts of facescale's MobileFaceNet and ViT saved before they took arcface_torch's parameter names.

Checkpoints written by earlier facescale versions name mbf layers `layers.0.0.weight`, `gdc.0.weight`,
`fc.weight`, and ViT layers `patch_embed.weight`, `blocks.N.mlp.0.weight` (and have no `mask_token` when
trained without masking). `upgrade_legacy_names` renames them so the weights of such runs can still be
evaluated, exported and used as `model.init_from`.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch

_MBF_RULES = [  # (old, new); the first match wins
    (re.compile(r"^layers\.(\d+)\.(\d+)\.layers\.(\d+)\.(\d+)\.(.+)$"),
     r"layers.\1.layers.\2.layers.\3.layers.\4.\5"),
    (re.compile(r"^layers\.(\d+)\.layers\.(\d+)\.(\d+)\.(.+)$"), r"layers.\1.layers.\2.layers.\3.\4"),
    (re.compile(r"^layers\.(\d+)\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$"),
     r"layers.\1.layers.\2.\3"),
    (re.compile(r"^conv_sep\.(\d+)\.(.+)$"), r"conv_sep.layers.\1.\2"),
    (re.compile(r"^gdc\.(\d+)\.(.+)$"), r"features.layers.0.layers.\1.\2"),
    (re.compile(r"^fc\.weight$"), "features.layers.2.weight"),
    (re.compile(r"^features\.(weight|bias|running_mean|running_var|num_batches_tracked)$"),
     r"features.layers.3.\1"),
]
_VIT_RULES = [
    (re.compile(r"^patch_embed\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.0\.(.+)$"), r"blocks.\1.mlp.fc1.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.2\.(.+)$"), r"blocks.\1.mlp.fc2.\2"),
]


def _rename(key: str, rules: list) -> str:
    for pattern, replacement in rules:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def upgrade_legacy_names(
    state: dict[str, torch.Tensor], model_keys: Collection[str] | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state with current names, which legacy layout was found or None); other state dicts pass unchanged.

    `model_keys`: the state_dict keys of the model it is for; a state whose keys are all the model's own (any
    backbone, a plug-in's too, that merely uses such names) is never renamed."""
    if model_keys is not None and set(state) <= set(model_keys):
        return state, None
    if "gdc.0.weight" in state:
        return {_rename(k, _MBF_RULES): v for k, v in state.items()}, "MobileFaceNet"
    if "patch_embed.weight" in state and "pos_embed" in state:
        upgraded = {_rename(k, _VIT_RULES): v for k, v in state.items()}
        if "mask_token" not in upgraded:  # saved with mask_ratio 0, where the token was not created
            dim = state["pos_embed"].shape[-1]
            upgraded["mask_token"] = torch.zeros(1, 1, dim, dtype=state["pos_embed"].dtype)
        return upgraded, "ViT"
    return state, None
