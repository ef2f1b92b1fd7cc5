"""The class-center head's forward and backward never make the host wait for the device (CPU-checkable part).

Ops that sync on CUDA are counted at dispatch (tests/sync_counter.py), so this runs on CPU: the only ones
allowed are in the CPU label check, which a single CUDA process replaces by a device-side assert (the GPU
test in tests/test_gpu.py runs the same step under torch.cuda.set_sync_debug_mode("error")).
"""

from __future__ import annotations

import torch

from facescale.config.schema import HeadConfig
from facescale.heads import build_head
from facescale.heads.sampling import sample_centers, sampling_generator
from tests.sync_counter import SyncCounter

CPU_LABEL_CHECK = "heads/partial_fc.py:_check_batch_across_ranks"


def _step_hits(sample_rate: float, update: str) -> tuple[list, list]:
    head = build_head(HeadConfig(sample_rate=sample_rate, update=update), 5000, 32, seed=1)
    embeddings = torch.randn(16, 32, requires_grad=True)
    labels = torch.randint(0, 5000, (16,))
    hits = []
    for step in range(2):
        head.zero_grad()
        with SyncCounter() as forward:
            loss, stats = head(embeddings, labels, step)
        with SyncCounter() as backward:
            loss.backward()
        head.optimizer_step(0.1)
        hits.append((forward.hits, backward.hits))
        assert float(stats["num_positive"]) == labels.unique().numel()  # the lazy stat is still right
    return [h for f, _ in hits for h in f], [h for _, b in hits for h in b]


def test_counter_sees_the_syncs_it_names():
    x = torch.arange(6)
    with SyncCounter() as counter:
        x[x > 2]  # boolean mask -> nonzero on CUDA
        x.sum().item()
        torch.nonzero(x)
    assert [op for op, _ in counter.hits] == ["index", "_local_scalar_dense", "nonzero"]


def test_head_forward_and_backward_sync_only_in_the_cpu_label_check():
    for rate, update in ((0.1, "dense"), (0.1, "sparse"), (1.0, "dense")):
        forward, backward = _step_hits(rate, update)
        assert backward == [], (rate, update, backward)
        assert forward and {where for _, where in forward} == {CPU_LABEL_CHECK}, (rate, update, forward)


def test_sampling_reads_the_positive_count_only_when_the_budget_is_below_the_batch():
    labels = torch.tensor([3, 3, 7, 11, 40, 41, 42, 43])
    with SyncCounter() as roomy:
        sample = sample_centers(labels, 0, 100, 10, sampling_generator(1, 0, 0))
    assert roomy.hits == [] and sample.num_positive == 7 and sample.index.numel() == 10
    with SyncCounter() as tight:
        sample = sample_centers(labels, 0, 100, 4, sampling_generator(1, 0, 0))
    assert [op for op, _ in tight.hits] == ["_local_scalar_dense", "nonzero"]
    assert sample.index.tolist() == [3, 7, 11, 40, 41, 42, 43]
