"""`--onnx FILE` as the model of `eval verify|ijb` and `embed`: a model zoo or exported ONNX graph, by
onnxruntime, giving the embeddings of the network it was exported from (either input convention)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facescale.cli import main
from facescale.config.schema import ModelConfig
from facescale.eval.binfile import write_bin
from facescale.models.registry import build_backbone

pytest.importorskip("onnxruntime")

SIZE = 112


def _faces(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    coarse = rng.integers(0, 256, (count, SIZE // 8, SIZE // 8, 3)).astype(np.uint8)
    return [np.asarray(Image.fromarray(c).resize((SIZE, SIZE), Image.BICUBIC)) for c in coarse]


class RawPixels(nn.Module):
    """A backbone with its normalisation inside, as converted MXNet models in insightface's zoo have it: they
    multiply by 1/128 (`zoo`); else training's division by 127.5, so its embeddings are the backbone's."""

    def __init__(self, backbone: nn.Module, zoo: bool = False) -> None:
        super().__init__()
        self.backbone, self.zoo = backbone, zoo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - 127.5) * 0.0078125 if self.zoo else (x - 127.5) / 127.5)


class LayerNormFirst(nn.Module):
    """Conv then a LayerNorm that opset 11 spells out with Sub and Div: not an input normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 8, stride=8), nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).mean(dim=(2, 3)))


def _export(model: nn.Module, path, batch: int | None, opset: int = 17) -> None:
    axes = None if batch else {"data": {0: "batch"}, "embedding": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(batch or 2, 3, SIZE, SIZE),), str(path), dynamo=False,
                          input_names=["data"], output_names=["embedding"], opset_version=opset,
                          dynamic_axes=axes)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """backbone.pth, its ONNX export (training-normalised input, dynamic batch), its raw-pixel ONNX twin
    exported for batch 1 only, a folder of faces and a 10-pair .bin of them."""
    root = tmp_path_factory.mktemp("onnx_model")
    torch.manual_seed(1)
    model = build_backbone(ModelConfig(name="demo", embedding_size=16)).eval()
    torch.save(model.state_dict(), root / "backbone.pth")
    _export(model, root / "normalised.onnx", batch=None)
    _export(RawPixels(model), root / "raw.onnx", batch=1)
    faces = _faces(20)
    (root / "faces").mkdir()
    for index, face in enumerate(faces):
        Image.fromarray(face).save(root / "faces" / f"{index:02d}.png")
    encoded = [(root / "faces" / f"{index:02d}.png").read_bytes() for index in range(20)]
    write_bin(root / "pairs.bin", encoded, [True, False] * 5)
    return root


@pytest.mark.parametrize("graph", ["normalised.onnx", "raw.onnx"])
def test_embed_with_an_onnx_model_equals_the_torch_weights(files, graph):
    common = [str(files / "faces"), "--workers", "0", "--batch-size", "3"]
    assert main(["embed", "--weights", str(files / "backbone.pth"), "--model", "demo",
                 "--out", str(files / "torch"), *common]) == 0
    assert main(["embed", "--onnx", str(files / graph), "--out", str(files / graph), *common]) == 0
    np.testing.assert_allclose(np.load(files / f"{graph}.npy"), np.load(files / "torch.npy"), atol=2e-4)


def test_eval_verify_with_an_onnx_model_scores_as_the_weights(files, capsys):
    bins = ["--bin", str(files / "pairs.bin"), "--out", str(files / "eval")]
    assert main(["eval", "verify", "--weights", str(files / "backbone.pth"), "--model", "demo", *bins]) == 0
    by_weights = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "verify", "--onnx", str(files / "raw.onnx"), *bins]) == 0
    by_onnx = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert by_onnx["accuracy"] == by_weights["accuracy"]
    assert by_onnx["embedding_norm"] == pytest.approx(by_weights["embedding_norm"], rel=1e-4)


def test_input_convention_is_read_from_the_graph(files, tmp_path):
    from facescale.eval.onnx_model import OnnxBackbone

    assert OnnxBackbone(files / "raw.onnx").raw_pixels
    _export(RawPixels(build_backbone(ModelConfig(name="demo", embedding_size=8)), zoo=True),
            tmp_path / "zoo.onnx", batch=None)
    assert OnnxBackbone(tmp_path / "zoo.onnx").raw_pixels
    assert not OnnxBackbone(files / "normalised.onnx").raw_pixels
    _export(LayerNormFirst(), tmp_path / "layernorm.onnx", batch=None, opset=11)
    assert not OnnxBackbone(tmp_path / "layernorm.onnx").raw_pixels


@pytest.mark.parametrize("op", ["Identity", "Cast"])
def test_an_mxnet_style_graph_with_a_node_before_its_normalisation_gets_raw_pixels(files, tmp_path, op):
    """insightface's MXNet symbols start `data = mx.sym.identity(data, name='id'); data = data - 127.5;
    data = data * 0.0078125`, which MXNet's ONNX exporter writes as Identity -> Sub -> Mul (a Cast in the
    fp16 ones): the graph normalises itself, so it must get raw pixels, not normalised ones twice."""
    import onnx
    from onnx import TensorProto, helper

    from facescale.eval.onnx_model import OnnxBackbone

    model = onnx.load(str(files / "raw.onnx"))
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["id_out" if name == "data" else name for name in node.input]
    extra = {"to": TensorProto.FLOAT} if op == "Cast" else {}
    graph.node.insert(0, helper.make_node(op, ["data"], ["id_out"], name="id", **extra))
    onnx.save(model, str(tmp_path / "mxnet.onnx"))
    assert OnnxBackbone(tmp_path / "mxnet.onnx").raw_pixels
    common = [str(files / "faces"), "--workers", "0", "--batch-size", "3"]
    assert main(["embed", "--weights", str(files / "backbone.pth"), "--model", "demo",
                 "--out", str(tmp_path / "torch"), *common]) == 0
    assert main(["embed", "--onnx", str(tmp_path / "mxnet.onnx"), "--out", str(tmp_path / "mx"),
                 *common]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "mx.npy"), np.load(tmp_path / "torch.npy"), atol=2e-4)


def test_bad_onnx_sources_are_one_line(files, tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    faces = [str(files / "faces"), "--out", str(tmp_path / "o")]
    for argv, expected in [
        (["--onnx", str(tmp_path / "junk.onnx")], "junk.onnx: not a loadable ONNX model ("),
        (["--onnx", str(tmp_path / "absent.onnx")], "absent.onnx: does not exist; check the path"),
        (["--onnx", str(files / "raw.onnx"), "--model", "r50"],
         "--model and --embedding-size go with --weights"),
    ]:
        assert main(["embed", *argv, *faces]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # export onnx takes no ONNX model
        main(["export", "onnx", "--onnx", str(files / "raw.onnx"), "--out", str(tmp_path / "x.onnx")])


def _external_data_model(folder, location: str) -> Path:
    """A 4x4-input linear model in `folder` whose weight lives in the external data file `location`."""
    import onnx
    from onnx import TensorProto, helper

    weight = onnx.numpy_helper.from_array(np.ones((48, 2), np.float32), "W")  # raw bytes: can go external
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    if location != "w.bin":  # point the weight elsewhere (where the test puts a copy of its bytes)
        stored = onnx.load(str(folder / "m.onnx"), load_external_data=False)
        next(e for e in stored.graph.initializer[0].external_data if e.key == "location").value = location
        (folder / "m.onnx").write_bytes(stored.SerializeToString())
    return folder / "m.onnx"


@pytest.mark.parametrize("where", ["traversal", "absolute", "symlink"])
def test_external_data_outside_the_models_folder_is_refused_before_loading(tmp_path, where):
    from facescale.eval.onnx_model import OnnxBackbone, OnnxModelError

    inside = _external_data_model(tmp_path / "model", "w.bin")
    assert OnnxBackbone(inside).image_size == 4  # the weight beside the model loads
    outside = tmp_path / "outside.bin"
    outside.write_bytes((tmp_path / "model" / "w.bin").read_bytes())
    location = {"traversal": "../outside.bin", "absolute": str(outside), "symlink": "link.bin"}[where]
    if where == "symlink":
        (tmp_path / "model" / "link.bin").symlink_to(outside)
    path = _external_data_model(tmp_path / "model", location)
    with pytest.raises(OnnxModelError) as error:
        OnnxBackbone(path)
    assert (f"m.onnx: tensor 'W' keeps its data in {location!r} ({outside.resolve()}), outside the model's "
            f"folder {(tmp_path / 'model').resolve()}") in error.value.line()
