"""Export a backbone to ONNX with a dynamic batch axis, verified against torch before the file appears.

The graph is written to a temp file next to `out_path`, checked with `onnx.checker`, run with onnxruntime on
sample images (two batch sizes, to prove the batch axis is dynamic) and renamed into place only if the outputs
match torch within `tolerance`. Input `data` is NCHW float32 normalized like training; output `embedding`.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"


def _sample_batch(check_images: Sequence[Any] | np.ndarray | None, image_size: int) -> np.ndarray:
    """NCHW float32 normalized inputs from given images (encoded or HWC uint8) or seeded random pixels."""
    if check_images is None:
        pixels = np.random.default_rng(0).integers(0, 256, (4, image_size, image_size, 3), dtype=np.uint8)
    else:
        from facescale.eval.decode import decode_image

        pixels = np.stack([decode_image(image, image_size, "check_images", index)
                           for index, image in enumerate(check_images)])
    if len(pixels) == 0:
        raise ValueError("check_images is empty; pass at least one image or None for random ones")
    return ((pixels.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()


def _export_graph(model: nn.Module, path: str, image_size: int, opset: int) -> None:
    dummy = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter needs no onnxscript
        torch.onnx.export(model, (dummy,), path, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def _check_graph(path: str) -> None:
    import onnx

    onnx.checker.check_model(path)
    graph = onnx.load(path, load_external_data=False).graph
    if len(graph.output) != 1:
        raise ValueError(f"exported graph has {len(graph.output)} outputs; a face backbone must have one")
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise ValueError("exported graph has a fixed batch size; the batch axis must be dynamic")


def _max_abs_diff(model: nn.Module, path: str, inputs: np.ndarray) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (inputs[:1], inputs):  # two batch sizes exercise the dynamic axis
        (onnx_out,) = session.run(None, {INPUT_NAME: batch})
        with torch.no_grad():
            torch_out = model(torch.from_numpy(batch)).numpy()
        if onnx_out.shape != torch_out.shape:
            raise ValueError(f"ONNX output shape {onnx_out.shape} differs from torch {torch_out.shape}")
        worst = max(worst, float(np.max(np.abs(onnx_out - torch_out))))
    return worst


def export_onnx(model: nn.Module, out_path: str, image_size: int = 112,
                check_images: Sequence[Any] | np.ndarray | None = None, tolerance: float = 1e-3,
                opset: int = 17) -> dict[str, Any]:
    """Write `model` (a CPU fp32 copy in eval mode) to `out_path` as ONNX; return {"path", "max_abs_diff"}.

    Raises (and leaves no file behind) when the checker rejects the graph or onnxruntime's output differs
    from torch's by more than `tolerance` on the check images.
    """
    export_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    inputs = _sample_batch(check_images, image_size)
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    # a sibling name of this process, created as any new file is (mkstemp's stays 0600 after the rename)
    temp_path = os.path.join(directory, f".{os.path.basename(out_path)}.export{os.getpid()}.onnx")
    try:
        _export_graph(export_model, temp_path, image_size, opset)
        try:
            _check_graph(temp_path)
        except Exception as error:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"ONNX export of {type(model).__name__} failed validation: {error}") from error
        diff = _max_abs_diff(export_model, temp_path, inputs)
        if not diff <= tolerance:
            raise ValueError(f"ONNX output differs from torch by {diff:.3g} (tolerance {tolerance:g}); "
                             f"refusing to write {out_path}. Data-dependent Python control flow in forward() "
                             "is the usual cause")
        os.replace(temp_path, out_path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)
    return {"path": out_path, "max_abs_diff": diff}
