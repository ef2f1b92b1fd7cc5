"""The training console: train.log through logging (appended across restarts), window statistics and ETA,
best-so-far accuracy, the start-up plan, and the filters for warnings users cannot act on."""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from types import SimpleNamespace

import pytest
import torch

from facescale.config.schema import Config
from facescale.f2c.mode import F2CRun
from facescale.metrics.console import (
    LOG_FILE,
    BestSoFar,
    StepWindow,
    TrainConsole,
    close_run_logging,
    duration,
    run_logger,
    setup_run_logging,
)
from facescale.metrics.quiet import silence_unactionable_warnings
from facescale.metrics.startup import RunFacts, plan_lines
from facescale.partial_fc.mode import PartialFCRun

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_train_log_is_appended_with_timestamps_and_levels(tmp_path, capsys) -> None:
    for attempt in range(2):  # a requeued job sets logging up again in the same run dir
        setup_run_logging(tmp_path, rank=0)
        run_logger().info(f"[train] attempt {attempt}")
        run_logger().warning("something odd")
        close_run_logging()
    setup_run_logging(tmp_path, rank=1)  # other ranks: warnings only, to stdout, never the file
    run_logger().info("rank 1 info")
    run_logger().warning("rank 1 warning")
    close_run_logging()
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    assert [re.sub(STAMP, "T", line) for line in lines] == [
        "T INFO [train] attempt 0", "T WARNING something odd",
        "T INFO [train] attempt 1", "T WARNING something odd"]
    out = capsys.readouterr().out
    assert "rank 1 info" not in out and re.search(STAMP + r" WARNING \[rank 1\] rank 1 warning", out)


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def write(self, _text: str) -> int:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


def test_train_log_on_a_full_disk_warns_once_and_stops(tmp_path, capsys) -> None:
    """As the other metrics sinks: one warning, then training goes on without train.log; logging's default
    printed a '--- Logging error ---' traceback to stderr for every line (196 in 200 steps)."""
    setup_run_logging(tmp_path, rank=0)
    file_handler = next(h for h in run_logger().handlers if isinstance(h, logging.FileHandler))
    file_handler.stream = _FullDisk()
    for step in range(5):
        run_logger().info(f"[train] step {step}")
    close_run_logging()
    captured = capsys.readouterr()
    assert "Logging error" not in captured.err and "Traceback" not in captured.err
    assert captured.out.count("cannot be written") == 1 and "No space left on device" in captured.out
    assert captured.out.count("[train] step") == 5  # the console goes on


def test_window_averages_the_loss_and_times_the_eta() -> None:
    clock = FakeClock()
    window = StepWindow(global_batch=32, clock=clock)
    for loss, wait in ((2.0, 0.1), (float("nan"), 0.2), (4.0, 0.3)):  # a skipped step's NaN is left out
        clock.now += 0.5
        window.add(loss, step_s=0.4, data_wait_s=wait, head_s=0.05)
    values = window.close()
    assert values["train/loss_avg"] == 3.0
    assert values["perf/samples_per_s"] == pytest.approx(3 * 32 / 1.5)
    assert values["perf/data_wait_ms"] == pytest.approx(200.0)
    assert values["perf/step_s_wall"] == pytest.approx(0.5)
    assert window.steps == 0  # a new window starts


def test_console_lines_and_best_so_far() -> None:
    lines: list[str] = []
    console = TrainConsole(lines.append, total_steps=1000, global_batch=64, batches_per_epoch=50,
                           grad_accumulation=2)
    console.start(["[plan] hello"])
    console.window.clock = clock = FakeClock()
    console.window.t0 = clock.now
    for loss in (1.0, 3.0):
        clock.now += 2.0
        console.add_step(loss, 1.5, 0.25, 0.1)
    scalars = console.close_window(step=100, lr=0.05, loss_scale=65536.0)
    line = lines[-1]
    assert "step 100/1000 epoch 4.00 loss 2.0000 lr 0.05 " in line  # 100 steps x 2 micro / 50 batches
    assert "32 img/s" in line and "data-wait 250 ms head 100 ms" in line
    assert "eta 30m00s" in line and "loss-scale 65536" in line  # 900 steps left x 2 s
    assert scalars["train/loss_scale"] == 65536.0 and "perf/step_s_wall" not in scalars
    result = {"accuracy": 0.9, "accuracy_std": 0.01, "num_pairs": 6000}
    console.eval_result(100, "lfw", result)
    console.eval_result(200, "lfw", {**result, "accuracy": 0.8})
    assert "accuracy 0.8000" in lines[-1] and "best 0.9000 at step 100" in lines[-1]
    restored = BestSoFar()
    restored.load_state_dict(console.best.state_dict())
    assert restored.best == {"lfw": (0.9, 100)}
    assert (duration(59), duration(3600 * 25 + 61)) == ("59s", "1d01h01m")


def test_plan_lines_name_the_run() -> None:
    cfg = Config()
    cfg.schedule.steps, cfg.schedule.global_batch_size, cfg.schedule.grad_accumulation = 3000, 1024, 2
    cfg.head.sample_rate, cfg.checkpoint.every_steps, cfg.eval.every_steps = 0.2, 500, 0
    pfc = PartialFCRun(SimpleNamespace(num_sample=25_749), loader=None)  # the line reads the head's width
    facts = RunFacts(world_size=16, ranks_per_node=8, device=torch.device("cpu"), precision="bf16",
                     micro_batch=32, batches_per_epoch=2000, num_identities=2_059_906, num_images=42_474_557,
                     head_summary=pfc.describe(cfg, 2_059_906, 16), run_dir="runs/wf42m",
                     resumed_from="runs/wf42m/checkpoints/step_500", start_step=500)
    text = "\n".join(plan_lines(cfg, facts))
    assert "16 ranks = 2 node(s) x 8 rank(s)" in text and "precision bf16, ZeRO stage 1" in text
    assert "micro 32 per rank x 16 ranks x 2 accumulation = global 1024" in text
    assert "2059906 identities, 42474557 images; 1000 steps per epoch, 3000 steps = 3.00 epochs" in text
    assert "128745 centers per rank (of 2059906), 25749 sampled per step (sample_rate 0.2; all the " \
           "positives of the global batch in its shard when they are more)" in text
    assert "checkpoint every 500 steps" in text and "eval none" in text
    assert "resumed from runs/wf42m/checkpoints/step_500 at step 500" in text
    cfg.head.type = "f2c"
    f2c = F2CRun(SimpleNamespace(), SimpleNamespace())
    facts = dataclasses.replace(facts, head_summary=f2c.describe(cfg, 2_059_906, 16))
    assert "F2C Dynamic Class Pool of 7409 identities" in "\n".join(plan_lines(cfg, facts))


def test_unactionable_warnings_are_filtered_and_others_kept(caplog) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_unactionable_warnings()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    deepspeed_logger = logging.getLogger("DeepSpeed")
    propagate, deepspeed_logger.propagate = deepspeed_logger.propagate, True  # let caplog see it
    try:
        with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
            deepspeed_logger.warning("**** You are using ZeRO with an untested optimizer, proceed with care")
            deepspeed_logger.warning("a warning that matters")
    finally:
        deepspeed_logger.propagate = propagate
    assert [r.getMessage() for r in caplog.records] == ["a warning that matters"]
