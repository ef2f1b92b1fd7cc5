"""head.init_from: a run starts from arcface_torch's per-GPU class centers (checkpoint_gpu_<r>.pt) or from a
[C, D] tensor written by `facescale export-head`, at any world size, fp32 or bf16 storage; bad sources are
refused by name before the run starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facescale.cli import main
from facescale.config.schema import HeadConfig, MarginConfig
from facescale.heads import build_head
from facescale.partial_fc.init_centers import CenterSourceError, open_center_source, read_center_rows
from tests.pfc_reference import reference_loss

REPO = Path(__file__).resolve().parents[1]
C, D = 10, 8
ARCFACE_TORCH_ROWS = [4, 3, 3]  # PartialFC_V2 on 3 GPUs: 10 // 3 each, the first 10 % 3 ranks one more


def _full() -> torch.Tensor:
    return torch.randn(C, D, generator=torch.Generator().manual_seed(4))


def _arcface_torch_run(directory: Path, full: torch.Tensor, rows: list[int] = ARCFACE_TORCH_ROWS) -> Path:
    """checkpoint_gpu_<r>.pt files as arcface_torch's save_all_states writes them (one per GPU)."""
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for rank, count in enumerate(rows):
        torch.save({
            "epoch": 2, "global_step": 500,
            "state_dict_backbone": {"fc.weight": torch.ones(D, 4)},
            "state_dict_softmax_fc": {"weight": full[start:start + count].clone()},
            "state_optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9,
                                                                "params": [0, 1]}]},
            "state_lr_scheduler": {"last_epoch": 500, "base_lrs": [0.1], "_last_lr": [0.05]},
        }, directory / f"checkpoint_gpu_{rank}.pt")
        start += count
    return directory


def test_arcface_torch_shards_in_rank_order_are_the_full_matrix(tmp_path):
    full = _full()
    source = open_center_source(_arcface_torch_run(tmp_path / "out", full))
    assert (source.num_classes, source.dim) == (C, D)
    for start, count in ((0, 10), (3, 5), (4, 3), (9, 1), (5, 0)):  # any facescale shard, across files
        torch.testing.assert_close(read_center_rows(source, start, count), full[start:start + count],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_head_starts_from_the_given_centers(tmp_path, storage):
    full = _full()
    torch.save(full, tmp_path / "centers.pt")  # as `facescale export-head` writes them
    source = open_center_source(tmp_path / "centers.pt")
    margin = MarginConfig(s=64.0, m2=0.5)
    head = build_head(HeadConfig(storage_dtype=storage, margin=margin), C, D, seed=0)
    head.load_center_values(read_center_rows(source, 0, C))
    state = head.state_dict()
    value = state["centers"].float() + state["optimizer"].get("center_residual", torch.zeros(1)).float()
    torch.testing.assert_close(value, full, rtol=2e-5, atol=0)  # bf16: hi + residual keeps ~16 bits
    assert not state["optimizer"]["momentum_buffer"].any()  # optimizer state starts fresh
    g = torch.Generator().manual_seed(5)
    embeddings, labels = torch.randn(6, D, generator=g), torch.randint(0, C, (6,), generator=g)
    loss, _ = head(embeddings, labels, 0)
    stored = state["centers"].double()
    want = reference_loss(embeddings.double(), stored, labels, margin)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4)


def _missing_rank(d: Path) -> Path:
    (_arcface_torch_run(d, _full()) / "checkpoint_gpu_1.pt").unlink()
    return d


def _file(d: Path, write) -> Path:
    d.mkdir()
    write(d / "checkpoint_gpu_0.pt")
    return d


@pytest.mark.parametrize(("make", "message"), [
    (_missing_rank, "checkpoint_gpu_1.pt is missing (2 of 3 ranks' files are there)"),
    (lambda d: _arcface_torch_run(d, _full(), [3, 4, 3]), "per-rank row counts [3, 4, 3] are not one run's"),
    (lambda d: _file(d, lambda p: torch.save({"state_dict_backbone": {}}, p)),
     "no state_dict_softmax_fc.weight"),
    (lambda d: _file(d, lambda p: p.write_bytes(b"\x80\x02cos\nsystem\n")),
     "refusing to load it: it holds objects facescale never writes (global os.system)"),
    (lambda d: _file(d, lambda p: p.write_bytes(b"\x80\x02")), "not a readable torch file"),
    (lambda d: d, "no such file or directory"),
])
def test_bad_sources_are_named(tmp_path, make, message):
    with pytest.raises(CenterSourceError) as error:
        open_center_source(make(tmp_path / "out"))
    assert message in str(error.value) and "weights_only" not in error.value.line()


def _argv(shards: Path, run_dir: Path, *sets: str) -> list[str]:
    argv = ["train", "--config", "configs/synthetic.yaml"]
    for item in (f"data.shards={shards}", f"logging.run_dir={run_dir}", "eval.bins=[]", "schedule.steps=2",
                 "schedule.warmup_steps=0", "schedule.global_batch_size=16", "data.num_workers=0", *sets):
        argv += ["--set", item]
    return argv


def _train(argv: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "facescale", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_run_starts_from_another_runs_centers_and_bad_ones_stop_it_first(tmp_path, capsys, monkeypatch):
    """Run A's exported centers start run B (its head learning rate ~0, so B's centers stay A's), whose
    resume then needs them no more; an arcface_torch directory of the wrong width or identity count is refused
    before a run starts."""
    from facescale.data.synth import synthesize

    shards = tmp_path / "shards"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=6, workers=1)
    _train(_argv(shards, tmp_path / "a"))
    assert main(["export-head", "--checkpoint", str(tmp_path / "a"), "--out", str(tmp_path / "a.pt")]) == 0
    log = _train(_argv(shards, tmp_path / "b", f"head.init_from={tmp_path / 'a.pt'}", "head.lr_scale=1e-12",
                       "head.weight_decay=0"))
    assert "head.init_from: class centers 0..11 of 12" in log
    assert main(["export-head", "--checkpoint", str(tmp_path / "b"), "--out", str(tmp_path / "b.pt")]) == 0
    a, b = (torch.load(tmp_path / f"{x}.pt", weights_only=True) for x in "ab")
    torch.testing.assert_close(b, a, rtol=0, atol=1e-9)
    (tmp_path / "a.pt").unlink()  # a resume ignores head.init_from: a requeued job runs on without the file
    log = _train(_argv(shards, tmp_path / "b", f"head.init_from={tmp_path / 'a.pt'}", "schedule.steps=3"))
    assert "resumed from" in log and "head.init_from:" not in log

    monkeypatch.chdir(REPO)
    capsys.readouterr()
    wide = _arcface_torch_run(tmp_path / "wide", torch.randn(12, 64), [4, 4, 4])  # demo net: 128 wide
    assert main(_argv(shards, tmp_path / "c", f"head.init_from={wide}")) == 2
    err = capsys.readouterr().err
    assert "holds 12 centers of width 64, this run needs 12 of width 128" in err
    few = _arcface_torch_run(tmp_path / "few", torch.randn(10, 128))
    assert main(_argv(shards, tmp_path / "c", f"head.init_from={few}")) == 2
    assert "holds 10 centers of width 128, this run needs 12" in capsys.readouterr().err
    one = few / "checkpoint_gpu_0.pt"
    assert main(_argv(shards, tmp_path / "c", f"head.init_from={one}")) == 2
    assert f"give the directory {few} instead" in capsys.readouterr().err
    assert main(_argv(shards, tmp_path / "c", "head.type=f2c", f"head.init_from={few}")) == 2
    assert "head.type f2c has none" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
