"""The `facescale synth` command: write synthetic identities as training shards plus a held-out `verify.bin`.

Training identities get labels 0..identities-1; the verification set uses `holdout_identities` further
identities that never appear in the shards. Output is byte-identical for equal arguments and any worker
count (given the same numpy, Pillow and JPEG encoder versions).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from facescale.data.jpeg import encode_jpeg
from facescale.data.manifest import MANIFEST_NAME, Manifest
from facescale.data.shard_writer import ShardWriter
from facescale.data.synth_faces import DEFAULT_NUISANCE, Nuisance, render_identity
from facescale.errors import InputError
from facescale.eval.binfile import write_bin

VERIFY_NAME = "verify.bin"
_TRAIN_STREAM, _VERIFY_STREAM = 0, 1
_SHUFFLE_TAG, _PAIRS_TAG = 1, 2  # rng([seed, tag]) streams; synth_faces owns tag 0


class SynthError(InputError, ValueError):
    """Sizes `synthesize` cannot write (no identities, a verification set of one identity...)."""


def _encode_identities(seed: int, identities: range, count: int, image_size: int, stream: int,
                       quality: int, nuisance: Nuisance) -> list[list[bytes]]:
    """Render and JPEG-encode `count` images for each identity in `identities` (a process-pool task)."""
    return [[encode_jpeg(image, quality)
             for image in render_identity(seed, identity, count, image_size, stream, nuisance)]
            for identity in identities]


def _render_all(seed: int, identities: range, count: int, image_size: int, stream: int, quality: int,
                nuisance: Nuisance, workers: int) -> list[list[bytes]]:
    """Encoded images per identity, in identity order; chunks of identities go to `workers` processes."""
    if workers <= 1 or len(identities) <= 1:
        return _encode_identities(seed, identities, count, image_size, stream, quality, nuisance)
    chunk = max(1, min(64, math.ceil(len(identities) / (4 * workers))))
    chunks = [identities[i:i + chunk] for i in range(0, len(identities), chunk)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        parts = pool.map(_encode_identities, *zip(*[(seed, c, count, image_size, stream, quality, nuisance)
                                                    for c in chunks], strict=True))
        return [images for part in parts for images in part]


def _clear_old_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier synth/converter output unless `overwrite`; then delete its files."""
    old = sorted(out_dir.glob("train-*.tar")) + sorted(out_dir.glob("train-*.idx"))
    old += [path for path in (out_dir / MANIFEST_NAME, out_dir / VERIFY_NAME) if path.exists()]
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds shards or a manifest; choose an empty directory or "
                              "pass overwrite=True (CLI: --overwrite) to replace them")
    for path in old:
        path.unlink()


def verification_pairs(num_identities: int, per_identity: int, num_pairs: int,
                       rng: np.random.Generator) -> Iterator[tuple[tuple[int, int], tuple[int, int], bool]]:
    """Yield balanced ((id, img), (id, img), is_same) pairs without repeats, in shuffled order.

    Asks for at most as many same pairs as distinct image pairs exist; half the pairs are different-identity.
    """
    same_total = num_identities * per_identity * (per_identity - 1) // 2
    half = min(num_pairs // 2, same_total, num_identities * (num_identities - 1) // 2 * per_identity ** 2)
    same_index = rng.choice(same_total, size=half, replace=False)
    within = [(a, b) for a in range(per_identity) for b in range(a + 1, per_identity)]
    pairs = [((i // len(within), within[i % len(within)][0]), (i // len(within), within[i % len(within)][1]),
              True) for i in same_index.tolist()]
    seen: set[tuple[int, int, int, int]] = set()
    while len(seen) < half:
        a, b = rng.choice(num_identities, size=2, replace=False).tolist()
        x, y = rng.integers(per_identity, size=2).tolist()
        key = (min(a, b), x if a < b else y, max(a, b), y if a < b else x)
        if key not in seen:
            seen.add(key)
            pairs.append(((a, x), (b, y), False))
    for index in rng.permutation(len(pairs)).tolist():
        yield pairs[index]


def synth_source(seed: int, identities: int, images_per_identity: int, holdout_identities: int) -> str:
    """The manifest `source` of a synthesized set: what it was made from (`make demo` compares it)."""
    return (f"synth(seed={seed}, identities={identities}, images_per_identity={images_per_identity}, "
            f"holdout_identities={holdout_identities})")


def synthesize(out_dir: str | Path, identities: int, images_per_identity: int, holdout_identities: int,
               seed: int, image_size: int = 112, shard_size: int = 1000, workers: int | None = None, *,
               verify_pairs: int = 3000, verify_images_per_identity: int = 10, quality: int = 90,
               nuisance: Nuisance = DEFAULT_NUISANCE, overwrite: bool = False) -> Manifest:
    """Write `identities` x `images_per_identity` shuffled samples as shards, `verify.bin` over held-out ids.

    Returns the saved Manifest. `holdout_identities=0` skips `verify.bin`; otherwise it needs >= 2 ids and
    holds up to `verify_pairs` balanced pairs drawn from `verify_images_per_identity` images per held-out id.
    """
    if identities < 1 or images_per_identity < 1 or holdout_identities < 0 or image_size < 16 or seed < 0:
        raise SynthError(f"synthesize needs identities >= 1, images_per_identity >= 1, holdout_identities "
                         f">= 0, image_size >= 16 and seed >= 0, got {identities}, {images_per_identity}, "
                         f"{holdout_identities}, {image_size}, {seed}",
                         fix="use values in those ranges (CLI: --identities, --images-per-identity, "
                             "--holdout-identities, --image-size, --seed)")
    if holdout_identities and (holdout_identities < 2 or verify_images_per_identity < 2 or verify_pairs < 2):
        raise SynthError(f"a verification set needs holdout_identities >= 2, verify_images_per_identity >= 2 "
                         f"and verify_pairs >= 2, got {holdout_identities}, {verify_images_per_identity}, "
                         f"{verify_pairs}", fix="raise them, or set holdout_identities=0 for no verify.bin "
                         "(CLI: --holdout-identities, --verify-pairs)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_old_output(out, overwrite)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    encoded = _render_all(seed, range(identities), images_per_identity, image_size, _TRAIN_STREAM, quality,
                          nuisance, workers)
    order = np.random.default_rng([seed, _SHUFFLE_TAG]).permutation(identities * images_per_identity)
    with ShardWriter(out, shard_size) as writer:
        for sample in order.tolist():
            label, image = divmod(sample, images_per_identity)
            writer.write(encoded[label][image], label)
    del encoded
    if holdout_identities:
        _write_verification(out / VERIFY_NAME, seed, identities, holdout_identities,
                            verify_images_per_identity, verify_pairs, image_size, quality, nuisance, workers)
    manifest = Manifest(num_classes=identities, num_samples=identities * images_per_identity,
                        image_size=image_size,
                        source=synth_source(seed, identities, images_per_identity, holdout_identities),
                        shards=writer.shards, samples_per_identity=[images_per_identity] * identities)
    manifest.save(out)
    return manifest


def _write_verification(path: Path, seed: int, first_identity: int, holdout: int, per_identity: int,
                        num_pairs: int, image_size: int, quality: int, nuisance: Nuisance,
                        workers: int) -> None:
    """Render galleries of the held-out identities (ids after the training ones) and write their pairs."""
    gallery = _render_all(seed, range(first_identity, first_identity + holdout), per_identity, image_size,
                          _VERIFY_STREAM, quality, nuisance, workers)
    images: list[bytes] = []
    issame: list[bool] = []
    for (a, x), (b, y), same in verification_pairs(holdout, per_identity, num_pairs,
                                                   np.random.default_rng([seed, _PAIRS_TAG])):
        images += [gallery[a][x], gallery[b][y]]
        issame.append(same)
    write_bin(path, images, issame)
