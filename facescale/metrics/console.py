"""The training console: Python logging to stdout and `<run_dir>/train.log` (rank 0), window statistics, ETA.

Every line carries a wall-clock timestamp and a level. Rank 0 logs INFO and above; other ranks only warnings,
prefixed with their rank. train.log is opened in append mode, so a requeued job continues the same file.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

LOGGER_NAME = "facescale"
LOG_FILE = "train.log"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_DATE = "%Y-%m-%d %H:%M:%S"


def run_logger() -> logging.Logger:
    """The `facescale` logger; configured for rank 0 without a file if nobody set it up yet."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        setup_run_logging(None, rank=0)
    return logger


class _RunLogFile(logging.FileHandler):
    """train.log, which like the other metrics sinks says once that it cannot be written (a full disk, a lost
    mount) and stops, where logging's default prints a traceback for every line that fails."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        with contextlib.suppress(Exception):
            self.close()
        logging.getLogger(LOGGER_NAME).warning(
            f"[facescale] warning: {self.baseFilename} cannot be written ({error}); training goes on without "
            "it until the run is started again")


def setup_run_logging(run_dir: str | Path | None, rank: int) -> logging.Logger:
    """(Re)configure the `facescale` logger for this process: stdout, plus train.log on rank 0."""
    from facescale.metrics.quiet import silence_unactionable_warnings

    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):  # a second Trainer in the same process replaces the first's
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(_FORMAT.replace("%(message)s", prefix + "%(message)s"), _DATE)
    stream = logging.StreamHandler(sys.stdout)
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    if rank == 0 and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        log_file = _RunLogFile(Path(run_dir) / LOG_FILE, mode="a", encoding="utf-8")
        log_file.setFormatter(formatter)
        logger.addHandler(log_file)
    silence_unactionable_warnings()
    return logger


def close_run_logging() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        handler.flush()
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()


def duration(seconds: float) -> str:
    """`1d02h03m`, `2h03m04s`, `3m04s` or `4s`: compact and sortable by eye."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StepWindow:
    """Statistics of the steps between two log lines: mean loss, step/wait/head time, throughput, ETA."""

    def __init__(self, global_batch: int, clock=time.perf_counter) -> None:
        self.global_batch = global_batch
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        self.steps, self.step_s, self.wait_s, self.head_s = 0, 0.0, 0.0, 0.0
        self.loss_sum, self.loss_count = 0.0, 0
        self.t0 = self.clock()

    def add(self, loss: float, step_s: float, data_wait_s: float, head_s: float) -> None:
        self.steps += 1
        self.step_s += step_s
        self.wait_s += data_wait_s
        self.head_s += head_s
        if loss == loss and abs(loss) != float("inf"):  # skipped (non-finite) steps are counted elsewhere
            self.loss_sum += loss
            self.loss_count += 1

    def close(self) -> dict[str, float]:
        """The window's scalars (then start a new window); `perf/step_s_wall` drives the ETA."""
        n, elapsed = max(1, self.steps), max(self.clock() - self.t0, 1e-9)
        values = {
            "train/loss_avg": self.loss_sum / self.loss_count if self.loss_count else float("nan"),
            "perf/samples_per_s": self.steps * self.global_batch / elapsed,
            "perf/step_ms": 1000 * self.step_s / n,
            "perf/data_wait_ms": 1000 * self.wait_s / n,
            "head/step_ms": 1000 * self.head_s / n,
            "perf/step_s_wall": elapsed / n,
        }
        self._reset()
        return values


def train_line(step: int, total_steps: int, epoch: float, values: dict[str, float], lr: float,
               elapsed_s: float, loss_scale: float | None = None) -> str:
    """One console line for a closed window (see StepWindow.close); the ETA uses the window's step time."""
    eta = (total_steps - step) * values["perf/step_s_wall"]
    line = (f"[train] step {step}/{total_steps} epoch {epoch:.2f} "
            f"loss {values['train/loss_avg']:.4f} lr {lr:.4g} {values['perf/samples_per_s']:.0f} img/s "
            f"step {values['perf/step_ms']:.0f} ms "
            f"data-wait {values['perf/data_wait_ms']:.0f} ms head {values['head/step_ms']:.0f} ms "
            f"elapsed {duration(elapsed_s)} eta {duration(eta)}")
    if loss_scale is not None:
        line += f" loss-scale {loss_scale:g}"
    return line


class BestSoFar:
    """The best value seen per verification set (higher is better), for the eval lines and TensorBoard."""

    def __init__(self) -> None:
        self.best: dict[str, tuple[float, int]] = {}

    def update(self, name: str, value: float, step: int) -> tuple[float, int]:
        if name not in self.best or value > self.best[name][0]:
            self.best[name] = (value, step)
        return self.best[name]

    def state_dict(self) -> dict[str, list]:
        return {name: [value, step] for name, (value, step) in self.best.items()}

    def load_state_dict(self, state: dict[str, list] | None) -> None:
        self.best = {name: (float(v), int(s)) for name, (v, s) in (state or {}).items()}


class TrainConsole:
    """What the trainer reports as text: the plan at start-up, one line per log window, one per eval set.

    Lines go through `log` (rank 0's MetricsWriter.console), so they reach stdout and train.log together.
    """

    def __init__(self, log, total_steps: int, global_batch: int, batches_per_epoch: int,
                 grad_accumulation: int) -> None:
        self.log = log
        self.total_steps = total_steps
        self.batches_per_epoch = max(1, batches_per_epoch)
        self.grad_accumulation = grad_accumulation
        self.window = StepWindow(global_batch)
        self.best = BestSoFar()
        self.started = time.perf_counter()

    def epoch(self, step: int) -> float:
        """Fractional epoch after `step` optimizer steps (passes over the data set, as the loader counts)."""
        return step * self.grad_accumulation / self.batches_per_epoch

    def start(self, plan: list[str]) -> None:
        self.started = time.perf_counter()
        self.window = StepWindow(self.window.global_batch)
        for line in plan:
            self.log(line)

    def add_step(self, loss: float, step_s: float, data_wait_s: float, head_s: float) -> None:
        self.window.add(loss, step_s, data_wait_s, head_s)

    def close_window(self, step: int, lr: float, loss_scale: float | None) -> dict[str, float]:
        """Log the line for the steps since the last one; return the window's scalars for TensorBoard."""
        values = self.window.close()
        self.log(train_line(step, self.total_steps, self.epoch(step), values, lr,
                            time.perf_counter() - self.started, loss_scale))
        values.pop("perf/step_s_wall")
        if loss_scale is not None:
            values["train/loss_scale"] = loss_scale
        return values

    def eval_result(self, step: int, name: str, result: dict) -> dict[str, float]:
        """Log one set's accuracy with its best so far; return the best-so-far scalars."""
        best, best_step = self.best.update(name, result["accuracy"], step)
        self.log(f"[eval] step {step} {name}: accuracy {result['accuracy']:.4f} "
                 f"± {result['accuracy_std']:.4f} (best {best:.4f} at step {best_step}; XNorm "
                 f"{result.get('xnorm', float('nan')):.2f}; raw-pixel baseline "
                 f"{result.get('pixel_accuracy', float('nan')):.4f}, {result['num_pairs']} pairs)")
        return {f"eval/{name}/best_accuracy": best}
