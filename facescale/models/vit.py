"""ViT for 112x112 faces shaped like insightface's vit_t/s/b/l: 9x9 patches (12x12 grid), no class token,
flattened tokens -> Linear-BN-Linear-BN head; random token masking and stochastic depth in training.

Module names follow arcface_torch's vit (`patch_embed.proj`, `blocks.N.mlp.fc1`, `feature.N`, `mask_token`),
so its vit_t/s/b/l checkpoints load with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from facescale.config.schema import ModelConfig
from facescale.models.layers import DropPath, norm1d
from facescale.models.registry import register_backbone

IMAGE_SIZE = 112
PATCH_SIZE = 9
GRID = IMAGE_SIZE // PATCH_SIZE  # 12; the last 4 pixel rows/columns fall outside the patch grid
VIT_OPTIONS = ("drop_path_rate", "mask_ratio")  # model.* keys the ViTs read


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (flash kernels on CUDA)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> ReLU6 -> fc2 (insightface's ViT MLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping 9x9 patches -> tokens [B, 144, dim] through one strided conv (`proj`)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + MLP(LN(x)) with a ReLU6 MLP of width 4*dim."""

    def __init__(self, dim: int, num_heads: int, drop_path: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FaceViT(nn.Module):
    """Patch embed (conv 9x9 / 9) + learnt positions, `depth` blocks, LN, flatten 144 tokens -> embedding."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, embedding_size: int = 512,
                 drop_path_rate: float = 0.1, mask_ratio: float = 0.1, dropout: float = 0.0,
                 norm: str = "batch", activation_checkpointing: bool = False) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.num_patches = GRID * GRID
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        # always present (arcface_torch's checkpoints hold it); frozen when unused, so DDP/ZeRO never wait
        # for a gradient that cannot come
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim), requires_grad=mask_ratio > 0)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic-depth ramp
        self.blocks = nn.ModuleList(TransformerBlock(embed_dim, num_heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            norm1d(embed_dim, norm, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            norm1d(embedding_size, norm, eps=2e-5),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised tokens [B, 144, embed_dim]; in training a random `mask_ratio` of them skip the blocks
        and come back as the learnt mask token (insightface's regulariser)."""
        x = self.patch_embed(images) + self.pos_embed
        keep = int(self.num_patches * (1.0 - self.mask_ratio))  # insightface's count of kept tokens
        if not self.training or keep == self.num_patches:
            return self.norm(self._run_blocks(x))
        order = torch.rand(x.shape[0], self.num_patches, device=x.device).argsort(dim=1)
        kept = order[:, :keep, None].expand(-1, -1, self.embed_dim)
        x = self.norm(self._run_blocks(torch.gather(x, 1, kept)))
        filled = self.mask_token.to(x.dtype).expand(x.shape[0], self.num_patches, -1).clone()
        return filled.scatter(1, kept, x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature(self.dropout(self.forward_tokens(images).flatten(1)))


def _vit(cfg: ModelConfig, embed_dim: int, depth: int, defaults: dict, overrides: dict) -> FaceViT:
    """The variant's defaults, then `model.drop_path_rate` / `model.mask_ratio` when set, then `overrides`."""
    configured = {k: getattr(cfg, k) for k in ("drop_path_rate", "mask_ratio") if getattr(cfg, k) is not None}
    settings = {**defaults, **configured, **overrides}
    return FaceViT(embed_dim, depth, 8, cfg.embedding_size, dropout=cfg.dropout, norm=cfg.norm, **settings)


@register_backbone("vit_t", options=VIT_OPTIONS)
def vit_tiny(cfg: ModelConfig, **overrides: object) -> FaceViT:
    """ViT-T: dim 256, depth 12, 8 heads; drop path 0.1, mask ratio 0.1 (insightface vit_t)."""
    return _vit(cfg, 256, 12, {"drop_path_rate": 0.1, "mask_ratio": 0.1}, overrides)


@register_backbone("vit_s", options=VIT_OPTIONS)
def vit_small(cfg: ModelConfig, **overrides: object) -> FaceViT:
    """ViT-S: dim 512, depth 12, 8 heads; drop path 0.1, mask ratio 0.1 (insightface vit_s)."""
    return _vit(cfg, 512, 12, {"drop_path_rate": 0.1, "mask_ratio": 0.1}, overrides)


@register_backbone("vit_b", options=VIT_OPTIONS)
def vit_base(cfg: ModelConfig, **overrides: object) -> FaceViT:
    """ViT-B: dim 512, depth 24, 8 heads; drop path 0.1, mask ratio 0.1, activation checkpointing."""
    defaults = {"drop_path_rate": 0.1, "mask_ratio": 0.1, "activation_checkpointing": True}
    return _vit(cfg, 512, 24, defaults, overrides)


@register_backbone("vit_l", options=VIT_OPTIONS)
def vit_large(cfg: ModelConfig, **overrides: object) -> FaceViT:
    """ViT-L: dim 768, depth 24, 8 heads; drop path 0.05, mask ratio 0.05, checkpointing.

    Matches arcface_torch's "vit_l_dp005_mask_005" (its only ViT-L).
    """
    defaults = {"drop_path_rate": 0.05, "mask_ratio": 0.05, "activation_checkpointing": True}
    return _vit(cfg, 768, 24, defaults, overrides)
