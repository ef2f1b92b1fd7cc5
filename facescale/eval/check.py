"""Start-up check of the verification sets a run names: open each `.bin` before training, not after it."""

from __future__ import annotations

from collections.abc import Sequence

from facescale.eval.binfile import EvalSetError
from facescale.eval.decode import decode_image
from facescale.eval.extract import load_bin_checked


def check_eval_bins(paths: Sequence[str], image_size: int, key: str = "eval.bins") -> None:
    """Read every `.bin` and decode its first and last image at `image_size`; EvalSetError names the file.

    A set with only same or only different pairs is accepted: it gets an accuracy but no ROC or TAR@FAR.
    """
    for i, path in enumerate(paths):
        try:
            images, _ = load_bin_checked(path)
            for index in sorted({0, len(images) - 1}):
                decode_image(images[index], image_size, path, index)
        except EvalSetError as exc:
            where = f"{key}[{i}] = {exc.where}" if exc.where else f"{key}[{i}]"
            raise EvalSetError(exc.what, where=where, fix=exc.fix) from None
