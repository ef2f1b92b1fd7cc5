"""Trainer.train's own bookkeeping, on a trainer whose step, evaluation and save are stand-ins (seconds, no
model): a finished run is left alone, the final eval reaches the checkpoint, the loss guard's counter is
logged once and its stop is one line, the data counters survive a resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from facescale.config.schema import Config
from facescale.errors import INPUT_ERROR_EXIT_CODE, InputError, report_errors
from facescale.metrics.console import TrainConsole
from facescale.train import trainer as trainer_module
from facescale.train.step import NonFiniteLossError, StepResult
from facescale.train.trainer import Trainer


class Sink:
    """Records what MetricsWriter would write."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []
        self.lines: list[str] = []
        self.closed = False
        self.superseded = None

    def scalars(self, step: int, values: dict) -> None:
        self.rows.append((step, dict(values)))

    def image(self, step: int, tag: str, image) -> None:
        pass

    def console(self, line: str) -> None:
        self.lines.append(line)

    def close(self) -> None:
        self.closed = True


class Loader:
    steps_per_epoch = 4

    def __init__(self, seen: int = 0, skipped: int = 0) -> None:
        self.seen, self.skipped = seen, skipped

    def __iter__(self):
        return iter(range(self.steps_per_epoch))


def fake_trainer(run_dir: Path, steps: int, *, step: int = 0, log_every: int = 1, max_bad: int = 3,
                 bins: tuple[str, ...] = (), loader: Loader | None = None) -> Trainer:
    """A Trainer with the real loop and bookkeeping; `save` and `evaluate` record instead of writing."""
    cfg = Config()
    cfg.schedule.steps, cfg.schedule.warmup_steps, cfg.schedule.global_batch_size = steps, 0, 8
    cfg.logging.every_steps, cfg.checkpoint.max_bad_steps, cfg.checkpoint.every_steps = log_every, max_bad, 0
    cfg.eval.bins, cfg.eval.every_steps, cfg.data.read_timeout_s = list(bins), 0, 0.0
    t = Trainer.__new__(Trainer)
    t.cfg, t.run_dir, t.step, t.metrics = cfg, run_dir, step, Sink()
    t.env, t.micro_batch = SimpleNamespace(rank=0, world_size=1), 8
    t.runtime = SimpleNamespace(device=torch.device("cpu"), precision="fp32")
    t.loader = loader or Loader()
    t.console = TrainConsole(t.metrics.console, steps, 8, t.loader.steps_per_epoch, 1)
    t.engine = t.mode = t.head = t.batches = t._saved = None
    t.eval_skipped, t._nan_steps, t._data_before = {}, frozenset(), {}
    t.skipped_steps = t.bad_steps_in_row = t._skip_batches = 0
    t._plan = list
    t._preempted = lambda input_failed=False: False
    t.saves = []

    def save() -> Path:
        t.saves.append((t.step, t.console.best.state_dict(), torch.get_rng_state()))
        return run_dir / "checkpoints" / f"step_{t.step:08d}"

    def evaluate() -> dict:
        torch.rand(8)  # an evaluation draws from the global RNG (e.g. a worker's seed)
        report = {"accuracy": 0.75, "accuracy_std": 0.0, "num_pairs": 10}
        t.metrics.scalars(t.step, t.console.eval_result(t.step, "verify", report))
        return {"verify": report}

    t.save, t.evaluate = save, evaluate
    return t


@pytest.fixture
def steps_skipped(monkeypatch):
    """train_step stand-in: loss 1.0, or a skipped step with a NaN loss at the 0-based steps named."""
    bad: set[int] = set()

    def train_step(mode, batches, ctx, inject_nan=False) -> StepResult:
        next(batches)
        skipped = ctx.step in bad
        return StepResult(loss=float("nan") if skipped else 1.0, data_wait_s=0.0, grad_norm=None,
                          skipped=skipped)

    monkeypatch.setattr(trainer_module, "train_step", train_step)
    return bad


def test_a_finished_run_started_again_trains_nothing_and_keeps_its_result(tmp_path, steps_skipped) -> None:
    written = {"steps": 8, "final_loss": 1.25, "samples_per_s": 40.0, "eval": {"verify": {"accuracy": 0.5}},
               "run_dir": str(tmp_path), "eval_skipped": {}}
    (tmp_path / "result.json").write_text(json.dumps(written, indent=2))
    before = (tmp_path / "result.json").read_text()
    t = fake_trainer(tmp_path, steps=8, step=8, bins=("verify.bin",))
    result = t.train()
    assert result.__dict__ == written
    assert (tmp_path / "result.json").read_text() == before
    assert t.metrics.rows == [] and t.saves == [] and t.metrics.closed
    assert t.metrics.lines == [f"[facescale] run already finished at step 8 ({tmp_path / 'result.json'}); "
                               "raise schedule.steps to train on"]


def test_the_final_eval_is_in_the_final_checkpoint(tmp_path, steps_skipped) -> None:
    t = fake_trainer(tmp_path, steps=4, bins=("verify.bin",))
    torch.manual_seed(3)
    result = t.train()
    assert result.eval["verify"]["accuracy"] == 0.75
    [(step, best, rng)] = t.saves
    assert (step, best) == (4, {"verify": [0.75, 4]})
    (tmp_path / "plain").mkdir()
    plain = fake_trainer(tmp_path / "plain", steps=4)  # no eval: the RNG state a checkpoint saves is the same
    torch.manual_seed(3)
    plain.train()
    assert torch.equal(rng, plain.saves[0][2])
    assert json.loads((tmp_path / "result.json").read_text())["final_loss"] == 1.0


def test_skipped_steps_are_logged_once_and_the_guard_stop_is_one_line(tmp_path, steps_skipped,
                                                                      capsys) -> None:
    steps_skipped.update({1, 2})  # steps 2 and 3 (1-based) are skipped; step 2 is also a log step
    t = fake_trainer(tmp_path, steps=6, log_every=2, max_bad=1)
    with pytest.raises(NonFiniteLossError) as stop:
        t.train()
    key = "train/skipped_steps"
    logged = [(step, row[key]) for step, row in t.metrics.rows if key in row]
    assert logged == [(2, 1), (3, 2)]
    assert [s for s, *_ in t.saves] == [3] and t.metrics.closed
    error = stop.value
    assert isinstance(error, InputError) and error.every_rank
    line = error.line()
    assert "steps 2-3 had a non-finite loss or gradient" in line and "checkpoint.max_bad_steps = 1" in line
    assert f"{tmp_path / 'checkpoints' / 'step_00000003'} holds the weights of step 1" in line
    assert t.metrics.lines[-1] == f"[facescale] error: {line}"  # train.log gets it too

    def run() -> int:
        raise error

    assert report_errors("train", run) == INPUT_ERROR_EXIT_CODE
    assert capsys.readouterr().err.splitlines() == [f"train: error: {line}"]


def test_data_counters_go_on_from_the_saved_ones_after_a_resume(tmp_path, monkeypatch) -> None:
    saved: dict = {}
    t = fake_trainer(tmp_path, steps=8, step=4, loader=Loader(seen=40, skipped=3))
    t.checkpoints = SimpleNamespace(save=lambda step, engine, head, state, yaml, extra: saved.update(state))
    Trainer.save(t)
    assert saved["data_counters"] == {"seen": 40.0, "skipped": 3.0}

    resumed = fake_trainer(tmp_path, steps=8, loader=Loader(seen=16, skipped=1))
    resumed.resume_from = tmp_path / "checkpoints" / "step_00000004"
    resumed.checkpoints = SimpleNamespace(root=tmp_path / "checkpoints",
                                          load=lambda path, engine, head: {**saved, "world_size": 1,
                                                                               "rank_state": {}})
    monkeypatch.setattr(trainer_module, "resolve_checkpoint", Path)
    resumed._maybe_resume()
    assert resumed._data_counters() == {"data/skipped_samples": 4.0, "data/skip_fraction": 4.0 / 60.0}
    resumed.loader.skipped_is_per_set = True  # DALI: the set's bad samples, counted again by this process
    assert resumed._data_counters()["data/skipped_samples"] == 1.0
