"""Derive the DeepSpeed JSON from the facescale config, so batch sizes and precision cannot disagree."""

from __future__ import annotations

import copy

from facescale.config.schema import Config

# keys of deepspeed.extra that would change the batch or the gradient scaling behind the decoupled backward's
# W x GAS surrogate factor (facescale/train/step.py), with what to set instead
RESERVED_EXTRA_KEYS = {
    "train_batch_size": "set schedule.global_batch_size",
    "train_micro_batch_size_per_gpu": "set schedule.global_batch_size (micro batch = global / (W x GAS))",
    "gradient_accumulation_steps": "set schedule.grad_accumulation",
    "gradient_predivide_factor": "facescale's surrogate assumes DeepSpeed's plain mean over ranks",
    "prescale_gradients": "facescale's surrogate assumes DeepSpeed's plain mean over ranks",
    "gradient_allreduce_op": "facescale's surrogate assumes DeepSpeed's plain mean over ranks",
}


def reserved_extra_keys(extra: dict) -> list[str]:
    """The keys of `extra` facescale sets itself or whose effect on gradient scaling it cannot follow."""
    return [key for key in extra if key in RESERVED_EXTRA_KEYS]


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
