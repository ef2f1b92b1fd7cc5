"""ONNX export: parity with torch on a small conv net, dynamic batch axis, refusal leaves no file."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from torch import nn

from facescale.eval.onnx_export import export_onnx

onnx = pytest.importorskip("onnx", reason="the [onnx] extra is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")


class TinyEmbedder(nn.Module):
    """Conv + BN + PReLU + linear head, the same layer kinds as a face backbone, at 16x16."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.PReLU(6))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, dim), nn.BatchNorm1d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CallCounting(TinyEmbedder):
    """Adds a Python-side call counter: tracing freezes it, so ONNX and later torch calls disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x) + float(self.calls)


def _trained_like(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial BN running statistics
            model(torch.randn(8, 3, 16, 16))
    return model


def test_export_matches_torch_and_has_dynamic_batch(tmp_path) -> None:
    model = _trained_like(TinyEmbedder())
    out = tmp_path / "sub" / "model.onnx"
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    report = export_onnx(model, str(out), image_size=16, check_images=images)
    assert report["path"] == str(out) and report["max_abs_diff"] < 1e-4
    assert model.training  # the caller's model is untouched (export works on a copy)
    graph = onnx.load(str(out)).graph
    assert len(graph.output) == 1 and graph.input[0].type.tensor_type.shape.dim[0].dim_param
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 16, 16)
    (onnx_out,) = session.run(None, {"data": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(onnx_out, expected, atol=1e-4)
    assert sorted(os.listdir(out.parent)) == ["model.onnx"]  # no temp file left
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # the mode any new file gets under this umask: others may read the model too
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_mismatch_refuses_to_write(tmp_path) -> None:
    out = tmp_path / "bad.onnx"
    with pytest.raises(ValueError, match="refusing to write"):
        export_onnx(_trained_like(CallCounting()), str(out), image_size=16)
    assert os.listdir(tmp_path) == []


def test_wrong_check_image_size_is_named(tmp_path) -> None:
    images = np.zeros((2, 20, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="20x20, expected 16x16"):
        export_onnx(TinyEmbedder(), str(tmp_path / "m.onnx"), image_size=16, check_images=images)
    assert os.listdir(tmp_path) == []
