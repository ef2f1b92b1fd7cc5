"""IJB embedding extraction: loose crops decoded and 5-point aligned in worker processes, embedded on this
rank's device, each rank taking a contiguous slice of the faces and all ranks receiving every embedding."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from facescale.eval.align import align_face
from facescale.eval.decode import decode_image
from facescale.eval.extract import embed_batch, gather_extraction, progress_bar
from facescale.eval.ijb_release import IJBRelease, IJBReleaseError
from facescale.parallel.partition import class_partition


class AlignedFaces(Dataset):
    """Faces `start .. start+count` of a release, read from loose_crop/ and aligned to `image_size`."""

    def __init__(self, release: IJBRelease, image_size: int, start: int, count: int) -> None:
        self.paths = [release.image_path(i) for i in range(start, start + count)]
        self.landmarks = release.landmarks[start:start + count]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray | str:
        """The aligned face, or the error message naming the file (raised by the reading rank, so a bad
        image is one clear line rather than a worker-process traceback)."""
        path = self.paths[index]
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            return f"{path}: cannot read ({error.strerror}); check loose_crop/ of the release"
        try:
            pixels = decode_image(data, None, path)
        except ValueError as error:
            return f"{error}; replace the file from the release"
        try:
            return align_face(pixels, self.landmarks[index], self.image_size)
        except ValueError as error:
            return f"{path}: {error}; check its line in the 5-point file"


def collate_faces(items: list[np.ndarray | str]) -> torch.Tensor | str:
    """A uint8 NHWC batch, or the first error message among the items."""
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.from_numpy(np.stack(items))


def default_workers(local_world_size: int = 1) -> int:
    """Decode/align workers per rank: the CPUs this process may use, shared by the ranks of a node, max 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus // max(1, local_world_size) - 1))


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # many workers per rank: one thread each keeps them from oversubscribing


def extract_ijb_embeddings(model: nn.Module, release: IJBRelease, image_size: int, batch_size: int,
                           device: torch.device | str, flip: bool = True, rank: int = 0, world_size: int = 1,
                           workers: int = 0, progress: bool = True) -> np.ndarray:
    """[N, D] float32 embeddings of every face of `release` (flip-summed when `flip`), on every rank.

    With world_size > 1 the process group must be initialized; an error on one rank is raised on all.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    start, count = class_partition(len(release.image_names), world_size, rank)
    faces = AlignedFaces(release, image_size, start, count)
    loader = DataLoader(faces, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_faces, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None,
                        worker_init_fn=_single_thread_worker if workers else None)

    def embed_local() -> torch.Tensor:
        update, close = progress_bar(count, progress and rank == 0, f"{release.name} faces (rank 0's share)")
        chunks = []
        try:
            for pixels in loader:
                if isinstance(pixels, str):
                    raise IJBReleaseError(pixels)
                chunks.append(embed_batch(model, pixels, device, flip))
                update(len(pixels))
        finally:
            close()
        return torch.cat(chunks) if chunks else torch.zeros(0, 0, device=device)

    was_training = model.training
    model.eval()
    try:
        return gather_extraction(embed_local, world_size, device)
    finally:
        model.train(was_training)
