"""NormLinear cosines, the fused margin cross-entropy and the row collectives, against plain references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facescale.config.schema import MarginConfig
from facescale.heads import norm_linear as norm_linear_module
from facescale.heads.allocations import LargestAllocation
from facescale.heads.dist_cross_entropy import margin_cross_entropy
from facescale.heads.margins import build_margin
from facescale.heads.native import center_kernels
from facescale.heads.norm_linear import CenterGrad, norm_linear
from facescale.parallel.collectives import (
    all_gather_rows_with_grad,
    check_equal_batch_sizes,
    reduce_scatter_rows,
    reduce_scatter_rows_by_all_reduce,
)
from facescale.parallel.partition import class_partition
from tests.distributed import run_ranks
from tests.pfc_reference import reference_logits_from_cos

MARGINS = [
    MarginConfig(type="arcface", s=64.0, m2=0.5),
    MarginConfig(type="cosface", s=30.0, m3=0.4, interclass_filtering_threshold=0.2),
    MarginConfig(type="combined", s=16.0, m1=1.2, m2=0.3, m3=0.1),
    MarginConfig(type="arcface_straight_through", s=64.0, m2=0.5, interclass_filtering_threshold=0.3),
]


def _problem(rows: int = 12, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines in (-0.9, 0.9) kept 1e-3 away from every filter threshold used above, and labels."""
    gen = torch.Generator().manual_seed(seed)
    cos = torch.rand(rows, classes, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    for t in (0.2, 0.3):
        near = (cos - t).abs() < 1e-3
        cos[near] += 3e-3
    labels = torch.randint(0, classes, (rows,), generator=gen)
    return cos, labels


def test_norm_linear_matches_normalize_then_linear_in_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    upstream = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    got = norm_linear(x, w)
    expected = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, (x, w), upstream)
    expected_grads = torch.autograd.grad(expected, (x, w), upstream)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(norm_linear, (x, w))


def test_norm_linear_half_inputs_give_fp32_cosines() -> None:
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 16, generator=gen), torch.randn(20, 16, generator=gen)
    exact = norm_linear(x, w)
    for dtype in (torch.bfloat16, torch.float16):
        got = norm_linear(x.to(dtype), w.to(dtype))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, exact, rtol=0, atol=2e-2)
    mixed = norm_linear(x.to(torch.bfloat16).requires_grad_(), w.requires_grad_())  # bf16 emb, fp32 centers
    assert mixed.dtype == torch.float32
    mixed.sum().backward()
    assert w.grad.dtype == torch.float32


@pytest.mark.parametrize("cfg", MARGINS, ids=lambda c: c.type)
def test_single_rank_loss_and_grad_match_plain_cross_entropy(cfg: MarginConfig) -> None:
    cos, labels = _problem()
    spec = build_margin(cfg)
    mine = cos.clone().requires_grad_()
    loss = margin_cross_entropy(mine, labels, spec)
    ref = cos.clone().requires_grad_()
    ref_loss = F.cross_entropy(reference_logits_from_cos(ref, labels, cfg), labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    (loss * 3.0).backward()  # the upstream gradient is honoured (no .item())
    (ref_loss * 3.0).backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-10, atol=1e-14)


def test_gradcheck_fused_loss_float64() -> None:
    cos, labels = _problem(rows=5, classes=4, seed=3)
    for cfg in MARGINS[:3]:
        spec = build_margin(cfg)
        assert torch.autograd.gradcheck(
            lambda c, s=spec: margin_cross_entropy(c, labels, s), (cos.clone().requires_grad_(),)
        )


def test_float32_cosines_give_float32_loss_matching_float64() -> None:
    cos, labels = _problem()
    spec = build_margin(MARGINS[0])
    loss32 = margin_cross_entropy(cos.float(), labels, spec)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), margin_cross_entropy(cos, labels, spec), rtol=1e-5, atol=0)


def _sharded_loss_worker(rank: int, world: int) -> dict:
    """Each rank owns a column block; compares loss and its column grads with the single-process result."""
    out: dict = {"loss": [], "grad_err": [], "ref_loss": [], "loss32": [], "grad32_err": []}
    cos, labels = _problem(rows=8, classes=7, seed=4)  # 7 columns over 3 ranks: 3, 2, 2
    start, count = class_partition(cos.shape[1], world, rank)
    mine_cols = (labels >= start) & (labels < start + count)
    target_col = torch.where(mine_cols, labels - start, -1)
    for cfg in MARGINS:
        spec = build_margin(cfg)
        local = cos[:, start : start + count].clone().requires_grad_()
        loss = margin_cross_entropy(local, target_col, spec)
        loss.backward()
        ref = cos.clone().requires_grad_()
        ref_loss = F.cross_entropy(reference_logits_from_cos(ref, labels, cfg), labels)
        ref_loss.backward()
        out["loss"].append(loss.item())
        out["ref_loss"].append(ref_loss.item())
        out["grad_err"].append((local.grad - ref.grad[:, start : start + count]).abs().max().item())
        if spec.filter_threshold == 0:  # fp32 in the head's buffer, in place (native passes on the CPU)
            cos32 = cos[:, start : start + count].float().requires_grad_()
            loss32 = margin_cross_entropy(cos32.clone(), target_col, spec, in_place=True)
            loss32.backward()
            out["loss32"].append((loss32.item(), ref_loss.item()))
            err = (cos32.grad.double() - ref.grad[:, start : start + count]).abs().max()
            out["grad32_err"].append(err.item())

    # collectives: reduce-scatter (native and fallback) and the all-gather's gradient
    full = torch.arange(world * 2 * 3, dtype=torch.float64).reshape(world * 2, 3) * (rank + 1)
    expected = (
        torch.arange(world * 2 * 3, dtype=torch.float64).reshape(world * 2, 3)
        * sum(r + 1 for r in range(world))
    )[rank * 2 : (rank + 1) * 2]
    out["rs_native_ok"] = torch.equal(reduce_scatter_rows(full), expected)
    out["rs_fallback_ok"] = torch.equal(reduce_scatter_rows_by_all_reduce(full), expected)
    rows = torch.full((2, 3), float(rank), dtype=torch.float64, requires_grad=True)
    gathered = all_gather_rows_with_grad(rows)
    out["gather_ok"] = torch.equal(gathered[:, 0], torch.arange(world).repeat_interleave(2).double())
    (gathered * (rank + 1)).sum().backward()  # every rank's loss weights all gathered rows by rank+1
    out["gather_grad_ok"] = torch.equal(
        rows.grad, torch.full((2, 3), float(sum(range(1, world + 1))), dtype=torch.float64)
    )
    try:
        check_equal_batch_sizes(4 if rank == 1 else 5, torch.device("cpu"))
        out["size_error"] = None
    except ValueError as err:
        out["size_error"] = str(err)
    return out


def test_sharded_loss_matches_single_process_on_three_ranks() -> None:
    results = run_ranks(_sharded_loss_worker, 3)
    for res in results:
        assert res["loss"] == pytest.approx(results[0]["loss"], rel=1e-14)  # same value on every rank
        assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-12)
        assert max(res["grad_err"]) < 1e-12
        for loss32, ref_loss in res["loss32"]:  # fp32 logits up to s = 64: a few fp32 ulps of 64 in each
            assert loss32 == pytest.approx(ref_loss, rel=1e-5)
        assert len(res["grad32_err"]) == 2 and max(res["grad32_err"]) < 4e-6  # |grad| <= s / N = 8
        assert res["rs_native_ok"] and res["rs_fallback_ok"]
        assert res["gather_ok"] and res["gather_grad_ok"]
        assert res["size_error"] is not None and "[5, 4, 5]" in res["size_error"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_norm_linear_into_a_buffer_without_a_sink_gives_exact_gradients(overwrite: bool) -> None:
    """out=buffer and no CenterGrad: d/dW and d/dx equal normalize-then-linear in float64, also when the
    caller scales the buffer in place after forward (as the head does with its logits)."""
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    w64 = torch.randn(9, 5, generator=g, dtype=torch.float64)
    target = torch.randn(6, 9, generator=g, dtype=torch.float64)
    ref_x, ref_w = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    ((F.normalize(ref_x, dim=1) @ F.normalize(ref_w, dim=1).t()).mul(2.0).sin() * target).sum().backward()
    x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
    buffer = torch.empty(6, 9)
    cos = norm_linear(x, w, out=buffer)
    logits = cos.mul_(2.0) if overwrite else cos * 2.0
    (logits.sin() * target.float()).sum().backward()
    torch.testing.assert_close(w.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fp32_gemm", ["onednn", "torch"])
@pytest.mark.parametrize("narrow", [True, False])
def test_cosines_into_a_buffer_wider_than_one_gemm_block_match_float64(
    fp32_gemm: str, narrow: bool, backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 cosines into a reused buffer run as several column-block GEMMs (2500 centers: two full blocks and
    a ragged one); every column equals normalize-then-linear in float64, on either fp32 backend: oneDNN's
    fresh blocks are scaled and clamped on their way into the buffer (one kernel call per block); torch.mm
    writes into the buffer, scaled and clamped after in one pass."""
    if fp32_gemm == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    backend(fp32_gemm)
    if narrow:  # 1024-row oneDNN blocks, as at big N; else ~2 MiB products: one block at N = 7
        monkeypatch.setattr(norm_linear_module, "_FRESH_BLOCK_BYTES", 0)
    kernels = center_kernels()
    calls: list[tuple[int, ...]] = []
    if kernels is not None:
        into = kernels.scale_clamp_into

        def counted(product: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(product.shape))
            return into(product, scale, out)

        monkeypatch.setattr(kernels, "scale_clamp_into", counted)
    g = torch.Generator().manual_seed(4)
    x64 = torch.randn(7, 16, generator=g, dtype=torch.float64)
    w64 = torch.randn(2500, 16, generator=g, dtype=torch.float64)
    expected = F.normalize(x64, dim=1) @ F.normalize(w64, dim=1).t()
    buffer = torch.full((7, 2500), float("nan"))
    got = norm_linear(x64.float(), w64.float(), out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    if kernels is not None:  # per fresh block on its way in, or one pass over the buffer torch.mm wrote
        blocks = [(7, 1024), (7, 1024), (7, 452)] if narrow else [(7, 2500)]
        assert calls == (blocks if fp32_gemm == "onednn" else [(7, 2500)])


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("buffer", [False, True])
def test_bf16_centers_with_fp32_embeddings_match_float64_with_no_fp32_copy(sink: bool, buffer: bool) -> None:
    """bf16 rows met by fp32 x (bf16 storage where autocast is off): fp32 GEMMs on the rows widened 1024 at a
    time (2500 rows: two whole blocks and a ragged one). Cosines and d/dx equal float64 normalize-then-linear
    of the same bf16 values, and no op allocates a [2500, D] tensor (an up-cast copy of the rows)."""
    g = torch.Generator().manual_seed(6)
    x64 = torch.randn(7, 16, generator=g, dtype=torch.float64)
    w16 = torch.randn(2500, 16, generator=g).to(torch.bfloat16)
    target = torch.randn(7, 2500, generator=g, dtype=torch.float64)
    ref_x = x64.clone().requires_grad_()
    expected = F.normalize(ref_x, dim=1) @ F.normalize(w16.double(), dim=1).t()
    (expected * target).sum().backward()
    x = x64.float().requires_grad_()
    out = torch.empty(7, 2500) if buffer else None
    with LargestAllocation() as tracker:
        cos = norm_linear(x, w16, CenterGrad() if sink else None, out=out)
        got = cos.detach().clone()
        (cos * target.float()).sum().backward()
    assert tracker.largest < 2500 * 16
    torch.testing.assert_close(got.double(), expected.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-5)
