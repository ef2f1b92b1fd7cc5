"""Resolve RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from whichever launcher started us.

Supported: torchrun and the deepspeed launcher (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), mpirun (Open MPI's
OMPI_COMM_WORLD_* or PMI_*), and srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master = first job host).
Precedence is torchrun-style env > MPI > Slurm; two sources that both describe this process must agree.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from facescale.errors import InputError
from launcher.ports import job_port

DEFAULT_PORT = 29500


class LaunchEnvError(InputError, RuntimeError):
    """The launcher's environment is incomplete or self-contradictory."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | mpi | slurm | single

    def export(self, environ: dict | None = None) -> None:
        """Write the resolved values back as the env:// variables torch.distributed and DeepSpeed read."""
        env = os.environ if environ is None else environ
        env.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(env: Mapping[str, str], key: str, source: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchEnvError(f"{source}: {key}={env[key]!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm nodelist like 'gpu[01-03,07],cpu5' without needing scontrol."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        part = part.strip(",")
        m = re.fullmatch(r"(.*)\[(.*)\](.*)", part)
        if not m:
            if part:
                hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def slurm_hosts(nodelist: str) -> list[str]:
    """Hostnames of a Slurm nodelist, via `scontrol show hostnames` when available."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)


def _from_torchrun(env: Mapping[str, str]) -> DistEnv | None:
    keys = ("RANK", "WORLD_SIZE")
    present = [k for k in keys if k in env]
    if not present:
        return None
    if len(present) != len(keys):
        missing = [k for k in keys if k not in env]
        raise LaunchEnvError(
            f"torchrun-style env: {present} set but {missing} missing; "
            "set all of RANK, WORLD_SIZE (and LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or none"
        )
    world = _int(env, "WORLD_SIZE", "torchrun-style env")
    return DistEnv(
        rank=_int(env, "RANK", "torchrun-style env"),
        local_rank=_int(env, "LOCAL_RANK", "torchrun-style env") if "LOCAL_RANK" in env else 0,
        world_size=world,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
        source="torchrun",
    )


def _from_mpi(env: Mapping[str, str]) -> DistEnv | None:
    for prefix, rank_k, size_k, local_k, lsize_k in (
        (
            "OMPI",
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
        ("PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ):
        if rank_k in env and size_k in env:
            if local_k not in env:  # Slurm's pmi2 plugin sets PMI_RANK/PMI_SIZE alone: its SLURM_* say more
                continue
            world = _int(env, size_k, prefix)
            return DistEnv(
                rank=_int(env, rank_k, prefix),
                local_rank=int(env.get(local_k, 0)),
                world_size=world,
                local_world_size=int(env.get(lsize_k, world)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
                source="mpi",
            )
    return None


def _from_slurm(env: Mapping[str, str]) -> DistEnv | None:
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env or "SLURM_STEP_ID" not in env:
        return None  # the batch shell itself (no job step) is not a rank
    world = _int(env, "SLURM_NTASKS", "slurm")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    addr = env.get("MASTER_ADDR") or (slurm_hosts(nodelist)[0] if nodelist else "127.0.0.1")
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else job_port(job, restarts)
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", str(world))
    local_world = int(re.match(r"\d+", tasks_per_node).group()) if re.match(r"\d+", tasks_per_node) else world
    return DistEnv(
        rank=_int(env, "SLURM_PROCID", "slurm"),
        local_rank=int(env.get("SLURM_LOCALID", 0)),
        world_size=world,
        local_world_size=local_world,
        master_addr=addr,
        master_port=port,
        source="slurm",
    )


def resolve_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The rank layout of this process; a single process when no launcher is detected."""
    env = os.environ if environ is None else environ
    found = [d for d in (_from_torchrun(env), _from_mpi(env), _from_slurm(env)) if d is not None]
    if not found:
        return DistEnv(
            0,
            0,
            1,
            1,
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", DEFAULT_PORT)),
            "single",
        )
    chosen = found[0]
    if "TORCHELASTIC_RUN_ID" in env:
        # torchrun's agent set RANK/WORLD_SIZE; Slurm/MPI variables then describe the agents (one task per
        # node), and rendezvous order need not follow SLURM_PROCID, so they are not rank information.
        found = found[:1]
    for other in found[1:]:
        # srun running one torchrun per node legitimately differs (fewer Slurm tasks than ranks); an srun with
        # one task per rank must agree with what torchrun-style variables say.
        if other.world_size == chosen.world_size and (other.rank, other.local_rank) != (
                chosen.rank, chosen.local_rank):
            raise LaunchEnvError(
                f"launchers disagree: {chosen.source} says rank {chosen.rank}/{chosen.world_size} (local "
                f"{chosen.local_rank}) but {other.source} says rank {other.rank}/{other.world_size} (local "
                f"{other.local_rank}); unset the stale variables (e.g. RANK/WORLD_SIZE exported in a batch "
                "script) or launch with one launcher only"
            )
    if not 0 <= chosen.rank < chosen.world_size:
        raise LaunchEnvError(f"{chosen.source}: rank {chosen.rank} is outside world size {chosen.world_size}")
    return chosen
