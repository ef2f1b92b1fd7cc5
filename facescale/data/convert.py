"""Convert insightface RecordIO sets or one-folder-per-identity trees into facescale shards.

The samples are shuffled globally (a seeded permutation) and cut into shards of `shard_size`; worker
processes write whole shards. Each finished shard leaves a completion record `.convert/<shard>.json` (count,
sha256, label counts, bad images), written after the tar and its index are renamed into place, so a re-run
with the same arguments redoes only the shards that have no record. `manifest.json` is written last.
Images that are JPEGs of the target size are stored unchanged; others are decoded, resized and re-encoded;
images that do not decode (or whose label is not a class number) are left out and listed in the summary. A
source that cannot be read (a truncated `.rec`, an `.idx` of another file, an unreadable image file) stops
the conversion with one line naming it instead of leaving its images out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from facescale.data.folder_listing import IMAGE_SUFFIXES, FolderLayoutError, detect_depth, list_identities
from facescale.data.jpeg import decode_jpeg, encode_jpeg, open_image, pil_rgb
from facescale.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from facescale.data.recordio import RecordFile
from facescale.data.shard_writer import ShardWriter
from facescale.errors import InputError

STATE_DIR = ".convert"
_SHUFFLE_TAG = 7
MAX_LABEL = 2**31 - 1  # shard labels are int32


class ConvertError(InputError, ValueError):
    """A source the conversion cannot read or that gives no sample; the message names the file."""


@dataclass(frozen=True)
class Source:
    """What to convert: `kind` "rec" or "folder", its paths, one ref per image (rec key or (path, label))."""

    kind: str
    paths: tuple[str, ...]
    refs: list[Any]
    num_classes_hint: int
    fingerprint: str

    @property
    def description(self) -> str:
        """A readable origin for manifest.json's `source`."""
        return f"{self.kind}:{':'.join(self.paths)}"


def _stat_fingerprint(paths: list[Path]) -> str:
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)


def rec_source(rec: str | Path, idx: str | Path) -> Source:
    """The image records of an insightface `.rec`/`.idx` pair (header and identity records excluded)."""
    records = RecordFile(rec, idx)
    keys = records.image_keys()
    identities = records.identity_count() or 0
    records.close()
    if not keys:
        raise ConvertError("its .idx lists no image record (only the header and identity records)", where=rec,
                           fix="check that it is the data set's train.rec (and --idx its index)")
    return Source("rec", (str(Path(rec).resolve()), str(Path(idx).resolve())), keys, identities,
                  _stat_fingerprint([Path(rec), Path(idx)]))


def folder_source(root: str | Path, depth: int | None = None, progress: bool = False,
                  out: str | Path | None = None) -> Source:
    """Images under `root/<identity>/` where an identity is `depth` directory levels down (None: detected);
    label = index of the identity's relative path in sorted order. An `out` directory inside `root` (the
    conversion's own output) is not part of the set."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; --root must hold one directory per identity "
                                "(possibly nested, see --depth)")
    skip = _inside(Path(out), root) if out is not None else ""
    depth = depth or detect_depth(root, skip)
    identities = list_identities(root, depth, progress, skip)
    refs = [(f"{name}/{image}", label) for label, (name, images) in enumerate(identities) for image in images]
    if not refs:
        raise FolderLayoutError(f"holds no images {depth} level(s) down ({', '.join(IMAGE_SUFFIXES)})",
                                where=root)
    listing = [f"{name}/" for name, _ in identities] + [f"{path}:{label}" for path, label in refs]
    digest = hashlib.sha256("\n".join(listing).encode("utf-8", "surrogateescape")).hexdigest()
    return Source("folder", (str(root.resolve()),), refs, len(identities), digest)


def _inside(path: Path, root: Path) -> str:
    """`path` spelled from `root` (as a listing of `root` names it) when it lies inside `root`, else ""."""
    try:
        return str(root / path.resolve().relative_to(root.resolve()))
    except ValueError:
        return ""


def training_jpeg(data: bytes, image_size: int, quality: int) -> tuple[bytes, bool]:
    """(JPEG bytes of an `image_size` square RGB image, whether re-encoded); ValueError if undecodable."""
    try:
        pixels = decode_jpeg(data)
        if pixels.shape == (image_size, image_size, 3):
            return data, False
    except Exception:  # noqa: BLE001 - not a JPEG (or a broken one): let Pillow try
        pixels = None
    from PIL import Image, UnidentifiedImageError

    try:
        with open_image(data) as image:
            image = pil_rgb(image)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            pixels = np.asarray(image)
    except Exception as error:  # noqa: BLE001 - Pillow raises assorted types on bad data
        reason = "no image format recognised" if isinstance(error, UnidentifiedImageError) else str(error)
        raise ValueError(f"does not decode as an image ({reason})") from error
    return encode_jpeg(pixels, quality), True


_RECORD_FILES: dict[tuple[str, ...], RecordFile] = {}  # per process: the pool's workers open each once


def _forget_record_files() -> None:
    """Close the `.rec` files this process opened for an earlier conversion."""
    for records in _RECORD_FILES.values():
        records.close()
    _RECORD_FILES.clear()


def _load(source_kind: str, paths: tuple[str, ...], ref: Any) -> tuple[bytes, float]:
    """(image bytes, label) of one ref; a source that cannot be read raises an InputError naming it."""
    if source_kind == "rec":
        records = _RECORD_FILES.get(paths)
        if records is None:
            records = _RECORD_FILES[paths] = RecordFile(*paths)
        record = records.read(ref)  # RecordIOError: the .rec or .idx is broken, not this image
        return record.image, record.labels[0]
    rel, label = ref
    try:
        return (Path(paths[0]) / rel).read_bytes(), label
    except OSError as error:
        raise ConvertError(f"cannot read it ({error.strerror or error})", where=Path(paths[0]) / _shown(rel),
                           fix="make it readable or remove it, then re-run the same command (finished "
                               "shards are kept)") from None


def _class_number(label: float) -> int:
    """A sample's label as a class number; ValueError for a fraction or a value out of [0, 2**31)."""
    if not (0 <= label <= MAX_LABEL) or label != int(label):
        raise ValueError(f"label {label:g} is not a class number (0 .. {MAX_LABEL})")
    return int(label)


def _shown(text: str) -> str:
    """A file name as it can be printed: bytes that are not UTF-8 (surrogate-escaped) as \\x.. escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _ref_name(source_kind: str, ref: Any) -> str:
    """How a left-out sample is named in the report: its record number, or its path under --root."""
    return f"record {ref}" if source_kind == "rec" else f"{_shown(ref[0])} (identity {ref[1]})"


def convert_shard(source_kind: str, paths: tuple[str, ...], refs: list[Any], out_dir: str, number: int,
                  shard_size: int, image_size: int, quality: int) -> dict[str, Any]:
    """Write shard `number` from `refs` and its completion record; returns that record (a pool task)."""
    out, partial = Path(out_dir), Path(out_dir) / STATE_DIR / f"partial-{number:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    labels: dict[int, int] = {}
    bad, reencoded = [], 0
    with ShardWriter(partial, shard_size, start_shard=number, start_index=number * shard_size) as writer:
        for ref in refs:
            data, value = _load(source_kind, paths, ref)
            try:
                label = _class_number(value)
                jpeg, changed = training_jpeg(data, image_size, quality)
            except ValueError as error:  # this image: left out and listed
                bad.append(f"{_ref_name(source_kind, ref)}: {error}")
                continue
            writer.write(jpeg, label)
            labels[label] = labels.get(label, 0) + 1
            reencoded += changed
    record: dict[str, Any] = {"shard": None, "labels": sorted(labels.items()), "bad": bad,
                              "reencoded": reencoded, "attempted": len(refs)}
    for info in writer.shards:
        for name in (info.name, info.index_name):
            os.replace(partial / name, out / name)
        record["shard"] = {"name": info.name, "num_samples": info.num_samples, "sha256": info.sha256}
    shutil.rmtree(partial, ignore_errors=True)
    done = _done_path(out, number)
    done.with_suffix(".tmp").write_text(json.dumps(record))
    done.with_suffix(".tmp").replace(done)
    return record


def _done_path(out: Path, number: int) -> Path:
    return out / STATE_DIR / f"shard-{number:06d}.json"


@dataclass
class ConvertSummary:
    """What a conversion produced; `resumed_shards` were already done by an earlier, interrupted run."""

    manifest: Manifest
    converted_shards: int
    resumed_shards: int
    reencoded: int
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0
    announced: int = 0  # identities a .rec header announces (0: none)

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        m = self.manifest
        rate = (m.num_samples / self.seconds) if self.seconds > 0 else 0.0
        lines = [f"samples {m.num_samples}, identities {m.num_classes}, shards {len(m.shards)} "
                 f"({self.converted_shards} written now, {self.resumed_shards} from an earlier run)",
                 f"images re-encoded to {m.image_size}px JPEG: {self.reencoded}; left out (undecodable): "
                 f"{len(self.bad)}", f"time {self.seconds:.1f} s ({rate:.0f} images/s this run)"]
        empty = [label for label, count in enumerate(m.samples_per_identity) if count == 0]
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
            announced = (f"; the .rec header announces {self.announced} identities" if self.announced and
                         self.announced < m.num_classes else "")
            lines.append(f"identities without an image: {len(empty)} (labels {shown}{announced}); each is a "
                         "class center that no sample trains")
        lines += [f"  left out: {entry}" for entry in self.bad[:20]]
        if len(self.bad) > 20:
            lines.append(f"  ... and {len(self.bad) - 20} more (see {STATE_DIR}/shard-*.json)")
        return lines


def _prepare_output(out: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Start or resume: an identical plan resumes; anything else needs `overwrite` (then it is cleared)."""
    plan_path = out / STATE_DIR / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) == plan and not overwrite:
        return
    old = sorted(out.glob("train-*.tar")) + sorted(out.glob("train-*.idx"))
    old += [p for p in (out / MANIFEST_NAME, out / STATE_DIR) if p.exists()]
    if old and not overwrite:
        raise FileExistsError(f"{out} holds shards of a different conversion (or another tool); choose an "
                              "empty directory or pass --overwrite to replace them")
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / STATE_DIR).mkdir(parents=True)
    plan_path.write_text(json.dumps(plan, indent=1))


def convert(source: Source, out_dir: str | Path, *, shard_size: int = 20000, seed: int = 0,
            workers: int | None = None, image_size: int = 112, quality: int = 95, overwrite: bool = False,
            progress: bool = True) -> ConvertSummary:
    """Shuffle `source` globally and write it as shards + manifest into `out_dir`, resuming earlier work."""
    from tqdm import tqdm

    if shard_size < 1 or image_size < 16:
        raise ValueError(f"need shard_size >= 1 and image_size >= 16, got {shard_size}, {image_size}")
    start, out = time.perf_counter(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"source": source.description, "fingerprint": source.fingerprint, "num_images": len(source.refs),
            "seed": seed, "shard_size": shard_size, "image_size": image_size, "quality": quality}
    _prepare_output(out, plan, overwrite)
    _forget_record_files()  # an in-process run (workers 1) reads the pair as it is now, not an earlier one
    order = np.random.default_rng([seed, _SHUFFLE_TAG]).permutation(len(source.refs))
    chunks = [order[i:i + shard_size].tolist() for i in range(0, len(order), shard_size)]
    pending = [n for n in range(len(chunks)) if not _done_path(out, n).is_file()]
    workers = max(1, min(workers if workers is not None else (os.cpu_count() or 1), len(pending) or 1))
    bar = tqdm(total=len(order), initial=len(order) - sum(len(chunks[n]) for n in pending), unit="img",
               desc="convert", disable=not progress)
    tasks = [(source.kind, source.paths, [source.refs[i] for i in chunks[n]], str(out), n, shard_size,
              image_size, quality) for n in pending]
    if workers == 1:
        for task in tasks:
            convert_shard(*task)
            bar.update(len(task[2]))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(convert_shard, *task): len(task[2]) for task in tasks}
            for future in as_completed(futures):
                future.result()
                bar.update(futures[future])
    bar.close()
    records = [json.loads(_done_path(out, n).read_text()) for n in range(len(chunks))]
    manifest = _manifest(records, source, image_size)
    manifest.save(out)
    return ConvertSummary(manifest, converted_shards=len(pending), resumed_shards=len(chunks) - len(pending),
                          reencoded=sum(r["reencoded"] for r in records),
                          bad=[entry for r in records for entry in r["bad"]],
                          seconds=time.perf_counter() - start,
                          announced=source.num_classes_hint if source.kind == "rec" else 0)


def _manifest(records: list[dict[str, Any]], source: Source, image_size: int) -> Manifest:
    """The manifest of the finished shards, with per-identity counts summed from the completion records."""
    shards = [ShardInfo(**r["shard"]) for r in records if r["shard"] is not None]
    counts: dict[int, int] = {}
    for record in records:
        for label, count in record["labels"]:
            counts[label] = counts.get(label, 0) + count
    if not counts:
        bad = [entry for record in records for entry in record["bad"]]
        first = f" (the first left out: {bad[0]})" if bad else ""
        raise ConvertError(f"none of its {len(source.refs)} images could be converted{first}",
                           where=source.paths[0], fix="check that it is the data set (and --idx its index)")
    num_classes = max(source.num_classes_hint, max(counts) + 1)
    per_identity = [counts.get(label, 0) for label in range(num_classes)]
    return Manifest(num_classes=num_classes, num_samples=sum(per_identity), image_size=image_size,
                    source=source.description, shards=shards, samples_per_identity=per_identity)
