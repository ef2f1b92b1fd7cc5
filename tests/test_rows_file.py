"""Rows of several ranks written by rank 0 into one .npy as they arrive (facescale/eval/rows_file.py).

The reference is the plain concatenation of every rank's rows (made here from the same seeds), loaded back
with numpy; a write that fails part-way raises on every rank, leaves no file, and hangs no rank.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_ranks

COUNTS = [5, 0, 3]  # uneven, one rank with nothing: chunks of 2 rows cut every rank's rows but rank 1's
DIM = 4


def _rank_rows(rank: int) -> torch.Tensor:
    return torch.randn(COUNTS[rank], DIM, generator=torch.Generator().manual_seed(rank)) * (rank + 1)


def _reference() -> np.ndarray:
    return np.concatenate([_rank_rows(r).numpy() for r in range(len(COUNTS))])


def _write(rank: int, world: int, path: str, normalize: bool, fail_at_chunk: int | None) -> str | None:
    from facescale.eval.extract import agree_rows
    from facescale.eval.rows_file import write_npy_from_ranks

    local = _rank_rows(rank)
    rows = agree_rows(local if len(local) else torch.zeros(0, 0), world, torch.device("cpu"))
    calls = [0]

    def transform(block: np.ndarray) -> np.ndarray:
        calls[0] += 1
        if calls[0] == fail_at_chunk:
            raise OSError(errno.ENOSPC, "No space left on device")
        return block / np.linalg.norm(block, axis=1, keepdims=True) if normalize else block

    try:
        write_npy_from_ranks(Path(path), rows, transform, chunk_rows=2)
    except Exception as error:  # noqa: BLE001 - the test compares what each rank raised
        return f"{type(error).__name__}: {error}"
    return None


@pytest.mark.parametrize("normalize", [False, True])
def test_three_ranks_rows_land_in_rank_order_chunk_by_chunk(tmp_path, normalize):
    path = tmp_path / "rows.npy"
    assert run_ranks(_write, 3, str(path), normalize, None) == [None, None, None]
    expected = _reference()
    if normalize:
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    written = np.load(path)
    assert written.dtype == np.float32 and written.shape == (8, DIM)
    np.testing.assert_allclose(written, expected, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.npy"]


def test_a_write_failing_part_way_raises_on_every_rank_and_leaves_no_file(tmp_path):
    path = tmp_path / "rows.npy"
    errors = run_ranks(_write, 3, str(path), False, 3)  # the 3rd chunk: rank 0's last, before rank 2's
    assert errors == [f"RowsNotWritten: {path}: cannot write (No space left on device)"] * 3
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").write_text("a file where the output's folder should be")
    blocked = tmp_path / "taken" / "rows.npy"
    errors = run_ranks(_write, 3, str(blocked), False, None)
    expected = f"RowsNotWritten: {blocked.parent}: cannot create the folder for rows.npy (File exists)"
    assert errors == [expected] * 3


def test_one_rank_writes_what_numpy_saves(tmp_path):
    from facescale.eval.extract import agree_rows
    from facescale.eval.rows_file import write_npy_from_ranks

    rows = torch.randn(7, 3, generator=torch.Generator().manual_seed(9))
    write_npy_from_ranks(tmp_path / "mine.npy", agree_rows(rows, 1, torch.device("cpu")), chunk_rows=3)
    np.save(tmp_path / "numpy.npy", rows.numpy())
    assert (tmp_path / "mine.npy").read_bytes() == (tmp_path / "numpy.npy").read_bytes()
