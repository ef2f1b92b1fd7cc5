"""`facescale embed`: embeddings of aligned face crops, written as `<out>.npy` ([N, D] float32) + `<out>.txt`.

What arcface_torch's `inference.py` does for one image, for a folder or list of any size: the training
normalisation, each embedding summed with its mirror image's by default (as the published tables score),
rows in the order of the path list (`.txt`, one path a line as given). Images are read and decoded in
DataLoader workers, so a million-image folder is never held in memory; extraction is split over the ranks
of a torchrun/srun launch. Crops must be aligned at the model's input size: none is resized here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from facescale.checkpoint.atomic import atomic_write_bytes
from facescale.data.folder_listing import IMAGE_SUFFIXES, is_image_name
from facescale.eval.binfile import EvalSetError
from facescale.eval.dataset_extract import embed_on_ranks, read_face
from facescale.eval.extract import RankRows
from facescale.eval.rows_file import write_npy_from_ranks
from facescale.parallel.partition import class_partition


class ImageListError(EvalSetError):
    """Images to embed that cannot be found, read or decoded at the model's size."""

    default_fix = "give aligned face crops (a folder, image files, or --list FILE with one path a line)"


_OR_SKIP = ", or rerun with --skip-bad to leave such images out"


class ImageFiles(Dataset):
    """Aligned crops read from `paths` as HWC uint8 RGB; an unreadable one gives its error message."""

    def __init__(self, paths: list[str], image_size: int, skipping: bool = False) -> None:
        self.paths, self.image_size, self.skipping = paths, image_size, skipping

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray | str:
        hint = "" if self.skipping else _OR_SKIP  # a stopping error says how to go on without the image
        return read_face(self.paths[index], self.image_size, f"check the file and its permissions{hint}",
                         bad_image_fix=hint.removeprefix(", "))


def _folder_images(root: str) -> list[str]:
    """Image files below `root` (recursively), sorted by path, as `root/relative/path`."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        found.extend(os.path.join(directory, name) for name in sorted(files) if is_image_name(name))
    return found


def _listed_images(list_file: str, root: str) -> list[str]:
    """The non-blank lines of `list_file`, a relative path taken from `root`."""
    try:
        lines = Path(list_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ImageListError(f"cannot read the image list ({error})", where=list_file,
                             fix="give a UTF-8 text file with one image path a line") from error
    return [os.path.join(root, line) for line in map(str.strip, lines) if line]  # join keeps absolute paths


def list_images(sources: list[str], list_file: str | None = None, root: str = "") -> list[str]:
    """Every image to embed, in output order: each source a folder (its images, sorted, recursively) or a
    file, then the lines of `list_file` (relative to `root`). Missing paths and no images are refused."""
    paths: list[str] = []
    for source in sources:
        if os.path.isdir(source):
            images = _folder_images(source)
            if not images:
                raise ImageListError(f"holds no images ({', '.join(IMAGE_SUFFIXES)})", where=source)
            paths.extend(images)
        elif os.path.isfile(source):
            paths.append(source)
        else:
            raise ImageListError("does not exist", where=source, fix="check the path")
    listed = _listed_images(list_file, root) if list_file else []
    missing = [path for path in listed if not os.path.isfile(path)]
    if missing:
        raise ImageListError(f"{len(missing)} listed image(s) do not exist, e.g. {missing[0]}",
                             where=list_file, fix="fix the paths, or give --root, the directory that "
                                                  "relative paths start from (default: the current one)")
    paths.extend(listed)
    if not paths:
        raise ImageListError("no images to embed", where=list_file or "the command line")
    odd = [path for path in paths if "\n" in path or "\r" in path]
    if odd:
        raise ImageListError(f"{odd[0]!r} has a line break in its name, which the .txt path list cannot hold",
                             fix="rename the file")
    return paths


def output_paths(out: str) -> tuple[Path, Path]:
    """(`.npy`, `.txt`) written for `--out`: `feats` and `feats.npy` both give feats.npy + feats.txt."""
    stem = Path(out[:-4] if out.endswith(".npy") else out)
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".txt")


def embed_images(model: nn.Module, paths: list[str], image_size: int, *, batch_size: int, device: str,
                 flip: bool = True, rank: int = 0, world_size: int = 1, workers: int = 0,
                 progress: bool = True, skip_bad: bool = False) -> tuple[RankRows, list[int]]:
    """(rows, skipped): this rank's float32 embeddings of its contiguous slice of `paths` (flip-summed when
    `flip`) with every rank's row count (process group initialized when world_size > 1). A bad image stops
    every rank, or with `skip_bad` is left out: `skipped` (on every rank) lists the indices into `paths` of
    those left out, and the rows, in rank order, are the other images' in order."""
    start, count = class_partition(len(paths), world_size, rank)
    local: list[int] | None = [] if skip_bad else None
    rows = embed_on_ranks(model, ImageFiles(paths[start:start + count], image_size, skip_bad),
                          batch_size=batch_size, device=device, flip=flip, world_size=world_size,
                          workers=workers, progress=progress and rank == 0,
                          label="embedding (rank 0's share)", error_type=ImageListError, skipped=local)
    skipped = [start + index for index in local or []]
    if skip_bad and world_size > 1:
        import torch.distributed as dist

        every: list[list[int] | None] = [None] * world_size
        dist.all_gather_object(every, skipped)
        skipped = [index for part in every for index in part or []]
    if skip_bad and len(skipped) == len(paths):
        raise ImageListError(f"none of the {len(paths)} images could be embedded (see the skipped lines)")
    return rows, skipped


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def write_embeddings(out: str, rows: RankRows, paths: list[str], normalize: bool, rank: int = 0,
                     skipped: list[str] | None = None) -> tuple[Path, Path]:
    """Write `<out>.npy` (all ranks' rows in rank order, L2-normalised when `normalize`; collective, rank 0
    writes them as they arrive) and `<out>.txt`, each atomically, and the images left out in
    `<out>.skipped.txt` when there are any (else an earlier one is removed)."""
    npy, txt = output_paths(out)
    write_npy_from_ranks(npy, rows, _unit_rows if normalize else None)
    if rank == 0:
        atomic_write_bytes(txt, _lines(paths))
        left_out = txt.with_name(txt.stem + ".skipped.txt")
        if skipped:
            atomic_write_bytes(left_out, _lines(skipped))
        else:
            left_out.unlink(missing_ok=True)
    return npy, txt


def _lines(paths: list[str]) -> bytes:
    return "".join(f"{path}\n" for path in paths).encode("utf-8")
