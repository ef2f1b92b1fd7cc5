"""Embed this rank's slice of image files decoded in DataLoader workers.

Shared by IJB (loose crops aligned in the workers; every rank receives every row) and `facescale embed`
(aligned crops read as they are; rank 0 writes the rows as they arrive, see eval/rows_file.py).
A dataset item is an HWC uint8 face or the error message naming its file, so a bad image ends the command
as one clear line raised by the rank that read it, on every rank, instead of a worker-process traceback.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from facescale.data.worker_loader import one_thread_worker
from facescale.errors import InputError
from facescale.eval.binfile import EvalSetError
from facescale.eval.decode import decode_image
from facescale.eval.extract import RankRows, all_gather_rows, embed_batch, progress_bar, rows_on_ranks


def read_face(path: str, image_size: int | None, unreadable_fix: str,
              bad_image_fix: str = "") -> np.ndarray | str:
    """The image at `path` as HWC uint8 RGB (size checked unless `image_size` is None), or the message naming
    the file: unreadable (+ `unreadable_fix`), not an image or not of `image_size` (+ `bad_image_fix`)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return f"{path}: cannot read ({error.strerror}); {unreadable_fix}"
    try:
        return decode_image(data, image_size, path)
    except EvalSetError as error:
        return f"{error}; {bad_image_fix}" if bad_image_fix else str(error)


def collate_faces(items: list[np.ndarray | str]) -> torch.Tensor | str:
    """A uint8 NHWC batch, or the first error message among the items."""
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.from_numpy(np.stack(items))


def collate_keeping_errors(items: list[np.ndarray | str]) -> tuple[torch.Tensor | None,
                                                                   list[tuple[int, str]]]:
    """The good items as a uint8 NHWC batch (None when none is) and (position, message) of the others."""
    good = [item for item in items if not isinstance(item, str)]
    bad = [(position, item) for position, item in enumerate(items) if isinstance(item, str)]
    return (torch.from_numpy(np.stack(good)) if good else None), bad


def default_workers(local_world_size: int = 1) -> int:
    """Decode workers per rank: the CPUs this process may use, shared by the ranks of a node, max 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus // max(1, local_world_size) - 1))


def embed_on_ranks(model: nn.Module, faces: Dataset, *, batch_size: int, device: torch.device | str,
                   flip: bool, world_size: int, workers: int, progress: bool, label: str,
                   error_type: type[InputError], skipped: list[int] | None = None) -> RankRows:
    """This rank's float32 embeddings of `faces` (its slice), with every rank's row count. An item that is an
    error message raises `error_type` with it on every rank; given a `skipped` list, such an item is left
    out instead, its index in `faces` appended and its message printed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    count = len(faces)  # type: ignore[arg-type]
    loader = DataLoader(faces, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_faces if skipped is None else collate_keeping_errors,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                        worker_init_fn=one_thread_worker if workers else None)

    def embed_local() -> torch.Tensor:
        update, close = progress_bar(count, progress, label)
        chunks, first = [], 0
        try:
            for batch in loader:
                pixels, bad = batch if skipped is not None else (batch, [])
                if isinstance(pixels, str):
                    raise error_type(pixels)
                for position, message in bad:
                    skipped.append(first + position)  # type: ignore[union-attr]
                    print(f"[embed] skipped {message}", file=sys.stderr, flush=True)
                if pixels is not None:
                    chunks.append(embed_batch(model, pixels, device, flip))
                done = len(bad) + (len(pixels) if pixels is not None else 0)
                first += done
                update(done)
        finally:
            close()
        return torch.cat(chunks) if chunks else torch.zeros(0, 0, device=device)

    was_training = model.training
    model.eval()
    try:
        return rows_on_ranks(embed_local, world_size, device)
    finally:
        model.train(was_training)


def embed_dataset(model: nn.Module, faces: Dataset, *, batch_size: int, device: torch.device | str,
                  flip: bool, world_size: int, workers: int, progress: bool, label: str,
                  error_type: type[InputError]) -> np.ndarray:
    """[N, D] float32 embeddings: `faces` (this rank's slice) embedded here (see `embed_on_ranks`), all
    ranks' rows gathered in rank order on every rank."""
    rows = embed_on_ranks(model, faces, batch_size=batch_size, device=device, flip=flip,
                          world_size=world_size, workers=workers, progress=progress, label=label,
                          error_type=error_type)
    return all_gather_rows(rows, world_size).cpu().numpy()
