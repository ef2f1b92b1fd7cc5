"""Plain single-process margin softmax (normalize W, linear, margin, F.cross_entropy): the test oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from facescale.config.schema import MarginConfig


def reference_target_margin(cos_t: Tensor, cfg: MarginConfig) -> Tensor:
    """The margin written from its textbook definition with arccos (float64 in the tests)."""
    theta = torch.acos(cos_t)
    if cfg.type == "cosface":
        return cos_t - cfg.m3
    if cfg.type == "arcface_straight_through":
        return cos_t + (torch.cos(theta + cfg.m2) - cos_t).detach()
    m1, m3 = (1.0, 0.0) if cfg.type == "arcface" else (cfg.m1, cfg.m3)
    angle = m1 * theta + cfg.m2
    if cfg.type == "arcface":  # insightface's classic fallback
        fallback = cos_t - math.sin(math.pi - cfg.m2) * cfg.m2
    else:  # past the angle where m1*theta + m2 = pi: slope 1 in the cosine, from -1 - m3 at that angle
        boundary = torch.cos(torch.tensor((math.pi - cfg.m2) / m1, dtype=cos_t.dtype))
        fallback = -1.0 - m3 + (cos_t - boundary)
    return torch.where(angle <= math.pi, torch.cos(angle) - m3, fallback)


def reference_logits_from_cos(cos: Tensor, labels: Tensor, cfg: MarginConfig) -> Tensor:
    """Scaled logits: margin on each row's target, inter-class filtering of the other columns."""
    rows = torch.arange(cos.shape[0])
    logits = cos
    if cfg.interclass_filtering_threshold > 0:
        mask = (cos > cfg.interclass_filtering_threshold).detach()
        mask[rows, labels] = False
        logits = logits.masked_fill(mask, 0.0)
    target = reference_target_margin(cos[rows, labels], cfg)
    onehot = F.one_hot(labels, cos.shape[1]).to(torch.bool)
    logits = torch.where(onehot, target[:, None], logits)
    return logits * cfg.s


def reference_loss(embeddings: Tensor, centers: Tensor, labels: Tensor, cfg: MarginConfig) -> Tensor:
    """Mean margin softmax cross-entropy of all rows against all centers."""
    cos = (F.normalize(embeddings, dim=1) @ F.normalize(centers, dim=1).t()).clamp(-1.0, 1.0)
    return F.cross_entropy(reference_logits_from_cos(cos, labels, cfg), labels)
