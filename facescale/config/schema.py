"""Typed configuration tree: one dataclass per section, loaded from YAML by `facescale.config.load`."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

# Every choice list of the config, written once: loading and validation check values against these, and
# the modules that act on a choice read its values from here (`choices(...)`).
NormKind = Literal["batch", "group"]
ReaderKind = Literal["auto", "dali", "webdataset"]
JpegDecoderKind = Literal["auto", "simplejpeg", "pil"]
ShardSamplingKind = Literal["exact", "resampled"]
BadSamplePolicy = Literal["error", "skip"]
MarginKind = Literal["arcface", "cosface", "combined", "arcface_straight_through"]
OptimizerKind = Literal["sgd", "adamw"]
UpdateKind = Literal["dense", "sparse"]
StorageDtype = Literal["fp32", "bf16"]
PoolKind = Literal["replicated", "sharded"]
PrecisionKind = Literal["auto", "fp32", "bf16", "fp16"]
WandbModeKind = Literal["online", "offline", "disabled"]


def choices(kind: typing.Any) -> tuple[str, ...]:
    """The allowed values of one of the `Literal` choice types above, in declaration order."""
    return typing.get_args(kind)


@dataclass
class ModelConfig:
    """Backbone choice; `name` is a key of `facescale.models.registry`."""

    name: str = "r50"
    embedding_size: int = 512
    dropout: float = 0.0
    # "batch" (default, insightface-shaped) or "group" (batch-independent, used by equivalence tests)
    norm: NormKind = "batch"
    # ViTs only; unset = the variant's own (0.1/0.1 for vit_t/s/b, 0.05/0.05 for vit_l)
    drop_path_rate: float | None = None
    mask_ratio: float | None = None
    # start from existing backbone weights (arcface_torch backbone.pth, facescale backbone.pt or step dir);
    # not the optimizer (class centers: head.init_from); a resumed run ignores it
    init_from: str = ""
    init_strict: bool = True  # false: load the keys that match, print the skipped ones
    # torch.compile of the backbone inside the engine (facescale/models/compile.py); the first step pays
    # the compile (minutes on CPU, logged apart), later steps run the fused graph
    compile: bool = False
    compile_backend: str = "inductor"  # a torch.compile backend; "aot_eager" traces without code generation
    # a plug-in backbone's own settings, read by its factory from cfg.options (the keys it registered with
    # `register_backbone(name, options=...)`); the built-in backbones read none
    options: dict[str, typing.Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training shards and how they are read."""

    shards: str = ""  # directory holding manifest.json + *.tar (+ *.idx)
    reader: ReaderKind = "auto"
    image_size: int = 112
    num_workers: int = 1  # webdataset DataLoader workers per rank
    dali_threads: int = 2  # DALI CPU threads per rank
    jpeg_decoder: JpegDecoderKind = "auto"  # webdataset reader; auto = simplejpeg if installed
    shard_sampling: ShardSamplingKind = "exact"  # webdataset reader; exact = each sample once per epoch
    shuffle_buffer: int = 4096
    random_mirror: bool = True
    random_shift: int = 0  # max translation in pixels (0 = off); see facescale/data/augment.py
    brightness: float = 0.0  # brightness jitter: factor ~ U[1 - b, 1 + b] (0 = off)
    contrast: float = 0.0  # contrast jitter around 128: factor ~ U[1 - c, 1 + c] (0 = off)
    on_bad_sample: BadSamplePolicy = "error"
    max_skip_fraction: float = 0.01
    # no batch from a rank's loader workers within this (storage that hangs): every rank saves and stops;
    # below dist.timeout_s, so the others still wait for that save (0 = wait for ever)
    read_timeout_s: float = 300.0


@dataclass
class MarginConfig:
    """Margin on the target logit: cos(m1*theta + m2) - m3, scaled by s."""

    type: MarginKind = "arcface"
    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    interclass_filtering_threshold: float = 0.0


@dataclass
class F2CConfig:
    """F2C's Dynamic Class Pool (used when head.type is "f2c"); see facescale/f2c/__init__.py."""

    queue_size: int = 7409  # Q pool slots (one identity each, two G-Net feature rows per slot)
    momentum: float = 0.99  # G-Net EMA: g = momentum * g + (1 - momentum) * p, once per iteration
    identities_per_rank: int = 0  # B_id identities x 2 images per rank and micro-step; 0 = the micro batch
    pool: PoolKind = "replicated"  # replicated = reference semantics; sharded = slot owner by label hash


@dataclass
class HeadConfig:
    """The model-parallel class-center layer (Partial FC) or the F2C pool."""

    # the training mode: a name in facescale.modes.registry (partial_fc, f2c, a plug-in's: README "Plug-ins")
    type: str = "partial_fc"
    sample_rate: float = 1.0
    margin: MarginConfig = field(default_factory=MarginConfig)
    optimizer: OptimizerKind = "sgd"  # adamw takes optim.betas (one optimizer over both, as arcface_torch)
    update: UpdateKind = "dense"
    lr_scale: float = 1.0  # head lr = optim.lr * lr_scale
    momentum: float = 0.9
    weight_decay: float = 5e-4
    storage_dtype: StorageDtype = "fp32"
    init_std: float = 0.01
    # start from existing class centers (Partial FC): an arcface_torch output dir with checkpoint_gpu_*.pt
    # (save_all_states) or a [C, D] tensor from `facescale export-head`; optimizer state starts fresh, and a
    # resumed run ignores it
    init_from: str = ""
    f2c: F2CConfig = field(default_factory=F2CConfig)
    # a plug-in mode's own settings (the keys its TrainingMode.options names); the built-in modes read none
    options: dict[str, typing.Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Backbone optimizer (run by the DeepSpeed engine)."""

    name: OptimizerKind = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 5.0


@dataclass
class ScheduleConfig:
    """Step-based schedule: linear warmup then polynomial decay to zero."""

    steps: int = 1000
    warmup_steps: int = 0
    power: float = 2.0
    global_batch_size: int = 128  # = micro batch per rank * world size * grad accumulation
    # arcface_torch-style alternatives, resolved at start-up (facescale/config/schedule_resolve.py);
    # exactly one key of each pair may be set, 0 = unset
    epochs: float = 0.0  # instead of steps: epochs of the manifest's samples
    warmup_epochs: float = 0.0  # instead of warmup_steps
    batch_per_rank: int = 0  # instead of global_batch_size: images per rank and micro-step
    grad_accumulation: int = 1
    seed: int = 1234
    # a fresh run starts its schedule here (step count, lr, data position), to go on from a run trained
    # elsewhere (e.g. an arcface_torch checkpoint_gpu_0.pt's global_step, with model.init_from, whose
    # optimizer state then goes on too); 0 = start
    start_step: int = 0


@dataclass
class DeepSpeedConfig:
    """What the derived DeepSpeed JSON takes from us; batch sizes come from `schedule`."""

    zero_stage: int = 1
    precision: PrecisionKind = "auto"  # auto = bf16 where the device has it natively
    overlap_comm: bool = False
    extra: dict = field(default_factory=dict)  # merged last into the JSON, for expert knobs


@dataclass
class CheckpointConfig:
    """Where and how often the run is saved."""

    every_steps: int = 0  # 0 = only at the end
    keep_last: int = 3
    resume: str = "auto"  # auto | none | <path>
    # loss guard: a step with a non-finite loss or gradient is skipped; more than this many in a row save
    # the last good state and stop the run (0 = stop at the first one)
    max_bad_steps: int = 10


@dataclass
class WandbConfig:
    """Weights & Biases (the [wandb] extra): on when `project` is set; rank 0 logs what TensorBoard gets."""

    project: str = ""
    entity: str = ""
    name: str = ""  # "" = the run directory's name
    mode: WandbModeKind | None = None  # None: W&B's own choice (WANDB_MODE, else online)


@dataclass
class LoggingConfig:
    """Console, train.log, TensorBoard and optional Weights & Biases output."""

    run_dir: str = "runs/default"
    every_steps: int = 10
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    """Verification sets evaluated during and after training."""

    bins: list[str] = field(default_factory=list)
    every_steps: int = 0  # 0 = only at the end
    batch_size: int = 64


@dataclass
class DistConfig:
    """Process-group timeouts: long for start-up and checkpoint loading, shorter once training runs."""

    init_timeout_s: float = 1800.0
    timeout_s: float = 600.0  # a dead or hung rank ends the job within this


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
