"""Start and stop the process group from the launcher's environment."""

from __future__ import annotations

import datetime

import torch.distributed as dist

from facescale.runtime import Runtime
from launcher.env import DistEnv
from launcher.ports import free_port


def init_distributed(env: DistEnv, runtime: Runtime, timeout_s: float = 1800.0) -> None:
    """Create the default process group (also for a single process, so every code path is the same).

    A single process without a launcher gets a private loopback port so parallel runs never collide.
    """
    if dist.is_initialized():
        return
    if env.source == "single":
        env = DistEnv(0, 0, 1, 1, "127.0.0.1", free_port(), "single")
    env.export()
    dist.init_process_group(
        backend=runtime.backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def shutdown_distributed() -> None:
    """Tear the process group down (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()
