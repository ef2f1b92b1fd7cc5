"""Step-directory checkpoints: DeepSpeed backbone, class-center shards, trainer state, completion marker."""

from facescale.checkpoint.layout import CheckpointError, resolve_checkpoint, verify_step_dir
from facescale.checkpoint.manager import CheckpointManager, load_backbone
from facescale.checkpoint.reshard import reshard_checkpoint, reshard_head

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "load_backbone",
    "reshard_checkpoint",
    "reshard_head",
    "resolve_checkpoint",
    "verify_step_dir",
]
