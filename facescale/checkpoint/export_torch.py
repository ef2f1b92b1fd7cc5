"""`facescale export torch`: a checkpoint's backbone as the plain fp32 state dict arcface_torch loads.

arcface_torch saves `backbone.module.state_dict()` with `torch.save` and loads it with
`get_model(name, num_features=N).load_state_dict(...)`; facescale's backbones carry the same names, so the
consolidated weights only need checking (strict load into a fresh model) and writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facescale.checkpoint.atomic import atomic_torch_save
from facescale.checkpoint.layout import (
    CONFIG,
    CheckpointError,
    read_text,
    resolve_checkpoint,
)

# facescale name -> arcface_torch get_model name (its only ViT-L is the dp005/mask005 one); the demo nets are
# facescale's own and have none
ARCFACE_TORCH_NAMES = {**{name: name for name in ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large",
                                                  "vit_t", "vit_s", "vit_b")},
                       "vit_l": "vit_l_dp005_mask_005"}


def export_torch(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the backbone of `checkpoint` (run, checkpoints or step dir) to `out`; return what was written."""
    from facescale.checkpoint.manager import load_backbone
    from facescale.config.load import load_config_text

    step_dir = resolve_checkpoint(checkpoint)
    cfg = load_config_text(read_text(step_dir / CONFIG), str(step_dir / CONFIG))
    if cfg.model.norm != "batch":
        raise CheckpointError(f"{step_dir}: model.norm is '{cfg.model.norm}'; arcface_torch's backbones use "
                              f"BatchNorm, so only model.norm=batch runs export to its format")
    model, _ = load_backbone(step_dir)  # a strict load, complete before anything is written
    plain = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
             for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(plain, out)
    return {"path": str(out), "tensors": len(plain), "model": cfg.model.name,
            "embedding_size": cfg.model.embedding_size,
            "arcface_torch_name": ARCFACE_TORCH_NAMES.get(cfg.model.name)}
