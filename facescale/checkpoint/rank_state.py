"""What differs between ranks and lives outside DeepSpeed and the head: RNG streams and module buffers.

RNG: torch (CPU and CUDA), numpy and Python `random` of every rank, so dropout and anything else seeded
from the global generators continues exactly. The numpy state is stored as a tensor and numbers (not a
numpy array), so the file loads with the weights-only unpickler (`facescale.checkpoint.safe_load`).
Buffers: BatchNorm running statistics are updated from each rank's own batches and DeepSpeed saves rank
0's module only, so every rank keeps its own copy here.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The global RNG states of this process."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_rng_state(),
        "python": random.getstate(),
        # this rank's own device only: the next allocation may give a node fewer GPUs (set_rng_state_all of
        # a node's 8 states fails where 4 are visible)
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by `rng_state` (CUDA ones only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_rng_from_saved(state["numpy"]))
    random.setstate(state["python"])
    saved = state.get("cuda")
    if saved is not None and torch.cuda.is_available():
        if isinstance(saved, (list, tuple)):  # written before: every visible GPU's, this rank's at its index
            index = torch.cuda.current_device()
            saved = saved[index] if index < len(saved) else None
        if saved is not None:
            torch.cuda.set_rng_state(saved)


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global MT19937 state with the key as an int64 tensor."""
    state = np.random.get_state(legacy=False)
    key = torch.from_numpy(state["state"]["key"].astype(np.int64))
    return {**state, "state": {**state["state"], "key": key}}


def _numpy_rng_from_saved(saved: Any) -> Any:
    """What `np.random.set_state` takes, from `_numpy_rng_state` output or an older file's legacy tuple."""
    if not isinstance(saved, dict):  # ("MT19937", key, pos, has_gauss, cached_gaussian)
        name, key, pos, has_gauss, gauss = saved
        saved = {"bit_generator": name, "state": {"key": key, "pos": pos}, "has_gauss": has_gauss}
        saved["gauss"] = gauss
    key = saved["state"]["key"]
    key = key.numpy() if torch.is_tensor(key) else np.asarray(key)
    return {**saved, "state": {**saved["state"], "key": key.astype(np.uint32)}}


def seed_fresh_rng(seed: int, rank: int, step: int) -> None:
    """Seed the global generators from (seed, rank, step) for a rank the checkpoint had no state for."""
    words = np.random.SeedSequence([seed, rank, step]).generate_state(2)
    torch.manual_seed(int(words[0]))
    np.random.seed(int(words[1]))
    random.seed(int(words[0]) ^ int(words[1]))


def module_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every buffer of `module` (running statistics, counters), on CPU."""
    return {name: b.detach().cpu().clone() for name, b in module.named_buffers()}


def load_module_buffers(module: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Copy saved buffers back in place; names must match the module's."""
    own = dict(module.named_buffers())
    if set(own) != set(buffers):
        raise ValueError(
            f"saved module buffers {sorted(set(buffers) ^ set(own))[:5]} do not match this backbone; "
            "was the checkpoint written with another model.name?"
        )
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(value)
