"""IJB embedding extraction: loose crops decoded and 5-point aligned in worker processes, embedded on this
rank's device, each rank taking a contiguous slice of the faces and all ranks receiving every embedding."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from facescale.eval.align import align_face
from facescale.eval.dataset_extract import embed_dataset, read_face
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
        pixels = read_face(path, None, "check loose_crop/ of the release",
                           bad_image_fix="replace the file from the release")
        if isinstance(pixels, str):
            return pixels
        try:
            return align_face(pixels, self.landmarks[index], self.image_size)
        except ValueError as error:
            return f"{path}: {error}; check its line in the 5-point file"


def extract_ijb_embeddings(model: nn.Module, release: IJBRelease, image_size: int, batch_size: int,
                           device: torch.device | str, flip: bool = True, rank: int = 0, world_size: int = 1,
                           workers: int = 0, progress: bool = True) -> np.ndarray:
    """[N, D] float32 embeddings of every face of `release` (flip-summed when `flip`), on every rank.

    With world_size > 1 the process group must be initialized; an error on one rank is raised on all.
    """
    start, count = class_partition(len(release.image_names), world_size, rank)
    return embed_dataset(model, AlignedFaces(release, image_size, start, count), batch_size=batch_size,
                         device=device, flip=flip, world_size=world_size, workers=workers,
                         progress=progress and rank == 0, label=f"{release.name} faces (rank 0's share)",
                         error_type=IJBReleaseError)
