"""A save never loses the checkpoint `latest` names: a crash at every phase of a periodic save and of a
re-save of an existing step leaves `latest` naming a complete step that loads, holding either the old or
the new state (never a mix), and a complete step directory is never overwritten or emptied.

The crash is an exception no code catches (`_Crash` derives from BaseException, and the save path only
handles write errors), raised from the manager's phase hook: the disk is left exactly as a SIGKILL at that
point leaves it. tests/test_checkpoint_crash.py SIGKILLs a real rank between shard writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_checkpoint_crash import _parts

PHASES = [
    "backbone",
    "head/shard-00000-of-00001.pt",
    "state/rank-00000.pt",
    "backbone.pt",
    "backbone_optim.pt",
    "trainer.json",
    "config.yaml",
    "COMPLETE",
    "rename",
    "latest",
    "purge",
]
SWITCHED = {"latest", "purge"}  # phases after which `latest` names the new save


class _Crash(BaseException):
    """Stands for SIGKILL: nothing in the save path handles it."""


def _crash_at(phase: str):
    def hook(name: str) -> None:
        if name == phase:
            raise _Crash(phase)

    return hook


def _load_centers(run_dir: Path, engine) -> tuple[str, torch.Tensor]:
    """Resolve `latest` and load it completely (DeepSpeed files, head, rank state): (dir name, centers)."""
    from facescale.checkpoint import CheckpointManager
    from facescale.config.schema import HeadConfig
    from facescale.heads import build_head

    manager = CheckpointManager(run_dir, 0, 1)
    latest = manager.latest()
    head = build_head(HeadConfig(), 7, 4, seed=5)
    manager.load(latest, engine, head)
    return latest.name, head.centers.detach().clone()


def _every_phase(rank: int, world: int, root: str, scenario: str) -> list[tuple[str, str, bool, bool]]:
    from facescale.checkpoint import CheckpointManager

    engine, head = _parts(rank, world)
    template = Path(root) / "template"
    first = CheckpointManager(template, 0, 1, keep_last=1)
    first.save(1, engine, head, {"seed": 0}, "x: 1\n")
    if scenario == "resave":  # the final step exists and `latest` names it; the same step is saved again
        head.centers.add_(1.0)
        first.save(2, engine, head, {"seed": 0}, "x: 1\n")
    old = head.centers.detach().clone()
    head.centers.add_(1.0)
    new = head.centers.detach().clone()
    rows = []
    for phase in PHASES:
        run_dir = Path(root) / phase.replace("/", "_")
        shutil.copytree(template, run_dir)
        manager = CheckpointManager(run_dir, 0, 1, keep_last=1)  # keep one: the purge removes the old step
        manager.on_file_written = _crash_at(phase)
        with pytest.raises(_Crash):
            manager.save(2, engine, head, {"seed": 0}, "x: 1\n")
        name, centers = _load_centers(run_dir, engine)
        rows.append((phase, name, torch.equal(centers, old), torch.equal(centers, new)))
        # a later save after the crash cleans up and completes normally
        manager.on_file_written = None
        final = manager.save(3, engine, head, {"seed": 0}, "x: 1\n")
        leftovers = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert leftovers == ["latest", final.name], (phase, leftovers)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["periodic", "resave"])
def test_crash_at_every_phase_keeps_latest_loadable(tmp_path: Path, scenario: str):
    rows = run_ranks(_every_phase, 1, str(tmp_path), scenario, timeout=600)[0]
    assert [r[0] for r in rows] == PHASES
    old_name = "step_00000001" if scenario == "periodic" else "step_00000002"
    new_name = "step_00000002" if scenario == "periodic" else "step_00000002.2"
    for phase, name, is_old, is_new in rows:
        if phase in SWITCHED:
            assert (name, is_new) == (new_name, True), phase
        else:
            assert (name, is_old) == (old_name, True), phase


def _resave_keeps_complete(rank: int, world: int, root: str) -> list[str]:
    """Re-saving a step never touches its COMPLETE directory before `latest` has moved on."""
    from facescale.checkpoint import CheckpointManager

    engine, head = _parts(rank, world)
    manager = CheckpointManager(root, 0, 1, keep_last=3)
    first = manager.save(4, engine, head, {"seed": 0}, "x: 1\n")
    seen = []

    def check(name: str) -> None:
        if name in ("COMPLETE", "rename"):  # `latest` still names `first`: it must be intact
            assert (first / "COMPLETE").is_file() and (first / "head/shard-00000-of-00001.pt").is_file()
        seen.append(name)

    manager.on_file_written = check
    stale = Path(root) / "checkpoints" / ".latest.tmp4242"  # a process killed between its write and rename
    stale.write_text("step_00000004\n")
    second = manager.save(4, engine, head, {"seed": 0}, "x: 1\n")
    assert not stale.exists() and not list(Path(root, "checkpoints").glob(".latest.tmp*"))
    return [first.name, second.name, (Path(root) / "checkpoints/latest").read_text().strip(), *seen]


@pytest.mark.slow
def test_resave_writes_a_new_directory_and_switches(tmp_path: Path):
    first, second, latest, *phases = run_ranks(_resave_keeps_complete, 1, str(tmp_path))[0]
    assert (first, second, latest) == ("step_00000004", "step_00000004.2", "step_00000004.2")
    assert phases.index("COMPLETE") < phases.index("rename") < phases.index("latest") < phases.index("purge")
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()  # superseded, retired after the switch
