"""The step-boundary read-ahead (facescale/train/lookahead.py): what it holds, what it hands back on a
failure, and the line it prints when a read waits past its limit."""

from __future__ import annotations

import time
from collections.abc import Iterator

from facescale.train.lookahead import BatchLookahead


def _counting(stop_at: int | None = None, pause_s: dict[int, float] | None = None) -> Iterator[int]:
    for number in range(100):
        if stop_at is not None and number == stop_at:
            raise RuntimeError(f"reader broke at batch {number}")
        time.sleep((pause_s or {}).get(number, 0.0))
        yield number


def test_batches_read_ahead_come_first_and_the_cursor_is_the_one_before_them() -> None:
    cursors = iter(range(100))
    ahead = BatchLookahead(_counting(), cursor=lambda: {"at": next(cursors)})
    assert next(ahead) == 0
    assert ahead.read_ahead(2) is None
    assert ahead.cursor() == {"at": 0}  # taken before the two held batches were read
    assert [next(ahead), next(ahead), next(ahead)] == [1, 2, 3]


def test_any_reader_error_is_handed_back_not_raised_and_the_cursor_stays_before_it() -> None:
    ahead = BatchLookahead(_counting(stop_at=1), cursor=lambda: {"at": "before"})
    assert next(ahead) == 0
    error = ahead.read_ahead(1)
    assert isinstance(error, RuntimeError) and str(error) == "reader broke at batch 1"
    assert ahead.cursor() == {"at": "before"}


def test_a_read_past_its_limit_is_named_once_and_a_quick_one_never(capfd) -> None:
    ahead = BatchLookahead(_counting(pause_s={1: 0.6}), cursor=lambda: None, warn_after_s=0.2,
                           end_after_s=60, who="rank 3 on node7")
    assert ahead.read_ahead(1) is None and next(ahead) == 0  # quick: nothing said
    time.sleep(0.3)
    assert "no batch after" not in capfd.readouterr().err
    assert ahead.read_ahead(1) is None and next(ahead) == 1  # 0.6 s against a 0.2 s limit
    time.sleep(0.3)
    lines = [line for line in capfd.readouterr().err.splitlines() if "no batch after" in line]
    assert lines == ["[facescale] rank 3 on node7: no batch after 0.2 s; the data's storage may hang "
                     "(check its mount); this reader cannot stop the wait: this rank ends at 60 s if it "
                     "still has none"]


_HUNG_READER = """
import sys, time
from facescale.train.lookahead import BatchLookahead

def never():
    yield 0
    time.sleep(3600)  # a read that never returns (e.g. DALI's file reader on a hung mount)
    yield 1

ahead = BatchLookahead(never(), cursor=lambda: None, warn_after_s=0.2, end_after_s=0.5, who="rank 0 on n1")
next(ahead)
ahead.read_ahead(1)
print("not reached")
"""


def test_a_read_that_never_returns_ends_the_rank_at_its_limit() -> None:
    """Shared storage that hangs holds every rank in its reader (none reaches a collective, so no collective
    timeout ends the job): the job hung until its time limit. Now the rank ends itself, saying why."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _HUNG_READER], cwd=repo, capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode == 1 and "not reached" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert lines[-2].startswith("[facescale] rank 0 on n1: no batch after 0.2 s; the data's storage may hang")
    assert lines[-1] == ("[facescale] rank 0 on n1: no batch after 0.5 s (dist.timeout_s): ending this rank "
                         "so that the job does not hang; run it again to resume from its last checkpoint "
                         "once the storage answers")
