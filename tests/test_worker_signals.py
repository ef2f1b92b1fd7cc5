"""Loader workers and Slurm's signals: `--signal=USR2@300` (the time-limit warning) and scancel's TERM reach
every process of the job step, the DataLoader's spawned workers too; the main process saves at the next step
boundary and needs its workers until then."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

from facescale.data.worker_loader import batch_stream_loader


class Counting(torch.utils.data.IterableDataset):
    """Endless batches [step, step, ...] (a worker's own count)."""

    def __iter__(self):
        step = 0
        while True:
            yield torch.full((4,), step)
            step += 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on 2 CPUs, on purpose
def test_loader_workers_outlive_the_signals_the_trainer_saves_on() -> None:
    names = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
    loader = iter(batch_stream_loader(Counting(), num_workers=len(names)))
    first = [next(loader) for _ in range(8)]
    workers = [w for w in psutil.Process(os.getpid()).children(recursive=True)
               if "spawn" in " ".join(w.cmdline())]
    assert len(workers) == len(names)
    for worker, name in zip(workers, names, strict=True):  # one signal each
        os.kill(worker.pid, getattr(signal, name))
    time.sleep(1.0)
    later = [next(loader) for _ in range(16)]  # a dead worker would raise LoaderWorkerDied here
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert len(first) == 8 and len(later) == 16


_EXIT_WITH_LIVE_WORKERS = """
from facescale.data.worker_loader import batch_stream_loader
from tests.test_worker_signals import Counting
loader = iter(batch_stream_loader(Counting(), num_workers=2))
next(loader)
print("fetched", flush=True)
"""  # and exit with the workers running (persistent, the iterator never deleted)


def test_a_process_exits_with_its_loader_workers_still_running() -> None:
    """Workers that ignore SIGTERM would hang the exit: multiprocessing's exit handler sends its daemonic
    children SIGTERM and then waits for them."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _EXIT_WITH_LIVE_WORKERS], cwd=repo, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0 and "fetched" in done.stdout, done.stderr[-2000:]
