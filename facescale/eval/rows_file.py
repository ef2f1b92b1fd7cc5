"""Rows spread over ranks written by rank 0 into one `.npy`, a chunk at a time, as they arrive.

No rank holds more than its own rows and one chunk: gathering all N rows on every rank first (as the eval
sets do) needs N x D floats per rank, 20 GiB per 10M 512-d rows, times the ranks of a node. The file is
written beside its final name and renamed when complete, so a failure never leaves a partial `.npy`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from facescale.checkpoint.atomic import temp_beside
from facescale.errors import InputError
from facescale.eval.extract import ExtractionFailed, RankRows
from facescale.writable import folder_write_problem

CHUNK_ROWS = 65536  # rows per message and per write: 128 MiB of 512-d float32


class RowsNotWritten(InputError):
    """The rows could not be written (raised alike on every rank; rank 0's message names the file)."""

    every_rank = True
    default_fix = "give --out a place you can write, with room for the rows"


def stream_to_rank0(rows: RankRows, sink: Callable[[np.ndarray], None], chunk_rows: int = CHUNK_ROWS) -> None:
    """Rank 0 calls `sink` with every rank's rows in rank order, [<= chunk_rows, dim] float32 at a time; the
    other ranks send theirs. If `sink` raises, rank 0 still receives the rest (no rank is left waiting in a
    send) and then every rank raises: RowsNotWritten with its message for an InputError, else rank 0 raises
    the error itself and the others ExtractionFailed."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    failure: list[Exception] = []

    def deliver(block: torch.Tensor) -> None:
        if not failure:
            try:
                sink(block.to("cpu", torch.float32).numpy())
            except Exception as error:  # noqa: BLE001 - raised below, on every rank, after the transfers
                failure.append(error)

    if rank == 0:
        for lo in range(0, rows.counts[0], chunk_rows):
            deliver(rows.local[lo:lo + chunk_rows])
        for source in range(1, world):
            for lo in range(0, rows.counts[source], chunk_rows):
                block = torch.empty(min(chunk_rows, rows.counts[source] - lo), rows.dim, dtype=torch.float32,
                                    device=rows.comm_device)
                dist.recv(block, src=source)
                deliver(block)
    else:
        for lo in range(0, rows.counts[rank], chunk_rows):
            dist.send(rows.local[lo:lo + chunk_rows].to(rows.comm_device, torch.float32).contiguous(), dst=0)
    _raise_alike(failure[0] if failure else None, rank, world)


def _raise_alike(error: Exception | None, rank: int, world: int) -> None:
    """Rank 0's outcome on every rank: nothing, RowsNotWritten(message), or a failure to look up on rank 0."""
    outcome = [None if error is None else (isinstance(error, InputError), str(error))]
    if world > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is None:
        return
    told, message = outcome[0]
    if rank == 0 and not told:
        raise error  # type: ignore[misc] - a bug: its own traceback
    if told:
        raise RowsNotWritten(message)
    raise ExtractionFailed("writing the rows failed on rank 0; see its error")


def check_writable(path: Path) -> None:
    """`path` could be written (its folder created, a file written there), or raise RowsNotWritten naming
    the folder: a command that writes only at its end checks this before it starts (nothing is created)."""
    problem = folder_write_problem(path.parent)
    if problem is not None:
        action, error = problem
        what = (f"cannot create the folder for {path.name}" if action == "create"
                else f"cannot write {path.name} there")
        raise RowsNotWritten(f"{path.parent}: {what} ({error.strerror or error})") from error


RowMap = Callable[[np.ndarray], np.ndarray]


def write_npy_from_ranks(path: Path, rows: RankRows, transform: RowMap | None = None,
                         chunk_rows: int = CHUNK_ROWS) -> None:
    """Write all ranks' rows to `path` as one float32 [sum(counts), dim] `.npy` (collective; rank 0 writes),
    each chunk passed through `transform` (a row-wise map) first: to a temp file, synced and renamed after
    the last chunk, so that a failure at any point (raised on every rank) leaves no partial file."""
    total = sum(rows.counts)
    if total == 0:
        raise ValueError("no rows to write")
    tmp = temp_beside(path)
    state: dict = {"handle": None, "written": 0}

    def write(block: np.ndarray) -> None:
        try:
            if state["handle"] is None:
                check_writable(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                state["handle"] = open(tmp, "wb")  # noqa: SIM115 - closed after the last chunk
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                          "shape": (total, rows.dim)}
                np.lib.format.write_array_header_1_0(state["handle"], header)
            handle = state["handle"]
            out = block if transform is None else transform(block)
            handle.write(np.ascontiguousarray(out, dtype="<f4").tobytes())
            state["written"] += len(block)
            if state["written"] == total:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                os.replace(tmp, path)
                state["handle"] = None  # done: nothing to remove
        except OSError as error:
            raise RowsNotWritten(f"{path}: cannot write ({error.strerror or error})") from error

    try:
        stream_to_rank0(rows, write, chunk_rows)
    finally:
        if state["handle"] is not None:
            state["handle"].close()
            tmp.unlink(missing_ok=True)
