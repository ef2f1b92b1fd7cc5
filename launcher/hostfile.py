"""Write a DeepSpeed hostfile (`host slots=N` per line) from a Slurm allocation, for `deepspeed --hostfile`.

python -m launcher.hostfile --out hostfile            # inside a job: nodes and slots from SLURM_*
python -m launcher.hostfile --nodelist 'gpu[01-04]' --slots 8 --out hostfile
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from facescale.errors import InputError
from launcher.env import slurm_hosts

DEFAULT_SLOTS = 8


class HostfileError(InputError, ValueError):
    """The nodelist or slot counts cannot describe a hostfile."""


def expand_counts(spec: str) -> list[int]:
    """Expand Slurm's compressed per-node counts, e.g. '8(x2),4' -> [8, 8, 4] (SLURM_TASKS_PER_NODE)."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise HostfileError(f"cannot read per-node count {part!r} in {spec!r} (expected e.g. '8(x2),4')")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def hostfile_lines(hosts: list[str], slots: int | list[int]) -> list[str]:
    """One `host slots=N` line per host; `slots` is one count for all hosts or one per host."""
    if not hosts:
        raise HostfileError("empty nodelist: no hosts to write")
    per_host = [slots] * len(hosts) if isinstance(slots, int) else list(slots)
    if len(per_host) != len(hosts):
        raise HostfileError(f"{len(hosts)} hosts but {len(per_host)} slot counts")
    if len(set(hosts)) != len(hosts):
        raise HostfileError(f"duplicate host names in {hosts}: DeepSpeed keys the hostfile by host name")
    if any(n < 1 for n in per_host):
        raise HostfileError(f"every host needs at least one slot, got {per_host}")
    return [f"{host} slots={n}" for host, n in zip(hosts, per_host, strict=True)]


def slots_from_env(env: Mapping[str, str], num_hosts: int) -> list[int]:
    """Slots per node of the current Slurm job: GPUs on the node, else tasks per node, else 8."""
    if env.get("SLURM_GPUS_ON_NODE", "0").isdigit() and int(env.get("SLURM_GPUS_ON_NODE", "0")) > 0:
        return [int(env["SLURM_GPUS_ON_NODE"])] * num_hosts
    if env.get("SLURM_TASKS_PER_NODE"):
        counts = expand_counts(env["SLURM_TASKS_PER_NODE"])
        if len(counts) == num_hosts:
            return counts
    return [DEFAULT_SLOTS] * num_hosts


def job_hostfile(
    env: Mapping[str, str] | None = None, nodelist: str | None = None, slots: int | None = None
) -> str:
    """Hostfile text for a nodelist (default: this job's SLURM_JOB_NODELIST)."""
    env = os.environ if env is None else env
    nodelist = nodelist or env.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        raise HostfileError("no nodelist: pass --nodelist or run inside a Slurm job (SLURM_JOB_NODELIST)")
    hosts = slurm_hosts(nodelist)
    counts = slots if slots is not None else slots_from_env(env, len(hosts))
    return "\n".join(hostfile_lines(hosts, counts)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.hostfile", description=__doc__.splitlines()[0])
    p.add_argument("--nodelist", help="Slurm nodelist, e.g. 'gpu[01-04]' (default: SLURM_JOB_NODELIST)")
    p.add_argument("--slots", type=int, help="slots (GPUs) per host (default: from the job, else 8)")
    p.add_argument("--out", default="-", help="file to write ('-' = stdout)")
    args = p.parse_args(argv)
    try:
        text = job_hostfile(nodelist=args.nodelist, slots=args.slots)
    except HostfileError as exc:
        sys.stderr.write(f"launcher.hostfile: {exc}\n")
        return 2
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
