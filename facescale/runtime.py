"""The one place where CPU and GPU differ: device, collective backend, precision, DeepSpeed accelerator."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from facescale.config.errors import ConfigError
from launcher.env import LaunchEnvError

# a resolved `deepspeed.precision` -> the dtype the backbone computes in (fp32: no autocast)
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """What this process computes on and how it talks to the others."""

    device: torch.device
    backend: str  # nccl on CUDA, gloo on CPU
    precision: str  # fp32 | bf16 | fp16

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def select_runtime(local_rank: int, requested_precision: str = "auto") -> Runtime:
    """Pick the device for `local_rank` (CUDA when present, else CPU) and the matching backend and precision.

    Must run before `deepspeed` is imported: on a CPU-only host it sets DS_ACCELERATOR=cpu so DeepSpeed does
    not probe for CUDA.
    """
    if torch.cuda.is_available():
        index, count = local_rank, torch.cuda.device_count()
        if local_rank >= count == 1:  # Slurm --gpus-per-task=1 / --gpu-bind=single: a task sees its own GPU
            index = 0
            os.environ["LOCAL_RANK"] = "0"  # DeepSpeed's engine takes its device from LOCAL_RANK
        elif local_rank >= count:
            raise LaunchEnvError(
                f"LOCAL_RANK {local_rank} but only {count} CUDA devices are visible",
                fix="launch one process per GPU (srun --ntasks-per-node / torchrun --nproc_per_node)")
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = True  # fixed 112 px shapes: cuDNN's fastest (as arcface_torch)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    return Runtime(device=device, backend=backend, precision=resolve_precision(requested_precision, device))


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast runs at full speed here: a CUDA device with bf16 (Ampere+), or a CPU whose oneDNN has
    native bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 would be emulated and slower than fp32."""
    if device.type == "cuda":  # not counting emulation: torch's default says yes on a V100 or T4
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` means bf16 autocast where the device runs bf16 natively (see `bf16_supported`), else fp32;
    fp16 needs CUDA (loss scaling)."""
    if requested == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("deepspeed.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return requested


def configure_threads(ranks_on_host: int) -> None:
    """Split this host's cores between its ranks so that intra-op thread pools do not oversubscribe."""
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, ranks_on_host)))
