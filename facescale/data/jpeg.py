"""JPEG encode/decode with simplejpeg when installed (fast, libjpeg-turbo) and Pillow otherwise; any other
image file (PNG, TIFF, ...) as RGB the way OpenCV reads it."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from facescale.config.schema import JpegDecoderKind, choices

try:
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is absent
    simplejpeg = None


def check_pixels(width: int, height: int) -> None:
    """Refuse an image whose header claims more pixels than Pillow's `Image.MAX_IMAGE_PIXELS`, before
    decoding: a few hundred bytes can otherwise cost gigabytes of memory and seconds per image."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ValueError(f"its header says {width}x{height} pixels, more than Pillow's "
                         f"Image.MAX_IMAGE_PIXELS ({limit}): a damaged file or a decompression bomb")


def open_image(data: bytes) -> Any:
    """Pillow's lazy `Image.open` of encoded bytes, refused by `check_pixels` before any pixel is decoded."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    try:
        check_pixels(*image.size)
    except ValueError:
        image.close()
        raise
    return image


def pil_rgb(image: Any) -> Any:
    """A Pillow image as 8-bit RGB; a 16-bit grey image (PNG/TIFF modes I;16*, I) scaled as OpenCV reads it
    (value >> 8), where Pillow's own convert would clip every value above 255 to white."""
    if image.mode.startswith("I"):
        from PIL import Image

        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    return image.convert("RGB")


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


JPEG_DECODERS = choices(JpegDecoderKind)


def decode_jpeg(data: bytes, out: np.ndarray | None = None, decoder: str = "auto") -> np.ndarray:
    """Decode JPEG bytes to an HWC uint8 RGB array (accurate DCT and upsampling, like DALI's CPU decoder).

    `decoder` "auto" is simplejpeg when installed, else Pillow; both give the same pixels. With `out`, the
    pixels are written into it when the image has exactly its shape (no allocation, no extra copy); the
    returned array then is `out`. An image of another shape is returned as a new array, `out` untouched.
    """
    if decoder not in JPEG_DECODERS:
        raise ValueError(f"data.jpeg_decoder must be one of {', '.join(JPEG_DECODERS)}, got {decoder!r}")
    if decoder == "simplejpeg" and simplejpeg is None:
        raise ImportError("data.jpeg_decoder is 'simplejpeg' but it is not installed; pip install simplejpeg "
                          "or set data.jpeg_decoder to 'auto'")
    if decoder != "pil" and simplejpeg is not None:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        check_pixels(width, height)
        if out is not None:
            if out.shape == (height, width, 3) and out.flags.c_contiguous:
                simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
                return out
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    with open_image(data) as image:
        pixels = np.asarray(image.convert("RGB"))
    if out is not None and out.shape == pixels.shape:
        out[...] = pixels
        return out
    return pixels
