"""Entry point of one training process: resolve the launch, check the config, build, train, close."""

from __future__ import annotations

from facescale.checkpoint.disk_space import CheckpointSaveError
from facescale.config.deepspeed import micro_batch_size
from facescale.config.load import load_config
from facescale.config.schedule_resolve import resolve_schedule
from facescale.config.validate import validate
from facescale.data.loader import load_shard_manifest, resolve_reader, steps_per_epoch
from facescale.eval.check import check_eval_bins
from facescale.parallel.init import init_distributed, shutdown_distributed
from facescale.runtime import configure_threads, select_runtime
from facescale.train.init_weights import check_init_from
from facescale.train.resume_check import check_resume_fits, keep_saved_global_batch, resume_step_dir
from facescale.train.run_lock import run_dir_lock
from facescale.writable import require_writable
from launcher.env import resolve_dist_env
from launcher.preemption import PreemptionFlag, clear_requeue_marker


def run_training(config_path: str | None, overrides: list[str], preemption: PreemptionFlag | None = None):
    """Train with the config at `config_path` plus overrides; every check runs before the process group.
    `preemption`: the flag `facescale train` installed at its start (else the trainer installs one)."""
    env = resolve_dist_env()
    cfg = load_config(config_path, overrides)
    resume_from = resume_step_dir(cfg)  # the complete step it continues from, checked once here
    kept_line = keep_saved_global_batch(cfg, resume_from)  # a resumed run keeps its global batch on any W
    schedule_line = resolve_schedule(cfg, env.world_size)  # epochs / batch_per_rank -> steps / global batch
    startup_lines = tuple(line for line in (kept_line, schedule_line) if line)  # the Trainer logs them
    validate(cfg, str(config_path), world_size=env.world_size)
    manifest = load_shard_manifest(cfg.data, need_index=resolve_reader(cfg.data.reader) == "dali")
    check_eval_bins(cfg.eval.bins, cfg.data.image_size)
    check_resume_fits(cfg, resume_from, str(config_path))  # that step was saved by a run of this shape
    check_init_from(cfg)  # model.init_from reads and fits the model (skipped when the run resumes)
    steps_per_epoch(manifest.num_samples, env.world_size, micro_batch_size(cfg, env.world_size),
                    source=str(manifest.directory))  # at least one batch per rank, before anything is written
    require_writable(cfg.logging.run_dir, "logging.run_dir")  # not at rank 0's first write, after the group
    runtime = select_runtime(env.local_rank, cfg.deepspeed.precision)
    configure_threads(env.local_world_size)
    init_distributed(env, runtime, timeout_s=cfg.dist.init_timeout_s, train_timeout_s=cfg.dist.timeout_s)
    try:
        from facescale.train.trainer import Trainer

        with run_dir_lock(cfg.logging.run_dir, env.rank):  # one run directory, one writer
            if env.rank == 0:
                clear_requeue_marker()  # one an earlier job left (its batch shell killed) asks nothing now
            return Trainer(cfg, env, runtime, preemption, startup_lines).train()
    except CheckpointSaveError:
        if env.rank == 0:
            clear_requeue_marker()  # a preemption save that failed must not requeue into the same failure
        raise
    finally:
        shutdown_distributed()
