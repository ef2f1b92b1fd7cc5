"""G-Net EMA correctness, exact resume of the DCP head from its state_dict, and the config checks."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from facescale.config.load import ConfigError
from facescale.config.schema import Config, MarginConfig
from facescale.config.validate import validate
from facescale.f2c.ema import GalleryNet
from facescale.f2c.head import DcpHead
from facescale.heads.margins import build_margin

DIM = 6


def _pnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, DIM)
    )


def test_ema_follows_the_closed_form_and_skips_batchnorm_statistics():
    pnet, m = _pnet(), 0.9
    gnet = GalleryNet(pnet, m)
    expected = {k: v.detach().clone() for k, v in pnet.named_parameters()}
    stats_before = gnet.net[1].running_mean.clone()
    with torch.no_grad():
        pnet[1].running_mean.fill_(5.0)  # P-Net's BN statistics must not leak into G-Net
    for _ in range(4):
        with torch.no_grad():
            for p in pnet.parameters():
                p.add_(torch.randn_like(p))
        gnet.update(pnet)
        for name, p in pnet.named_parameters():
            expected[name] = m * expected[name] + (1 - m) * p.detach()
    for name, g in gnet.net.named_parameters():
        torch.testing.assert_close(g, expected[name])
        assert not g.requires_grad
    assert torch.equal(gnet.net[1].running_mean, stats_before)


def test_gallery_net_uses_batch_statistics_and_gets_no_gradient():
    pnet = _pnet()
    gnet = GalleryNet(pnet, 0.99)
    gnet.eval()  # ignored: G-Net always normalises with the gallery batch's statistics
    x = torch.randn(10, 4)
    out = gnet(x)
    net = gnet.net
    h = net[0](x)
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net[1].eps) * net[1].weight + net[1].bias
    torch.testing.assert_close(out, F.normalize(net[3](torch.relu(h)), dim=1))
    assert out.grad_fn is None
    loss = pnet(x).sum() + out.sum()
    loss.backward()
    assert all(p.grad is None for p in gnet.parameters())


def _head(seed: int) -> DcpHead:
    spec = build_margin(MarginConfig(type="arcface", s=16.0, m2=0.3))
    return DcpHead(GalleryNet(_pnet(1), 0.9), DIM, spec, queue_size=6, seed=seed)


def _step(head: DcpHead, pnet: torch.nn.Module, step: int) -> tuple[float, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in pnet.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    head.update_gallery_net(pnet)
    x, y = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    lx, ly = torch.randint(0, 9, (4,), generator=g), torch.randint(0, 9, (4,), generator=g)
    px, py = pnet(x).detach().requires_grad_(), pnet(y).detach().requires_grad_()
    loss, _ = head(px, py, lx, ly, head.gallery_features(x), head.gallery_features(y))
    loss.backward()
    return float(loss.detach()), px.grad


def test_resume_from_state_dict_is_exact():
    pnet_a = _pnet(1)
    a = _head(seed=3)
    for step in range(3):
        _step(a, pnet_a, step)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    pnet_b = _pnet(1)
    pnet_b.load_state_dict(pnet_a.state_dict())
    b = _head(seed=99)  # different random init: everything must come from the checkpoint
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    assert b.iteration == 3
    for step in range(3, 6):
        loss_a, grad_a = _step(a, pnet_a, step)
        loss_b, grad_b = _step(b, pnet_b, step)
        assert loss_a == loss_b and torch.equal(grad_a, grad_b)
    for key, value in a.pool.pool_state().items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.pool.pool_state()[key])), key
    assert a.pool.lru_order().tolist() == b.pool.lru_order().tolist()


def test_resume_refuses_another_pool_layout():
    state = _head(seed=3).state_dict()
    spec = build_margin(MarginConfig())
    other = DcpHead(GalleryNet(_pnet(1), 0.9), DIM, spec, queue_size=7, seed=3)
    with pytest.raises(ValueError, match="same head.f2c settings"):
        other.load_state_dict(state)


def _dcp_config(tmp_path, **dcp) -> Config:
    (tmp_path / "manifest.json").write_text("{}")
    cfg = Config()
    cfg.data.shards = str(tmp_path)
    cfg.head.type = "f2c"
    for key, value in dcp.items():
        setattr(cfg.head.f2c, key, value)
    return cfg


def test_config_refuses_zero3_small_pools_and_odd_batches(tmp_path):
    cfg = _dcp_config(tmp_path, queue_size=1000)
    cfg.deepspeed.zero_stage = 3
    with pytest.raises(ConfigError, match="zero_stage 0, 1 or 2"):
        validate(cfg, "x.yaml", world_size=2)
    cfg = _dcp_config(tmp_path, queue_size=100, identities_per_rank=64)
    cfg.schedule.global_batch_size = 128  # 64 per rank: 2 x (64 + 32) = 192 labels per pass
    with pytest.raises(ConfigError, match="queue_size >= 192"):
        validate(cfg, "x.yaml", world_size=2)
    cfg = _dcp_config(tmp_path, queue_size=1000)
    cfg.schedule.global_batch_size = 6
    with pytest.raises(ConfigError, match="even batch"):
        validate(cfg, "x.yaml", world_size=2)
    validate(_dcp_config(tmp_path, queue_size=192, identities_per_rank=64), "x.yaml", world_size=2)
    with pytest.raises(ConfigError, match="head.f2c.pool"):
        validate(_dcp_config(tmp_path, pool="ring"), "x.yaml")
