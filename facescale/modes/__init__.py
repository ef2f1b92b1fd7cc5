"""Training modes as plug-ins: the contract a mode implements (`base`) and the registry that names them.

A mode (Partial FC, F2C, ...) owns its config checks, its head and loaders, the per-micro-batch loss, the
per-step finish, its checkpoint reshard rule and its `plan`; the trainer, step skeleton, checkpoint manager,
validation and `facescale plan` reach it only through `get_mode(cfg.head.type)`.
"""

from facescale.modes.base import MicroOutput, ModePlan, ModeRun, StepContext, TrainingMode
from facescale.modes.registry import UnknownModeError, get_mode, list_modes, register_mode

__all__ = [
    "MicroOutput",
    "ModePlan",
    "ModeRun",
    "StepContext",
    "TrainingMode",
    "UnknownModeError",
    "get_mode",
    "list_modes",
    "register_mode",
]
