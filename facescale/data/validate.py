"""`facescale validate DIR`: decode every sample of a shard directory and check it against manifest.json.

Per shard: the sha256 and sample count from the manifest, the `.idx` against the tar's real member layout,
and every sample (members present, inside the file, label in range, JPEG decodes to the image size). Then
the per-identity counts against the manifest's. Shards are checked in parallel worker processes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from facescale.data.bad_data import TRUNCATED_REASON, BadSample, scan_shard
from facescale.data.manifest import Manifest
from facescale.data.shard_writer import index_tar


@dataclass
class ValidationReport:
    """Outcome of a validation: samples checked, per-identity counts found, and every problem found."""

    directory: Path
    samples_checked: int
    counts: np.ndarray
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    def lines(self, show: int = 50) -> list[str]:
        """A human report: totals, per-identity count statistics, then the first `show` problems."""
        counts = self.counts
        lines = [f"{self.directory}: {self.samples_checked} samples checked, {len(counts)} identities",
                 f"images per identity: min {counts.min()}, median {int(np.median(counts))}, "
                 f"max {counts.max()}, "
                 f"identities without images {int((counts == 0).sum())}"]
        lines.append(f"problems: {len(self.problems)}" if self.problems else "no problems found")
        lines += [f"  {problem}" for problem in self.problems[:show]]
        if len(self.problems) > show:
            lines.append(f"  ... and {len(self.problems) - show} more")
        return lines


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_shard(tar: str, index: str, expected_samples: int, expected_sha: str, num_classes: int,
                image_size: int) -> tuple[list[str], dict[int, int], int]:
    """(problems, good-label counts, samples listed) of one shard (a pool task)."""
    tar_path, index_path = Path(tar), Path(index)
    if not tar_path.is_file():
        return [f"{tar_path.name}: listed in manifest.json but missing"], {}, 0
    problems = []
    if sha256_file(tar_path) != expected_sha:
        problems.append(f"{tar_path.name}: sha256 differs from manifest.json (changed or damaged file)")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            fresh = index_tar(tar_path, Path(scratch) / "fresh.idx").read_text()
            if not index_path.is_file() or index_path.read_text() != fresh:
                problems.append(f"{index_path.name}: missing or does not match the tar's members; "
                                "recreate it with facescale.data.shard_writer.index_tar")
        except Exception as error:  # noqa: BLE001 - tarfile raises several types on damaged archives
            problems.append(f"{tar_path.name}: the tar does not read to the end ({error}); the shard is "
                            "truncated or damaged")
    if not index_path.is_file():
        return problems, {}, 0
    try:
        bad, counts, listed = scan_shard(tar_path, index_path, num_classes=num_classes, image_size=image_size)
    except ValueError as error:
        return problems + [str(error)], {}, 0
    problems += _grouped(bad)
    if listed != expected_samples:
        problems.append(f"{tar_path.name}: {listed} samples, manifest.json says {expected_samples}")
    return problems, counts, listed


def _grouped(bad: list[BadSample]) -> list[str]:
    """One line per bad sample, except those past the end of a cut shard: the first of them and a count
    (a shard cut early, or to 0 bytes, would otherwise list every one of its samples)."""
    past_end = [sample for sample in bad if TRUNCATED_REASON in sample.reason]
    lines = [str(sample) for sample in bad if TRUNCATED_REASON not in sample.reason]
    if past_end:
        first = past_end[0]
        count = len(past_end)
        which = f"{count} samples from {first.key!r} on" if count > 1 else f"sample {first.key!r}"
        lines.append(f"{first.shard}: {which} cut off: {first.reason}; copy the shard again or convert it "
                     "again")
    return lines


def validate_directory(directory: str | Path, workers: int | None = None,
                       progress: bool = False) -> ValidationReport:
    """Check every shard of `directory` (manifest.json must load) and return the report; `workers` None
    uses every core, `progress` shows a bar over the samples checked."""
    from tqdm import tqdm

    manifest = Manifest.load(directory)
    tasks = [(str(tar), str(index), info.num_samples, info.sha256, manifest.num_classes, manifest.image_size)
             for tar, index, info in zip(manifest.shard_paths(), manifest.index_paths(), manifest.shards,
                                         strict=True)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    bar = tqdm(total=manifest.num_samples, unit="img", desc="validate", disable=not progress)
    results = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(check_shard, *task) for task in tasks]
            for task, future in zip(tasks, futures, strict=True):  # in shard order: a stable report
                results.append(future.result())
                bar.update(task[2])
    else:
        for task in tasks:
            results.append(check_shard(*task))
            bar.update(task[2])
    bar.close()
    counts = np.zeros(manifest.num_classes, dtype=np.int64)
    problems: list[str] = []
    checked = 0
    for shard_problems, shard_counts, listed in results:
        problems += shard_problems
        checked += listed
        for label, count in shard_counts.items():
            counts[label] += count
    if manifest.samples_per_identity:
        expected = np.asarray(manifest.samples_per_identity)
        for label in np.flatnonzero(expected != counts)[:100].tolist():
            problems.append(f"identity {label}: {counts[label]} good images, manifest.json says "
                            f"{expected[label]}")
    return ValidationReport(Path(directory), checked, counts, problems)
