"""The root config of every job: one typed tree, each section owned by its package.

``configs/*.yaml`` files hold partial trees merged onto these defaults; ``--set a.b=v``
overrides single keys. The resolved tree is written beside every output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
from upsr.typed_config import load_config, to_dict

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
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
    # zlib level of the PNGs: 1 is ~25 % faster to encode than 3 for <2 % larger files.
    png_compression: int = 1

    def __post_init__(self) -> None:
        for name in ("crop_size", "crops_per_image", "min_side", "max_pixels", "batch_size",
                     "row_group_rows", "rows_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_side > self.crop_size:
            raise ValueError(f"min_side ({self.min_side}) must not exceed crop_size ({self.crop_size})")
        if not 0 <= self.png_compression <= 9:
            raise ValueError(f"png_compression must be 0..9, got {self.png_compression}")
        bad = [e for e in self.extensions if not e.startswith(".")]
        if bad:
            raise ValueError(f"extensions must start with a dot, got {bad[0]!r}")


@dataclass
class StorageConfig:
    # S3-compatible endpoint (MinIO, moto, ...); None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS.
    s3_endpoint: str | None = None
    s3_region: str | None = None


@dataclass
class RayConfig:
    # None: RAY_ADDRESS if set, else a fresh local instance.
    address: str | None = None
    # CPUs of a local instance (None: all of this machine's).
    num_cpus: int | None = None


@dataclass
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

    def __post_init__(self) -> None:
        if self.degradation.device == "cuda" and self.synth.actor_gpus <= 0:
            raise ValueError("degradation.device is cuda: set synth.actor_gpus > 0 so actors get a GPU")
        if self.synth.crop_size % self.degradation.scale:
            raise ValueError(f"synth.crop_size {self.synth.crop_size} is not a multiple of degradation.scale")


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    return load_config(Config, path, list(overrides))


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
