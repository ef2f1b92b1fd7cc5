"""Photometric and geometric training augmentations, one definition for both readers.

Applied after decoding and before the random mirror and normalisation, all on uint8 HWC RGB:
  random_shift  translate by integer (dx, dy) drawn uniformly from [-s, s]; uncovered pixels are 0
  brightness    multiply by b ~ U[1 - brightness, 1 + brightness]
  contrast      scale around 128 by c ~ U[1 - contrast, 1 + contrast]: out = b * (128 + c * (in - 128))
Results are rounded and saturated to [0, 255]. The DALI path builds the same operators into its graph
(`fn.warp_affine` with nearest-neighbour sampling, `fn.brightness_contrast`), so for equal draws both readers
produce the same pixels; the draws themselves come from each reader's own seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facescale.config.schema import DataConfig

CONTRAST_CENTER = 128.0


@dataclass(frozen=True)
class Augment:
    """The augmentation switches of `DataConfig`; all zero means no augmentation beyond the mirror."""

    random_shift: int = 0
    brightness: float = 0.0
    contrast: float = 0.0

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Augment:
        return cls(cfg.random_shift, cfg.brightness, cfg.contrast)

    @property
    def active(self) -> bool:
        return bool(self.random_shift or self.brightness or self.contrast)


NO_AUGMENT = Augment()


def shift_image(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`image` moved right by dx and down by dy, zero where nothing moved in."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    src_y, dst_y = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    src_x, dst_x = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    out[dst_y, dst_x] = image[src_y, src_x]
    return out


def brightness_contrast(image: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """b * (128 + c * (x - 128)), rounded and saturated to uint8."""
    out = brightness * (CONTRAST_CENTER + contrast * (image.astype(np.float32) - CONTRAST_CENTER))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def augment_numpy(image: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Apply `aug` to one uint8 HWC image with draws from `rng` (the webdataset reader's path)."""
    if aug.random_shift:
        dx, dy = rng.integers(-aug.random_shift, aug.random_shift + 1, size=2)
        image = shift_image(image, int(dx), int(dy))
    if aug.brightness or aug.contrast:
        b = rng.uniform(1 - aug.brightness, 1 + aug.brightness)
        c = rng.uniform(1 - aug.contrast, 1 + aug.contrast)
        image = brightness_contrast(image, b, c)
    return image


def augment_dali(images, aug: Augment):
    """The same augmentations as DALI CPU/GPU operators on a decoded uint8 HWC batch (pipeline graph)."""
    from nvidia.dali import fn, types

    if aug.random_shift:
        offset = fn.random.uniform(values=[float(v) for v in range(-aug.random_shift, aug.random_shift + 1)],
                                   shape=[2])
        images = fn.warp_affine(images, matrix=fn.transforms.translation(offset=offset), fill_value=0,
                                inverse_map=False, interp_type=types.INTERP_NN)
    if aug.brightness or aug.contrast:
        images = fn.brightness_contrast(images, brightness=_dali_factor(aug.brightness),
                                        contrast=_dali_factor(aug.contrast), contrast_center=CONTRAST_CENTER,
                                        dtype=types.UINT8)
    return images


def _dali_factor(jitter: float):
    """A per-sample factor ~ U[1 - jitter, 1 + jitter] (exactly 1.0 when the jitter is off)."""
    from nvidia.dali import fn

    return fn.random.uniform(range=[1 - jitter, 1 + jitter]) if jitter else 1.0
