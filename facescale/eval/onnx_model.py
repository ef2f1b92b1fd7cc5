"""An ONNX face model (`facescale export onnx`, arcface_torch's torch2onnx.py, insightface's model zoo) as a
backbone for `eval verify|ijb` and `embed`, run by onnxruntime.

Input conventions, as insightface's model zoo has them: NCHW float RGB; a graph that subtracts from its input
and then multiplies or divides (the normalisation built in, e.g. converted MXNet models) takes raw 0-255
pixels, any other graph pixels normalised as in training, (x - 127.5) / 127.5. The file is parsed as
protobuf by onnxruntime: it runs no Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facescale.errors import InputError


class OnnxModelError(InputError, ValueError):
    """An ONNX file that cannot serve as a face backbone."""

    default_fix = "give an ONNX face model with one NCHW image input and one [batch, dim] output"


_PASS_THROUGH = ("Identity", "Cast")  # MXNet's exporter puts `id` (Identity) between `data` and its `- 127.5`


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds: initializers (sparse ones too) and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            yield from (attribute.t, *attribute.tensors)
            for subgraph in (attribute.g, *attribute.graphs):
                yield from _tensors(subgraph)


def _check_external_data(path: Path, graph: Any) -> None:
    """Refuse a tensor whose external data file resolves (symlinks too) outside the model's folder: older
    onnxruntime versions open such paths (`../../etc/passwd`, absolute ones) as they are."""
    folder = path.resolve().parent
    for tensor in _tensors(graph):
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
        target = None if location is None else (folder / location).resolve()
        if target is not None and not target.is_relative_to(folder):
            raise OnnxModelError(f"tensor {tensor.name!r} keeps its data in {location!r} ({target}), outside "
                                 f"the model's folder {folder}", where=path,
                                 fix="keep the model's external data files in its folder, as onnx.save does")


def _normalises_inside(graph: Any, image: str) -> bool:
    """Whether the graph's `image` input goes (through Identity / Cast nodes only) into a Sub whose result is
    scaled (Mul or Div): its own normalisation. (Any Sub and Mul among the first nodes would also match a
    ViT's decomposed LayerNorm.)"""
    inputs = {image}
    for node in graph.node:  # ONNX lists nodes in topological order
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in inputs:
            inputs.update(node.output)
    subtracted = {out for node in graph.node if node.op_type == "Sub" and inputs & set(node.input)
                  for out in node.output}
    return any(node.op_type in ("Mul", "Div") and subtracted & set(node.input) for node in graph.node)


class OnnxBackbone(nn.Module):
    """Embeddings from an ONNX graph: takes training-normalised NCHW float32, returns [batch, dim] float32."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError as error:
            raise OnnxModelError("onnxruntime is not installed", where=path,
                                 fix="pip install -e '.[onnx]' (or onnxruntime)") from error
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError("does not exist", where=path, fix="check the path")
        try:
            import onnx

            graph = onnx.load(str(self.path), load_external_data=False).graph
            _check_external_data(self.path, graph)  # before onnxruntime opens any of those files
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")  # CUDA: onnxruntime-gpu
                         if p in onnxruntime.get_available_providers()]
            self.session = onnxruntime.InferenceSession(str(self.path), providers=providers)
            self.raw_pixels = _normalises_inside(graph, self.session.get_inputs()[0].name)
        except OnnxModelError:
            raise
        except Exception as error:  # noqa: BLE001 - onnxruntime and onnx raise assorted types on bad files
            reason = " ".join(str(error).split())[:300]
            raise OnnxModelError(f"not a loadable ONNX model ({reason})", where=path) from error
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) != 4 or shape[1] != 3 or len(outputs) != 1:
            found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise OnnxModelError(f"inputs {found} and {len(outputs)} output(s); expected one NCHW image "
                                 "input [batch, 3, H, W] and one embedding output", where=path)
        self.input_name = inputs[0].name
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        height, width = shape[2], shape[3]
        fixed = [side for side in (height, width) if isinstance(side, int)]
        if len(set(fixed)) > 1:
            raise OnnxModelError(f"takes {height}x{width} images; facescale evaluates square crops",
                                 where=path)
        self.image_size = fixed[0] if fixed else 112  # a free size: arcface_torch's 112x112 crops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.detach().float().cpu().numpy()
        if self.raw_pixels:
            pixels = pixels * np.float32(127.5) + np.float32(127.5)
        step = self.fixed_batch or len(pixels)  # a graph exported for one batch size gets chunks of it
        chunks = []
        for start in range(0, len(pixels), step):
            chunk = pixels[start:start + step]
            padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(padded)})
            chunks.append(np.asarray(out, dtype=np.float32)[:len(chunk)])
        out = np.concatenate(chunks)
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise OnnxModelError(f"returned {out.shape} for a batch of {x.shape[0]}; expected [batch, dim]",
                                 where=self.path)
        return torch.from_numpy(out).to(x.device)
