"""The contract of a training mode: what it builds (`ModeRun`), what one micro-step hands the step skeleton
(`MicroOutput`), the small per-step context it receives (`StepContext`) and its `plan` (`ModePlan`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class StepContext:
    """What one optimizer step of any mode needs to know; `micro` advances through the micro-steps."""

    engine: Any  # the DeepSpeed engine of the backbone
    step: int  # 0-based optimizer step
    lr_backbone: float
    lr_head: float
    world_size: int
    grad_accumulation: int
    clock: Callable[[], float]
    micro: int = 0


@dataclass
class MicroOutput:
    """One micro-step's head loss (graph back to detached leaves) and the (live, detached) embedding pairs
    whose leaf gradients the skeleton hands to the engine; `head_s` is the mode's own head time."""

    loss: Tensor
    pairs: list[tuple[Tensor, Tensor]]
    stats: dict = field(default_factory=dict)
    head_s: float = 0.0


def detached_leaf(embeddings: Tensor) -> Tensor:
    """The fp32 leaf the head sees in place of the engine's output (decoupled backward)."""
    return embeddings.detach().float().requires_grad_(True)


class ModeRun(ABC):
    """A built mode of one rank: its head (checkpointed through `state_dict`), its loader, its step hooks.

    `loader` is iterated for batches (each handed to `micro_step`), has `steps_per_epoch` (micro-batches per
    rank and epoch), and `state_dict` / `load_state_dict` when its position is to survive a resume."""

    head: nn.Module
    loader: Any

    def describe(self, cfg: Any, num_classes: int, world_size: int) -> str:
        """The start-up plan's `head:` line (metrics/startup.py): what this rank's head is."""
        return f"{cfg.head.type} ({type(self.head).__name__})"

    def begin_step(self, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        """Before the first micro-step of an optimizer step."""

    @abstractmethod
    def micro_step(self, ctx: StepContext, batch: Any) -> MicroOutput:
        """Engine forward(s) and the head loss of one micro-batch (the skeleton runs the backward)."""

    def finish_step(self, ctx: StepContext, skipped: bool) -> None:  # noqa: B027 - optional hook
        """After the engine's step: the head's own update, or dropping its gradients when `skipped`."""


class ModePlan(ABC):
    """A mode's share of `facescale plan` for one rank: named bytes it keeps, bytes one micro-step adds,
    bytes it sends per micro-step, a summary line and rows for the node-count comparison table."""

    @property
    @abstractmethod
    def memory(self) -> dict[str, int]: ...

    @property
    @abstractmethod
    def step_memory(self) -> dict[str, int]: ...

    @property
    @abstractmethod
    def traffic(self) -> dict[str, float]: ...

    @property
    @abstractmethod
    def summary(self) -> str: ...

    @property
    @abstractmethod
    def table_rows(self) -> dict[str, str]: ...

    @property
    @abstractmethod
    def activation_images(self) -> int:
        """Images per micro-step whose backbone activations are kept for backward on this rank."""

    @property
    def host_memory(self) -> dict[str, int]:
        """Named bytes this rank keeps in host RAM (not device memory)."""
        return {}


class TrainingMode(ABC):
    """One registered training mode (see `facescale.modes.registry`)."""

    name: str
    resume_keys: tuple[str, ...] = ()  # config keys that fix this mode's saved state (checked on resume)
    options: tuple[str, ...] = ()  # the keys of `head.options` this mode reads (any other is refused)

    def check_config(self, cfg: Any, source: str, world_size: int | None) -> None:  # noqa: B027
        """Raise ConfigError for settings this mode cannot run (before any process group starts)."""

    @abstractmethod
    def build(self, cfg: Any, engine: Any, manifest: Any, *, rank: int, world_size: int, micro_batch: int,
              precision: str, device: torch.device) -> ModeRun:
        """This rank's head, loader and step hooks for `cfg`, around the already built `engine`."""

    def start_fresh(self, run: ModeRun, cfg: Any, log: Callable[[str], None]) -> None:  # noqa: B027
        """Called once on a run that does not resume, after `build`: e.g. load given class centers."""

    def resume_notes(self, saved: dict[str, Any], cfg: Any) -> list[str]:
        """Console lines on how the head state of a step saved with config `saved` (its config.yaml as a dict)
        is carried into `cfg` where a setting changed that the load converts (e.g. a storage dtype)."""
        return []

    def reshard_head_state(self, shards: list[dict[str, Any]], world_size: int,
                           rank: int) -> dict[str, Any] | None:
        """The head state of `rank` of `world_size` from saved `shards`, when they are in a format only this
        mode knows; None leaves them to the generic rule (row-sharded by class_partition, or replicated)."""
        return None

    @abstractmethod
    def plan(self, cfg: Any, data: Any, world: int, micro_batch: int, backbone: Any,
             rank: int | None = None) -> ModePlan:
        """Memory and traffic of `rank` (default: the rank that holds the most) at `world` ranks; `data`
        has `num_classes` and `num_samples` (None when unknown); `backbone` is a plan BackboneStats."""
