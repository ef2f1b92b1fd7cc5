"""JPEG encode/decode with simplejpeg when installed (fast, libjpeg-turbo) and Pillow otherwise."""

from __future__ import annotations

import io

import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is absent
    simplejpeg = None


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode an HWC uint8 RGB image as baseline JPEG (4:2:0); same bytes for the same input and backend."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_jpeg needs an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    if simplejpeg is not None:
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB",
                                      colorsubsampling="420")
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=quality, subsampling=2)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode JPEG bytes to an HWC uint8 RGB array (accurate DCT and upsampling, like DALI's CPU decoder)."""
    if simplejpeg is not None:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
