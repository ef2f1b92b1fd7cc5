"""F2C loss (§1.6): K, all-pooled = plain margin softmax over the pool, none-pooled = mean ReLU(top-K)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facescale.config.schema import MarginConfig
from facescale.f2c.ema import GalleryNet
from facescale.f2c.head import DcpHead
from facescale.f2c.loss import distributed_top_k, outlier_top_k
from facescale.heads.margins import build_margin

DIM, S, M = 8, 16.0, 0.3
SPEC = build_margin(MarginConfig(type="cosface", s=S, m3=M))


def _head(q: int, mode: str = "replicated", seed: int = 0) -> DcpHead:
    return DcpHead(
        GalleryNet(torch.nn.Linear(3, DIM), 0.99), DIM, SPEC, queue_size=q, seed=seed, pool_mode=mode
    )


def _unit(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)


def plain_cosface_ce(probes: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Independent margin softmax: s * (cos - m at the target), cross-entropy, mean over rows."""
    cos = F.normalize(probes, dim=1) @ weight.t()
    logits = S * (cos - M * F.one_hot(targets, weight.shape[0]))
    return F.cross_entropy(logits, targets)


@pytest.mark.parametrize(
    ("q", "k"), [(2, 2), (100, 3), (19999, 3), (20000, 4), (49999, 9), (50000, 10), (10**7, 10)]
)
def test_top_k_is_clamped_fraction_of_q(q, k):
    assert outlier_top_k(q) == k == min(q, max(3, min(10, math.floor(0.0002 * q))))


def test_every_label_pooled_equals_plain_margin_softmax_over_the_pool():
    head = _head(4)
    labels_x, labels_y = torch.tensor([10, 11, 12, 13]), torch.tensor([13, 12, 11, 10])
    gallery_x, gallery_y = _unit(4, 1), _unit(4, 2)
    probe_x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(3)).requires_grad_()
    probe_y = torch.randn(4, DIM, generator=torch.Generator().manual_seed(4)).requires_grad_()
    loss, stats = head(probe_x, probe_y, labels_x, labels_y, gallery_x, gallery_y)
    # empty pool, each label once per pass: slot j holds the j-th gallery row in both views
    slot_of_y = {int(lab): j for j, lab in enumerate(labels_y)}
    slot_of_x = {int(lab): j for j, lab in enumerate(labels_x)}
    px, py = probe_x.detach().clone().requires_grad_(), probe_y.detach().clone().requires_grad_()
    trial = plain_cosface_ce(px, gallery_y, torch.tensor([slot_of_y[int(v)] for v in labels_x]))
    commit = plain_cosface_ce(py, gallery_x, torch.tensor([slot_of_x[int(v)] for v in labels_y]))
    expected = 2 * trial + 2 * commit
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(probe_x.grad, px.grad)
    torch.testing.assert_close(probe_y.grad, py.grad)
    assert stats["pooled_probe_fraction"] == 1.0 and stats["outlier_loss"] == 0.0
    assert stats["pool_fill"] == 1.0


def test_no_label_pooled_equals_mean_relu_top_k():
    q = 20
    head = _head(q, seed=4)
    k = outlier_top_k(q)
    gallery_x, gallery_y = _unit(5, 1), _unit(5, 2)
    labels_x, labels_y = torch.tensor([50, 51, 52, 53, 54]), torch.tensor([60, 61, 62, 63, 64])
    probe_x, probe_y = _unit(5, 3).requires_grad_(), _unit(5, 4).requires_grad_()
    init = head.pool.features.clone()
    # trial view: y written to row 0 of slots 0..4; commit view (trial rolled back): x written there
    w_trial, w_commit = init[0].clone(), init[0].clone()
    w_trial[:5], w_commit[:5] = gallery_y, gallery_x

    def neg(p, w):
        return torch.topk(F.normalize(p, dim=1) @ w.t(), k, dim=1).values.clamp_min(0).mean()

    px, py = probe_x.detach().clone().requires_grad_(), probe_y.detach().clone().requires_grad_()
    expected = 2 * neg(px, w_trial) + 2 * neg(py, w_commit)
    loss, stats = head(probe_x, probe_y, labels_x, labels_y, gallery_x, gallery_y)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(probe_x.grad, px.grad)
    torch.testing.assert_close(probe_y.grad, py.grad)
    assert expected > 0  # the random positive-orthant init gives positive cosines to push away
    assert stats["pooled_probe_fraction"] == 0.0 and stats["classification_loss"] == 0.0


def test_mixed_batch_weights_parts_one_to_one():
    head = _head(8)
    labels_x, labels_y = torch.tensor([1, 2, 40, 41]), torch.tensor([1, 2, 50, 51])  # ids 1, 2 in both
    loss, stats = head(_unit(4, 3), _unit(4, 4), labels_x, labels_y, _unit(4, 1), _unit(4, 2))
    assert stats["pooled_probe_fraction"] == pytest.approx(4 / 8)
    assert stats["classification_loss"] > 0 and stats["outlier_loss"] > 0
    assert float(loss) == pytest.approx(stats["classification_loss"] + stats["outlier_loss"], rel=1e-5)


def test_distributed_top_k_single_rank_pads_small_pools():
    cos = torch.tensor([[0.1, 0.5], [0.9, -0.2]])
    top = distributed_top_k(cos, 3)
    torch.testing.assert_close(top[:, :2], torch.tensor([[0.5, 0.1], [0.9, -0.2]]))
    assert (top[:, 2] < -1).all()


def test_sharded_world_one_equals_replicated_with_eviction():
    rep, sh = _head(5, "replicated", 2), _head(5, "sharded", 2)
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        lx, ly = torch.randint(0, 9, (4,), generator=g), torch.randint(0, 9, (4,), generator=g)
        args = (_unit(4, 10 + step), _unit(4, 20 + step), lx, ly, _unit(4, 30 + step), _unit(4, 40 + step))
        a, _ = rep(*args)
        b, _ = sh(*args)
        torch.testing.assert_close(a, b)
    assert torch.equal(rep.pool.features, sh.pool.features)


def test_local_margin_ce_equals_the_distributed_one_on_one_rank():
    from facescale.f2c.loss import local_margin_cross_entropy
    from facescale.heads.dist_cross_entropy import margin_cross_entropy

    spec = build_margin(MarginConfig(type="arcface", s=32.0, m2=0.5, interclass_filtering_threshold=0.3))
    cos = (torch.rand(6, 9, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_()
    targets = torch.tensor([0, 3, 8, 2, 2, 5])
    a = local_margin_cross_entropy(cos, targets, spec)
    (ga,) = torch.autograd.grad(a, cos)
    b = margin_cross_entropy(cos, targets, spec)
    (gb,) = torch.autograd.grad(b, cos)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
