"""Backbone registry and backbones: shapes, parameter counts, norm="group" batch independence, bf16, ONNX."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from facescale.config.schema import ModelConfig
from facescale.models import UnknownBackboneError, build_backbone, list_backbones, register_backbone
from facescale.models import registry as registry_module
from facescale.models.iresnet import IResNet
from facescale.models.vit import FaceViT
from tests.arcface_torch_keys import ARCFACE_TORCH_KEYS

ALL_NAMES = ["demo", "demo_wide", "mbf", "mbf_large", "r18", "r34", "r50", "r100", "r200",
             "vit_t", "vit_s", "vit_b", "vit_l"]
# cheap enough for a real CPU forward/backward at batch 2
REAL_CPU_NAMES = ["demo", "demo_wide", "mbf", "r18", "vit_t"]


def on_meta(name: str, **cfg_fields: object) -> torch.nn.Module:
    """Build a backbone without allocating weights."""
    with torch.device("meta"):
        return build_backbone(ModelConfig(name=name, **cfg_fields))


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The suite shares 2 cores with other processes: oversubscribed OpenMP makes these tests 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------- registry


def test_every_expected_backbone_is_registered() -> None:
    assert sorted(ALL_NAMES) == list_backbones()


def test_unknown_name_lists_known_backbones_and_suggests_the_closest() -> None:
    with pytest.raises(UnknownBackboneError) as error:
        build_backbone(ModelConfig(name="r05"))
    message = str(error.value)
    assert "model.name" in message and "'r05'" in message
    assert "Did you mean 'r50'" in message
    assert all(name in message for name in ALL_NAMES)


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ValueError, match="Known backbones") as error:
        build_backbone(ModelConfig(name="zzzzzzzz"))
    assert "Did you mean" not in str(error.value)


@pytest.mark.parametrize(("field", "value", "key"), [
    ("norm", "layer", "model.norm"),
    ("embedding_size", 0, "model.embedding_size"),
    ("dropout", 1.0, "model.dropout"),
])
def test_bad_model_config_values_name_their_key(field: str, value: object, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        build_backbone(ModelConfig(name="demo", **{field: value}))


def test_unsupported_override_is_rejected() -> None:
    with pytest.raises(TypeError, match="drop_path_rate"):
        build_backbone(ModelConfig(name="demo"), drop_path_rate=0.0)


def test_register_backbone_adds_a_name_and_refuses_a_second_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_backbone("tiny_test_net")
    def tiny(cfg: ModelConfig) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(cfg.embedding_size))

    assert "tiny_test_net" in list_backbones()
    assert build_backbone(ModelConfig(name="tiny_test_net", embedding_size=8))(images(2)).shape == (2, 8)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("r50")(tiny)


# ------------------------------------------------------------------------------------ shapes and counts


@pytest.mark.parametrize("name", ALL_NAMES)
def test_meta_forward_gives_batch_by_embedding(name: str) -> None:
    model = on_meta(name, embedding_size=128)
    assert model(torch.empty(3, 3, 112, 112, device="meta")).shape == (3, 128)


@pytest.mark.parametrize("name", REAL_CPU_NAMES)
def test_cpu_forward_backward_train_and_eval(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name=name, embedding_size=64))
    out = model(images(2))
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    out.square().mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    model.eval()
    with torch.no_grad():
        assert model(images(1)).shape == (1, 64)


def iresnet_param_count(blocks: tuple[int, ...], embedding: int = 512) -> int:
    """Closed-form count: stem, IBasicBlocks (BN, conv, BN, PReLU, conv, BN, 1x1+BN projection), head."""
    total = 3 * 9 * 64 + 2 * 64 + 64
    in_channels = 64
    for channels, count in zip((64, 128, 256, 512), blocks, strict=True):
        for index in range(count):
            c_in = in_channels if index == 0 else channels
            total += 2 * c_in + 9 * c_in * channels + 2 * channels + channels + 9 * channels**2 + 2 * channels
            if index == 0:
                total += c_in * channels + 2 * channels
        in_channels = channels
    return total + 2 * 512 + 512 * 49 * embedding + embedding + 2 * embedding


@pytest.mark.parametrize(("name", "blocks"), [
    ("r18", (2, 2, 2, 2)), ("r34", (3, 4, 6, 3)), ("r50", (3, 4, 14, 3)),
    ("r100", (3, 13, 30, 3)), ("r200", (6, 26, 60, 6)),
])
def test_iresnet_parameter_count_matches_closed_form(name: str, blocks: tuple[int, ...]) -> None:
    assert param_count(on_meta(name)) == iresnet_param_count(blocks)


@pytest.mark.parametrize(("name", "millions"), [("r50", 43.6), ("r100", 65.2)])
def test_iresnet_parameter_count_matches_insightface(name: str, millions: float) -> None:
    assert param_count(on_meta(name)) / 1e6 == pytest.approx(millions, rel=2e-3)


def vit_param_count(dim: int, depth: int, embedding: int = 512, patches: int = 144) -> int:
    """Closed-form count: patch conv, positions, mask token, pre-LN blocks (qkv no bias), LN, 2-layer head."""
    per_block = 4 * dim + 3 * dim * dim + dim * dim + dim + 8 * dim * dim + 5 * dim
    stem = 3 * 81 * dim + dim + patches * dim + dim
    head = patches * dim * dim + 2 * dim + dim * embedding + 2 * embedding
    return stem + depth * per_block + 2 * dim + head


@pytest.mark.parametrize(("name", "dim", "depth"), [
    ("vit_t", 256, 12), ("vit_s", 512, 12), ("vit_b", 512, 24), ("vit_l", 768, 24),
])
def test_vit_parameter_count_matches_closed_form(name: str, dim: int, depth: int) -> None:
    model = on_meta(name)
    assert param_count(model) == vit_param_count(dim, depth)
    assert model.num_patches == 144 and model.patch_embed.proj.kernel_size == (9, 9)


def test_small_backbones_stay_small() -> None:
    assert 1.0e6 < param_count(on_meta("mbf")) < 2.2e6
    assert param_count(on_meta("demo")) < 3e6
    assert param_count(on_meta("demo_wide")) < 4e6


def test_iresnet_state_dict_uses_arcface_torch_key_names() -> None:
    keys = set(on_meta("r18").state_dict())
    expected = {"conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn1.weight",
                "layer1.0.conv1.weight", "layer1.0.bn2.bias", "layer1.0.prelu.weight",
                "layer1.0.conv2.weight", "layer1.0.bn3.weight",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer4.1.conv2.weight",
                "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean"}
    assert expected <= keys
    assert not any(key.startswith("layer1.1.downsample") for key in keys)


@pytest.mark.parametrize("name", ["r18", "demo"])
def test_embedding_norm_scale_is_frozen_at_one(name: str) -> None:
    model = build_backbone(ModelConfig(name=name))
    assert not model.features.weight.requires_grad and bool((model.features.weight == 1).all())
    assert model.features.bias.requires_grad


# ------------------------------------------------------------------------------------ norm="group"


def small_iresnet(norm: str) -> IResNet:
    return IResNet((1, 1, 1, 1), embedding_size=32, norm=norm)


def deterministic_vit(norm: str) -> FaceViT:
    return FaceViT(64, 2, 4, embedding_size=32, drop_path_rate=0.0, mask_ratio=0.0, norm=norm)


BUILDERS = {
    "iresnet": small_iresnet,
    "vit": deterministic_vit,
    "demo": lambda norm: build_backbone(ModelConfig(name="demo", embedding_size=32, norm=norm)),
    "mbf": lambda norm: build_backbone(ModelConfig(name="mbf", embedding_size=32, norm=norm)),
}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_group_norm_makes_train_mode_embeddings_batch_independent(family: str) -> None:
    torch.manual_seed(0)
    batch = images(4, seed=1)
    grouped = BUILDERS[family]("group").train()
    alone, together = grouped(batch[:1]), grouped(batch)[:1]
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in grouped.modules())

    torch.manual_seed(0)
    batched = BUILDERS[family]("batch").train()
    # with BatchNorm a sample's embedding depends on its batch mates, so the check above can fail
    assert not torch.allclose(batched(batch[:2]), batched(batch)[:2], rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------ ViT training tricks


def test_vit_masking_replaces_the_masked_fraction_with_the_mask_token() -> None:
    torch.manual_seed(0)
    vit = FaceViT(32, 1, 4, embedding_size=16, drop_path_rate=0.0, mask_ratio=0.25).train()
    tokens = vit.forward_tokens(images(3))
    is_mask = (tokens == vit.mask_token).all(dim=-1)
    assert tokens.shape == (3, 144, 32)
    assert is_mask.sum(dim=1).tolist() == [36, 36, 36]
    assert not torch.equal(is_mask[0], is_mask[1])  # each sample draws its own mask
    vit.eval()
    assert not (vit.forward_tokens(images(3)) == vit.mask_token).all(dim=-1).any()


def test_vit_eval_is_deterministic_and_train_is_stochastic() -> None:
    torch.manual_seed(0)
    vit = build_backbone(ModelConfig(name="vit_t", embedding_size=32))
    batch = images(4)
    first, second = vit(batch), vit(batch)
    assert not torch.allclose(first, second)
    vit.eval()
    torch.testing.assert_close(vit(batch), vit(batch))


def test_vit_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = FaceViT(32, 2, 4, embedding_size=16, drop_path_rate=0.0, mask_ratio=0.0).train()
    checkpointed = FaceViT(32, 2, 4, embedding_size=16, drop_path_rate=0.0, mask_ratio=0.0,
                           activation_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    batch = images(3)
    for model in (plain, checkpointed):
        model(batch).square().sum().backward()
    assert not plain.mask_token.requires_grad  # unused at mask_ratio 0: frozen, so DDP/ZeRO never wait for it
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


# ------------------------------------------------------------------------------------ bf16 and ONNX


@pytest.mark.parametrize("name", ["demo", "mbf", "r18", "vit_t"])
def test_bf16_autocast_on_cpu_tracks_fp32(name: str) -> None:
    torch.manual_seed(0)
    overrides = {"mask_ratio": 0.0, "drop_path_rate": 0.0} if name.startswith("vit") else {}
    model = build_backbone(ModelConfig(name=name, embedding_size=64), **overrides).train()
    batch = images(4)
    reference = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(batch)
    low.float().square().mean().backward()
    assert torch.isfinite(low.float()).all()
    assert F.cosine_similarity(low.float(), reference.detach(), dim=1).min() > 0.97
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("name", "norm"), [("demo", "batch"), ("demo", "group"), ("mbf", "batch"),
                                            ("vit_t", "batch")])
def test_onnx_export_matches_pytorch(name: str, norm: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = build_backbone(ModelConfig(name=name, embedding_size=64, norm=norm)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, (images(2),), buffer, dynamo=False, opset_version=17, input_names=["images"],
                      output_names=["embeddings"], dynamic_axes={"images": {0: "batch"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    batch = images(3, seed=5)
    (exported,) = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        expected = model(batch)
    torch.testing.assert_close(torch.from_numpy(exported), expected, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------ demo learns


def test_demo_backbone_learns_to_separate_synthetic_identities() -> None:
    """Eight 'identities' (fixed random templates) under noise and shifts: a cosine softmax must fit them."""
    torch.manual_seed(0)
    identities, per_identity = 8, 8
    templates = F.interpolate(torch.randn(identities, 3, 14, 14), size=112, mode="bilinear")
    labels = torch.arange(identities).repeat_interleave(per_identity)
    shifts = torch.randint(-4, 5, (labels.numel(), 2))
    faces = torch.stack([templates[label].roll(tuple(shift.tolist()), dims=(1, 2))
                         for label, shift in zip(labels, shifts, strict=True)])
    faces = faces + 0.5 * torch.randn_like(faces)

    model = build_backbone(ModelConfig(name="demo", embedding_size=64))
    centers = torch.nn.Parameter(torch.randn(identities, 64) * 0.01)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad] + [centers], lr=0.1,
                                momentum=0.9)

    def loss_and_accuracy() -> tuple[torch.Tensor, float]:
        logits = 16.0 * F.normalize(model(faces)) @ F.normalize(centers).T
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean().item()

    first_loss, _ = loss_and_accuracy()
    for _ in range(25):
        loss, _ = loss_and_accuracy()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final_loss, accuracy = loss_and_accuracy()
    assert final_loss.item() < 0.3 * first_loss.item()
    assert accuracy == 1.0


# ------------------------------------------------------------------------------------ arcface_torch key names


@pytest.mark.parametrize("name", sorted(ARCFACE_TORCH_KEYS))
def test_state_dict_names_and_shapes_are_arcface_torch_ones(name: str) -> None:
    expected = ARCFACE_TORCH_KEYS[name](256)
    got = {k: tuple(v.shape) for k, v in on_meta(name, embedding_size=256).state_dict().items()}
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_vit_drop_path_and_mask_ratio_come_from_the_config() -> None:
    model = on_meta("vit_t", drop_path_rate=0.05, mask_ratio=0.0)
    assert model.mask_ratio == 0.0 and not model.mask_token.requires_grad
    assert model.blocks[-1].drop_path.rate == pytest.approx(0.05) and model.blocks[0].drop_path.rate == 0.0
    with pytest.raises(ValueError, match="model.mask_ratio: backbone 'r50' does not use it"):
        build_backbone(ModelConfig(name="r50", mask_ratio=0.1))
    with pytest.raises(ValueError, match=r"model.drop_path_rate: must be in \[0, 1\)"):
        build_backbone(ModelConfig(name="vit_t", drop_path_rate=1.5))


# ------------------------------------------------------------------------------------ earlier facescale names

LEGACY_MBF_EXAMPLES = {  # facescale's MobileFaceNet names before arcface_torch's -> today's
    "layers.0.0.weight": "layers.0.layers.0.weight",
    "layers.1.2.weight": "layers.1.layers.2.weight",
    "layers.2.layers.1.0.weight": "layers.2.layers.1.layers.0.weight",
    "layers.3.0.layers.2.1.running_var": "layers.3.layers.0.layers.2.layers.1.running_var",
    "conv_sep.2.weight": "conv_sep.layers.2.weight",
    "gdc.0.weight": "features.layers.0.layers.0.weight",
    "gdc.1.bias": "features.layers.0.layers.1.bias",
    "fc.weight": "features.layers.2.weight",
    "features.running_mean": "features.layers.3.running_mean",
}


def _legacy_mbf_name(key: str) -> str:
    """Today's mbf key in the earlier layout (each block's inner Sequential was unnamed)."""
    parts = key.split(".")
    if parts[0] == "features":
        if parts[2] == "0":
            return f"gdc.{parts[4]}.{parts[-1]}"
        return "fc.weight" if parts[2] == "2" else f"features.{parts[-1]}"
    if parts[0] == "conv_sep":
        return f"conv_sep.{parts[2]}.{parts[3]}"
    numbers = [p for p in parts[1:-1] if p != "layers"]
    if len(numbers) == 4:  # residual stage / block / inner conv block / layer
        return f"layers.{numbers[0]}.{numbers[1]}.layers.{numbers[2]}.{numbers[3]}.{parts[-1]}"
    if len(numbers) == 3:  # stand-alone depthwise block / inner conv block / layer
        return f"layers.{numbers[0]}.layers.{numbers[1]}.{numbers[2]}.{parts[-1]}"
    return f"layers.{numbers[0]}.{numbers[1]}.{parts[-1]}"


def test_legacy_facescale_names_are_upgraded() -> None:
    from facescale.models.legacy_names import upgrade_legacy_names

    upgraded, kind = upgrade_legacy_names({k: torch.zeros(1) for k in LEGACY_MBF_EXAMPLES})
    assert kind == "MobileFaceNet" and sorted(upgraded) == sorted(LEGACY_MBF_EXAMPLES.values())
    for name in ("mbf", "mbf_large"):
        model = build_backbone(ModelConfig(name=name, embedding_size=64))
        state = model.state_dict()
        old = {_legacy_mbf_name(k): v for k, v in state.items()}
        assert "gdc.0.weight" in old and len(old) == len(state)
        restored, _ = upgrade_legacy_names(old)
        assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)

    vit = build_backbone(ModelConfig(name="vit_t", embedding_size=64, mask_ratio=0.0))
    state = vit.state_dict()
    renames = {"patch_embed.proj.": "patch_embed.", "mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.2."}
    old = {}
    for key, value in state.items():
        for new, earlier in renames.items():
            key = key.replace(new, earlier)
        old[key] = value
    del old["mask_token"]  # not created when training without masking
    restored, kind = upgrade_legacy_names(old)
    assert kind == "ViT" and restored.keys() == state.keys()
    vit.load_state_dict(restored, strict=True)
    assert upgrade_legacy_names(state)[1] is None and upgrade_legacy_names(state)[0] is state  # unchanged
