"""Expected state-dict keys and shapes of arcface_torch's r50, mbf and vit_t (facts, written independently of
facescale's model code from insightface's recognition/arcface_torch/backbones definitions)."""

from __future__ import annotations

Shape = tuple[int, ...]


def batch_norm(prefix: str, channels: int) -> dict[str, Shape]:
    """BatchNorm1d/2d entries: affine parameters, running statistics and the scalar batch counter."""
    keys = {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")}
    return {**keys, f"{prefix}.num_batches_tracked": ()}


def r50_keys(embedding: int = 512) -> dict[str, Shape]:
    """iresnet50: blocks 3-4-14-3 of widths 64/128/256/512; every stage's first block projects (stride 2)."""
    keys = {"conv1.weight": (64, 3, 3, 3), **batch_norm("bn1", 64), "prelu.weight": (64,)}
    in_channels = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 14, 3), strict=True), start=1):
        for block in range(count):
            p = f"layer{stage}.{block}"
            c_in = in_channels if block == 0 else width
            keys.update(batch_norm(f"{p}.bn1", c_in))
            keys[f"{p}.conv1.weight"] = (width, c_in, 3, 3)
            keys.update(batch_norm(f"{p}.bn2", width))
            keys[f"{p}.prelu.weight"] = (width,)
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            keys.update(batch_norm(f"{p}.bn3", width))
            if block == 0:
                keys[f"{p}.downsample.0.weight"] = (width, c_in, 1, 1)
                keys.update(batch_norm(f"{p}.downsample.1", width))
        in_channels = width
    keys.update(batch_norm("bn2", 512))
    keys.update({"fc.weight": (embedding, 512 * 49), "fc.bias": (embedding,)})
    keys.update(batch_norm("features", embedding))
    return keys


def _conv_block(prefix: str, c_in: int, c_out: int, kernel: int, groups: int, prelu: bool) -> dict:
    """mobilefacenet ConvBlock (conv, BN, PReLU) or LinearBlock (conv, BN) under `prefix.layers.*`."""
    keys = {f"{prefix}.layers.0.weight": (c_out, c_in // groups, kernel, kernel)}
    keys.update(batch_norm(f"{prefix}.layers.1", c_out))
    if prelu:
        keys[f"{prefix}.layers.2.weight"] = (c_out,)
    return keys


def _depthwise(prefix: str, c_in: int, c_out: int, hidden: int) -> dict[str, Shape]:
    return {**_conv_block(f"{prefix}.layers.0", c_in, hidden, 1, 1, True),
            **_conv_block(f"{prefix}.layers.1", hidden, hidden, 3, hidden, True),
            **_conv_block(f"{prefix}.layers.2", hidden, c_out, 1, 1, False)}


def _residual(prefix: str, count: int, channels: int, hidden: int) -> dict[str, Shape]:
    keys: dict[str, Shape] = {}
    for j in range(count):
        keys.update(_depthwise(f"{prefix}.layers.{j}", channels, channels, hidden))
    return keys


def mbf_keys(embedding: int = 512) -> dict[str, Shape]:
    """get_mbf: blocks (1, 4, 6, 2), scale 2 (widths 128/256), GDC head of 512 channels."""
    keys = {**_conv_block("layers.0", 3, 128, 3, 1, True), **_conv_block("layers.1", 128, 128, 3, 64, True)}
    keys.update(_depthwise("layers.2", 128, 128, 128))
    keys.update(_residual("layers.3", 4, 128, 128))
    keys.update(_depthwise("layers.4", 128, 256, 256))
    keys.update(_residual("layers.5", 6, 256, 256))
    keys.update(_depthwise("layers.6", 256, 256, 512))
    keys.update(_residual("layers.7", 2, 256, 256))
    keys.update(_conv_block("conv_sep", 256, 512, 1, 1, True))
    keys.update(_conv_block("features.layers.0", 512, 512, 7, 512, False))
    keys["features.layers.2.weight"] = (embedding, 512)
    keys.update(batch_norm("features.layers.3", embedding))
    return keys


def vit_t_keys(embedding: int = 512) -> dict[str, Shape]:
    """VisionTransformer(img 112, patch 9, dim 256, depth 12, heads 8, qkv without bias, LN): 144 tokens."""
    dim, tokens = 256, 144
    keys = {"patch_embed.proj.weight": (dim, 3, 9, 9), "patch_embed.proj.bias": (dim,),
            "pos_embed": (1, tokens, dim), "mask_token": (1, 1, dim)}
    for i in range(12):
        p = f"blocks.{i}"
        keys.update({f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,),
                     f"{p}.attn.qkv.weight": (3 * dim, dim), f"{p}.attn.proj.weight": (dim, dim),
                     f"{p}.attn.proj.bias": (dim,), f"{p}.norm2.weight": (dim,), f"{p}.norm2.bias": (dim,),
                     f"{p}.mlp.fc1.weight": (4 * dim, dim), f"{p}.mlp.fc1.bias": (4 * dim,),
                     f"{p}.mlp.fc2.weight": (dim, 4 * dim), f"{p}.mlp.fc2.bias": (dim,)})
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,), "feature.0.weight": (dim, dim * tokens)})
    keys.update(batch_norm("feature.1", dim))
    keys["feature.2.weight"] = (embedding, dim)
    keys.update(batch_norm("feature.3", embedding))
    return keys


ARCFACE_TORCH_KEYS = {"r50": r50_keys, "mbf": mbf_keys, "vit_t": vit_t_keys}
