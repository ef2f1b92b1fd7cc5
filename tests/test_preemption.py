"""Preemption flag agreement across ranks, the requeue marker, and the switch to the training timeout.

(The end-to-end path -- `scancel -s USR1` on real Slurm, checkpoint, requeue, resume -- is in test_slurm.py.)
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

from launcher import preemption
from launcher.preemption import REQUEUE_MARKER_ENV, PreemptionFlag, after_first_stop_check
from tests.distributed import run_ranks


def _signal_rank1_at_step3(rank: int, world: int, marker: str) -> list[bool]:
    os.environ[REQUEUE_MARKER_ENV] = marker
    flag = PreemptionFlag.install(("SIGUSR1",))
    answers = []
    for step in range(5):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled
        answers.append(flag.should_stop())
    return answers


def test_one_signalled_rank_stops_every_rank_at_the_same_step(tmp_path):
    marker = tmp_path / "REQUEUE"
    answers = run_ranks(_signal_rank1_at_step3, 2, str(marker))
    assert answers == [[False, False, False, True, True]] * 2
    assert marker.read_text().strip() == "peer"  # written by rank 0, which saw no signal itself


def test_single_process_flag_and_marker(tmp_path, monkeypatch):
    monkeypatch.setenv(REQUEUE_MARKER_ENV, str(tmp_path / "sub" / "REQUEUE"))
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        flag = PreemptionFlag.install(("SIGUSR2",))
        assert not flag.should_stop() and not (tmp_path / "sub" / "REQUEUE").exists()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.should_stop() and flag.signal_name == "SIGUSR2"
        assert (tmp_path / "sub" / "REQUEUE").read_text().strip() == "SIGUSR2"
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_first_check_hooks_run_once_after_the_first_check():
    calls = []
    after_first_stop_check(lambda: calls.append("timeout"))
    flag = PreemptionFlag()
    assert not calls
    flag.should_stop()
    flag.should_stop()
    assert calls == ["timeout"] and not preemption._first_check_hooks


def _late_peer_after_training_timeout(rank: int, world: int) -> tuple[str, float]:
    from facescale.parallel.init import use_training_timeout

    after_first_stop_check(lambda: use_training_timeout(2.0))
    PreemptionFlag().should_stop()  # the end of "step 1": the group was made with a long timeout
    if rank == 1:
        time.sleep(5)
        return "late", 0.0
    t0 = time.monotonic()
    try:
        dist.barrier()
        return "no error", time.monotonic() - t0
    except RuntimeError:
        return "timed out", time.monotonic() - t0


def test_training_timeout_replaces_the_start_up_timeout():
    outcome, waited = run_ranks(_late_peer_after_training_timeout, 2)[0]
    assert outcome == "timed out" and waited < 6.0, (outcome, waited)
