"""Decode one evaluation image (JPEG/PNG bytes or an HWC array) to HWC uint8 RGB, with its size checked."""

from __future__ import annotations

import numpy as np

from facescale.eval.binfile import EvalSetError

ImageInput = bytes | bytearray | memoryview | np.ndarray


MODEL_SIZE_FIX = "align the faces to crops of the model's input size"


def decode_image(image: ImageInput, image_size: int | None, source: str, index: int | None = None,
                 size_fix: str = MODEL_SIZE_FIX) -> np.ndarray:
    """One image as HWC uint8 RGB: JPEG via simplejpeg (PIL fallback), other formats via PIL; size checked.

    Errors name `source` (a file) and, for a collection, the image `index` within it; `size_fix` is what a
    wrong size's message says to do.
    """
    where = source if index is None else f"{source}: image {index}"
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        try:
            pixels = _decode_bytes(data)
        except Exception as error:  # noqa: BLE001 - every decoder failure becomes one clear message
            from PIL import UnidentifiedImageError

            reason = "no image format recognised" if isinstance(error, UnidentifiedImageError) else error
            raise EvalSetError(f"{where} could not be decoded ({reason}); "
                               "expected JPEG or PNG bytes") from error
    else:
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise EvalSetError(f"{where} must be HWC uint8 RGB, got {pixels.dtype} {pixels.shape}")
    if image_size is not None and pixels.shape[:2] != (image_size, image_size):
        height, width = pixels.shape[:2]
        raise EvalSetError(f"{where} is {width}x{height}, expected {image_size}x{image_size}; {size_fix}")
    return pixels


def _decode_bytes(data: bytes) -> np.ndarray:
    from facescale.data.jpeg import decode_jpeg, open_image, pil_rgb

    if data[:2] == b"\xff\xd8":
        return decode_jpeg(data)  # simplejpeg when installed, else Pillow
    with open_image(data) as img:
        return np.asarray(pil_rgb(img), dtype=np.uint8)
