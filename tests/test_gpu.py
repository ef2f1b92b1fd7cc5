"""On one CUDA device: the runtime's choices, the head against the CPU fp32 oracle, no host sync in the head,
DALI mixed decoding, and peak head memory against `facescale plan`. Skipped with a reason without CUDA.

`make gpu-check` runs these and the GPU benchmarks (benchmarks/gpu_check.py). Needs torch (CUDA) and
facescale's pure-Python dependencies; DeepSpeed and DALI are optional: their tests skip when missing.
"""

from __future__ import annotations

import os

import pytest
import torch

from facescale.config.schema import HeadConfig, MarginConfig
from facescale.heads import build_head
from tests.pfc_reference import reference_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

C, D, B = 4000, 128, 64
FP32_TOL = 1e-5  # fp32 on CUDA vs fp32 on CPU: same math, different summation order (TF32 off)
BF16_LOSS_REL = 2e-2  # bf16 centers (8-bit mantissa, rel. rounding 2^-9) at s = 64: loss within 2%
BF16_GRAD_REL = 5e-2  # embedding gradients within 5% of the fp32 gradient's norm
JPEG_MEAN_LEVELS, JPEG_MAX_LEVELS = 1.0, 24  # nvJPEG vs libjpeg-turbo: IDCT rounding and chroma upsampling
MEMORY_TOL = 0.15  # peak CUDA memory of a head step vs `facescale plan`


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True, scope="module")
def _nccl_torn_down():
    """The NCCL world some tests start is destroyed before pytest exits (a live group can abort at exit)."""
    yield
    from facescale.parallel.init import shutdown_distributed

    shutdown_distributed()


def _batch(device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(B, D, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    return embeddings.to(device), labels.to(device)


def _head_step(device: str, storage: str = "fp32", sample_rate: float = 1.0):
    """Loss, embedding gradient and centers after one SGD step of a world-of-one head on `device`."""
    cfg = HeadConfig(sample_rate=sample_rate, storage_dtype=storage, margin=MarginConfig(s=64.0, m2=0.5))
    head = build_head(cfg, C, D, seed=3, device=device)
    start_centers = head.state_dict()["centers"].float().cpu()
    embeddings, labels = _batch(device)
    embeddings.requires_grad_(True)
    loss, _ = head(embeddings, labels, 0)
    loss.backward()
    head.optimizer_step(0.1)
    return (float(loss), embeddings.grad.float().cpu(), head.state_dict()["centers"].float().cpu(),
            start_centers, labels.cpu(), embeddings.detach().float().cpu())


def test_runtime_picks_nccl_bf16_and_the_gpu():
    from facescale.runtime import select_runtime

    runtime = select_runtime(0, "auto")
    assert runtime.device == torch.device("cuda", 0) and runtime.backend == "nccl"
    assert runtime.precision == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp32")  # Ampere+
    assert torch.backends.cudnn.benchmark  # as arcface_torch's train_v2.py: fixed 112 px shapes


def test_dali_loader_decodes_on_the_gpu(tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is optional on the GPU machine")
    from facescale.config.schema import DataConfig
    from facescale.data.loader import build_train_loader
    from facescale.data.synth import synthesize

    synthesize(tmp_path, identities=8, images_per_identity=4, holdout_identities=0, seed=1)
    cfg = DataConfig(shards=str(tmp_path), reader="dali", dali_threads=1)
    loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=8, seed=0, device=torch.device("cuda"))
    assert loader.device_id == 0  # -> fn.decoders.image(device="mixed") in build_pipeline
    images, labels = next(iter(loader))
    assert images.is_cuda and images.shape == (8, 3, 112, 112) and labels.is_cuda


def test_head_fp32_on_cuda_equals_the_cpu_fp32_oracle():
    loss, grad, centers, start, labels, embeddings = _head_step("cuda")
    oracle_embeddings = embeddings.double().requires_grad_(True)
    oracle_loss = reference_loss(oracle_embeddings, start.double(), labels, MarginConfig(s=64.0, m2=0.5))
    oracle_loss.backward()
    assert loss == pytest.approx(float(oracle_loss), rel=FP32_TOL)
    scale = float(grad.abs().max())
    torch.testing.assert_close(grad.double(), oracle_embeddings.grad, rtol=FP32_TOL, atol=FP32_TOL * scale)
    cpu_loss, cpu_grad, cpu_centers, *_ = _head_step("cpu")  # and the whole step equals the CPU head's
    assert loss == pytest.approx(cpu_loss, rel=FP32_TOL)
    torch.testing.assert_close(grad, cpu_grad, rtol=FP32_TOL, atol=FP32_TOL * scale)
    torch.testing.assert_close(centers, cpu_centers, rtol=FP32_TOL, atol=1e-7)
    assert not torch.equal(centers, start)


def test_head_bf16_on_cuda_is_within_its_stated_bound_of_fp32():
    loss, grad, *_ = _head_step("cuda", storage="bf16")
    ref_loss, ref_grad, *_ = _head_step("cpu", storage="fp32")
    assert loss == pytest.approx(ref_loss, rel=BF16_LOSS_REL)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < BF16_GRAD_REL


def _nccl_world_of_one():
    import torch.distributed as dist

    from launcher.ports import free_port

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    assert dist.get_backend() == "nccl"


def test_training_step_has_no_host_sync_in_the_head():
    """Backbone + head on one NCCL rank; the head's forward and backward run under sync debug mode "error"."""
    from facescale.config.schema import ModelConfig
    from facescale.models.registry import build_backbone

    _nccl_world_of_one()
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(name="demo", embedding_size=D)).cuda()
    head = build_head(HeadConfig(sample_rate=0.1), C, D, seed=3, device="cuda")
    images = torch.randn(B, 3, 112, 112, device="cuda")
    labels = torch.randint(0, C, (B,), device="cuda")
    for step in range(3):
        head.zero_grad()
        with torch.autocast("cuda", torch.bfloat16):
            embeddings = backbone(images)
        detached = embeddings.detach().float().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _ = head(detached, labels, step)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        (embeddings.float() * detached.grad).sum().backward()
        head.optimizer_step(0.1)
        assert torch.isfinite(loss)


def test_deepspeed_step_on_one_nccl_rank():
    """facescale's own train_step (engine, loss guard, surrogate) on CUDA; needs DeepSpeed."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed on this GPU machine")
    import deepspeed

    from facescale.deepspeed_ops import skip_unused_ops

    skip_unused_ops()  # no JIT build of DeepSpeed's inference-only comm op (minutes on a fresh venv)

    from facescale.config.deepspeed import deepspeed_json
    from facescale.config.schema import Config
    from facescale.models.registry import build_backbone
    from facescale.modes import StepContext
    from facescale.partial_fc.mode import PartialFCRun
    from facescale.train.step import train_step
    from facescale.train.trainer import build_backbone_optimizer

    _nccl_world_of_one()
    cfg = Config()
    cfg.model.name, cfg.model.embedding_size, cfg.schedule.global_batch_size = "demo", D, B
    backbone = build_backbone(cfg.model).cuda()
    engine, *_ = deepspeed.initialize(model=backbone, config=deepspeed_json(cfg, 1, "bf16"),
                                      optimizer=build_backbone_optimizer(cfg, backbone.parameters()))
    head = build_head(HeadConfig(sample_rate=0.1), C, D, seed=3, device="cuda")
    images, labels = torch.randn(B, 3, 112, 112, device="cuda"), torch.randint(0, C, (B,), device="cuda")
    run = PartialFCRun(head, None)
    contexts = [StepContext(engine, s, 0.05, 0.05, 1, 1, lambda: 0.0) for s in range(5)]
    losses = [train_step(run, iter([(images, labels)]), ctx).loss for ctx in contexts]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_dali_mixed_decode_matches_cpu_decode(tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is optional on the GPU machine")
    from facescale.data.dali_reader import build_pipeline
    from facescale.data.manifest import Manifest
    from facescale.data.synth import synthesize

    synthesize(tmp_path, identities=8, images_per_identity=8, holdout_identities=0, seed=2)
    manifest = Manifest.load(str(tmp_path))
    tars, idx = [str(p) for p in manifest.shard_paths()], [str(p) for p in manifest.index_paths()]
    decoded = {}
    for name, device_id in (("cpu", None), ("mixed", 0)):
        pipe = build_pipeline(tars, idx, shard_id=0, world_size=1, batch_size=32, num_threads=1,
                              device_id=device_id, seed=0, shuffle_buffer=1, mirror=False,
                              random_shuffle=False)
        images, labels = pipe.run()
        images = images.as_cpu() if name == "mixed" else images
        decoded[name] = (torch.stack([torch.from_numpy(images.at(i).copy()) for i in range(32)]).int(),
                         [int(labels.at(i)[0]) for i in range(32)])
    (cpu, cpu_labels), (gpu, gpu_labels) = decoded["cpu"], decoded["mixed"]
    assert cpu_labels == gpu_labels and cpu.shape == gpu.shape
    diff = (cpu - gpu).abs().float()
    assert diff.mean() <= JPEG_MEAN_LEVELS and diff.max() <= JPEG_MAX_LEVELS, (diff.mean(), diff.max())


def test_head_step_peak_memory_within_15_percent_of_the_plan():
    from facescale.partial_fc.plan import head_shard, head_step_bytes, sampled_columns

    classes, batch, dim = 1_000_000, 512, 512
    cfg = HeadConfig(sample_rate=0.1)
    shard = head_shard(cfg, classes, dim, world=1, rank=0)
    columns = sampled_columns(shard.num_sample, shard.rows, classes, batch)  # the 100,000 sampled
    step_bytes = sum(head_step_bytes(columns, batch, dim).values())
    predicted = shard.centers_bytes + shard.optimizer_bytes + step_bytes
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    head = build_head(cfg, classes, dim, seed=1, device="cuda")
    embeddings = torch.randn(batch, dim, device="cuda", requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device="cuda")
    for step in range(2):  # the second step runs with the reused buffers, as training does
        head.zero_grad()
        loss, _ = head(embeddings, labels, step)
        loss.backward()
        head.optimizer_step(0.1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base  # in a world of one the input is the gathered batch
    message = f"peak {peak / 2**20:.0f} MiB, plan {predicted / 2**20:.0f} MiB"
    assert abs(peak / predicted - 1) <= MEMORY_TOL, message
