"""F2C's identity loader: per rank, batches of B_id identities with two images each (reference §1.4).

Each pass over the identities is a fresh seeded permutation (reshuffled every pass, unlike the reference,
whose sampler never calls set_epoch), padded by wrapping to a multiple of W and dealt round-robin to the
ranks, so every identity is drawn once per pass. Per identity two distinct images are drawn uniformly; an
identity with one image gives it twice, the second view mirrored. Other views are mirrored independently with
p = 0.5 when `data.random_mirror`. Passes cycle forever; the instance loader defines the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from facescale.data.bad_data import BAD_SAMPLE_FIX, RESCAN_FIX, BadSampleError, check_image
from facescale.data.identity_index import IdentityIndex, SampleLocation
from facescale.data.jpeg import decode_jpeg
from facescale.data.train_loader import stream_seed
from facescale.data.worker_loader import batch_stream_loader
from facescale.errors import InputError

UInt8Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # [B, H, W, 3] x 2, labels [B]


class TooFewIdentitiesError(InputError, ValueError):
    """Fewer identities than one identity batch per rank; every rank counts the same and raises alike."""

    every_rank = True


class IdentityPairs(IterableDataset):
    """The endless stream of one rank's identity batches as uint8 HWC pairs (split over loader workers)."""

    def __init__(
        self,
        index: IdentityIndex,
        *,
        rank: int,
        world_size: int,
        identities_per_batch: int,
        seed: int,
        mirror: bool,
        image_size: int,
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__()
        self.on_bad_sample = on_bad_sample  # under skip the index was built without the bad samples
        self.index, self.rank, self.world_size = index, rank, world_size
        self.batch, self.seed, self.mirror, self.image_size = identities_per_batch, seed, mirror, image_size
        self.start_serial = 0  # the first batch serial to make (a resumed run starts where it stopped)
        self.eligible = np.nonzero(np.diff(index.starts) > 0)[0]
        per_rank = -(-len(self.eligible) // world_size)
        # enough batches that every identity is drawn: the last one is topped up from the pass's start
        self.batches_per_pass = -(-per_rank // identities_per_batch)
        if per_rank < identities_per_batch:
            raise TooFewIdentitiesError(
                f"the shards hold {len(self.eligible)} identities with images, fewer than "
                f"{identities_per_batch} per rank for {world_size} ranks",
                fix="lower head.f2c.identities_per_rank, or add identities")

    def rank_identities(self, pass_number: int) -> np.ndarray:
        """This rank's identities of one pass, in order: the pass's permutation, wrapped round to fill every
        rank's `batches_per_pass` full batches (so each identity is drawn at least once), dealt by rank."""
        order = np.random.default_rng(stream_seed(self.seed, 0xD1, pass_number)).permutation(self.eligible)
        padded = np.resize(order, self.world_size * self.batches_per_pass * self.batch)
        return padded[self.rank :: self.world_size]

    def batch_labels(self, pass_number: int, batch_number: int) -> np.ndarray:
        """The identities of batch `batch_number` of pass `pass_number` on this rank."""
        return self.rank_identities(pass_number)[batch_number * self.batch : (batch_number + 1) * self.batch]

    def make_batch(self, pass_number: int, batch_number: int) -> UInt8Pairs:
        """Batch `batch_number` of pass `pass_number`: first views, second views, labels."""
        labels = self.batch_labels(pass_number, batch_number)
        rng = np.random.default_rng(stream_seed(self.seed, self.rank, pass_number, batch_number))
        first, second = self._empty(len(labels)), self._empty(len(labels))
        for i, label in enumerate(labels):
            rows = self.index.locations(int(label))
            if len(rows) >= 2:
                a, b = rng.choice(len(rows), 2, replace=False)
                flip_a, flip_b = (rng.random(2) < 0.5) & self.mirror
            else:
                a = b = 0
                flip_a = bool(rng.random() < 0.5) & self.mirror
                flip_b = not flip_a  # one image: the two views differ by a mirror
            self._image(rows[a], bool(flip_a), first[i])
            self._image(rows[b], bool(flip_b), second[i])
        return first, second, torch.from_numpy(labels.astype(np.int64))

    def _empty(self, count: int) -> torch.Tensor:
        """A uint8 [count, H, W, 3] batch; in shared memory inside a DataLoader worker (no copy)."""
        images = torch.empty((count, self.image_size, self.image_size, 3), dtype=torch.uint8)
        return images.share_memory_() if get_worker_info() is not None else images

    def _image(self, location: SampleLocation, flip: bool, out: torch.Tensor) -> None:
        """Decode one image into `out` (HWC), mirrored in place when `flip`; a bad one is a BadSampleError."""
        jpeg = self.index.read_jpeg(location)
        try:
            shape = decode_jpeg(jpeg, out.numpy()).shape
            reason = None if shape == (self.image_size, self.image_size, 3) else \
                f"image is {shape}, expected {self.image_size}px RGB"
        except Exception:  # noqa: BLE001 - decoders raise assorted types; check_image words the reason
            reason = check_image(jpeg, self.image_size) or "JPEG does not decode"
        if reason:
            raise BadSampleError(f"bad training sample: {location.tar} at byte {location.offset}: {reason}",
                                 fix=RESCAN_FIX if self.on_bad_sample == "skip" else BAD_SAMPLE_FIX)
        if flip:
            out.copy_(out.flip(1))

    def __iter__(self) -> Iterator[UInt8Pairs]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        serial = self.start_serial + worker  # over all passes; worker w makes s + w, s + w + workers, ...
        while True:
            yield self.make_batch(serial // self.batches_per_pass, serial % self.batches_per_pass)
            serial += workers


def build_identity_loader(dataset: IdentityPairs, num_workers: int, timeout_s: float = 0.0) -> DataLoader:
    """Endless DataLoader over the identity pairs; workers take turns, so the batch order is deterministic.
    `timeout_s`: data.read_timeout_s (see batch_stream_loader)."""
    return batch_stream_loader(dataset, num_workers, timeout_s=timeout_s)
