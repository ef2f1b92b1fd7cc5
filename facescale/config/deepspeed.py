"""Derive the DeepSpeed JSON from the facescale config, so batch sizes and precision cannot disagree."""

from __future__ import annotations

import copy

from facescale.config.schema import Config

# keys of deepspeed.extra that facescale sets itself (the batch, the ZeRO stage its [plan] line reports) or
# that would change the gradient scaling behind the decoupled backward's W x GAS surrogate factor
# (facescale/train/step.py), with what to do instead; a dotted key is one inside a section
RESERVED_EXTRA_KEYS = {
    "train_batch_size": "set schedule.global_batch_size",
    "train_micro_batch_size_per_gpu": "set schedule.global_batch_size (micro batch = global / (W x GAS))",
    "gradient_accumulation_steps": "set schedule.grad_accumulation",
    "gradient_predivide_factor": "facescale's surrogate assumes DeepSpeed's plain mean over ranks",
    "prescale_gradients": "facescale's surrogate assumes DeepSpeed's plain mean over ranks",
    "gradient_allreduce_op": "facescale's surrogate assumes DeepSpeed's plain mean over ranks",
    "zero_optimization.stage": "set deepspeed.zero_stage (which the [plan] line and the memory plan follow)",
}

# the top-level keys DeepSpeed 0.19's config reader looks up (the keys DeepSpeedConfig(dict) reads, traced
# on 0.19.8); DeepSpeed ignores any other, so a misspelt deepspeed.extra key would be silently unread
DEEPSPEED_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level",
    "managed_gradient_accumulation", "memory_breakdown", "nebula", "optimizer", "pipeline",
    "prescale_gradients", "progressive_layer_drop", "quantize_training", "scheduler",
    "seq_parallel_communication_data_type", "sparse_attention", "sparse_gradients", "steps_per_print",
    "tensor_parallel", "tensorboard", "timers", "torch_autocast", "train_batch_size",
    "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism", "vocabulary_size",
    "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
})


def reserved_extra_keys(extra: dict) -> list[str]:
    """The (dotted) keys of `extra` facescale sets itself or whose effect on gradients it cannot follow."""
    found = []
    for key in RESERVED_EXTRA_KEYS:
        section, _, inner = key.rpartition(".")
        node = extra.get(section, {}) if section else extra
        if isinstance(node, dict) and inner in node:
            found.append(key)
    return found


def unknown_extra_keys(extra: dict) -> list[str]:
    """The top-level keys of `extra` DeepSpeed does not read (it would ignore them without a word)."""
    return [key for key in extra if key not in DEEPSPEED_KEYS]


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Samples per rank per forward pass."""
    sch = cfg.schedule
    return sch.global_batch_size // (world_size * sch.grad_accumulation)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_json(cfg: Config, world_size: int, precision: str) -> dict:
    """The `config` dict handed to `deepspeed.initialize` for the backbone engine.

    `precision` is the resolved one (fp32 | bf16 | fp16). bf16 runs as DeepSpeed's torch autocast (fp32 master
    weights, bf16 compute); fp16 uses DeepSpeed's dynamic loss scaling.
    """
    ds: dict = {
        "train_batch_size": cfg.schedule.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.schedule.grad_accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage, "overlap_comm": cfg.deepspeed.overlap_comm},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }
    if precision == "bf16":
        # no "lower-precision-safe" modules: DeepSpeed would otherwise reduce Linear/Conv gradients in bf16
        # (a bucket per dtype plus casts); they are reduced in fp32, as DDP under autocast does
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "auto_cast": True,  # the engine casts the fp32 images to half, as its fp16 weights need
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    for key in reserved_extra_keys(cfg.deepspeed.extra):
        raise ValueError(f"deepspeed.extra.{key}: not settable here; {RESERVED_EXTRA_KEYS[key]}")
    return _merge(ds, cfg.deepspeed.extra)
