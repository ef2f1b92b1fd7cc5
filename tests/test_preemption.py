"""Preemption flag agreement across ranks, the requeue marker, and the switch to the training timeout.

(The end-to-end path -- `scancel -s USR1` on real Slurm, checkpoint, requeue, resume -- is in test_slurm.py.)
"""

from __future__ import annotations

import os
import signal
import time

import pytest
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


def _interrupt_rank1_at_step2(rank: int, world: int, marker: str) -> list[tuple[bool, bool]]:
    os.environ[REQUEUE_MARKER_ENV] = marker
    flag = PreemptionFlag.install(("SIGUSR1",), interrupt=True)
    answers = []
    for step in range(4):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches rank 1 only
        answers.append((flag.should_stop(), flag.requeue))
    return answers


def test_ctrl_c_on_one_rank_stops_every_rank_without_requeue(tmp_path):
    marker = tmp_path / "REQUEUE"
    answers = run_ranks(_interrupt_rank1_at_step2, 2, str(marker))
    assert answers == [[(False, False), (False, False), (True, False), (True, False)]] * 2
    assert not marker.exists()  # an interrupted run is not requeued


def _term_on_rank1_usr2_on_rank0(rank: int, world: int, marker: str) -> list[tuple[bool, bool, bool]]:
    os.environ[REQUEUE_MARKER_ENV] = marker
    flag = PreemptionFlag.install()  # the trainer's signals: USR1, USR2, TERM
    answers = []
    for step in range(4):
        if step == 2:  # the time-limit warning on rank 0, scancel's SIGTERM on rank 1 at the same moment
            os.kill(os.getpid(), signal.SIGTERM if rank == 1 else signal.SIGUSR2)
        answers.append((flag.should_stop(), flag.requeue, flag.terminate))
    return answers


def test_sigterm_saves_and_stops_every_rank_without_asking_for_a_requeue(tmp_path):
    """scancel sends SIGTERM to every step (and a Slurm preemption, which requeues the job itself where it
    should): a cancelled job must stay cancelled, even when another rank got the requeue signal."""
    marker = tmp_path / "REQUEUE"
    answers = run_ranks(_term_on_rank1_usr2_on_rank0, 2, str(marker))
    assert answers == [[(False, False, False), (False, False, False), (True, False, True),
                        (True, False, True)]] * 2
    assert not marker.exists()


def _input_fails_on_rank0_while_rank1_is_preempted(rank: int, world: int, marker: str) -> list[tuple]:
    os.environ[REQUEUE_MARKER_ENV] = marker
    flag = PreemptionFlag.install(("SIGUSR1",))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    answers = []
    for step in range(2):
        stop = flag.should_stop(input_failed=rank == 0 and step == 1)
        answers.append((stop, flag.input_failed, flag.requeue))
    return answers


def test_an_input_failure_on_one_rank_stops_every_rank_and_outranks_a_preemption(tmp_path):
    """Step 0: rank 1 is preempted (requeue); step 1: rank 0 cannot read its next batch: every rank stops for
    the input failure, which a requeue would only meet again."""
    marker = tmp_path / "REQUEUE"
    answers = run_ranks(_input_fails_on_rank0_while_rank1_is_preempted, 2, str(marker))
    assert answers == [[(True, False, True), (True, True, False)]] * 2


def test_second_ctrl_c_stops_at_once_and_ignored_sigint_stays_ignored():
    previous = signal.getsignal(signal.SIGINT)
    try:
        flag = PreemptionFlag.install((), interrupt=True)
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.interrupted and flag.should_stop() and not flag.requeue
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. nohup or a background job
        PreemptionFlag.install((), interrupt=True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_for_step(proc, log_path, step: int, timeout: float = 240.0) -> None:
    """Until the training run `proc` (logging every step to `log_path`) has logged `step`."""
    deadline = time.monotonic() + timeout
    while f"[train] step {step}/" not in log_path.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-2000:]
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code", "said"), [
    ("SIGINT", 130, r"interrupted \(Ctrl-C\)"),
    ("SIGTERM", 143, r"stopped by SIGTERM \(scancel or preemption\)"),
])
def test_ctrl_c_or_scancel_saves_the_step_and_stops_without_requeue(tmp_path, name, code, said):
    """Ctrl-C (SIGINT to the whole process group, data workers included, as a terminal sends it) or scancel's
    SIGTERM (to every process of the step, workers too) saves the current step, exits with 130 / 143 and no
    traceback, asks for no requeue (a marker an earlier job left is cleared at the start); the run resumes
    from that step."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from facescale.data.synth import synthesize

    repo = Path(__file__).resolve().parents[1]
    shards = tmp_path / "shards"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=7, workers=1)
    sets = [f"data.shards={shards}", f"logging.run_dir={tmp_path / 'run'}", "eval.bins=[]",
            "data.num_workers=1", "schedule.warmup_steps=0", "schedule.global_batch_size=8",
            "logging.every_steps=1", "checkpoint.every_steps=1000"]
    argv = [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml"]
    marker = tmp_path / "REQUEUE"
    marker.write_text("SIGUSR2\n")  # left by an earlier job whose batch shell was killed before removing it
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", REQUEUE_MARKER_ENV: str(marker)}
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        command = argv + [x for item in [*sets, "schedule.steps=100000"] for x in ("--set", item)]
        proc = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _wait_for_step(proc, log_path, 3)
        os.killpg(proc.pid, getattr(signal, name))
        assert proc.wait(timeout=120) == code, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "Traceback" not in text and not marker.exists()
    step = int(re.search(said + r" at step (\d+): saving", text).group(1))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    command = argv + [x for item in [*sets, f"schedule.steps={step + 1}"] for x in ("--set", item)]
    again = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"at step {step}" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_preemption_save_with_the_next_step_read_ahead_resumes_exactly(tmp_path):
    """The preemption save comes after the next step's batches were read ahead (train/lookahead.py): the
    saved data position must be the one before them, so the resumed run trains on exactly what an
    uninterrupted one does (1 rank, gradient accumulation 2, per-step losses compared bit for bit)."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    from facescale.data.synth import synthesize

    repo = Path(__file__).resolve().parents[1]
    shards = tmp_path / "shards"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=9, workers=1)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}

    def command(run: str) -> list[str]:
        sets = [f"data.shards={shards}", f"logging.run_dir={tmp_path / run}", "eval.bins=[]",
                "data.num_workers=1", "schedule.steps=30", "schedule.warmup_steps=2",
                "schedule.global_batch_size=8", "schedule.grad_accumulation=2", "logging.every_steps=1",
                "checkpoint.every_steps=1000"]
        return [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml",
                *[x for item in sets for x in ("--set", item)]]

    def losses(run: str) -> dict[int, float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {row["step"]: row["train/loss"] for row in map(json.loads, lines) if "train/loss" in row}

    whole_run = subprocess.run(command("whole"), cwd=repo, env=env, capture_output=True, timeout=300)
    assert whole_run.returncode == 0
    log_path = tmp_path / "preempted.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command("preempted"), cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_step(proc, log_path, 4)
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=120) == 3, log_path.read_text()[-3000:]
    step = int(re.search(r"preempted at step (\d+): saving", log_path.read_text()).group(1))
    assert step < 30
    resumed = subprocess.run(command("preempted"), cwd=repo, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout + resumed.stderr
    whole, preempted = losses("whole"), losses("preempted")
    assert [preempted[s] for s in range(step + 1, 31)] == [whole[s] for s in range(step + 1, 31)]


@pytest.mark.slow
def test_a_preemption_signal_during_start_up_waits_for_the_first_step_and_requeues(tmp_path):
    """Slurm may signal while the ranks still build (process group, engine, loaders: minutes on a cluster):
    the signal is kept from the command's start, so the run saves its first step and exits for requeue
    instead of dying by the signal's default action (no save, no requeue, its peers left waiting)."""
    import subprocess
    import sys
    from pathlib import Path

    from facescale.data.synth import synthesize

    repo = Path(__file__).resolve().parents[1]
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=7, workers=1)
    sets = [f"data.shards={shards}", f"logging.run_dir={run_dir}", "eval.bins=[]", "schedule.steps=50",
            "schedule.warmup_steps=0", "schedule.global_batch_size=8", "checkpoint.every_steps=1000"]
    command = [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml",
               *[x for item in sets for x in ("--set", item)]]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "LOCK").exists():  # the process group is up; the engine and loaders come next
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 3, out[-3000:]
    assert "preempted at step 1: saving" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000001"
