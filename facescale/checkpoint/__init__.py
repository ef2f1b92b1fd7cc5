"""Step-directory checkpoints: DeepSpeed backbone, class-center shards, trainer state, completion marker."""

from facescale.checkpoint.manager import CheckpointError, CheckpointManager, load_backbone, resolve_checkpoint

__all__ = ["CheckpointError", "CheckpointManager", "load_backbone", "resolve_checkpoint"]
