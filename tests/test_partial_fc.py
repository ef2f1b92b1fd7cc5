"""The Partial FC head on 1-4 gloo ranks against a plain single-process float64 margin softmax."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from facescale.config.schema import HeadConfig, MarginConfig
from facescale.heads import build_head
from facescale.heads.allocations import LargestAllocation
from facescale.heads.margins import build_margin
from facescale.heads.partial_fc import PartialFCHead, init_center_rows
from facescale.parallel.collectives import rank_and_world
from tests.distributed import run_ranks
from tests.pfc_reference import reference_loss

NUM_CLASSES, DIM, BATCH, SEED, STD = 11, 6, 3, 123, 0.5
MARGINS = [
    MarginConfig(type="arcface", s=16.0, m2=0.5),
    MarginConfig(type="cosface", s=30.0, m3=0.4, interclass_filtering_threshold=0.3),
    MarginConfig(type="combined", s=8.0, m1=1.2, m2=0.3, m3=0.1),
    MarginConfig(type="arcface_straight_through", s=16.0, m2=0.5),
]


def _global_batch(world: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    emb = torch.randn(world * BATCH, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (world * BATCH,), generator=gen, dtype=torch.int32)
    return emb, labels


def _head(
    cfg: MarginConfig, sample_rate: float = 1.0, update: str = "sparse", dtype=torch.float64
) -> PartialFCHead:
    return PartialFCHead(
        NUM_CLASSES,
        DIM,
        build_margin(cfg),
        seed=SEED,
        sample_rate=sample_rate,
        optimizer="sgd",
        update=update,
        momentum=0.0,
        weight_decay=0.0,
        storage_dtype=dtype,
        init_std=STD,
    )


def _step(head: PartialFCHead, emb: torch.Tensor, labels: torch.Tensor, step: int = 0):
    """One trainer-style step with lr 1 and plain SGD: returns loss, stats, local emb grad, center grad."""
    rank, _ = rank_and_world()
    local = emb[rank * BATCH : (rank + 1) * BATCH].clone().requires_grad_()
    loss, stats = head(local, labels[rank * BATCH : (rank + 1) * BATCH], step)
    loss.backward()
    before = head.centers.clone()
    head.optimizer_step(1.0)
    return loss, stats, local.grad, before - head.centers


def _reference(emb, centers, labels, cfg, rows):
    emb = emb.clone().requires_grad_()
    centers = centers.clone().requires_grad_()
    loss = reference_loss(emb, centers, labels.long(), cfg)
    loss.backward()
    return loss, emb.grad[rows], centers.grad


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _head_worker(rank: int, world: int) -> dict:
    out: dict = {"full": [], "sampled": []}
    emb, labels = _global_batch(world)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    full = init_center_rows(0, NUM_CLASSES, DIM, STD, SEED).double()
    for cfg in MARGINS:  # sample_rate 1: loss, embedding grads and every center grad
        head = _head(cfg)
        shard = slice(head.start, head.start + head.count)
        out["init_matches_global"] = torch.equal(head.centers, full[shard])
        loss, _, emb_grad, center_grad = _step(head, emb, labels)
        ref_loss, ref_emb_grad, ref_center_grad = _reference(emb, full, labels, cfg, rows)
        out["full"].append(
            (
                loss.item(),
                ref_loss.item(),
                _rel_err(emb_grad, ref_emb_grad),
                _rel_err(center_grad, ref_center_grad[shard]) if head.count else 0.0,
            )
        )

    for rate in (0.5, 0.0):  # sampling: reference restricted to exactly the sampled centers
        head = _head(MARGINS[0], sample_rate=rate)
        loss, stats, emb_grad, center_grad = _step(head, emb, labels, step=3)
        mine = head.last_sampled_classes.tolist()
        everyone = [None] * world
        dist.all_gather_object(everyone, mine) if world > 1 else everyone.__setitem__(0, mine)
        kept = torch.tensor(sorted(c for ids in everyone for c in ids))
        remap = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
        remap[kept] = torch.arange(len(kept))
        ref_loss, ref_emb_grad, ref_center_grad = _reference(
            emb, full[kept], remap[labels.long()], MARGINS[0], rows
        )
        local_cols = (kept >= head.start) & (kept < head.start + head.count)
        unsampled = torch.ones(head.count, dtype=torch.bool)
        unsampled[torch.tensor(mine, dtype=torch.long) - head.start] = False
        out["sampled"].append(
            {
                "loss": loss.item(),
                "ref_loss": ref_loss.item(),
                "emb_err": _rel_err(emb_grad, ref_emb_grad),
                "center_err": _rel_err(center_grad[~unsampled], ref_center_grad[local_cols])
                if len(mine)
                else 0.0,
                "unsampled_unchanged": bool((center_grad[unsampled] == 0).all()),
                "width_ok": stats["num_sampled"]
                == max(int(rate * head.count), stats["num_positive"])
                == len(mine),
                "all_positives": set(labels.tolist()) <= set(kept.tolist()),
            }
        )

    # gradient accumulation: two forward/backward pairs then one step == sum of the two single-step updates
    deltas = []
    for steps in ((0, 1), (0,), (1,)):
        head = _head(MARGINS[1], sample_rate=0.5)
        before = head.centers.clone()
        for step in steps:
            step_emb, step_labels = _global_batch(world, step)
            local = step_emb[rows].clone().requires_grad_()
            head(local, step_labels[rows], step)[0].backward()
        head.optimizer_step(1.0)
        deltas.append(before - head.centers)
    out["accumulation_err"] = float((deltas[0] - deltas[1] - deltas[2]).abs().max())

    # bf16 embeddings into fp32 centers: fp32 loss close to the float64 value, bf16 grads for DeepSpeed
    head32 = _head(MARGINS[0], dtype=torch.float32)
    local = emb[rows].to(torch.bfloat16).requires_grad_()
    loss_bf16, _ = head32(local, labels[rows], 0)
    loss_bf16.backward()
    out["bf16"] = (str(loss_bf16.dtype), str(local.grad.dtype), loss_bf16.item(), out["full"][0][1])

    # checkpoint round trip and metadata checks
    state = head32.state_dict()
    fresh = _head(MARGINS[0], dtype=torch.float32)
    fresh.load_state_dict(state)
    out["meta"] = state["meta"]
    out["roundtrip"] = torch.equal(fresh.centers, head32.centers)
    try:
        fresh.load_state_dict({**state, "meta": {**state["meta"], "start": state["meta"]["start"] + 1}})
        out["bad_meta_error"] = None
    except ValueError as err:
        out["bad_meta_error"] = str(err)

    # more ranks than classes: the last shard is empty yet takes part in every collective
    tiny_classes = max(world - 1, 1)
    tiny = PartialFCHead(
        tiny_classes,
        DIM,
        build_margin(MARGINS[0]),
        seed=SEED,
        storage_dtype=torch.float64,
        init_std=STD,
        momentum=0.0,
        weight_decay=0.0,
    )
    tiny_labels = labels % tiny_classes
    loss, _, emb_grad, _ = _step(tiny, emb, tiny_labels)
    ref_loss, ref_emb_grad, _ = _reference(emb, full[:tiny_classes], tiny_labels, MARGINS[0], rows)
    out["empty_shard"] = (tiny.count, loss.item(), ref_loss.item(), _rel_err(emb_grad, ref_emb_grad))

    # a label outside [0, C) on rank 0 stops every rank with the same error
    bad_labels = labels[rows].clone()
    bad_labels[0] = NUM_CLASSES if rank == 0 else bad_labels[0]
    try:
        head32(emb[rows].float(), bad_labels, 0)
        out["label_error"] = None
    except ValueError as err:
        out["label_error"] = str(err)

    if world > 1:  # unequal per-rank batch sizes fail on every rank with a message naming them
        short = emb[rows][: BATCH - 1] if rank == world - 1 else emb[rows]
        try:
            head32(short.float(), labels[rows][: short.shape[0]], 0)
            out["size_error"] = None
        except ValueError as err:
            out["size_error"] = str(err)
    return out


def _check(results: list[dict], world: int) -> None:
    for rank, res in enumerate(results):
        assert res["init_matches_global"]
        for mine, ref, emb_err, center_err in res["full"]:
            assert mine == pytest.approx(ref, rel=1e-10)
            assert emb_err < 1e-5 and center_err < 1e-5, (emb_err, center_err)
        assert [f[0] for f in res["full"]] == [f[0] for f in results[0]["full"]]  # identical on every rank
        for sampled in res["sampled"]:
            assert sampled["loss"] == pytest.approx(sampled["ref_loss"], rel=1e-10)
            assert sampled["emb_err"] < 1e-5 and sampled["center_err"] < 1e-5
            assert sampled["unsampled_unchanged"] and sampled["width_ok"] and sampled["all_positives"]
        assert res["accumulation_err"] < 1e-12
        loss_dtype, grad_dtype, loss_bf16, loss_ref = res["bf16"]
        assert (loss_dtype, grad_dtype) == ("torch.float32", "torch.bfloat16")
        assert loss_bf16 == pytest.approx(loss_ref, rel=2e-2)
        start = sum(r["meta"]["count"] for r in results[:rank])
        assert res["meta"] == {
            "num_classes": NUM_CLASSES,
            "start": start,
            "count": res["meta"]["count"],
            "embedding_size": DIM,
            "optimizer": "sgd",
            "update": "sparse",
        }
        assert res["roundtrip"] and "reshard" in res["bad_meta_error"]
        if world > 1:
            sizes = [BATCH] * (world - 1) + [BATCH - 1]
            assert str(sizes) in res["size_error"]
        count, loss, ref_loss, emb_err = res["empty_shard"]
        assert count == (0 if world > 1 and rank == world - 1 else 1)
        assert loss == pytest.approx(ref_loss, rel=1e-10) and emb_err < 1e-5
        assert "on ranks [0]" in res["label_error"]
    assert sum(r["meta"]["count"] for r in results) == NUM_CLASSES


def test_single_process_head_matches_reference() -> None:
    _check([_head_worker(0, 1)], 1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_multi_rank_head_matches_reference(world: int) -> None:
    _check(run_ranks(_head_worker, world), world)


@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_sampled_step_allocates_nothing_of_shard_by_dim_or_batch_by_shard(update: str) -> None:
    num_classes, dim, batch = 60_000, 32, 16
    cfg = HeadConfig(sample_rate=0.1, update=update, margin=MarginConfig(interclass_filtering_threshold=0.4))
    head = build_head(cfg, num_classes, dim, seed=0)
    head.center_optimizer.block_rows = 2048
    emb, labels = torch.randn(batch, dim), torch.randint(0, num_classes, (batch,))
    with LargestAllocation() as tracker:
        for step in range(2):
            local = emb.clone().requires_grad_()
            loss, stats = head(local, labels, step)
            loss.backward()
            head.optimizer_step(0.1)
    assert stats["num_sampled"] == 6000
    assert tracker.largest <= 6000 * dim  # the sampled rows; C x D would be 10x that
    assert tracker.largest < batch * num_classes


@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_bf16_centers_with_fp32_embeddings_run_the_fp32_forward_and_backward(update: str) -> None:
    """bf16 storage fed fp32 embeddings (autocast off, e.g. a CPU without native bf16): the GEMMs run in fp32
    on the rows widened a block at a time (no C' x D fp32 copy). Loss and embedding gradient must be those of
    an fp32-storage head holding the same values, step after step (to fp32 rounding: the backward's product
    is accumulated over the blocks), and the sampled classes the same."""
    num_classes, dim, batch = 3000, 40, 24
    half, full = (
        PartialFCHead(
            num_classes,
            dim,
            build_margin(MARGINS[0]),
            seed=1,
            sample_rate=0.5,  # 1500 sampled rows: two blocks of the CPU's 1024-row GEMMs
            update=update,
            storage_dtype=dtype,
        )
        for dtype in (torch.bfloat16, torch.float32)
    )
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        full.centers.copy_(half.centers.float())  # (both brought up to date) the bf16 values, exactly
        emb = torch.randn(batch, dim, generator=gen)
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        grads, losses = [], []
        for head in (half, full):
            x = emb.clone().requires_grad_()
            loss, _ = head(x, labels, step)
            loss.backward()
            head.optimizer_step(0.1)
            grads.append(x.grad)
            losses.append(loss.detach())
        assert half.last_sampled_classes.equal(full.last_sampled_classes)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * float(grads[1].abs().max()))
