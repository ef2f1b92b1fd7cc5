"""The step-based training loop: build everything from the config, train, evaluate, checkpoint."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from facescale.checkpoint import CheckpointManager, resolve_checkpoint
from facescale.checkpoint.layout import read_saved_config, read_trainer_state, trained_world_size
from facescale.checkpoint.space_check import warn_if_short_of_space
from facescale.config.deepspeed import deepspeed_json, micro_batch_size
from facescale.config.errors import ConfigError
from facescale.config.load import config_to_dict, config_yaml
from facescale.config.schema import Config
from facescale.data.hang_guard import read_hang_limit_s
from facescale.errors import INPUT_ERROR_EXIT_CODE
from facescale.metrics.console import TrainConsole, run_logger, setup_run_logging
from facescale.metrics.writer import MetricsWriter, peak_memory_mb
from facescale.modes import StepContext, get_mode
from facescale.parallel.grad_overlap import overlap_grad_reduce
from facescale.runtime import Runtime
from facescale.train.evaluation import evaluate_sets
from facescale.train.init_weights import carry_backbone_optimizer, init_backbone_from
from facescale.train.lookahead import BatchLookahead
from facescale.train.resume_check import cursor_batch, epoch_plan_change, recount_cursor, resume_step_dir
from facescale.train.schedule import lr_at
from facescale.train.step import NonFiniteLossError, nan_injection_steps, train_step
from launcher.env import DistEnv
from launcher.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, TERMINATE_EXIT_CODE, PreemptionFlag


@dataclass
class TrainResult:
    """Summary of a finished run (identical on every rank)."""

    steps: int
    final_loss: float
    samples_per_s: float
    eval: dict
    run_dir: str
    eval_skipped: dict  # eval set -> the last step it could not be evaluated at (see train/evaluation.py)


def build_backbone_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed wraps for the backbone (frozen parameters left out).

    Fused kernels (CPU and CUDA): one pass per tensor for decay, momentum and update; the unfused step was
    2-3x slower on r18 (benchmarks/step.py's optimizer phase), same update rule."""
    params = [p for p in params if p.requires_grad]
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True
        )
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=True)


def keep_clip_norm(engine) -> None:
    """ZeRO stage 0: clip as torch's clip_grad_norm_ does and keep the norm for train/grad_norm.

    DeepSpeed's stage-0 clip drops the global norm it computes (stages 1-3 keep it), loops over parameters one
    by one and all-reduces a norm every rank already has (the gradients are averaged before the clip). This
    clips with torch's foreach clip_grad_norm_ on the averaged gradients (same formula: coefficient
    max_norm / (norm + 1e-6), at most 1) and keeps the norm, no collective. With model parallelism (an mpu)
    DeepSpeed's own clip stays, its norm kept."""
    from deepspeed.runtime.utils import clip_grad_norm_

    if engine.zero_optimization_stage() != 0:
        return

    def clip_and_keep() -> None:
        if engine.mpu is not None:
            engine._global_grad_norm = clip_grad_norm_(
                parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
            )
            return
        with_grads = [p for p in engine.module.parameters() if p.grad is not None]
        max_norm = engine.gradient_clipping()
        engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(with_grads, max_norm, foreach=True)

    engine.clip_fp32_gradients = clip_and_keep


class Trainer:
    """Owns the engine (backbone), the class-center head, the loader, metrics and checkpoints of one run."""

    def __init__(self, cfg: Config, env: DistEnv, runtime: Runtime,
                 preemption: PreemptionFlag | None = None, startup_lines: tuple[str, ...] = ()) -> None:
        """`startup_lines`: what the launch resolved before train.log was open (the schedule line), logged
        first by rank 0 so the console and train.log carry them alike."""
        import deepspeed

        from facescale.data.manifest import Manifest
        from facescale.deepspeed_ops import jit_lock_watchdog, skip_unused_ops
        from facescale.models.registry import build_backbone

        self.cfg, self.env, self.runtime = cfg, env, runtime
        self.run_dir = Path(cfg.logging.run_dir)
        setup_run_logging(self.run_dir, env.rank)  # before DeepSpeed, whose warnings it filters
        log0 = run_logger().info if env.rank == 0 else (lambda line: None)  # a line once, from rank 0
        for line in startup_lines:
            log0(line)
        self.manifest = Manifest.load(cfg.data.shards)
        skip_unused_ops()  # no JIT build of DeepSpeed's inference-only comm op at start-up
        torch.manual_seed(cfg.schedule.seed)  # identical initial backbone on every rank
        backbone = build_backbone(cfg.model)
        self.checkpoints = CheckpointManager(self.run_dir, env.rank, env.world_size, cfg.checkpoint.keep_last)
        self.resume_from = resume_step_dir(cfg)  # the step this run continues from; None: a fresh start
        if self.resume_from is None:  # a resumed run continues from its checkpoint, never init_from
            init_backbone_from(cfg.model, backbone, log0, cfg.schedule.start_step)
        if cfg.model.compile:
            from facescale.models.compile import compile_backbone

            compile_backbone(backbone, cfg.model.compile_backend)
        ds_config = deepspeed_json(cfg, env.world_size, runtime.precision)
        with jit_lock_watchdog():  # a JIT op build's lock is waited on with a limit and a message
            optimizer = build_backbone_optimizer(cfg, backbone.parameters())
            self.engine, *_ = deepspeed.initialize(model=backbone, optimizer=optimizer, config=ds_config)
        keep_clip_norm(self.engine)
        overlap_grad_reduce(self.engine)  # stage 0: reduce gradient buckets while backward runs, as DDP
        if self.resume_from is None and cfg.schedule.start_step and cfg.model.init_from:
            carry_backbone_optimizer(cfg, self.engine, log0)

        self.micro_batch = micro_batch_size(cfg, env.world_size)
        self.mode = get_mode(cfg.head.type).build(
            cfg, self.engine, self.manifest, rank=env.rank, world_size=env.world_size,
            micro_batch=self.micro_batch, precision=runtime.precision, device=runtime.device,
        )
        self.head, self.loader = self.mode.head, self.mode.loader
        if self.resume_from is None:  # e.g. head.init_from; a resumed run has its own state
            get_mode(cfg.head.type).start_fresh(self.mode, cfg, log0)
        resumed_at = None if self.resume_from is None else int(read_trainer_state(self.resume_from)["step"])
        self.metrics = MetricsWriter(self.run_dir, enabled=env.rank == 0, tensorboard=cfg.logging.tensorboard,
                                     wandb=cfg.logging.wandb, config=config_to_dict(cfg),
                                     resumed_at=resumed_at)
        self.console = TrainConsole(self.metrics.console, cfg.schedule.steps, cfg.schedule.global_batch_size,
                                    self.loader.steps_per_epoch, cfg.schedule.grad_accumulation)
        self.batches: BatchLookahead | None = None  # the training batches, once train() runs
        self.eval_skipped: dict[str, int] = {}  # eval set -> the last step it could not be evaluated at
        self._saved: tuple[int, Path] | None = None  # (step, dir) of the checkpoint holding the current state
        self.step = 0
        self.skipped_steps = self.bad_steps_in_row = 0  # loss guard counters (see train/step.py)
        self._skip_batches = 0  # batches to drop on resume when the loader has no load_state_dict
        self._data_before: dict[str, float] = {}  # data counters summed before a resume (see _data_totals)
        self._nan_steps = nan_injection_steps()
        self.preemption = preemption or PreemptionFlag.install()  # a signal since start-up is kept
        self.preemption.catch_interrupt()  # Ctrl-C saves from here on (before, it stops at once)
        if env.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            warn_if_short_of_space(cfg, self.run_dir, self.manifest.num_classes, env.world_size, self.metrics)
            (self.run_dir / "config.yaml").write_text(config_yaml(cfg))
            (self.run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
        self._maybe_resume()
        if self.resume_from is None and cfg.schedule.start_step:
            self._start_at(cfg.schedule.start_step)

    def _start_at(self, step: int) -> None:
        """schedule.start_step: a fresh run goes on with the schedule of a run trained elsewhere, its step
        count, learning rate and data position as if `step` steps had run here."""
        sch = self.cfg.schedule
        if step >= sch.steps:
            raise ConfigError(f"schedule.start_step {step} must be smaller than schedule.steps ({sch.steps})")
        self.step = step
        batches = step * sch.grad_accumulation
        per_epoch = self.loader.steps_per_epoch
        if hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict({"epoch": batches // per_epoch, "step_in_epoch": batches % per_epoch})
        else:
            self._skip_batches = batches
        lr = lr_at(step, self.cfg.optim.lr, sch)
        self.metrics.console(f"[facescale] schedule.start_step: this run starts at step {step} of "
                             f"{sch.steps} (epoch {batches / per_epoch:.2f}, lr {lr:.4g})")

    def _maybe_resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        state = self.checkpoints.load(path, self.engine, self.head)
        for line in get_mode(self.cfg.head.type).resume_notes(read_saved_config(path), self.cfg):
            self.metrics.console(line)
        self.step = int(state["step"])
        if resolve_checkpoint(path).parent == self.checkpoints.root:  # this run's own step: no re-save
            self._saved = (self.step, resolve_checkpoint(path))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_steps_in_row = int(state.get("bad_steps_in_row", 0))
        self.console.best.load_state_dict(state.get("best_eval"))
        self._data_before = state.get("data_counters") or {}
        cursor = state["rank_state"].get("loader", state.get("loader"))
        if cursor is not None and hasattr(self.loader, "load_state_dict"):
            batch = self.micro_batch * self.env.world_size
            saved_batch = cursor_batch(state, path) or batch
            per_epoch = self.loader.steps_per_epoch
            self.loader.load_state_dict(recount_cursor(cursor, saved_batch, batch, per_epoch))
            replanned = epoch_plan_change(self.cfg, path, state, self.env.world_size, cursor,
                                          getattr(self.loader, "planned_by_workers", False), batch)
            if replanned:
                self.metrics.console(replanned)
        else:  # exact for any deterministic loader, but it decodes every batch again
            self._skip_batches = self.step * self.cfg.schedule.grad_accumulation
            self.metrics.console(
                f"[facescale] the loader cannot restore its position; skipping {self._skip_batches} batches"
            )
        resharded = f", resharded for {state['world_size']}" if "resharded_from" in state else ""
        self.metrics.console(f"[facescale] resumed from {path} (saved by {trained_world_size(state)} ranks"
                             f"{resharded}) at step {self.step}")
        if self.metrics.superseded is not None:
            first, last = self.metrics.superseded
            self.metrics.console(
                f"[facescale] steps {first}-{last}, logged before the resume past this checkpoint, are done "
                "again: their metrics.jsonl lines moved to metrics.superseded.jsonl, TensorBoard hides them"
            )
        if self.cfg.schedule.start_step:
            self.metrics.console(f"[facescale] schedule.start_step ignored: this run resumes from {path}")
        if self.cfg.model.init_from:
            self.metrics.console(f"[facescale] model.init_from ignored: this run resumes from {path}")

    def _batches(self):
        """Batches forever, from the resume position; the loader's draws from the global RNG (worker base
        seeds) are kept out of the training RNG, so a resumed run draws what an uninterrupted one does."""
        source = self._endless_batches()
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(source)
            if self._skip_batches:
                self._skip_batches -= 1
                continue
            yield batch

    def _endless_batches(self):
        while True:
            yield from self.loader

    def evaluate(self) -> dict:
        """Verification on every configured .bin at the current step (collective; see train/evaluation.py)."""
        return evaluate_sets(self.cfg, self.engine, self.runtime.device, self.env, self.step, self.metrics,
                             self.console, self.eval_skipped)

    def save(self) -> Path:
        """Checkpoint the run at the current step (collective); see facescale/checkpoint/manager.py.
        A step already saved (resumed and not trained further, or preempted right after a periodic save)
        is not written again."""
        if self._saved is not None and self._saved[0] == self.step:
            self.metrics.console(f"[facescale] step {self.step} is already saved in {self._saved[1]}")
            return self._saved[1]
        micro_steps = self.step * self.cfg.schedule.grad_accumulation
        # a batch read ahead is not yet trained on: save the position before it
        cursor = self.batches.cursor() if self.batches is not None else self._loader_cursor()
        state = {
            "step": self.step,
            "epoch": cursor["epoch"] if cursor else micro_steps // max(1, self.loader.steps_per_epoch),
            "loader": cursor,
            "samples_seen": self.step * self.cfg.schedule.global_batch_size,
            "cursor_batch": self.micro_batch * self.env.world_size,  # samples of a `loader` batch, all ranks
            "seed": self.cfg.schedule.seed,
            "lr": lr_at(self.step, self.cfg.optim.lr, self.cfg.schedule),
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_row": self.bad_steps_in_row,
            "head_type": self.cfg.head.type,
            "best_eval": self.console.best.state_dict(),
            "data_counters": self._data_totals(),  # summed over ranks, added back on resume
        }
        extra = {"loader": cursor} if cursor is not None else {}
        path = self.checkpoints.save(self.step, self.engine, self.head, state, config_yaml(self.cfg), extra)
        self._saved = (self.step, path)
        return path

    def _guard(self, out) -> bool:
        """Count skipped steps; True when more than checkpoint.max_bad_steps in a row must stop the run."""
        if not getattr(out, "skipped", False):
            self.bad_steps_in_row = 0
            return False
        self.skipped_steps += 1
        self.bad_steps_in_row += 1
        self.metrics.console(
            f"[facescale] step {self.step}: non-finite loss or gradient, update skipped "
            f"({self.bad_steps_in_row} in a row, {self.skipped_steps} in total)"
        )
        return self.bad_steps_in_row > self.cfg.checkpoint.max_bad_steps

    def _stop_non_finite(self) -> None:
        """Save and end every rank alike (NonFiniteLossError, one line, also in train.log). The skipped steps
        changed no weights, so the step saved holds those of the last good step, its data cursor past the
        bad batches: a resume from it goes on with the next batch."""
        path = self.save()
        good = self.step - self.bad_steps_in_row
        error = NonFiniteLossError(
            f"steps {good + 1}-{self.step} had a non-finite loss or gradient, more than "
            f"checkpoint.max_bad_steps = {self.cfg.checkpoint.max_bad_steps} in a row; stopped at step "
            f"{self.step}",
            fix=f"{path} holds the weights of step {good} (the skipped steps changed nothing): lower "
                "optim.lr or check the data, then run the same command again to resume from it "
                "(checkpoint.resume: auto)",
        )
        self.metrics.console(f"[facescale] error: {error.line()}")
        self.metrics.close()
        if dist.is_initialized():  # no rank exits while rank 0 still closes its logs (as _stop)
            dist.barrier()
        raise error

    def _log(self, lr: float, out) -> None:
        """TensorBoard scalars and the console line for the steps since the last log."""
        scalars = {
            "train/loss": out.loss,
            "train/lr": lr,
            **self.console.close_window(self.step, lr, self._loss_scale()),
            "perf/max_memory_mb": peak_memory_mb(self.runtime.device),
            "train/grad_norm": out.grad_norm,
            "train/skipped_steps": self.skipped_steps,
            "train/epoch": self.console.epoch(self.step),
            **self._data_counters(),
        }
        scalars.update({f"head/{k}": float(v) for k, v in out.head_stats.items()})
        self.metrics.scalars(self.step, scalars)

    def _loss_scale(self) -> float | None:
        """DeepSpeed's dynamic fp16 loss scale (None unless training in fp16)."""
        if self.runtime.precision != "fp16":
            return None
        optimizer = self.engine.optimizer
        scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
        return float(scale) if scale is not None else None

    def _plan(self) -> list[str]:
        from facescale.metrics.startup import RunFacts, plan_lines

        facts = RunFacts(
            world_size=self.env.world_size, ranks_per_node=self.env.local_world_size,
            device=self.runtime.device, precision=self.runtime.precision, micro_batch=self.micro_batch,
            batches_per_epoch=self.loader.steps_per_epoch, num_identities=self.manifest.num_classes,
            num_images=self.manifest.num_samples,
            head_summary=self.mode.describe(self.cfg, self.manifest.num_classes, self.env.world_size),
            run_dir=str(self.run_dir), resumed_from=str(self.resume_from) if self.resume_from else None,
            start_step=self.step,
        )
        return plan_lines(self.cfg, facts)

    def _data_totals(self) -> dict[str, float] | None:
        """Samples seen and bad samples skipped (data.on_bad_sample=skip) since the run started, summed over
        ranks: this process's loader counts plus those saved before a resume (every rank calls this); None
        for a loader that counts neither."""
        seen, skipped = getattr(self.loader, "seen", None), getattr(self.loader, "skipped", None)
        if seen is None or skipped is None:
            return None
        counts = torch.tensor([float(seen), float(skipped)], dtype=torch.float64, device=self.runtime.device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        before = self._data_before
        if getattr(self.loader, "skipped_is_per_set", False):  # counted again by this process: not added
            before = {**before, "skipped": 0.0}
        return {"seen": counts[0].item() + before.get("seen", 0.0),
                "skipped": counts[1].item() + before.get("skipped", 0.0)}

    def _data_counters(self) -> dict[str, float]:
        """Bad samples skipped under data.on_bad_sample=skip since the run started, summed over ranks."""
        totals = self._data_totals()
        if totals is None:
            return {}
        return {"data/skipped_samples": totals["skipped"],
                "data/skip_fraction": totals["skipped"] / max(1.0, totals["seen"] + totals["skipped"])}

    def _stop(self, input_error: Exception | None) -> None:
        """Save the agreed step on every rank and end the process: the rank whose input failed raises its
        error (an input error: one line, exit 2; anything else with its traceback), the others exit 2; else a
        SIGTERM exits with 143, a preemption for requeue (3), a Ctrl-C with 130."""
        if self.preemption.input_failed:
            path = self.save()
            self.metrics.console(f"[facescale] stopped at step {self.step}: a rank could not read its next "
                                 f"batch (its error follows); step {self.step} is saved in {path}: fix the "
                                 "cause, then run the same command again to resume from it")
            self.metrics.close()
            if input_error is not None:
                raise input_error
            raise SystemExit(INPUT_ERROR_EXIT_CODE)
        requeue = self.preemption.requeue
        code, what = ((REQUEUE_EXIT_CODE, "preempted") if requeue else
                      (TERMINATE_EXIT_CODE, "stopped by SIGTERM (scancel or preemption)")
                      if self.preemption.terminate else (INTERRUPT_EXIT_CODE, "interrupted (Ctrl-C)"))
        self.metrics.console(f"[facescale] {what} at step {self.step}: saving and exiting with code "
                             f"{code}{' for requeue' if requeue else ''}")
        self.save()
        self.metrics.close()
        if dist.is_initialized():  # no rank exits (srun --kill-on-bad-exit then kills the others) while rank
            dist.barrier()  # 0 still closes its logs (TensorBoard's last events, W&B's run)
        raise SystemExit(code)

    def _already_finished(self) -> TrainResult:
        """A run resumed at or past schedule.steps trains and evaluates nothing: its result.json, metrics and
        TensorBoard stay as the finished run wrote them; the result is that file's (if readable)."""
        result_file = self.run_dir / "result.json"
        self.metrics.console(f"[facescale] run already finished at step {self.step} ({result_file}); raise "
                             "schedule.steps to train on")
        self.metrics.close()
        try:
            return TrainResult(**json.loads(result_file.read_text()))
        except (OSError, ValueError, TypeError):  # none yet (stopped between the last save and its write)
            return TrainResult(self.step, float("nan"), 0.0, {}, str(self.run_dir), self.eval_skipped)

    def _loader_cursor(self) -> dict | None:
        return self.loader.state_dict() if hasattr(self.loader, "state_dict") else None

    def _preempted(self, input_failed: bool = False) -> bool:
        """Collective: every rank learns whether any rank got a preemption signal or could not read its
        next batch."""
        return self.preemption.should_stop(self.runtime.device, input_failed)

    def train(self) -> TrainResult:
        cfg, sch = self.cfg, self.cfg.schedule
        if self.step >= sch.steps:
            return self._already_finished()
        # DataLoader readers stop a wait at data.read_timeout_s themselves (every rank saves); the others
        # (DALI, no workers) say a little later which rank waits, and end it at dist.timeout_s
        batches = self.batches = BatchLookahead(self._batches(), self._loader_cursor,
                                                warn_after_s=1.1 * cfg.data.read_timeout_s,
                                                end_after_s=read_hang_limit_s(cfg),
                                                who=f"rank {self.env.rank} on {socket.gethostname()}")
        loss = float("nan")
        self.console.start(self._plan())
        t_start, start_step, eval_results = time.perf_counter(), self.step, {}
        t0 = time.perf_counter()
        while self.step < sch.steps:
            lr = lr_at(self.step, cfg.optim.lr, sch)
            ctx = StepContext(self.engine, self.step, lr, lr * cfg.head.lr_scale, self.env.world_size,
                              sch.grad_accumulation, time.perf_counter)
            out = train_step(self.mode, batches, ctx, inject_nan=self.step in self._nan_steps)
            out.data_wait_s += batches.take_wait()  # its batches, read at the end of the last step
            self.step += 1
            loss = out.loss
            if cfg.model.compile and self.step in (start_step + 1, sch.steps):  # compile time, recompiles
                from facescale.models.compile import compile_line

                self.metrics.console(compile_line(self.step, time.perf_counter() - t0))
            self.console.add_step(out.loss, time.perf_counter() - t0, out.data_wait_s, out.head_s)
            stop = self._guard(out)  # counters first: the step's scalars carry them, logged once
            if self.step % cfg.logging.every_steps == 0 or self.step == sch.steps:
                self._log(lr, out)
            elif out.skipped:
                self.metrics.scalars(self.step, {"train/skipped_steps": self.skipped_steps})
            if stop:
                self._stop_non_finite()
            if self.step == sch.steps:
                break
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                with torch.random.fork_rng(devices=[]):  # keep exact resume independent of evaluation
                    self.evaluate()
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
            t0 = time.perf_counter()  # the next step's time includes reading its batches, here
            input_error = batches.read_ahead(sch.grad_accumulation)
            if self._preempted(input_error is not None):
                self._stop(input_error)
        throughput = (
            (self.step - start_step) * sch.global_batch_size / max(time.perf_counter() - t_start, 1e-9)
        )
        if cfg.eval.bins:  # before the save, as a periodic eval: the checkpoint's best_eval holds it
            with torch.random.fork_rng(devices=[]):  # the saved RNG state is that of an eval-free run
                eval_results = self.evaluate()
        self.save()
        result = TrainResult(
            steps=self.step,
            final_loss=loss,
            samples_per_s=throughput,
            eval=eval_results,
            run_dir=str(self.run_dir),
            eval_skipped=self.eval_skipped,
        )
        if self.env.rank == 0:
            (self.run_dir / "result.json").write_text(json.dumps(result.__dict__, indent=2, default=str))
        self.metrics.close()
        if dist.is_initialized():
            dist.barrier()
        return result
