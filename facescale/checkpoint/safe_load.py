"""Read checkpoint files without running code from them: torch's weights-only unpickler plus an allow-list.

Every file facescale writes holds only tensors, numbers, strings, None, lists, tuples and dicts
(`plain_state` enforces it when saving), which the weights-only unpickler accepts as they are. The only
other globals ever allowed, each for the files that need it:
- DeepSpeed's ZeRO optimizer files (same-world-size resume): its loss scaler, ZeRO stage enum and
  fragment address (`DEEPSPEED_GLOBALS`);
- numpy arrays and dtypes in rank-state files written before the numpy RNG state was stored as a tensor
  (`LEGACY_RANK_STATE_GLOBALS`), so those checkpoints still resume.
A file that needs anything else is refused with an `UnsafeCheckpointError` naming the file; nothing in it ran.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facescale.checkpoint.layout import CheckpointError

PLAIN_TYPES = (bool, int, float, str, bytes, type(None), torch.dtype, torch.Size)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read without unpickling something outside the allow-list."""


def _numpy_globals() -> list[Any]:
    reconstruct = np._core.multiarray._reconstruct
    return [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # the same function as numpy 1.x pickles name it
        np.ndarray,
        np.dtype,
        *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)},  # numpy 2 pickles the dtype class
    ]


def _deepspeed_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


LEGACY_RANK_STATE_GLOBALS = "numpy"
DEEPSPEED_GLOBALS = "deepspeed"
_GLOBALS = {LEGACY_RANK_STATE_GLOBALS: _numpy_globals, DEEPSPEED_GLOBALS: _deepspeed_globals}


def allowed_globals(allow: str | None) -> list[Any]:
    """The extra globals the named allow-list lets the weights-only unpickler build (none for None)."""
    return _GLOBALS[allow]() if allow else []


def safe_load(path: str | Path, allow: str | None = None, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with the named extra allow-list; any refusal or unreadable
    file becomes an error that names the file."""
    path = Path(path)
    extra = allowed_globals(allow)
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file '{path}' does not exist") from None
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(_refusal(path, exc)) from None
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, zipfile.BadZipFile,
            OSError) as exc:  # torch's zip reader raises a bare OSError (EINVAL) at some truncations
        raise CheckpointError(
            f"checkpoint file '{path}' is not readable ({_first_line(exc)}); it is truncated or damaged. "
            "Use an earlier step directory"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# what to do with a file the weights-only loader refused, when its owner trusts it
TRUST_FIX = ("if you made this file yourself and trust it, re-save it holding only tensors, numbers, "
             "strings, lists and dicts")


def unsafe_reason(exc: pickle.UnpicklingError) -> str:
    """Why torch's weights-only unpickler refused a file, naming the refused global or opcode; never torch's
    own advice, which is to rerun with `weights_only=False` (running the file's code)."""
    text = str(exc)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    other = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)  # e.g. an opcode it does not know
    detail = (f"global {refused.group(1)}" if refused else other.group(1).strip().rstrip(".") if other
              else "something outside the weights-only allow-list")
    return (f"it holds objects facescale never writes ({detail}), so it was altered or written by other "
            "code; nothing in it was run")


def _refusal(path: Path, exc: pickle.UnpicklingError) -> str:
    return (f"refusing to load checkpoint file '{path}': {unsafe_reason(exc)}. Use a step directory written "
            f"by facescale, or, {TRUST_FIX}")


def plain_state(obj: Any, where: str = "state") -> Any:
    """`obj` with numpy arrays/scalars turned into tensors/Python numbers; raises TypeError naming the key
    of anything else the weights-only loader would refuse (so a bad save fails now, not at resume)."""
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, PLAIN_TYPES):
        return obj
    if isinstance(obj, dict):
        return {k: plain_state(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoint state must be tensors, "
        "numbers, strings, lists and dicts so that it loads without unpickling code"
    )
