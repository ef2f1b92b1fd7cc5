"""The head's CPU thread budget (heads/cpu_threads.py): small torch ops on one thread, big work on all, the
caller's thread count restored on every exit, and the same numbers as a head that never narrows it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from facescale.config.schema import MarginConfig
from facescale.heads import center_optimizer, cpu_threads, dist_cross_entropy, norm_linear, partial_fc
from facescale.heads.cpu_threads import all_threads, small_ops_serial, thread_budget
from facescale.heads.margins import ArcFaceMargin, MarginSoftmaxSpec, build_margin
from facescale.heads.native import CenterKernels, center_kernels
from facescale.heads.partial_fc import PartialFCHead

CLASSES, DIM, BATCH = 3000, 512, 128  # [128, 512] and [128, C'] ops fork at 2 threads
CPU = torch.device("cpu")


def test_brackets_narrow_torch_and_give_the_budget_back(two_threads):
    assert thread_budget() == 2
    with small_ops_serial(CPU):
        assert torch.get_num_threads() == 1 and thread_budget() == 2
        with small_ops_serial(CPU):  # re-entrant: the inner bracket changes nothing
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
        with all_threads():
            assert torch.get_num_threads() == 2
            with all_threads():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and thread_budget() == 2
    with all_threads():  # outside a bracket: nothing to give back
        assert torch.get_num_threads() == 2


def test_brackets_restore_the_count_when_the_work_raises(two_threads):
    with pytest.raises(RuntimeError, match="boom"), small_ops_serial(CPU):
        with all_threads():
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2 and thread_budget() == 2


def test_only_the_cpu_with_several_threads_is_narrowed(two_threads):
    with small_ops_serial(torch.device("meta")):
        assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    with small_ops_serial(CPU):
        assert torch.get_num_threads() == 1 and thread_budget() == 1


class _RecordingArcFace(ArcFaceMargin):
    """ArcFace that notes torch's thread count each time the head applies it (a small op of the forward)."""

    def __init__(self) -> None:
        super().__init__(0.5)
        self.seen: list[int] = []

    def __call__(self, cos: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return super().__call__(cos)


def _head(dtype: torch.dtype, update: str, margin=None) -> PartialFCHead:
    spec = margin or build_margin(MarginConfig(type="arcface", s=64.0, m2=0.5))
    return PartialFCHead(
        CLASSES, DIM, spec, seed=5, sample_rate=0.2, update=update, storage_dtype=dtype, momentum=0.9
    )


def _steps(head: PartialFCHead, dtype: torch.dtype, count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    losses = []
    for step in range(count):
        x = torch.randn(BATCH, DIM, generator=gen).to(dtype).requires_grad_()
        labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        loss, _ = head(x, labels, step)
        loss.backward()
        head.optimizer_step(0.1)
        losses.append(loss.detach())
        losses.append(x.grad)
    return losses


@pytest.mark.skipif(center_kernels() is None, reason="no C++ compiler: the head keeps torch's threading")
def test_head_runs_small_ops_on_one_thread_and_kernels_on_all(two_threads, monkeypatch):
    seen_by_kernel: list[tuple[int, int]] = []
    real_sgd = CenterKernels.sgd

    def recording_sgd(self, *args, **kwargs):
        seen_by_kernel.append((torch.get_num_threads(), thread_budget()))
        return real_sgd(self, *args, **kwargs)

    monkeypatch.setattr(CenterKernels, "sgd", recording_sgd)
    margin = _RecordingArcFace()
    head = _head(torch.float32, "sparse", MarginSoftmaxSpec(target_margin=margin, scale=64.0))
    _steps(head, torch.float32, count=2)
    assert margin.seen == [1, 1]  # the margin ran inside the forward's bracket
    assert seen_by_kernel and all(seen == (1, 2) for seen in seen_by_kernel)
    assert torch.get_num_threads() == 2  # every bracket closed


@pytest.mark.skipif(center_kernels() is None, reason="no C++ compiler: the head keeps torch's threading")
def test_head_gives_the_threads_back_when_its_forward_raises(two_threads):
    head = _head(torch.float32, "sparse")
    with pytest.raises(ValueError, match="labels outside"):
        head(torch.randn(BATCH, DIM), torch.full((BATCH,), CLASSES), 0)
    assert torch.get_num_threads() == 2


FILTERED = MarginConfig(type="cosface", s=64.0, m3=0.4, interclass_filtering_threshold=0.1)  # torch's passes


@pytest.mark.parametrize(
    ("dtype", "update", "margin"),
    [
        (torch.float32, "sparse", None),
        (torch.float32, "dense", None),
        (torch.bfloat16, "sparse", None),
        (torch.bfloat16, "dense", None),
        (torch.float32, "sparse", FILTERED),
    ],
)
def test_narrowing_leaves_every_number_unchanged(two_threads, monkeypatch, dtype, update, margin):
    spec = None if margin is None else build_margin(margin)
    narrowed = _head(dtype, update, spec)
    narrowed_out = _steps(narrowed, dtype)
    for module in (partial_fc, center_optimizer, norm_linear, dist_cross_entropy):
        monkeypatch.setattr(module, "small_ops_serial", lambda device: contextlib.nullcontext())
    plain = _head(dtype, update, spec)
    plain_out = _steps(plain, dtype)
    for a, b in zip(narrowed_out, plain_out, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(narrowed.centers, plain.centers)
    for name, value in narrowed.center_optimizer.state_tensors().items():
        assert torch.equal(value, plain.center_optimizer.state_tensors()[name]), name
    assert cpu_threads.thread_budget() == 2


@pytest.mark.skipif(center_kernels() is None, reason="no C++ compiler: the head keeps torch's threading")
def test_torch_passes_of_the_filtered_softmax_keep_every_thread(two_threads, monkeypatch):
    seen: list[int] = []
    real = dist_cross_entropy._filtered_negatives

    def recording(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(dist_cross_entropy, "_filtered_negatives", recording)
    _steps(_head(torch.float32, "sparse", build_margin(FILTERED)), torch.float32, count=1)
    assert seen == [2, 2]  # forward's mask and backward's, each in a [N, C'] pass on all threads
