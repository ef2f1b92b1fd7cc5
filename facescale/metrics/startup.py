"""The start-up plan rank 0 prints: what this run is, so a log read weeks later says how it was set up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facescale.config.schema import Config


@dataclass(frozen=True)
class RunFacts:
    """What the plan lines need beyond the config: the launch, the device and the built parts."""

    world_size: int
    ranks_per_node: int
    device: torch.device
    precision: str
    micro_batch: int
    batches_per_epoch: int  # per rank, as the loader counts them (micro-batches)
    num_identities: int
    num_images: int
    head_summary: str  # what the head of this run is (the mode's ModeRun.describe)
    run_dir: str
    resumed_from: str | None
    start_step: int


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def steps_per_epoch(facts: RunFacts, grad_accumulation: int) -> float:
    """Optimizer steps per pass over the data set."""
    return max(1, facts.batches_per_epoch) / max(1, grad_accumulation)


def plan_lines(cfg: Config, facts: RunFacts) -> list[str]:
    """The run plan, one aspect per line, each prefixed `[plan]`."""
    sch = cfg.schedule
    nodes = max(1, facts.world_size // max(1, facts.ranks_per_node))
    per_epoch = steps_per_epoch(facts, sch.grad_accumulation)
    ckpt = (f"every {cfg.checkpoint.every_steps} steps" if cfg.checkpoint.every_steps else "at the end only")
    evals = (f"every {cfg.eval.every_steps} steps" if cfg.eval.every_steps else "at the end only")
    evals = f"{evals} on {len(cfg.eval.bins)} set(s)" if cfg.eval.bins else "none (no eval.bins)"
    resumed = (f"{facts.resumed_from} at step {facts.start_step}" if facts.resumed_from else "no (fresh run)")
    lines = [
        f"world {facts.world_size} ranks = {nodes} node(s) x {facts.ranks_per_node} rank(s), "
        f"device {device_name(facts.device)}, precision {facts.precision}, "
        f"ZeRO stage {cfg.deepspeed.zero_stage}",
        f"model {cfg.model.name}, embedding {cfg.model.embedding_size}, image {cfg.data.image_size}px, "
        f"optimizer {cfg.optim.name} lr {cfg.optim.lr:g}",
        f"batch: micro {facts.micro_batch} per rank x {facts.world_size} ranks x {sch.grad_accumulation} "
        f"accumulation = global {sch.global_batch_size}",
        f"data: {facts.num_identities} identities, {facts.num_images} images; {per_epoch:g} steps per epoch, "
        f"{sch.steps} steps = {sch.steps / per_epoch:.2f} epochs (warmup {sch.warmup_steps})",
        f"head: {facts.head_summary}",
        f"checkpoint {ckpt} (keep {cfg.checkpoint.keep_last}), eval {evals}, log every "
        f"{cfg.logging.every_steps} steps",
        f"run dir {facts.run_dir}; resumed from {resumed}",
    ]
    return [f"[plan] {line}" for line in lines]
