"""Start and stop the process group from the launcher's environment, with two collective timeouts.

Start-up (rendezvous, DeepSpeed set-up, loading the first checkpoint from a shared file system) runs under the
long `dist.init_timeout_s`. Once training runs, a dead or hung rank should end the job quickly, so
`use_training_timeout` lowers every process group's timeout to `dist.timeout_s`. `init_distributed` arranges
that this happens by itself when the trainer first asks `launcher.preemption` whether to stop, i.e. at the end
of the first training step (after start-up and the checkpoint load) — the trainer needs no extra call.
"""

from __future__ import annotations

import datetime
import sys

import torch.distributed as dist

from facescale.parallel.failure import register_rank
from facescale.runtime import Runtime
from launcher.env import DistEnv
from launcher.ports import free_port
from launcher.preemption import after_first_stop_check


def init_distributed(
    env: DistEnv, runtime: Runtime, timeout_s: float = 1800.0, train_timeout_s: float | None = None
) -> None:
    """Create the default process group (also for a single process, so every code path is the same).

    `timeout_s` covers start-up; after the first training step every group (DeepSpeed's too) uses
    `train_timeout_s`, or `timeout_s` when that is None.
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
    register_rank()  # lets a survivor name a killed or hung rank and its host (facescale.parallel.failure)
    # Also with train_timeout_s=None: groups created later by DeepSpeed get torch's default timeout (30 min),
    # so after step 1 every group is brought to the training timeout (or to the start-up one).
    training_timeout = timeout_s if train_timeout_s is None else train_timeout_s
    after_first_stop_check(lambda: use_training_timeout(training_timeout))


def process_groups() -> list:
    """Every process group this rank belongs to (the default one first), including DeepSpeed's own."""
    default = dist.distributed_c10d._get_default_group()
    others = [g for g in dist.distributed_c10d._world.pg_map if g is not default]
    return [default] + [g for g in others if not dist.distributed_c10d._rank_not_in_group(g)]


def use_training_timeout(timeout_s: float) -> None:
    """Set the collective timeout of all existing process groups to `timeout_s` (call on every rank)."""
    if not dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    for group in process_groups():
        dist.distributed_c10d._set_pg_timeout(timeout, group)
    if dist.get_rank() == 0:
        sys.stderr.write(f"[facescale] collective timeout is now {timeout_s:g} s (training)\n")


def shutdown_distributed() -> None:
    """Tear the process group down (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()
