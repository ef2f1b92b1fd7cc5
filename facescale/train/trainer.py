"""The step-based training loop: build everything from the config, train, evaluate, checkpoint."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from facescale.checkpoint import CheckpointManager
from facescale.config.deepspeed import deepspeed_json, micro_batch_size
from facescale.config.load import config_yaml
from facescale.config.schema import Config
from facescale.metrics.writer import MetricsWriter, peak_memory_mb
from facescale.runtime import Runtime
from facescale.train.schedule import lr_at
from facescale.train.step import train_step
from launcher.env import DistEnv
from launcher.preemption import REQUEUE_EXIT_CODE, PreemptionFlag


@dataclass
class TrainResult:
    """Summary of a finished run (identical on every rank)."""

    steps: int
    final_loss: float
    samples_per_s: float
    eval: dict
    run_dir: str


def build_backbone_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed wraps for the backbone (frozen parameters left out)."""
    params = [p for p in params if p.requires_grad]
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


class Trainer:
    """Owns the engine (backbone), the class-center head, the loader, metrics and checkpoints of one run."""

    def __init__(self, cfg: Config, env: DistEnv, runtime: Runtime) -> None:
        import deepspeed

        from facescale.data.loader import build_train_loader
        from facescale.data.manifest import Manifest
        from facescale.heads import build_head
        from facescale.models.registry import build_backbone

        self.cfg, self.env, self.runtime = cfg, env, runtime
        self.run_dir = Path(cfg.logging.run_dir)
        self.manifest = Manifest.load(cfg.data.shards)
        torch.manual_seed(cfg.schedule.seed)  # identical initial backbone on every rank
        backbone = build_backbone(cfg.model)
        ds_config = deepspeed_json(cfg, env.world_size, runtime.precision)
        self.engine, *_ = deepspeed.initialize(
            model=backbone, optimizer=build_backbone_optimizer(cfg, backbone.parameters()), config=ds_config
        )

        self.head = build_head(
            cfg.head, self.manifest.num_classes, cfg.model.embedding_size, seed=cfg.schedule.seed
        ).to(runtime.device)
        self.micro_batch = micro_batch_size(cfg, env.world_size)
        self.loader = build_train_loader(
            cfg.data,
            rank=env.rank,
            world_size=env.world_size,
            batch_size=self.micro_batch,
            seed=cfg.schedule.seed,
            device=runtime.device,
        )
        self.metrics = MetricsWriter(self.run_dir, enabled=env.rank == 0, tensorboard=cfg.logging.tensorboard)
        self.checkpoints = CheckpointManager(self.run_dir, env.rank, env.world_size, cfg.checkpoint.keep_last)
        self.step = 0
        self.preemption = PreemptionFlag.install()
        if env.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_yaml(cfg))
            (self.run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return
        path = self.checkpoints.latest() if mode == "auto" else Path(mode)
        if path is None:
            return
        state = self.checkpoints.load(path, self.engine, self.head)
        self.step = int(state["step"])
        self.metrics.console(f"[facescale] resumed from {path} at step {self.step}")

    def _batches(self):
        while True:
            yield from self.loader

    def _eval_model(self) -> torch.nn.Module:
        """The backbone for extraction; under ZeRO-3 a gathered plain copy (ranks may run unequal batches)."""
        if self.engine.zero_optimization_stage() != 3:
            return self.engine.module
        import deepspeed

        from facescale.models.registry import build_backbone

        copy = build_backbone(self.cfg.model).to(self.runtime.device)
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            copy.load_state_dict(self.engine.module.state_dict())
        return copy

    def evaluate(self) -> dict:
        """Verification on every configured .bin, extraction split across all ranks."""
        from facescale.eval.extract import evaluate_bin

        results: dict = {}
        model = self._eval_model()
        was_training = model.training
        model.eval()
        for path in self.cfg.eval.bins:
            res = evaluate_bin(
                model,
                path,
                batch_size=self.cfg.eval.batch_size,
                device=self.runtime.device,
                rank=self.env.rank,
                world_size=self.env.world_size,
                image_size=self.cfg.data.image_size,
                progress=False,
            )
            name = res["name"]
            results[name] = res
            self.metrics.scalars(
                self.step,
                {
                    f"eval/{name}/{k}": v
                    for k, v in res.items()
                    if isinstance(v, float | int) and not isinstance(v, bool)
                },
            )
            self.metrics.console(
                f"[eval] step {self.step} {name}: accuracy {res['accuracy']:.4f} "
                f"± {res['accuracy_std']:.4f} (raw-pixel baseline "
                f"{res.get('pixel_accuracy', float('nan')):.4f}, {res['num_pairs']} pairs)"
            )
        model.train(was_training)
        return results

    def save(self) -> None:
        state = {
            "step": self.step,
            "epoch": self.step // max(1, self.loader.steps_per_epoch),
            "seed": self.cfg.schedule.seed,
        }
        self.checkpoints.save(self.step, self.engine, self.head, state, config_yaml(self.cfg))

    def _log(self, window: _Window, lr: float, out) -> None:
        """TensorBoard scalars and the console line for the steps since the last log."""
        scalars = {
            "train/loss": out.loss,
            "train/lr": lr,
            **window.scalars(),
            "perf/max_memory_mb": peak_memory_mb(self.runtime.device),
            "train/grad_norm": out.grad_norm,
        }
        scalars.update({f"head/{k}": float(v) for k, v in out.head_stats.items()})
        self.metrics.scalars(self.step, scalars)
        self.metrics.console(
            f"[train] step {self.step}/{self.cfg.schedule.steps} loss {out.loss:.4f} lr {lr:.4g} "
            f"{scalars['perf/samples_per_s']:.0f} img/s step {scalars['perf/step_ms']:.0f} ms "
            f"data-wait {scalars['perf/data_wait_ms']:.0f} ms head {scalars['head/step_ms']:.0f} ms"
        )

    def _preempted(self) -> bool:
        """Collective: every rank learns whether any rank got a preemption signal."""
        return self.preemption.should_stop(self.runtime.device)

    def train(self) -> TrainResult:
        cfg, sch = self.cfg, self.cfg.schedule
        batches = self._batches()
        window, loss = _Window(sch.global_batch_size), float("nan")
        t_start, start_step, eval_results = time.perf_counter(), self.step, {}
        while self.step < sch.steps:
            t0 = time.perf_counter()
            lr = lr_at(self.step, cfg.optim.lr, sch)
            out = train_step(
                self.engine,
                self.head,
                batches,
                self.step,
                lr,
                lr * cfg.head.lr_scale,
                self.env.world_size,
                sch.grad_accumulation,
                time.perf_counter,
            )
            self.step += 1
            loss = out.loss
            window.add(out, time.perf_counter() - t0)
            if self.step % cfg.logging.every_steps == 0 or self.step == sch.steps:
                self._log(window, lr, out)
            if self.step == sch.steps:
                break
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                self.evaluate()
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
            if self._preempted():
                self.metrics.console(
                    f"[facescale] preempted at step {self.step}: saving and exiting "
                    f"with code {REQUEUE_EXIT_CODE} for requeue"
                )
                self.save()
                self.metrics.close()
                raise SystemExit(REQUEUE_EXIT_CODE)
        throughput = (
            (self.step - start_step) * sch.global_batch_size / max(time.perf_counter() - t_start, 1e-9)
        )
        self.save()
        if cfg.eval.bins:
            eval_results = self.evaluate()
        result = TrainResult(
            steps=self.step,
            final_loss=loss,
            samples_per_s=throughput,
            eval=eval_results,
            run_dir=str(self.run_dir),
        )
        if self.env.rank == 0:
            (self.run_dir / "result.json").write_text(json.dumps(result.__dict__, indent=2, default=str))
        self.metrics.close()
        if dist.is_initialized():
            dist.barrier()
        return result


class _Window:
    """Timings accumulated between two log lines."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self._reset()

    def _reset(self) -> None:
        self.steps, self.step_s, self.wait_s, self.head_s, self.t0 = 0, 0.0, 0.0, 0.0, time.perf_counter()

    def add(self, out, step_s: float) -> None:
        self.steps += 1
        self.step_s += step_s
        self.wait_s += out.data_wait_s
        self.head_s += out.head_s

    def scalars(self) -> dict[str, float]:
        n, elapsed = max(1, self.steps), max(time.perf_counter() - self.t0, 1e-9)
        values = {
            "perf/samples_per_s": self.steps * self.global_batch / elapsed,
            "perf/step_ms": 1000 * self.step_s / n,
            "perf/data_wait_ms": 1000 * self.wait_s / n,
            "head/step_ms": 1000 * self.head_s / n,
        }
        self._reset()
        return values
