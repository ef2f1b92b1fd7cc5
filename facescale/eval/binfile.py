"""insightface verification `.bin` files: a pickle of (list of encoded images, list of is-same flags).

Images are in pair order: pair i is images (2*i, 2*i+1). Reading uses a restricted unpickler that only
accepts plain containers, bytes and bools (plus numpy scalars/arrays, protocol-5 array buffers and
`_codecs.encode`, which real files written by other tools contain), so a hostile file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from facescale.errors import InputError

_NUMPY_GLOBALS = {
    ("numpy", "dtype"), ("numpy", "bool_"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    # protocol 5 (insightface's build_eval_pack.py: pickle.HIGHEST_PROTOCOL on Python >= 3.8) stores each
    # cv2.imencode uint8 array as _frombuffer(buffer, dtype, shape, order); numpy 1.x and 2.x module names
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class EvalSetError(InputError, ValueError):
    """A verification set (`.bin`, pairs file, images) that cannot be read or evaluated."""

    default_fix = "rebuild it with `facescale make-bin` or remove it from the command / eval.bins"


class VerificationBin(NamedTuple):
    """A verification set: images 2*i and 2*i+1 form pair i; `issame[i]` says if they share an identity."""

    images: list[bytes]
    issame: list[bool]


class _SafeUnpickler(pickle.Unpickler):
    """Refuses every global except the few numpy names that appear in real-world `.bin` files."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a .bin holds only bytes and bools")


def write_bin(path: str | Path, images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write an insightface-compatible `.bin` (images in pair order); returns the path."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: need 2 images per pair, got {len(images)} images for {len(issame)} pairs")
    path = Path(path)
    payload = ([bytes(image) for image in images], [bool(flag) for flag in issame])
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as handle:
        pickle.dump(payload, handle, protocol=4)
    tmp.replace(path)
    return path


def read_bin(path: str | Path) -> VerificationBin:
    """Read a `.bin` written by insightface or `write_bin`; a malformed file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise EvalSetError("verification set does not exist", where=path,
                           fix="check the path, or remove it from the command / eval.bins")
    try:
        content = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise EvalSetError(f"{path}: not an insightface .bin pickle ({error})") from error
    except (MemoryError, OverflowError, RecursionError) as error:  # a declared length or depth beyond reach
        raise EvalSetError(f"{path}: not an insightface .bin pickle (it declares an object too large or too "
                           f"deep to read: {type(error).__name__})") from error
    if not (isinstance(content, list | tuple) and len(content) == 2):
        raise EvalSetError(f"{path}: expected a pickled (images, issame) pair, got {type(content).__name__}")
    images, issame = content
    if isinstance(issame, np.ndarray) and issame.ndim == 1 and issame.dtype.kind == "b":
        issame = issame.tolist()  # a numpy bool vector of flags
    for name, value in (("images", images), ("issame", issame)):
        if not isinstance(value, list | tuple):
            raise EvalSetError(f"{path}: {name} is a {type(value).__name__}, expected a list")
    images = [_as_bytes(image, path, number) for number, image in enumerate(images)]
    flags = [_as_flag(flag, path, number) for number, flag in enumerate(issame)]
    if len(images) != 2 * len(flags) or not flags:
        raise EvalSetError(f"{path}: {len(images)} images for {len(flags)} pairs; a .bin holds exactly "
                         "2 images per pair and at least one pair")
    return VerificationBin(images, flags)


def _as_bytes(image: Any, path: Path, number: int) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if hasattr(image, "tobytes") and getattr(image, "dtype", None) is not None and image.dtype.itemsize == 1:
        return image.tobytes()  # numpy uint8 buffer of encoded bytes
    raise EvalSetError(f"{path}: image {number} is a {type(image).__name__}, expected encoded image bytes")


def _as_flag(flag: Any, path: Path, number: int) -> bool:
    """An is-same flag: a bool (Python or numpy) or the integer 0 or 1; anything else is a damaged file."""
    if isinstance(flag, bool | np.bool_) or (isinstance(flag, Integral) and flag in (0, 1)):
        return bool(flag)
    raise EvalSetError(f"{path}: issame {number} is a {type(flag).__name__}, expected a bool")
