"""Training augmentations: the numpy definition, DALI's operators against it, and both readers using them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facescale.data.augment import Augment, augment_numpy, brightness_contrast, shift_image
from facescale.data.loader import build_train_loader
from tests.test_readers import CPU, _config, shard_dir  # noqa: F401  (module fixture)

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)


def test_shift_moves_pixels_and_zero_fills():
    img = IMAGES[0]
    out = shift_image(img, 2, -3)
    assert np.array_equal(out[0:13, 2:], img[3:16, :14])
    assert not out[13:].any() and not out[:, :2].any()
    assert np.array_equal(shift_image(img, 0, 0), img)


def test_brightness_contrast_formula_and_saturation():
    img = np.array([[[0, 128, 255]]], dtype=np.uint8)
    assert brightness_contrast(img, 1.0, 1.0).tolist() == img.tolist()
    assert brightness_contrast(img, 1.0, 0.5).tolist() == [[[64, 128, 192]]]
    assert brightness_contrast(img, 1.5, 1.0).tolist() == [[[0, 192, 255]]]


def test_numpy_augment_is_seeded_and_off_by_default():
    aug = Augment(random_shift=3, brightness=0.2, contrast=0.2)
    a = augment_numpy(IMAGES[1], aug, np.random.default_rng(5))
    b = augment_numpy(IMAGES[1], aug, np.random.default_rng(5))
    assert np.array_equal(a, b) and not np.array_equal(a, IMAGES[1])
    assert not Augment().active


def _dali_run(aug: Augment) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def

    from facescale.data.augment import augment_dali

    @pipeline_def(batch_size=len(IMAGES), num_threads=1, device_id=None, seed=3)
    def pipe():
        return augment_dali(fn.external_source(source=lambda: list(IMAGES), layout="HWC"), aug)

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.stack([np.asarray(out[i]) for i in range(len(IMAGES))])


@pytest.mark.dali
def test_dali_shift_is_an_integer_translation_in_range():
    pytest.importorskip("nvidia.dali")
    out = _dali_run(Augment(random_shift=3))
    for src, got in zip(IMAGES, out, strict=True):
        matches = [(dx, dy) for dx in range(-3, 4) for dy in range(-3, 4)
                   if np.array_equal(shift_image(src, dx, dy), got)]
        assert matches, "DALI output is not one of the allowed integer shifts"


@pytest.mark.dali
def test_dali_brightness_contrast_follows_the_numpy_formula():
    pytest.importorskip("nvidia.dali")
    out = _dali_run(Augment(brightness=0.3))
    for src, got in zip(IMAGES, out, strict=True):
        factor = got.astype(np.float64).sum() / src.astype(np.float64).sum()
        assert 0.65 < factor < 1.35
        # recover the drawn factor from unsaturated pixels and compare pixel by pixel with the formula
        ok = src < 180
        b = np.median(got[ok & (src > 40)] / src[ok & (src > 40)])
        assert np.abs(brightness_contrast(src, b, 1.0).astype(int) - got.astype(int))[ok].max() <= 2


@pytest.mark.parametrize("reader", ["webdataset", "dali"])
def test_readers_apply_augmentations_deterministically(shard_dir, reader):  # noqa: F811
    if reader == "dali":
        pytest.importorskip("nvidia.dali")

    def first_batch(**aug):
        cfg = _config(shard_dir, reader, **aug)
        loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=9, device=CPU)
        return next(iter(loader))

    plain, _ = first_batch()
    a, labels_a = first_batch(random_shift=4, brightness=0.3, contrast=0.3)
    b, labels_b = first_batch(random_shift=4, brightness=0.3, contrast=0.3)
    assert torch.equal(a, b) and torch.equal(labels_a, labels_b)
    assert a.shape == plain.shape and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, plain)
