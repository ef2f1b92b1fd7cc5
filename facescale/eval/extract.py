"""Embedding extraction for evaluation (flip-summed, optionally split over ranks) and `.bin` verification.

Images are normalized exactly like training: RGB, CHW float32, (x - 127.5) / 127.5. Every rank extracts a
contiguous slice and all-gathers, so all ranks finish with every embedding and none waits idle on rank 0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from facescale.config.eval_bins import eval_set_name
from facescale.eval.binfile import EvalSetError
from facescale.eval.decode import ImageInput, decode_image
from facescale.eval.verification import pixel_baseline, verify_embeddings
from facescale.parallel.partition import class_partition


def progress_bar(total: int, enabled: bool, label: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(update, close) for a progress bar on stderr: tqdm when installed, else a plain count line."""
    if not enabled:
        return (lambda n: None), (lambda: None)
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit="img", file=sys.stderr, leave=False)
        return bar.update, bar.close
    except ImportError:
        done = [0]

        def update(n: int) -> None:
            done[0] += n
            print(f"\r{label}: {done[0]}/{total} images", end="", file=sys.stderr, flush=True)

        return update, lambda: print(file=sys.stderr)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


@torch.no_grad()
def embed_batch(model: nn.Module, pixels: torch.Tensor, device: torch.device, flip: bool,
                separate: bool = False) -> torch.Tensor:
    """Float32 [B, D] embeddings of an NHWC uint8 RGB batch, each summed with its mirror image when `flip`
    ([B, 2D] with `separate`: the image's and its mirror's embeddings side by side, unsummed)."""
    batch = len(pixels)
    x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).to(_model_dtype(model))
    x = x.sub_(127.5).div_(127.5)
    out = model(torch.cat([x, x.flip(3)]) if flip else x)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise TypeError(f"the model must return a [batch, dim] tensor, got {type(out).__name__} "
                        f"{getattr(out, 'shape', '')}")
    if flip and separate:
        return torch.cat([out[:batch], out[batch:]], dim=1).float()
    return (out[:batch] + out[batch:] if flip else out).float()


def _embed_slice(model: nn.Module, images: Sequence[ImageInput], batch_size: int, device: torch.device,
                 flip: bool, image_size: int | None, source: str, first_index: int,
                 progress: bool, separate: bool = False) -> torch.Tensor:
    update, close = progress_bar(len(images), progress, f"embedding {os.path.basename(source)}")
    chunks = []
    try:
        for start in range(0, len(images), batch_size):
            batch = [decode_image(images[i], image_size, source, first_index + i)
                     for i in range(start, min(start + batch_size, len(images)))]
            if len({b.shape for b in batch}) > 1:
                raise ValueError(f"{source}: images {first_index + start}.. have different sizes")
            chunks.append(embed_batch(model, torch.from_numpy(np.stack(batch)), device, flip, separate))
            update(len(batch))
    finally:
        close()
    return torch.cat(chunks) if chunks else torch.zeros(0, 0, device=device)


class ExtractionFailed(RuntimeError):
    """Raised on the ranks that extracted fine when another rank's extraction failed (that rank raises its own
    error), so that no rank waits in a collective the failed one never joins."""


@dataclass
class RankRows:
    """The rows this rank embedded, with every rank's row count and the width, agreed by all ranks."""

    local: torch.Tensor  # [counts[rank], dim] (a [0, 0] tensor when this rank had nothing to embed)
    counts: list[int]
    dim: int
    comm_device: torch.device  # where this group's collectives take tensors (the GPU under NCCL)


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def agree_rows(local: torch.Tensor | None, world_size: int, device: torch.device) -> RankRows:
    """Every rank's row count and the row width (one collective). `local=None` means this rank failed: every
    rank then raises instead of waiting in a later collective."""
    on = _comm_device(device)
    if world_size == 1:
        if local is None:
            raise ExtractionFailed("embedding extraction failed")
        return RankRows(local, [local.shape[0]], local.shape[1], on)
    shape = (0, 0, 1) if local is None else (local.shape[0], local.shape[1], 0)
    meta = torch.tensor(shape, dtype=torch.int64, device=on)
    metas = [torch.zeros_like(meta) for _ in range(world_size)]
    dist.all_gather(metas, meta)
    failed = [r for r, m in enumerate(metas) if int(m[2])]
    if failed or local is None:
        raise ExtractionFailed(f"embedding extraction failed on rank(s) {failed}; see that rank's error")
    return RankRows(local, [int(m[0]) for m in metas], max(int(m[1]) for m in metas), on)


def all_gather_rows(rows: RankRows, world_size: int) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (padded to equal length for the gather)."""
    if world_size == 1:
        return rows.local
    padded = torch.zeros(max(rows.counts), rows.dim, dtype=torch.float32, device=rows.comm_device)
    if rows.local.shape[0]:
        padded[: rows.local.shape[0]] = rows.local.to(rows.comm_device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, rows.counts, strict=True)])


def announce_failure(world_size: int, device: torch.device) -> None:
    """Join `agree_rows` as a failed rank, so that the others raise instead of waiting."""
    if world_size > 1:
        try:
            agree_rows(None, world_size, device)
        except ExtractionFailed:
            pass


def rows_on_ranks(embed_local: Callable[[], torch.Tensor], world_size: int,
                  device: torch.device) -> RankRows:
    """Run this rank's `embed_local()` and agree on every rank's row count; a failure on any rank raises on
    every rank."""
    try:
        local = embed_local()
    except Exception:
        announce_failure(world_size, device)  # before raising, so no other rank hangs in the agreement
        raise
    return agree_rows(local, world_size, device)


def gather_extraction(embed_local: Callable[[], torch.Tensor], world_size: int,
                      device: torch.device) -> np.ndarray:
    """Run this rank's `embed_local()` and all-gather the rows; a failure on any rank raises on every rank."""
    return all_gather_rows(rows_on_ranks(embed_local, world_size, device), world_size).cpu().numpy()


def extract_embeddings(model: nn.Module, images: Sequence[ImageInput] | np.ndarray, batch_size: int,
                       device: torch.device | str, flip: bool = True, rank: int = 0, world_size: int = 1,
                       progress: bool = True, image_size: int | None = 112,
                       source: str = "<images>", separate: bool = False) -> np.ndarray:
    """Embeddings [N, D] float32 of encoded or HWC uint8 images, each summed with its horizontal flip
    ([N, 2D] with `separate`: each image's and its mirror's embeddings side by side).

    With world_size > 1 (process group initialized) rank r embeds its contiguous slice and all ranks receive
    all N rows; an error on one rank is raised on every rank. Ranks may run different batch counts, so pass
    a module whose forward needs no collectives (not a ZeRO-3 partitioned one). The model runs in eval mode
    under no_grad; its train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        raise ValueError(f"{source}: no images to embed")
    if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size):
        raise RuntimeError(f"world_size={world_size} needs an initialized process group of that size")
    device = torch.device(device)
    start, count = class_partition(len(images), world_size, rank)
    was_training = model.training
    model.eval()
    try:
        return gather_extraction(
            lambda: _embed_slice(model, images[start:start + count], batch_size, device, flip, image_size,
                                 source, start, progress and rank == 0, separate),
            world_size, device)
    finally:
        model.train(was_training)


_PIXEL_BASELINE_CACHE: dict[tuple[str, int, int], Any] = {}


def _cached_pixel_baseline(bin_path: str, images: Sequence[bytes], issame: Sequence[bool],
                           image_size: int | None) -> Any:
    stat = os.stat(bin_path)
    key = (os.path.abspath(bin_path), stat.st_mtime_ns, stat.st_size)
    if key not in _PIXEL_BASELINE_CACHE:
        _PIXEL_BASELINE_CACHE[key] = pixel_baseline(images, issame, image_size, source=bin_path)
    return _PIXEL_BASELINE_CACHE[key]


FOLDS = 10  # the verification protocol's folds: a set needs at least one pair per fold


def load_bin_checked(bin_path: str) -> tuple[list[bytes], list[bool]]:
    """Read an insightface `.bin`; any malformation becomes a ValueError naming the file."""
    from facescale.eval.binfile import read_bin

    try:
        images, issame = read_bin(bin_path)
    except EvalSetError:
        raise  # read_bin's messages already name the file
    except Exception as error:  # noqa: BLE001 - anything else is reported with the file name
        raise EvalSetError(f"{bin_path}: not a readable insightface .bin ({error})") from error
    if len(images) != 2 * len(issame) or not issame:
        raise EvalSetError(f"{bin_path}: {len(images)} images for {len(issame)} pairs; a .bin holds exactly "
                         "2 images per pair and at least one pair")
    if len(issame) < FOLDS:
        raise EvalSetError(f"{len(issame)} pairs, but the {FOLDS}-fold protocol needs at least {FOLDS}",
                           where=bin_path, fix="use a set with more pairs (LFW has 6000)")
    return list(images), [bool(s) for s in issame]


def flip_sum(parts: np.ndarray, flip: bool) -> tuple[np.ndarray, float]:
    """(float64 embeddings, XNorm) as insightface's verification forms them: an image's and its mirror's
    float32 embeddings (side by side in `parts` when `flip`) summed in float64; XNorm = the mean norm of
    every single embedding, image and mirror counted apart (about half the summed embedding's norm)."""
    if not flip:
        embeddings = parts.astype(np.float64)
        return embeddings, float(np.linalg.norm(embeddings, axis=1).mean())
    half = parts.shape[1] // 2
    image, mirror = parts[:, :half].astype(np.float64), parts[:, half:].astype(np.float64)
    norms = np.concatenate([np.linalg.norm(image, axis=1), np.linalg.norm(mirror, axis=1)])
    return image + mirror, float(norms.mean())


def evaluate_bin(model: nn.Module, bin_path: str, batch_size: int, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, image_size: int | None = 112, flip: bool = True,
                 progress: bool = True, pixel_reference: bool = True,
                 roc_image: bool = False) -> dict[str, Any]:
    """Verification accuracy of `model` on one `.bin` (10-fold), with TAR@FAR and the raw-pixel baseline.

    Every rank returns the same dict; the pixel baseline is computed once per file and process. With
    `roc_image`, `report["roc_image"]` is the ROC curve (genuine vs impostor cosines) as HWC uint8 RGB.
    """
    try:
        images, issame = load_bin_checked(bin_path)
    except EvalSetError:
        announce_failure(world_size, torch.device(device))  # the other ranks are already in the extraction
        raise
    parts = extract_embeddings(model, images, batch_size, device, flip=flip, rank=rank,
                               world_size=world_size, progress=progress, image_size=image_size,
                               source=bin_path, separate=flip)
    embeddings, xnorm = flip_sum(parts, flip)
    result = verify_embeddings(embeddings, issame)
    report: dict[str, Any] = {
        "name": eval_set_name(bin_path),
        "num_pairs": result.num_pairs,
        "accuracy": result.accuracy_mean,
        "accuracy_std": result.accuracy_std,
        "threshold": result.best_threshold,
        "cosine_threshold": result.best_cosine_threshold,
        "embedding_norm": float(np.linalg.norm(embeddings, axis=1).mean()),
        "xnorm": xnorm,
    }
    for far, tar in result.tar_at_far.items():
        report[f"tar_at_far_{far:.0e}"] = tar
    if pixel_reference:
        baseline = _cached_pixel_baseline(bin_path, images, issame, image_size)
        report["pixel_accuracy"] = baseline.accuracy_mean
        report["pixel_accuracy_std"] = baseline.accuracy_std
    same = np.asarray(issame, dtype=bool)
    if same.all() or not same.any():
        kind = "same" if same.all() else "different"
        report["roc_skipped"] = f"all {same.size} pairs are {kind}-identity pairs: accuracy only, no ROC"
    elif roc_image:
        from facescale.eval.roc import roc_figure
        from facescale.eval.verification import pair_distances

        cosines = 1.0 - pair_distances(embeddings) / 2.0
        report["roc_image"] = roc_figure({"model": (cosines[same], cosines[~same])},
                                         title=f"ROC {report['name']}")
    return report
