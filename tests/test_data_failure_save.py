"""A batch that cannot be read mid-run stops every rank at the step boundary with that step saved.

The webdataset reader meets a bad sample only when it reads it (DALI scans at start-up). The rank that met it
used to raise inside the step while the others waited in its collectives: the run ended with nothing saved
since the last checkpoint (here: none at all). Now the next batch is read at the step boundary, the ranks
agree to stop, save, and the run resumes from that step once the data is fixed or the sample skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from facescale.data.bad_data import read_index_lines
from launcher.local import local_train_command

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, str]:
    """12 identities x 4 images in 4 shards; the last sample of the last shard no longer decodes.
    Returns the directory and that sample's key."""
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("data_failure")
    synthesize(out, identities=12, images_per_identity=4, holdout_identities=0, seed=4, shard_size=12,
               workers=1)
    tar = out / "train-000003.tar"
    last = list(read_index_lines(out / "train-000003.idx"))[-1]
    key, (offset, size) = last.key, last.members["jpg"]
    data = bytearray(tar.read_bytes())
    data[offset:offset + size] = b"\xff\xd8" + bytes(size - 2)  # same length: the index stays right
    tar.write_bytes(bytes(data))
    return out, key


def _train(shards: Path, run_dir: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = local_train_command(2, "configs/synthetic.yaml", [
        f"data.shards={shards}", "data.reader=webdataset", "data.num_workers=0", "eval.bins=[]",
        f"logging.run_dir={run_dir}", "logging.every_steps=1", "schedule.steps=12", "schedule.warmup_steps=0",
        "schedule.global_batch_size=8", "checkpoint.every_steps=100", *sets])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])  # with 2, the bad batch may be a step's second micro-batch
def test_a_bad_sample_mid_run_saves_the_last_step_and_the_run_resumes_past_it(shards, tmp_path,
                                                                              accumulation) -> None:
    directory, key = shards
    run_dir = tmp_path / "run"
    gas = f"schedule.grad_accumulation={accumulation}"
    first = _train(directory, run_dir, gas)
    out = first.stdout + first.stderr
    assert first.returncode != 0, out[-3000:]
    stopped = re.search(r"\[facescale\] stopped at step (\d+): a rank could not read its next batch", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 1 <= step < 12
    assert re.search(rf"error: .*train-000003\.tar.*{key}.*JPEG does not decode", out), out[-3000:]
    # no rank traceback (torchrun's agent prints its own ChildFailedError one) and no collective timeout
    assert not re.search(r'File ".*/facescale/', out) and "timed out" not in out
    saved = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (saved / "COMPLETE").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == saved.name

    second = _train(directory, run_dir, gas, "data.on_bad_sample=skip", "data.max_skip_fraction=0.1")
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"at step {step}" in out  # resumed from the saved step, not from scratch
    assert "step 12/12" in out


def _kill_rank_worker(agent_pid: int, rank: int) -> int:
    """SIGKILL the data-loader worker of `rank` (a child of the rank's process that is not multiprocessing's
    resource tracker), as the kernel's OOM killer would; return its pid."""
    import signal

    import psutil

    for process in psutil.Process(agent_pid).children(recursive=True):
        try:
            if process.environ().get("RANK") != str(rank):
                continue
            workers = [c for c in process.children() if "resource_tracker" not in " ".join(c.cmdline())]
        except psutil.Error:
            continue
        if workers:
            workers[0].send_signal(signal.SIGKILL)
            return workers[0].pid
    raise AssertionError(f"rank {rank} has no data-loader worker to kill")


def _fault_after_step_3(tmp_path: Path, fault: Callable[[int, Path], None],
                        *sets: str) -> tuple[str, Callable[[], None]]:
    """A 2-rank webdataset run (1 loader worker per rank) meets `fault(agent_pid, shards)` after step 3 and
    must stop with its last step saved. Returns (its output, a resume from that step that runs two more)."""
    import json
    import time

    from facescale.data.synth import synthesize

    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=6, shard_size=12,
               workers=1)
    sets = (f"data.shards={shards}", "data.reader=webdataset", "data.num_workers=1", "eval.bins=[]",
            f"logging.run_dir={run_dir}", "logging.every_steps=1", "schedule.warmup_steps=0",
            "schedule.global_batch_size=8", "checkpoint.every_steps=1000", *sets)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = local_train_command(2, "configs/synthetic.yaml", [*sets, "schedule.steps=2000"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300

    def logged_step() -> int:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return max([json.loads(line)["step"] for line in lines if line.endswith("}")], default=0)

    try:
        while logged_step() < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.05)
        fault(proc.pid, shards)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out[-3000:]
    stopped = re.search(r"\[facescale\] stopped at step (\d+): a rank could not read its next batch", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 2000
    assert not re.search(r'File ".*/facescale/', out) and "timed out" not in out  # no rank traceback
    saved = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (saved / "COMPLETE").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == saved.name

    def resume() -> None:
        again = local_train_command(2, "configs/synthetic.yaml", [*sets, f"schedule.steps={step + 2}"])
        resumed = subprocess.run(again, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
        assert f"resumed from {saved} (saved by 2 ranks) at step {step}" in resumed.stdout + resumed.stderr

    return out, resume


@pytest.mark.slow
def test_a_killed_loader_worker_saves_the_last_step_and_the_run_resumes(tmp_path) -> None:
    """torch's SIGCHLD handler raised the worker's death inside whatever the step was doing (a gradient
    all-reduce's wait, here): the rank died mid-step and the run lost everything since its last checkpoint.
    Now the death is found when the next batch is read, at the step boundary, and every rank saves first."""
    killed: list[int] = []
    out, resume = _fault_after_step_3(tmp_path, lambda agent, _: killed.append(_kill_rank_worker(agent, 1)))
    assert re.search(rf"error: rank 1 .*: data-loader worker {killed[0]} was killed by SIGKILL; the kernel's "
                     r"OOM killer", out), out[-3000:]
    resume()


@pytest.mark.slow
def test_storage_that_hangs_stops_within_the_read_timeout_with_the_last_step_saved(tmp_path) -> None:
    """Shards whose open never returns (FIFOs in their place, as a hung NFS/Lustre mount): the loader waited
    for ever and the other ranks until dist.timeout_s ended the job, nothing saved. Now a fetch past
    data.read_timeout_s stops every rank with the last step saved; the run resumes once the data is back."""
    moved: list[Path] = []

    def hang(_agent: int, shards: Path) -> None:
        for tar in sorted(shards.glob("*.tar")):
            moved.append(tar.rename(tar.with_name(tar.name + ".aside")))
            os.mkfifo(tar)

    out, resume = _fault_after_step_3(tmp_path, hang, "data.read_timeout_s=5")
    assert re.search(r"error: rank \d .*: no batch from this rank's data-loader workers within "
                     r"data.read_timeout_s \(5.0 s\); check the data's mount", out), out[-3000:]
    for aside in moved:
        aside.with_name(aside.name.removesuffix(".aside")).unlink()
        aside.rename(aside.with_name(aside.name.removesuffix(".aside")))
    resume()


@pytest.mark.slow
def test_storage_that_hangs_under_dali_ends_the_job_at_dist_timeout(tmp_path) -> None:
    """DALI's reader cannot stop a wait, and shared storage that hangs holds every rank in it, so no rank
    reached a collective and no timeout fired: the job hung until its time limit. Now a rank says it waits,
    then ends itself at dist.timeout_s (30 s later by faulthandler's timer where DALI holds the GIL)."""
    import time

    from facescale.data.loader import dali_available
    from facescale.data.synth import synthesize

    if not dali_available():
        pytest.skip("DALI is not installed")
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=6, workers=1)
    sets = [f"data.shards={shards}", "data.reader=dali", "eval.bins=[]", f"logging.run_dir={run_dir}",
            "logging.every_steps=1", "schedule.warmup_steps=0", "schedule.global_batch_size=8",
            "schedule.steps=2000", "data.read_timeout_s=2", "dist.timeout_s=12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(local_train_command(2, "configs/synthetic.yaml", sets), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    try:
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.05)
        for tar in sorted(shards.glob("*.tar")):  # the next epoch's pipeline opens them: never returns
            tar.rename(tar.with_name(tar.name + ".aside"))
            os.mkfifo(tar)
        hung_at = time.monotonic()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and time.monotonic() - hung_at < 120, out[-3000:]
    # where the pipeline for the next epoch is built ahead, DALI holds the GIL while it blocks: then no Python
    # line can be written and faulthandler's timer (data/hang_guard.py) ends the rank with its traceback dump
    frozen = "Timeout (0:" in out and "open_epoch" in out
    said = re.search(r"rank \d on .*: no batch after 2.2 s; the data's storage may hang", out)
    ended = re.search(r"rank \d on .*: no batch after 12 s \(dist.timeout_s\): ending this rank", out)
    assert frozen or (said and ended), out[-3000:]
