"""The start-up scan of a shard directory for bad samples, split over the ranks and cached per shard.

The DALI reader needs it: DALI's JPEG decoder turns most corrupt JPEGs into garbage images without an error,
so bad samples are found before training with the same check the webdataset reader applies to each sample
(`facescale.data.bad_data`). One JPEG decode per sample, divided over the ranks when a process group is
up; each shard's result is cached under $FACESCALE_CACHE (default ~/.cache/facescale) keyed by the tar's
checksum, size and mtime, so the scan is paid once per data set, not once per run.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from facescale.data.bad_data import BadSample, scan_shard
from facescale.data.manifest import Manifest

SCAN_VERSION = 1


def cache_dir() -> Path:
    """Where per-shard scan results live ($FACESCALE_CACHE/shard-scans)."""
    root = os.environ.get("FACESCALE_CACHE") or Path.home() / ".cache" / "facescale"
    return Path(root) / "shard-scans"


def _cache_file(tar: Path, sha256: str, manifest: Manifest) -> Path:
    stat = tar.stat()
    key = f"v{SCAN_VERSION}-{sha256[:24]}-{stat.st_size}-{stat.st_mtime_ns}-{manifest.num_classes}-" \
          f"{manifest.image_size}"
    return cache_dir() / f"{key}.json"


def _scan_one(manifest: Manifest, number: int) -> list[BadSample]:
    """Bad samples of shard `number` (named as in manifest.json, unique where file names repeat in
    subfolders), from the cache when this exact tar was scanned before."""
    tar, index = manifest.shard_paths()[number], manifest.index_paths()[number]
    name = manifest.shards[number].name
    cached = _cache_file(tar, manifest.shards[number].sha256, manifest)
    if cached.is_file():
        try:
            return [BadSample(name, *row) for row in json.loads(cached.read_text())["bad"]]
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is rescanned
    bad = [replace(b, shard=name) for b in
           scan_shard(tar, index, num_classes=manifest.num_classes, image_size=manifest.image_size)[0]]
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bad": [[b.key, b.position, b.reason] for b in bad]}))
        tmp.replace(cached)
    except OSError:
        pass  # no writable cache: the next run scans again
    return bad


def scan_shards(manifest: Manifest, world_size: int = 1) -> list[BadSample]:
    """Every bad sample of the directory; with a process group of `world_size` ranks each scans a part."""
    import torch.distributed as dist

    split = world_size > 1 and dist.is_initialized() and dist.get_world_size() == world_size
    rank, ranks = (dist.get_rank(), world_size) if split else (0, 1)
    mine = [b for n in range(rank, len(manifest.shards), ranks) for b in _scan_one(manifest, n)]
    if not split:
        return mine
    parts: list[list[BadSample] | None] = [None] * world_size
    dist.all_gather_object(parts, mine)
    order = {info.name: n for n, info in enumerate(manifest.shards)}
    every = [b for part in parts for b in part or []]
    return sorted(every, key=lambda b: (order.get(b.shard, 0), b.position))


def bad_positions(manifest: Manifest, bad: list[BadSample]) -> list[set[int]]:
    """Per shard of the manifest (by number), the positions of its samples in `bad` (from `scan_shards`)."""
    number = {info.name: n for n, info in enumerate(manifest.shards)}
    positions: list[set[int]] = [set() for _ in manifest.shards]
    for sample in bad:
        positions[number[sample.shard]].add(sample.position)
    return positions
