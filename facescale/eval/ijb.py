"""IJB-B/C 1:1 template verification on the official release: read, align, extract, score, report.

See facescale.eval.ijb_release for the layout, facescale.eval.ijb_protocol for the F1/N1/D1 protocol.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from facescale.eval.ijb_extract import extract_ijb_embeddings
from facescale.eval.ijb_protocol import IJBMode, format_table, pair_scores, tar_table, tar_table_at_most
from facescale.eval.ijb_release import check_images_exist, read_ijb_release

PUBLISHED_MODE = IJBMode()  # F1 N1 D1, as in the published arcface_torch tables
AT_MOST = "tar_at_far_at_most_"  # report keys of the TARs at an empirical FAR <= each target


def evaluate_ijb(model: nn.Module, root: str, name: str | None = None, mode: IJBMode = PUBLISHED_MODE,
                 batch_size: int = 128, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1, image_size: int = 112, workers: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """TAR@FAR 1e-6..1e-1 of `model` on the release under `root` as eval_ijbc.py reads it (`tar_at_far_*`)
    and at an empirical FAR <= each target (`tar_at_far_at_most_*`, None if unmeasurable), with counts, the
    test mode, and the per-pair `scores` / `labels` arrays. Every rank returns the same report."""
    release = read_ijb_release(root, name)
    check_images_exist(release)
    embeddings = extract_ijb_embeddings(model, release, image_size, batch_size, device, flip=mode.flip,
                                        rank=rank, world_size=world_size, workers=workers, progress=progress)
    scores = pair_scores(embeddings, release.detector_scores, release.template_ids, release.media_ids,
                         release.pair_templates, mode)
    labels = release.pair_labels
    report: dict[str, Any] = {
        "name": release.name, "mode": mode.label, "num_images": len(release.image_names),
        "num_templates": int(np.unique(release.template_ids).size),
        "num_genuine": int((labels == 1).sum()), "num_impostor": int((labels == 0).sum()),
    }
    for far, tar in tar_table(scores, labels).items():
        report[f"tar_at_far_{far:.0e}"] = tar
    for far, tar in tar_table_at_most(scores, labels).items():
        report[f"{AT_MOST}{far:.0e}"] = tar
    report["scores"], report["labels"] = scores, labels
    return report


def table_text(report: dict[str, Any]) -> str:
    """The report as the human-readable TAR@FAR table, titled with the set, test mode and counts."""
    table = {float(key.removeprefix("tar_at_far_")): value for key, value in report.items()
             if key.startswith("tar_at_far_") and not key.startswith(AT_MOST)}
    at_most = {float(key.removeprefix(AT_MOST)): value for key, value in report.items()
               if key.startswith(AT_MOST)}
    mode = IJBMode(*(part.endswith("1") for part in report["mode"].split()))
    title = (f"{report['name'].upper()} 1:1 verification, {mode.describe()}\n"
             f"{report['num_images']} faces, {report['num_templates']} templates, "
             f"{report['num_genuine']} genuine / {report['num_impostor']} impostor pairs")
    return format_table(title, table, at_most)


def write_outputs(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """`<name>_<mode>_scores.npy` (per-pair cosines in pair-file order), `..._roc.png`, `..._result.json`."""
    from PIL import Image

    from facescale.eval.roc import roc_figure

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{report['name']}_{report['mode'].replace(' ', '')}")
    paths = {"scores": f"{stem}_scores.npy", "roc_image": f"{stem}_roc.png", "result": f"{stem}_result.json"}
    scores, labels = report["scores"], report["labels"]
    np.save(paths["scores"], scores)
    curve = {report["mode"]: (scores[labels == 1], scores[labels == 0])}
    Image.fromarray(roc_figure(curve, title=f"ROC {report['name'].upper()}")).save(paths["roc_image"])
    summary = {k: v for k, v in report.items() if k not in ("scores", "labels")}
    with open(paths["result"], "w", encoding="utf-8") as handle:
        json.dump({**summary, **paths}, handle, indent=2)
    return paths
