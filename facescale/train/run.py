"""Entry point of one training process: resolve the launch, check the config, build, train, close."""

from __future__ import annotations

from facescale.config.load import load_config
from facescale.config.schedule_resolve import resolve_schedule
from facescale.config.validate import validate
from facescale.data.loader import load_shard_manifest, resolve_reader
from facescale.eval.check import check_eval_bins
from facescale.parallel.init import init_distributed, shutdown_distributed
from facescale.runtime import configure_threads, select_runtime
from facescale.train.init_weights import check_init_from
from launcher.env import resolve_dist_env


def run_training(config_path: str | None, overrides: list[str]):
    """Train with the config at `config_path` plus overrides; every check runs before the process group."""
    env = resolve_dist_env()
    cfg = load_config(config_path, overrides)
    schedule_line = resolve_schedule(cfg, env.world_size)  # epochs / batch_per_rank -> steps / global batch
    if schedule_line and env.rank == 0:
        print(schedule_line, flush=True)
    validate(cfg, str(config_path), world_size=env.world_size)
    load_shard_manifest(cfg.data, need_index=resolve_reader(cfg.data.reader) == "dali")  # shards, .idx
    check_eval_bins(cfg.eval.bins, cfg.data.image_size)
    check_init_from(cfg)  # model.init_from reads and fits the model (skipped when the run resumes)
    runtime = select_runtime(env.local_rank, cfg.deepspeed.precision)
    configure_threads(env.local_world_size)
    init_distributed(env, runtime, timeout_s=cfg.dist.init_timeout_s, train_timeout_s=cfg.dist.timeout_s)
    try:
        from facescale.train.trainer import Trainer

        return Trainer(cfg, env, runtime).train()
    finally:
        shutdown_distributed()
