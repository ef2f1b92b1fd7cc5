"""Center optimizer: dense mode equals torch.optim on the full shard; sparse touches sampled rows only."""

from __future__ import annotations

import pytest
import torch

from facescale.config.schema import HeadConfig
from facescale.heads import build_head
from facescale.heads.allocations import LargestAllocation
from facescale.heads.center_optimizer import CenterOptimizer

ROWS, DIM = 23, 4


def _steps(num_steps: int = 6, seed: int = 0) -> list[tuple[torch.Tensor | None, torch.Tensor, float]]:
    """(sorted index or None, grad rows, lr) per step; a None index means a full-shard gradient."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for step in range(num_steps):
        if step == 2:
            steps.append((None, torch.randn(ROWS, DIM, generator=gen), 0.05))
            continue
        index = torch.randperm(ROWS, generator=gen)[:7].sort().values
        steps.append((index, torch.randn(7, DIM, generator=gen), 0.1 / (step + 1)))
    return steps


ADAMW_BETAS = (0.8, 0.95)  # not torch's defaults, so a head that drops the configured betas shows


def _torch_optimizer(
    kind: str, param: torch.nn.Parameter, momentum: float, wd: float
) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD([param], lr=1.0, momentum=momentum, weight_decay=wd)
    return torch.optim.AdamW([param], lr=1.0, weight_decay=wd, betas=ADAMW_BETAS)


@pytest.mark.parametrize("kind, momentum", [("sgd", 0.9), ("sgd", 0.0), ("adamw", 0.0)])
@pytest.mark.parametrize("block_rows", [5, 1024])
def test_dense_mode_equals_torch_optim_on_the_full_shard(kind: str, momentum: float, block_rows: int) -> None:
    init = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))
    centers = init.clone()
    opt = CenterOptimizer(ROWS, DIM, kind=kind, mode="dense", momentum=momentum, weight_decay=0.01,
                          betas=ADAMW_BETAS, block_rows=block_rows)
    param = torch.nn.Parameter(init.clone())
    reference = _torch_optimizer(kind, param, momentum, 0.01)
    for index, grad, lr in _steps():
        opt.step(centers, grad, index, lr)
        param.grad = grad.clone() if index is None else torch.zeros(ROWS, DIM).index_copy_(0, index, grad)
        reference.param_groups[0]["lr"] = lr
        reference.step()
    torch.testing.assert_close(centers, param.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_sparse_mode_leaves_unsampled_rows_and_state_bit_identical(kind: str) -> None:
    init = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(2))
    centers = init.clone()
    opt = CenterOptimizer(ROWS, DIM, kind=kind, mode="sparse", momentum=0.9, weight_decay=0.01,
                          betas=ADAMW_BETAS)
    history: dict[int, list[tuple[torch.Tensor, float]]] = {r: [] for r in range(ROWS)}
    for index, grad, lr in _steps():
        before = centers.clone()
        state_before = {k: v.clone() for k, v in opt.state_tensors().items()}
        opt.step(centers, grad, index, lr)
        rows = list(range(ROWS)) if index is None else index.tolist()
        untouched = torch.ones(ROWS, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(centers[untouched], before[untouched])
        for name, value in opt.state_tensors().items():
            assert torch.equal(value[untouched], state_before[name][untouched]), name
        for position, row in enumerate(rows):
            history[row].append((grad[position], lr))
    # each row evolves exactly like torch.optim run only on the steps where it was sampled
    for row, updates in history.items():
        param = torch.nn.Parameter(init[row : row + 1].clone())
        reference = _torch_optimizer(kind, param, 0.9, 0.01)
        for grad, lr in updates:
            param.grad = grad[None].clone()
            reference.param_groups[0]["lr"] = lr
            reference.step()
        torch.testing.assert_close(centers[row : row + 1], param.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_bf16_storage_tracks_fp32_math(kind: str, mode: str) -> None:
    init = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(3))
    exact, low = init.clone(), init.to(torch.bfloat16)
    opt32 = CenterOptimizer(ROWS, DIM, kind=kind, mode=mode, block_rows=4)
    opt16 = CenterOptimizer(ROWS, DIM, kind=kind, mode=mode, state_dtype=torch.bfloat16, block_rows=4)
    for index, grad, lr in _steps():
        opt32.step(exact, grad, index, lr)
        opt16.step(low, grad.to(torch.bfloat16), index, lr)
    assert low.dtype == torch.bfloat16
    assert all(v.dtype in (torch.bfloat16, torch.int64) for v in opt16.state_tensors().values())
    torch.testing.assert_close(low.float(), exact, rtol=0.02, atol=0.02)


def test_state_loading_checks_keys_and_shapes() -> None:
    opt = CenterOptimizer(ROWS, DIM, kind="sgd", momentum=0.9)
    with pytest.raises(ValueError, match="head.optimizer"):
        opt.load_state_tensors({"exp_avg": torch.zeros(ROWS, DIM)})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_tensors({"momentum_buffer": torch.zeros(ROWS + 1, DIM)})
    with pytest.raises(ValueError, match="head.update"):
        CenterOptimizer(ROWS, DIM, mode="lazy")


def _head_trajectory(update: str, momentum: float, wd: float, steps: int = 5):
    """Single-process head training on a fixed batch; returns losses, final centers, sampled ids per step."""
    cfg = HeadConfig(sample_rate=0.3, update=update, momentum=momentum, weight_decay=wd)
    head = build_head(cfg, num_classes=40, embedding_size=8, seed=11)
    gen = torch.Generator().manual_seed(5)
    emb, labels = (
        torch.randn(6, 8, generator=gen),
        torch.randint(0, 40, (6,), generator=gen, dtype=torch.int32),
    )
    losses, sampled, snapshots = [], [], []
    for step in range(steps):
        snapshots.append(
            (head.centers.clone(), {k: v.clone() for k, v in head.state_dict()["optimizer"].items()})
        )
        loss, stats = head(emb.clone().requires_grad_(), labels, step)
        loss.backward()
        head.optimizer_step(0.5)
        losses.append(loss.item())
        sampled.append(head.last_sampled_classes.clone())
        assert stats["num_sampled"] == 12
    return losses, head.centers.clone(), sampled, snapshots


def test_head_sparse_and_dense_agree_without_momentum_and_decay() -> None:
    dense_losses, dense_centers, _, _ = _head_trajectory("dense", 0.0, 0.0)
    sparse_losses, sparse_centers, _, _ = _head_trajectory("sparse", 0.0, 0.0)
    assert dense_losses == sparse_losses
    assert torch.equal(dense_centers, sparse_centers)
    assert dense_losses[-1] < dense_losses[0]


def test_head_sparse_mode_never_touches_unsampled_rows_but_dense_mode_does() -> None:
    _, final, sampled, snapshots = _head_trajectory("sparse", 0.9, 5e-4)
    for step in range(1, len(snapshots)):
        (before, state_before), (after, state_after) = snapshots[step - 1], snapshots[step]
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[sampled[step - 1]] = False
        assert torch.equal(after[untouched], before[untouched])
        assert torch.equal(
            state_after["momentum_buffer"][untouched], state_before["momentum_buffer"][untouched]
        )
    _, _, dense_sampled, dense_snapshots = _head_trajectory("dense", 0.9, 5e-4)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[dense_sampled[2]] = False
    moved = dense_snapshots[3][0][untouched] != dense_snapshots[2][0][untouched]  # ghost momentum/decay
    assert bool(moved.all(dim=1).any())


def test_fp32_center_grad_blocks_shrink_with_the_batch() -> None:
    """fp32 blocks of a CenterGrad hold ~2 MiB of G*r: 2048 rows up to B = 256, fewer above (oneDNN copies
    that [rows, B] operand; 2048 rows at B = 512 grew the first steps' heap by 24 MiB); bf16 blocks and a
    given block_rows stay as they are, and so do gradient rows given as a tensor (batch 0)."""
    opt = CenterOptimizer(100, 512)
    expected = {0: 2048, 128: 2048, 256: 2048, 512: 1024, 1024: 512, 4096: 256, 65536: 256}
    assert {b: opt._rows_per_block(torch.float32, b) for b in expected} == expected
    assert {opt._rows_per_block(torch.bfloat16, b) for b in expected} == {10240}
    assert opt.block_size(30_000, torch.float32, 512) == 1000  # 30 equal blocks of at most 1024 rows
    assert CenterOptimizer(100, 512, block_rows=4096)._rows_per_block(torch.float32, 512) == 4096


def test_the_b512_update_forms_no_product_of_2048_rows() -> None:
    """At B = 512 a head step's optimizer forms its fp32 gradient products in blocks of at most 1024 rows."""
    head = build_head(HeadConfig(sample_rate=0.5, update="sparse"), 12_000, 512, seed=0)
    emb, labels = torch.randn(512, 512), torch.randint(0, 12_000, (512,))
    loss, stats = head(emb.clone().requires_grad_(), labels, 0)
    loss.backward()
    with LargestAllocation() as tracker:
        head.optimizer_step(0.1)
    assert stats["num_sampled"] == 6000
    assert 0 < tracker.largest <= 1024 * 512, (tracker.largest, tracker.largest_op)


def test_the_partial_fc_head_steps_adamw_with_the_runs_betas(monkeypatch: pytest.MonkeyPatch) -> None:
    """head.optimizer adamw takes optim.betas (arcface_torch steps backbone and centers with one AdamW); the
    head used to keep torch's default (0.9, 0.999) whatever the config said."""
    from types import SimpleNamespace

    from facescale.config.schema import Config
    from facescale.partial_fc import mode as partial_fc_mode

    cfg = Config()
    cfg.head.optimizer, cfg.optim.name, cfg.optim.betas = "adamw", "adamw", (0.5, 0.6)
    cfg.model.embedding_size = DIM
    monkeypatch.setattr(partial_fc_mode, "build_train_loader", lambda *args, **kwargs: None)
    run = partial_fc_mode.MODE.build(cfg, None, SimpleNamespace(num_classes=ROWS), rank=0, world_size=1,
                                     micro_batch=2, precision="fp32", device=torch.device("cpu"))
    assert run.head.center_optimizer.betas == (0.5, 0.6)


def _trained_head(storage_dtype: str = "fp32", momentum: float = 0.9):
    """A 40-class head after two SGD steps (so its momentum, and a bf16 head's residual, are not zero)."""
    head = build_head(HeadConfig(momentum=momentum, storage_dtype=storage_dtype), 40, 8, seed=3)
    gen = torch.Generator().manual_seed(7)
    emb, labels = torch.randn(6, 8, generator=gen), torch.randint(0, 40, (6,), generator=gen)
    for step in range(2):
        head(emb.clone().requires_grad_(), labels, step)[0].backward()
        head.optimizer_step(0.5)
    return head


def test_a_head_resumed_with_another_head_momentum_keeps_its_centers() -> None:
    """Saved at head.momentum 0.9, resumed at 0 (its momentum dropped) and the other way (momentum from zero):
    both were refused after start-up as if head.optimizer had changed."""
    saved = _trained_head(momentum=0.9).state_dict()
    assert bool(saved["optimizer"]["momentum_buffer"].abs().sum() > 0)
    without = _trained_head(momentum=0.0)
    without.load_state_dict(saved)
    assert torch.equal(without.centers, saved["centers"]) and not without.state_dict()["optimizer"]
    with_momentum = _trained_head(momentum=0.9)  # its own momentum is not zero before the load
    with_momentum.load_state_dict(without.state_dict())
    assert torch.equal(with_momentum.centers, saved["centers"])
    assert not bool(with_momentum.state_dict()["optimizer"]["momentum_buffer"].any())
    with pytest.raises(ValueError, match="head.optimizer"):  # another optimizer is still refused
        build_head(HeadConfig(optimizer="adamw"), 40, 8, seed=3).load_state_dict(saved)


def test_a_head_resumed_with_another_storage_dtype_keeps_the_centers_value() -> None:
    """fp32 -> bf16 keeps the rounding error in the residual (it was zero, 2^-9 of each center lost);
    bf16 -> fp32 loads centers plus residual (it failed on the residual's key); the round trip gives
    back the fp32 centers to bf16-plus-residual precision (~2^-16)."""
    fp32 = _trained_head("fp32")
    exact = fp32.state_dict()["centers"]
    bf16 = _trained_head("bf16")
    bf16.load_state_dict(fp32.state_dict())
    state = bf16.state_dict()
    assert state["centers"].dtype == torch.bfloat16
    kept = state["centers"].float() + state["optimizer"]["center_residual"].float()
    assert float((state["centers"].float() - exact).abs().max()) > 1e-5  # rounding bf16 alone loses this
    torch.testing.assert_close(kept, exact, rtol=2**-15, atol=1e-7)
    back = _trained_head("fp32")
    back.load_state_dict(state)
    torch.testing.assert_close(back.centers, exact, rtol=2**-15, atol=1e-7)
    assert torch.equal(back.state_dict()["optimizer"]["momentum_buffer"],
                       state["optimizer"]["momentum_buffer"].float())


def test_partial_fc_says_how_a_changed_head_setting_is_carried_on_resume() -> None:
    from facescale.config.schema import Config
    from facescale.partial_fc.mode import MODE

    cfg = Config()
    cfg.head.momentum, cfg.head.storage_dtype = 0.0, "bf16"
    notes = MODE.resume_notes({"head": {"momentum": 0.9, "storage_dtype": "fp32"}}, cfg)
    assert notes == ["[facescale] head.momentum 0.9 -> 0.0: the saved momentum of the centers is dropped",
                     "[facescale] head.storage_dtype fp32 -> bf16: the centers load as the saved centers "
                     "rounded to bf16, the rounding error kept in their residual"]
    assert MODE.resume_notes({"head": {"momentum": 0.0, "storage_dtype": "bf16"}}, cfg) == []
    cfg.head.optimizer = "adamw"  # no momentum buffer either way
    assert MODE.resume_notes({"head": {"momentum": 0.9, "storage_dtype": "bf16"}}, cfg) == []
