"""The backbone's weights and optimizer state as plain per-parameter tensors, independent of the world size.

DeepSpeed's own files hold ZeRO partitions that only load at the saving world size. To resume on another
number of ranks we also save, on rank 0, the consolidated fp32 weights (`backbone.pt`) and every parameter's
full optimizer state (`backbone_optim.pt`: SGD momentum, Adam moments, plus scalars such as Adam's step),
gathered through DeepSpeed's full-state API (`safe_get_full_optimizer_state`: fragments under ZeRO 1/2, an
all-gather of the fp32 partitions under ZeRO-3) or read directly (no ZeRO). Loading writes them back into a
freshly built engine of any world size and ZeRO stage: weights and optimizer state are restored exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

FORMAT = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def consolidated_weights(engine) -> dict[str, torch.Tensor] | None:
    """Full fp32 module state (parameters and buffers) on rank 0, None elsewhere; collective under ZeRO-3."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    else:
        state = {
            k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in module.state_dict().items()
        }
    return state if _rank() == 0 else None


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (inside DeepSpeed's ZeRO wrapper, or the engine's own)."""
    inner = getattr(engine.optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else engine.optimizer


def _uses_fragments(engine) -> bool:
    return engine.zero_optimization_stage() in (1, 2)


def _uses_full_state_api(engine) -> bool:
    """ZeRO 1/2/3 partition the fp32 master and optimizer state; DeepSpeed's safe_* API reaches them."""
    return engine.zero_optimization_stage() in (1, 2, 3)


def _scalar_state(base: torch.optim.Optimizer) -> dict[str, Any]:
    """Per-group scalars of the base optimizer's state (Adam's `step`), taken from its first entry."""
    for entry in base.state.values():
        return {
            k: v.clone() if torch.is_tensor(v) else v
            for k, v in entry.items()
            if not torch.is_tensor(v) or v.dim() == 0
        }
    return {}


def consolidated_optimizer_state(engine) -> dict[str, Any] | None:
    """{"format", "optimizer", "params": {name: {key: full tensor}}, "scalars"} on rank 0, None elsewhere.

    Collective under ZeRO 1/2 (one all-reduce per parameter and state key): every rank must call it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    stage = engine.zero_optimization_stage()
    base = _base_optimizer(engine)
    params: dict[str, dict[str, torch.Tensor]] = {}
    named = _trainable(engine)
    if _uses_full_state_api(engine):
        keys = _fragment_keys(named) if _uses_fragments(engine) else _partition_keys(base)
        for name, param in named:
            params[name] = {
                k: safe_get_full_optimizer_state(param, k).detach().cpu().clone().view(full_shape(param))
                for k in keys
            }
    else:
        for name, param in named:
            entry = base.state.get(param, {})
            params[name] = {
                k: v.detach().cpu().clone()
                for k, v in entry.items()
                if torch.is_tensor(v) and v.shape == param.shape
            }
    state = {
        "format": FORMAT,
        "optimizer": type(base).__name__,
        "zero_stage": stage,
        "supported": True,
        "params": params,
        "scalars": _scalar_state(base),
    }
    return state if _rank() == 0 else None


def _fragment_keys(named: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """Optimizer-state keys linked to the ZeRO fragments (empty before the first optimizer step)."""
    for _, param in named:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None and mapping.optim_fragment:
            return sorted(mapping.get_optim_state_keys())
    return []


def _partition_keys(base: torch.optim.Optimizer) -> list[str]:
    """Optimizer-state keys over ZeRO-3's flat fp32 partitions (empty before the first optimizer step)."""
    entries = base.state.values()
    return sorted({k for entry in entries for k, v in entry.items() if torch.is_tensor(v) and v.dim()})


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The full shape of a parameter (ZeRO-3 leaves an empty placeholder in `param` itself)."""
    return getattr(param, "ds_shape", param.shape)


def _state_owners(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer keys its state by: ZeRO-3's flat fp32 partitions (its param groups
    hold them only during a step), else the param groups' tensors."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if engine.zero_optimization_stage() == 3 and flat is not None:
        return list(flat)
    return [p for group in _base_optimizer(engine).param_groups for p in group["params"]]


def placed_scalar(key: str, value: Any, owner: torch.Tensor, group: dict[str, Any]) -> Any:
    """A saved per-parameter scalar where torch's own `Optimizer.load_state_dict` puts it: Adam's `step` as
    float32 on the parameter's device for a fused or capturable optimizer (their kernels read it there; a
    checkpoint read with map_location="cpu" has it on the CPU), else as saved."""
    if not torch.is_tensor(value):
        return value
    if key == "step" and (group.get("fused") or group.get("capturable")):
        return value.to(dtype=torch.float32, device=owner.device)
    return value.clone()


def _ensure_state_entries(engine, keys: set[str], scalars: dict[str, Any]) -> None:
    """Create zero state for `keys` where the base optimizer has none yet (state is created lazily at the
    first step) and link it to DeepSpeed's fragments, so that it can be written into."""
    base = _base_optimizer(engine)
    group = base.param_groups[0]  # facescale builds one group: fused / capturable hold for all
    for p in _state_owners(engine):
        entry = base.state[p]
        for key in keys:
            entry.setdefault(key, torch.zeros_like(p))
        for key, value in scalars.items():
            entry[key] = placed_scalar(key, value, p, group)
    if _uses_fragments(engine) and hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def _load_module_weights(engine, weights: dict[str, torch.Tensor]) -> None:
    """Module parameters and buffers from `weights` (under ZeRO-3: gathered, written, re-partitioned)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            _load_state(module, weights)  # every rank writes its buffers; rank 0's parameters are kept
    else:
        _load_state(module, weights)


def _load_state(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(module.state_dict()) - set(weights))
    if missing:
        raise ValueError(
            f"consolidated backbone weights lack {missing[:5]}; was it saved from another model?"
        )
    module.load_state_dict({k: weights[k].to(v.dtype) for k, v in module.state_dict().items()})


def _set_zero3_partition(engine, param, value: torch.Tensor, key: str | None = None) -> None:
    """Write this rank's slice of a full fp32 tensor (the master weights, or optimizer state `key`) into
    ZeRO-3's flat partition. DeepSpeed's own `set_full_hp_param` (0.19) reads past the end of the tensor on
    the last rank when the parameter does not split evenly; partitions are zero-padded, so pad here."""
    zero3 = engine.optimizer
    part, _ = zero3._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * zero3._get_param_partition_rank(param)
    chunk = value.flatten()[start:start + part.numel()]
    part.zero_()
    part[: chunk.numel()].copy_(chunk)


@torch.no_grad()
def set_consolidated_state(engine, weights: dict[str, torch.Tensor], optim: dict[str, Any] | None) -> None:
    """Write consolidated weights and optimizer state into `engine` (any world size; ZeRO 0/1/2/3)."""
    from deepspeed.utils import safe_set_full_fp32_param

    _load_module_weights(engine, weights)
    fragments, zero3 = _uses_fragments(engine), engine.zero_optimization_stage() == 3
    for name, param in _trainable(engine):  # the fp32 masters ZeRO keeps beside the module's weights
        value = weights[name].to(param.device).float()
        if fragments:
            safe_set_full_fp32_param(param, value)
        elif zero3:
            _set_zero3_partition(engine, param, value)
    if optim is not None:
        set_optimizer_state(engine, optim)


@torch.no_grad()
def set_optimizer_state(engine, optim: dict[str, Any]) -> None:
    """Write consolidated optimizer state ({"params": {name: {key: full tensor}}, "scalars"}, as
    `consolidated_optimizer_state` returns it) into `engine`'s optimizer (any world size; ZeRO 0/1/2/3)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    named = _trainable(engine)
    per_param = optim.get("params", {})
    keys = {k for entry in per_param.values() for k in entry}
    if not per_param:
        return
    absent = [n for n, _ in named if n not in per_param]
    if absent:
        raise ValueError(f"consolidated optimizer state lacks parameters {absent[:5]}")
    _ensure_state_entries(engine, keys, optim.get("scalars", {}))
    fragments, zero3 = _uses_fragments(engine), engine.zero_optimization_stage() == 3
    base = _base_optimizer(engine)
    for name, param in named:
        for key in keys:
            state_value = per_param[name][key].to(param.device)
            if fragments:
                safe_set_full_optimizer_state(param, state_value, key)
            elif zero3:
                _set_zero3_partition(engine, param, state_value, key)
            else:
                base.state[param][key] = state_value.to(param.dtype).clone()
