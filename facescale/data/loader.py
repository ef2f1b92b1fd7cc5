"""Pick and build the training reader (DALI or webdataset) for one rank; both yield batches of one format.

Batches are `(images, labels)`: float32 [B, 3, H, W] in [-1, 1] ((x - 127.5) / 127.5, RGB) and int64 [B],
on the model's device. Both readers decode, augment and mirror into uint8 [B, H, W, 3] batches and leave the
normalisation to `normalize_batch` on the model's device (4x fewer bytes to move; free on a GPU).
Training is step-based: a TrainLoader iterates forever, rolling epochs over internally, and every rank
gets exactly `steps_per_epoch = N // (world * B)` equal full batches per epoch.

Epoch guarantee (both readers with `data.shard_sampling: exact`, N samples in the manifest, all good): the
concatenated sample list is split into `world` contiguous parts by sample count; in every epoch each rank
reads only its part, no sample is yielded twice, and exactly `N mod (world * B)` samples are left out (the
ones still in the shuffle buffer when a rank's quota is reached). Both readers assign the parts differently
per epoch (DALI rotates `shard_id`; webdataset permutes the shard order with the epoch seed). Under
`on_bad_sample: skip` the bad samples are left out too; DALI drops them before the split (pre-scan),
webdataset replaces them with later samples of the same stream, repeating samples of its part only when the
bad ones outnumber the `N mod (world * B)` spare ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from facescale.config.schema import DataConfig, ReaderKind, choices
from facescale.data.manifest import Manifest, ManifestError
from facescale.data.train_loader import (  # re-exported: the names readers' users know from here
    Batch,
    TrainLoader,
    normalize_batch,
    steps_per_epoch,
    stream_seed,
)
from facescale.data.worker_loader import batch_stream_loader

__all__ = ["Batch", "TrainLoader", "batch_stream_loader", "build_train_loader", "dali_available",
           "load_shard_manifest", "normalize_batch", "resolve_reader", "steps_per_epoch", "stream_seed"]

READERS = choices(ReaderKind)


def dali_available() -> bool:
    """Whether `nvidia.dali` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


def resolve_reader(reader: str) -> str:
    """Map `data.reader` to "dali" or "webdataset"; "auto" picks DALI when it is installed."""
    if reader not in READERS:
        raise ValueError(f"data.reader must be one of {', '.join(READERS)}, got {reader!r}")
    if reader == "auto":
        return "dali" if dali_available() else "webdataset"
    if reader == "dali" and not dali_available():
        raise ImportError("data.reader is 'dali' but nvidia.dali is not importable; install the [dali] "
                          "extra (pip install nvidia-dali-cuda120) or set data.reader to 'webdataset'")
    return reader


def load_shard_manifest(data_cfg: DataConfig, need_index: bool) -> Manifest:
    """Read `data.shards/manifest.json` and check the tars (and `.idx` files when `need_index`) exist."""
    if not data_cfg.shards:
        raise ManifestError("data.shards is empty; set it to a directory written by "
                            "`facescale synth --out DIR` or a facescale converter")
    from facescale.data.index_check import check_index

    manifest = Manifest.load(data_cfg.shards)
    if manifest.image_size != data_cfg.image_size:
        raise ManifestError(f"{Path(data_cfg.shards) / 'manifest.json'}: shards hold {manifest.image_size}px "
                            f"images but data.image_size is {data_cfg.image_size}; make them agree")
    for tar, index, info in zip(manifest.shard_paths(), manifest.index_paths(), manifest.shards, strict=True):
        if not tar.is_file():
            raise ManifestError(f"{tar} is listed in manifest.json but missing; restore it or regenerate "
                                "the shard directory")
        if need_index and not index.is_file():
            raise ManifestError(f"{index} (DALI index) is missing; recreate it with "
                                f"`python -c \"from facescale.data.shard_writer import index_tar; "
                                f"index_tar('{tar}')\"` or `wds2idx`")
        if index.is_file():  # both readers read members at its offsets
            check_index(tar, index, info.num_samples)
    return manifest


def build_train_loader(data_cfg: DataConfig, *, rank: int, world_size: int, batch_size: int, seed: int,
                       device: torch.device, epoch: int = 0, hang_limit_s: float = 0.0) -> TrainLoader:
    """The training reader of `rank` out of `world_size`, per `data_cfg.reader`; batches land on `device`.
    `hang_limit_s` (> 0): a DALI pipeline whose build blocks longer ends the process (data/hang_guard.py)."""
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"need 0 <= rank < world_size and batch_size >= 1; got rank {rank}, world_size "
                         f"{world_size}, batch_size {batch_size}")
    reader = resolve_reader(data_cfg.reader)
    if reader == "dali" and data_cfg.shard_sampling != "exact":
        raise ValueError(f"data.shard_sampling={data_cfg.shard_sampling} is a webdataset-reader mode, but "
                         "data.reader resolved to dali; set data.reader=webdataset")
    manifest = load_shard_manifest(data_cfg, need_index=reader == "dali")
    if reader == "dali":
        from facescale.data.dali_reader import DaliTrainLoader

        return DaliTrainLoader(manifest, data_cfg, rank=rank, world_size=world_size, batch_size=batch_size,
                               seed=seed, device=device, epoch=epoch, hang_limit_s=hang_limit_s)
    from facescale.data.wds_reader import WdsTrainLoader

    return WdsTrainLoader(manifest, data_cfg, rank=rank, world_size=world_size, batch_size=batch_size,
                          seed=seed, device=device, epoch=epoch)
