"""The CUDA branches that can be checked without a GPU: torch's CUDA answers are stood in for (as a V100, a
Slurm task bound to one GPU, a node with fewer GPUs than the one that saved), the rest of the code is real."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from facescale.runtime import bf16_supported, resolve_precision, select_runtime
from launcher.env import LaunchEnvError


def _cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> list[int]:
    """torch answers as on a host where `count` GPUs are visible; returns the set_device calls."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # put back after
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_a_slurm_task_bound_to_one_gpu_takes_the_one_it_sees(monkeypatch) -> None:
    """srun --gpus-per-task=1 / --gpu-bind=single:1: SLURM_LOCALID (the local rank) is 0-7, but each task
    sees only its own GPU as device 0; DeepSpeed's engine picks its device from LOCAL_RANK, which must say
    so too."""
    chosen = _cuda(monkeypatch, count=1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    runtime = select_runtime(3, "fp32")
    assert (runtime.device, runtime.backend, chosen) == (torch.device("cuda", 0), "nccl", [0])
    assert os.environ["LOCAL_RANK"] == "0"


def test_more_ranks_than_visible_gpus_is_refused(monkeypatch) -> None:
    _cuda(monkeypatch, count=2)
    with pytest.raises(LaunchEnvError, match="LOCAL_RANK 3 but only 2 CUDA devices are visible"):
        select_runtime(3, "fp32")


def test_precision_auto_does_not_pick_emulated_bf16(monkeypatch) -> None:
    """On a V100 or T4 (sm70/75) torch's is_bf16_supported() says yes by default, counting emulation; bf16
    there is slower than fp32, so `precision: auto` must resolve to fp32."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:  # torch's answers on sm70
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda", 0)
    assert not bf16_supported(cuda) and resolve_precision("auto", cuda) == "fp32"


def test_cuda_rng_resumes_on_a_node_with_fewer_gpus(monkeypatch) -> None:
    """A rank keeps its own device's CUDA generator; a file written with every visible GPU's (8 on the
    saving node) restores this rank's entry on a node that sees fewer (set_rng_state_all: IndexError)."""
    from facescale.checkpoint import rank_state

    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: states[2])
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    saved = rank_state.rng_state()
    assert torch.equal(saved["cuda"], states[2])
    rank_state.set_rng_state(saved)
    rank_state.set_rng_state({**saved, "cuda": states})  # the older format: a list of the node's GPUs
    assert [int(state[0]) for state in restored] == [2, 2]


def test_fp16_has_the_engine_cast_its_inputs() -> None:
    """DeepSpeed's fp16 turns the backbone's weights to half; without auto_cast the fp32 images met them
    ("Input type (FloatTensor) and weight type (HalfTensor) should be the same") at the first forward."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from facescale.config.deepspeed import deepspeed_json
    from facescale.config.schema import Config

    ds = DeepSpeedConfig(deepspeed_json(Config(), 1, "fp16"))
    assert ds.float16_config.enabled and ds.float16_config.auto_cast


def test_the_partial_fc_head_is_built_on_the_runs_device(monkeypatch) -> None:
    """Built on the CPU and moved, the head missed its GPU settings (the center optimizer's 65536-row blocks
    are chosen at construction on CUDA; the CPU's 2048 ran 147 small updates per dense step at 300k rows)."""
    from facescale.config.schema import Config
    from facescale.partial_fc import mode as partial_fc_mode

    devices: list[object] = []
    real = partial_fc_mode.build_head

    def build_head(*args, **kwargs):
        devices.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(partial_fc_mode, "build_head", build_head)
    monkeypatch.setattr(partial_fc_mode, "build_train_loader", lambda *args, **kwargs: None)
    cfg = Config()
    cfg.model.embedding_size = 8
    device = torch.device("cpu")
    partial_fc_mode.MODE.build(cfg, None, SimpleNamespace(num_classes=10), rank=0, world_size=1,
                               micro_batch=2, precision="fp32", device=device)
    assert devices == [device]
