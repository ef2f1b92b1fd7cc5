"""A failed collective (a rank killed, crashed or hung) ends in one line naming that rank, its host and why.

Every rank publishes its host in the process group's store at start-up. A rank whose collective fails, or
that stops on an error of its own, writes a report (kind, host, cause) there. After a failed collective the
survivors wait up to `REPORT_WINDOW_S` for each other's reports: the ranks that never report are the
killed or hung ones, and only the lowest reporting rank prints the diagnosis. A rank that stopped on its
own input error has printed that error itself, so then the others stay quiet.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import torch.distributed as dist

PREFIX = "facescale/rank"
REPORT_WINDOW_S = 5.0
COLLECTIVE_FAILURE_EXIT_CODE = 1
_MARKERS = ("gloo", "NCCL", "nccl", "Connection reset", "Connection closed", "timed out", "Timed out",
            "ProcessGroup", "Broken pipe", "Application timeout caused pair closure")  # the last: gloo's
# all_reduce when its peer hangs past the timeout


_JOB: dict = {}  # store, rank, world of the group this process joined; kept after the group is torn down


def joined() -> bool:
    """Whether this process joined a process group (errors may then be this rank's own)."""
    return bool(_JOB)


def forget() -> None:
    """Drop the record of a group joined earlier in this process."""
    _JOB.clear()


def _store():
    return _JOB["store"]


def _first_line(exc: BaseException) -> str:
    """The gist of an error: its first line without gloo's source location and advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = re.sub(r"^\[[^\]]+:\d+\]\s*", "", lines[0] if lines else type(exc).__name__)
    return line.split(" This is typically", 1)[0].replace("\t", " ")[:300]


def register_rank() -> None:
    """Publish this rank's host name (call once on every rank, right after the process group starts)."""
    _JOB.update(store=dist.distributed_c10d._get_default_store(), rank=dist.get_rank(),
                world=dist.get_world_size())
    _store().set(f"{PREFIX}/host/{_JOB['rank']}", socket.gethostname())


def report(kind: str, exc: BaseException) -> None:
    """Tell the other ranks why this one stops: kind "input", "crash" or "collective" (best effort)."""
    try:
        _store().set(f"{PREFIX}/failed/{_JOB['rank']}", f"{kind}\t{socket.gethostname()}\t{_first_line(exc)}")
    except Exception:  # noqa: BLE001 - the store may be gone with the rank that hosted it
        pass


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective or process-group failure (a peer died, hung or the network broke)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _MARKERS)


def _value(store, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


def diagnose(exc: BaseException) -> str | None:
    """The line describing a failed collective, or None where another rank prints it (or already did).

    The store calls run on a helper thread: a hung rank 0 (which hosts the store) would block them for the
    store's own timeout, the long start-up one.
    """
    answer: list[str | None] = []
    helper = threading.Thread(target=lambda: answer.append(_diagnose(exc)), daemon=True,
                              name="facescale-rank-failure")
    helper.start()
    helper.join(REPORT_WINDOW_S + 5.0)
    if answer:
        return answer[0]
    rank, host = _JOB["rank"], socket.gethostname()
    return (f"rank {rank} on {host}: the job's store in rank 0's process does not answer after a failed "
            f"collective ({_first_line(exc)}); rank 0 hangs or its host is unreachable: check its log and "
            "node, then resume")


def _diagnose(exc: BaseException) -> str | None:
    rank, world, host = _JOB["rank"], _JOB["world"], socket.gethostname()
    cause = _first_line(exc)
    store, reports = _store(), {}
    try:
        store.set(f"{PREFIX}/failed/{rank}", f"collective\t{host}\t{cause}")
        deadline = time.monotonic() + REPORT_WINDOW_S
        while True:
            reports = {r: v.split("\t", 2) for r in range(world)
                       if (v := _value(store, f"{PREFIX}/failed/{r}")) is not None}
            if len(reports) == world or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        hosts = {r: _value(store, f"{PREFIX}/host/{r}") or "an unknown host" for r in range(world)}
    except Exception:  # noqa: BLE001 - the store lives in rank 0's process
        if 0 in reports and rank != 0:
            return None  # rank 0 reported, then left: it prints the line
        return (f"rank {rank} on {host}: lost rank 0 (it also hosts the job's store) during a collective: "
                f"{cause}; rank 0 was killed, crashed or hung: check its log and its node, then resume")
    if any(kind == "input" for kind, _, _ in reports.values()) or rank != min(reports, default=rank):
        return None
    crashed = [f"rank {r} on {h} crashed ({why}; its traceback is in its log)"
               for r, (kind, h, why) in sorted(reports.items()) if kind == "crash"]
    silent = [f"rank {r} on {hosts[r]}" for r in range(world) if r not in reports]
    if silent:
        what = (f"{', '.join(silent)} stopped responding (killed or hung: no report within "
                f"{REPORT_WINDOW_S:g} s of the failed collective)")
    elif crashed:
        what = "; ".join(crashed)
    else:
        what = "a collective failed on every rank"
    return (f"{what}; seen by rank {rank} on {host}: {cause}; check that rank's log and node (dmesg for the "
            "OOM killer), then resume: the last complete checkpoint is intact")
