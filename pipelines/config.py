"""The root config of every job: one typed tree, each section owned by its package.

``configs/*.yaml`` files hold partial trees merged onto these defaults; ``--set a.b=v``
overrides single keys. The resolved tree is written beside every output.
"""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic.dataclasses import dataclass

from degradations.config import DegradationConfig
from upsr.config import (
    AuxConfig,
    DenoiserConfig,
    DiffusionConfig,
    InferenceConfig,
    LossConfig,
    MetricsConfig,
    NoiseWeightConfig,
)
from pipelines.storage import redact_uri
from upsr.config_loader import SECTION, from_dict, load_config, to_dict, yaml_load

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


SAMPLE_COLLECTIONS = ("scikit-image", "scikit-learn", "matplotlib")


@dataclass(config=SECTION)
class SynthConfig:
    seed: int = 0
    crop_size: int = 256
    crops_per_image: int = 4
    # Files whose shorter side is below min_side are quarantined; sides between min_side and
    # crop_size are reflect-padded, as the authors did.
    min_side: int = 64
    # Decompression-bomb guard: images with more pixels are quarantined without decoding.
    max_pixels: int = 100_000_000
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    # Crops per degradation call (one record each); also the Ray Data batch size.
    batch_size: int = 8
    # Degradation actors: 0 means autoscale up to what the cluster offers.
    max_actors: int = 0
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    # Each row holds a 256x256 HR PNG (~150 kB) and a 64x64 LR PNG (~10 kB). 64 rows make a
    # ~10 MB row group: one read unit for a training worker, small enough that Ray's object
    # store does not spill when several are in flight. 512 rows (~80 MB) per file keeps the
    # file count and S3 request count low without making one file a straggler.
    row_group_rows: int = 64
    rows_per_file: int = 512
    # zlib level of the PNGs: 0 stores them uncompressed (~3x faster to encode, ~1.8x larger);
    # 1-9 give the same bytes with the run-length strategy the encoder uses (pipelines.images).
    png_compression: int = 1
    # Without --input, synth exports and reads the photographs these packages ship (no download):
    # scikit-image (9), scikit-learn (2), matplotlib (1).
    sample_collections: tuple[str, ...] = ("scikit-image",)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sample_collections) - set(SAMPLE_COLLECTIONS))
        if unknown or not self.sample_collections:
            raise ValueError(f"sample_collections must name some of {list(SAMPLE_COLLECTIONS)}, got "
                             f"{list(self.sample_collections)}")
        for name in ("crop_size", "crops_per_image", "min_side", "max_pixels", "batch_size",
                     "row_group_rows", "rows_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_side > self.crop_size:
            raise ValueError(f"min_side ({self.min_side}) must not exceed crop_size ({self.crop_size})")
        if not 0 <= self.png_compression <= 9:
            raise ValueError(f"png_compression must be 0..9, got {self.png_compression}")
        for name in ("max_actors", "actor_cpus", "actor_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        bad = [e for e in self.extensions if not e.startswith(".")]
        if bad:
            raise ValueError(f"extensions must start with a dot, got {bad[0]!r}")


@dataclass(config=SECTION)
class StorageConfig:
    # S3-compatible endpoint (MinIO, moto, ...); None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS.
    s3_endpoint: str | None = None
    s3_region: str | None = None


@dataclass(config=SECTION)
class RayConfig:
    # None: RAY_ADDRESS if set, else a fresh local instance.
    address: str | None = None
    # CPUs of a local instance (None: all of this machine's).
    num_cpus: int | None = None
    # Ray Data's per-operator progress bars. Off by default: where the output is not a terminal
    # (`ray job logs`, CI, a pipe) every redraw from every worker is a new line (12,500 of the
    # demo's 12,850 lines were theirs).
    data_progress_bars: bool = False
    # Connected to an existing cluster (address or RAY_ADDRESS), a job refuses local storage and a
    # local MLflow file: other nodes cannot see them, and a submitted job's working folder is
    # deleted when it ends. True (--allow-local) when every node mounts the paths.
    allow_local: bool = False


@dataclass(config=SECTION)
class TrainDebugConfig:
    """Test and debugging knobs of the training jobs; leave them empty in real runs."""

    # Steps at which rank 0 replaces its batch with NaNs, to exercise the non-finite guard.
    inject_nan_at_steps: list[int] = field(default_factory=list)
    # A folder where every worker writes ``rank<N>.pid`` after each checkpoint, so that a
    # fault-injection test can kill one of them.
    pid_dir: str | None = None


@dataclass(config=SECTION)
class PlateauConfig:
    """Stop a run early once a validation metric stops improving (e.g. the aux net's gain over
    bicubic): after ``patience`` validations in a row none of which beat the best so far by more
    than ``min_delta``. The run ends with a checkpoint at that step; ``steps`` stays the upper bound."""

    metric: str | None = None  # None: run all the steps
    mode: Literal["max", "min"] = "max"
    patience: int = 3
    min_delta: float = 0.0
    # The final checkpoint's model (the EMA weights, which validation scores) is the best
    # validation's, not the last step's: past the plateau a small dataset is often overfitted.
    restore_best: bool = True

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best + self.min_delta if self.mode == "max" else value < best - self.min_delta


@dataclass(config=SECTION)
class TrainConfig:
    """Ray Train settings of ``upsr train`` (the diffusion); defaults are the paper's values.

    ``batch_size`` is per worker and micro-batch: the global batch is ``batch_size * num_workers *
    grad_accum_steps`` (paper: 16 x 2 GPUs x 1). Steps count iterations, skipped non-finite ones
    included, so the learning rate schedule is a function of the step alone.
    """

    steps: int = 200_000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5000
    # Max global gradient norm; None (the release's choice) clips nothing. The norm is logged either way.
    grad_clip: float | None = None
    # A fixed decay, updated after every optimiser step, as the release does.
    ema_decay: float = 0.999
    # Ramp the EMA decay as min(ema_decay, (1 + n) / (10 + n)) over the first updates, so that a
    # short run's EMA follows the model instead of staying at its random initialisation
    # (0.999^30 leaves 97 % of it). The ramp ends after ~9k updates; off in the release.
    ema_warmup: bool = False
    # "auto": bf16 autocast on GPUs, plain fp32 on CPUs. "fp16" is the authors' setting: fp16
    # autocast with a GradScaler. g(y), w and the condition are computed in float32 whatever this is.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    checkpoint_every: int = 5000
    num_to_keep: int = 3
    validate_every: int = 5000
    # Validation scores the first val_batches x batch_size held-out crops, the same ones in every
    # run (or every held-out photograph whole: train_data.val_photos).
    val_batches: int = 4
    log_every: int = 50
    num_workers: int = 2
    use_gpu: bool = True
    # 1 CPU per worker; below 1 leaves CPUs on small machines to Ray Data's decoding tasks.
    cpus_per_worker: float = 1.0
    # With use_gpu: below 1, several workers share a GPU (e.g. 0.25: four small Tune trials at once
    # on one GPU, as configs/ablation_gpu.yaml does).
    gpus_per_worker: float = 1.0
    max_failures: int = 2
    max_consecutive_nonfinite: int = 10
    seed: int = 0
    # Folder or s3:// prefix of Ray Train's run folders (checkpoints); None: runs/ray_results
    # under the folder the job starts in, made absolute so every worker agrees.
    storage_path: str | None = None
    # Micro-batches of batch_size per optimiser step: the global batch is batch_size x num_workers
    # x grad_accum_steps, with the gradient of that batch (the loss is averaged over them).
    grad_accum_steps: int = 1
    # Recompute each level of the Swin-UNet in the backward pass instead of keeping its activations:
    # less memory for ~30 % more compute (upsr train only; the aux nets have no levels).
    activation_checkpointing: bool = False
    # torch.compile the trained net (its first steps compile; validation and the EMA run eagerly).
    compile: bool = False
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    debug: TrainDebugConfig = field(default_factory=TrainDebugConfig)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_workers * self.grad_accum_steps

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "num_to_keep", "validate_every", "log_every",
                     "num_workers", "max_consecutive_nonfinite", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "val_batches", "max_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if not 0 < self.gpus_per_worker <= 1:
            raise ValueError(f"gpus_per_worker must be in (0, 1], got {self.gpus_per_worker}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


@dataclass(config=SECTION)
class AuxTrainConfig(TrainConfig):
    """Ray Train settings of ``upsr train-aux`` (the auxiliary SR net, L1 + optional LPIPS).

    Same keys as ``train``; the defaults follow common practice for small SR nets (the paper
    gives no schedule for its aux net).
    """

    steps: int = 100_000
    lr: float = 2e-4
    warmup_steps: int = 1000


@dataclass(config=SECTION)
class TrainDataConfig:
    """How both training jobs read a synthesised dataset."""

    # Fraction of source photographs held out for validation (every crop of a held-out photo):
    # chosen by hashing the source name with split_seed, so the split never changes between runs.
    val_fraction: float = 0.05
    split_seed: int = 0
    # Rows shuffled in each worker's buffer (0: read order); blocks are shuffled every epoch too.
    shuffle_buffer: int = 256
    prefetch_batches: int = 2
    # Decode once and keep the decoded train split in Ray's object store for the whole run. Only for
    # small datasets (tests, CPU demos), where restarting the read-and-decode pipeline every
    # epoch costs more than the epoch itself.
    materialize: bool = False
    # The same batches in the same order on every run of the same config: Ray Data keeps block
    # order (preserve_order), blocks go to workers by count alone (no locality), and the block
    # and buffer shuffles are seeded. Costs some throughput (a slow block holds up the ones
    # behind it), so the paper-scale config leaves it off.
    deterministic: bool = False
    # Folder or s3:// prefix of the photographs the dataset was synthesised from (synth's --input).
    # Set: validation scores each held-out photograph whole (its largest centred square up to
    # val_photo_side pixels, degraded once from a seed fixed per photograph) instead of the
    # first val_batches x batch_size held-out crops: more pixels, and the images a user upscales.
    val_photos: str | None = None
    val_photo_side: int = 512

    def __post_init__(self) -> None:
        if self.val_photo_side < 64:
            raise ValueError(f"val_photo_side must be >= 64, got {self.val_photo_side}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shuffle_buffer < 0 or self.prefetch_batches < 0:
            raise ValueError("shuffle_buffer and prefetch_batches must be >= 0")


@dataclass(config=SECTION)
class MlflowConfig:
    # None: MLFLOW_TRACKING_URI if set, else sqlite:///<runs/mlflow.db under the start folder>.
    tracking_uri: str | None = None
    experiment: str = "upsr"
    # Where a new experiment stores artifacts; None: the server's default, or for a local
    # SQLite store the folder "mlartifacts" beside the database file.
    artifact_location: str | None = None
    registered_model: str = "upsr"
    alias: str = "challenger"
    # Training runs record each worker's CPU, memory, disk, network and GPU use (MLflow's system
    # metrics, system/rank<N>/...) every this many seconds; 0 turns it off.
    system_metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.system_metrics_interval_s >= 0:
            raise ValueError(f"system_metrics_interval_s must be >= 0, got {self.system_metrics_interval_s}")


@dataclass(config=SECTION)
class ActorPoolConfig:
    """A Ray Data actor pool of model replicas, each loading the model once."""

    num_actors: int = 1
    actor_cpus: float = 1.0
    # GPUs per actor; None: 1 when the Ray cluster has GPUs when the job starts, else 0 (CPU).
    actor_gpus: float | None = None

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.actor_cpus < 0 or (self.actor_gpus or 0) < 0:
            raise ValueError("actor_cpus and actor_gpus must be >= 0")


@dataclass(config=SECTION)
class UpscaleConfig(ActorPoolConfig):
    """``upsr upscale`` of a folder or prefix: its images go through this actor pool."""


@dataclass(config=SECTION)
class EvaluateConfig(ActorPoolConfig):
    """``upsr evaluate``: batch inference over an eval set in a Ray Data actor pool."""

    # Images per actor call; each image is still sampled with its own seed, so results do not
    # depend on how images are batched.
    batch_size: int = 4
    # Side-by-side images (LR bicubic | SR | HR) logged to MLflow: the first ones by id.
    side_by_side: int = 4
    # The paper's no-reference metrics, computed with pyiqa (upsr.no_reference_metrics) on the
    # actor's device; NIQE on SR images of at least 192x192 only. One whose weights are not in
    # iqa_weights_dir is listed as not computed, with the paths looked for; NIQE then uses
    # basicsr's copy of its pristine-image model. MANIQA scores 20 224x224 crops with a ViT-B/8:
    # a fraction of a second per image on a GPU, over a minute on one CPU core.
    no_reference_metrics: tuple[Literal["clipiqa", "musiq", "maniqa", "niqe"], ...] = (
        "clipiqa", "musiq", "maniqa", "niqe")
    # Folder of pyiqa's weight files under pyiqa's names (RN50.pt, musiq_koniq_ckpt-e95806b9.pth,
    # ckpt_koniq10k.pt, niqe_modelparameters.mat), e.g. a copy of a cache that pyiqa filled where
    # it could download. None: pyiqa's own caches, <torch hub dir>/pyiqa and <torch hub dir>/clip.
    # MANIQA also needs timm's ViT-B/8 in the Hugging Face cache, where timm keeps it.
    iqa_weights_dir: str | None = None
    # Folder or s3:// prefix of the evaluations that get no --out (all of promote's): each in
    # <output_dir>/<time>-<model>/metrics.parquet. MLflow keeps a copy of every table anyway.
    output_dir: str = "runs/evaluations"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.side_by_side < 0:
            raise ValueError(f"side_by_side must be >= 0, got {self.side_by_side}")


@dataclass(config=SECTION)
class PromoteConfig:
    """``upsr promote``: when a candidate replaces the champion."""

    # The per-image metric compared (psnr, ssim: higher is better; lpips: lower is better).
    primary_metric: Literal["psnr", "ssim", "lpips"] = "psnr"
    # The candidate must beat the champion by more than this (in the metric's units) on the
    # mean per-image difference, and the bootstrap interval must exclude zero.
    margin: float = 0.0
    bootstrap_samples: int = 10_000
    confidence: float = 0.95
    seed: int = 0
    champion_alias: str = "champion"

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.bootstrap_samples < 100:
            raise ValueError(f"bootstrap_samples must be >= 100, got {self.bootstrap_samples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


@dataclass(config=SECTION)
class Config:
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    weight: NoiseWeightConfig = field(default_factory=NoiseWeightConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aux_train: AuxTrainConfig = field(default_factory=AuxTrainConfig)
    train_data: TrainDataConfig = field(default_factory=TrainDataConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def __post_init__(self) -> None:
        if self.degradation.device == "cuda" and self.synth.actor_gpus <= 0:
            raise ValueError("degradation.device is cuda: set synth.actor_gpus > 0 so actors get a GPU")
        if self.synth.crop_size % self.degradation.scale:
            raise ValueError(f"synth.crop_size {self.synth.crop_size} is not a multiple of degradation.scale")


def load(paths: str | Path | list[str | Path] | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then each file (with its ``base:`` files) in order, then ``--set`` overrides."""
    return load_config(Config, paths, list(overrides))


def from_yaml(text: str, source: str = "config") -> Config:
    return from_dict(Config, yaml_load(text) or {}, source=source)


def public_dict(config: Any) -> dict[str, Any]:
    """``to_dict(config)`` with credentials taken out of every URI-like string (user:password@,
    query values): what may be written to files, params and logs. The config object itself keeps
    them for the code that connects."""

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return redact_uri(value)
        if isinstance(value, list):
            return [scrub(item) for item in value]
        if isinstance(value, dict):
            return {key: scrub(item) for key, item in value.items()}
        return value

    return scrub(to_dict(config))


def to_yaml(config: Config) -> str:
    """The config as YAML, credentials taken out (``public_dict``)."""
    return yaml.safe_dump(public_dict(config), sort_keys=False)
