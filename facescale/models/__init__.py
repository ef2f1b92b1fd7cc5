"""Face-recognition backbones, built by name: `build_backbone(ModelConfig(name="r50"))`."""

from facescale.models.registry import (
    UnknownBackboneError,
    build_backbone,
    list_backbones,
    register_backbone,
)

# importing the modules registers their backbones
from facescale.models import demo_net, iresnet, mobilefacenet, vit  # noqa: E402,F401  isort: skip

__all__ = ["UnknownBackboneError", "build_backbone", "list_backbones", "register_backbone"]
