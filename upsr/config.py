"""Config sections of the model library (schedule, noise weighting, networks, losses, inference).

pydantic dataclasses whose defaults are the paper's values (DESIGN §1); ``configs/tiny.yaml``
holds the tiny twin used by tests and CPU demos. pydantic checks types; each section's
``__post_init__`` checks its own rules; ``upsr.config_loader`` adds the file and key to messages.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Literal

from pydantic.dataclasses import dataclass

from upsr.config_loader import SECTION


@dataclass(config=SECTION)
class DiffusionConfig:
    """Noise schedule (DESIGN §1): ResShift's exponential schedule with UPSR's cap on eta_1.

    ``eta_end`` is sqrt(eta_T); ``eta_1_cap: null`` gives ResShift's schedule.
    """

    steps: int = 5
    kappa: float = 2.5
    power: float = 0.2
    min_noise_level: float = 0.2
    eta_end: float = 0.99
    eta_1_cap: float | None = 0.001

    def __post_init__(self) -> None:
        from upsr.schedule import check_schedule_args  # lazy: keeps torch out of config parsing

        check_schedule_args(
            self.steps, self.kappa, self.power, self.min_noise_level, self.eta_end, self.eta_1_cap
        )


@dataclass(config=SECTION)
class NoiseWeightConfig:
    """Uncertainty-guided noise weight (the paper's u; see ``upsr.uncertainty``).

    ``tau <= 0`` turns the weighting off (plain ResShift noise). ``gamma`` shapes the
    ``power`` family, ``sharpness`` the ``logistic`` one; other families ignore them.
    """

    family: str = "linear"
    tau: float = 0.1
    floor: float = 0.4
    gamma: float = 1.0
    sharpness: float = 8.0

    def __post_init__(self) -> None:
        from upsr.uncertainty import WEIGHT_FAMILIES  # lazy: keeps torch out of config parsing

        if self.family not in WEIGHT_FAMILIES:
            raise ValueError(
                f"family: unknown noise-weight family {self.family!r} (known: {', '.join(sorted(WEIGHT_FAMILIES))})"
            )
        if not -float("inf") < self.tau < float("inf"):
            raise ValueError(f"tau must be a finite number (<= 0 turns the weighting off), got {self.tau!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {self.floor!r}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")
        if not self.sharpness > 0:
            raise ValueError(f"sharpness must be > 0, got {self.sharpness!r}")


# --- networks, losses, metrics and inference ------------------------------------------------

# The release's aux net g (its network_mse): ATD light x4, 2,532,360 parameters (upsr.atd).
ATD_LIGHT_X4 = {
    "upscale": 4,
    "in_chans": 3,
    "img_size": 64,
    "embed_dim": 96,
    "depths": [6, 6, 6, 6],
    "num_heads": [4, 4, 4, 4],
    "window_size": 16,
    "category_size": 128,
    "num_tokens": 64,
    "reducted_dim": 8,
    "convffn_kernel_size": 7,
    "img_range": 1.0,
    "mlp_ratio": 1,
    "upsampler": "pixelshuffledirect",
    "resi_connection": "1conv",
    "use_checkpoint": False,
}


@dataclass(config=SECTION)
class DenoiserConfig:
    """ResShift's Swin-UNet in pixel space (DESIGN §1b); the defaults are the release's 119,418,319
    parameters (its ``network_g``: ``head_channels`` is its ``num_feat``, ``swin_dim`` its
    ``swin_embed_dim``, ``swin_heads`` its ``swin_embed_dim / num_head_channels``)."""

    scale: int = 4  # PixelUnshuffle factor of the first stage; also the SR factor of the head
    # The LR side the Swin layers are built for (the release's image_size = lq_size): a level
    # whose map is no larger than the window gets no shift, and shifted blocks store the mask
    # of this size. Other sizes still run (their masks are computed per call).
    image_size: int = 64
    model_channels: int = 160
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    dropout: float = 0.0
    swin_dim: int = 192
    swin_heads: int = 6
    swin_depth: int = 2
    window_size: int = 8
    mlp_ratio: float = 4.0
    # The shifted blocks' attention mask: "release" reproduces the release's (which separates
    # tokens only in the bottom row of windows, left from right), "swin" is Swin's own (wrapped
    # rows and columns kept apart). Weights trained with one rule expect it at inference.
    shift_mask: Literal["release", "swin"] = "release"
    head_channels: int = 128
    # False gives the ResShift-style baseline: the condition is y alone (48 channels after
    # unshuffling) instead of [g(y), y] (96 channels).
    use_sr_condition: bool = True
    # "x0": the network's output is the x0 estimate, as in the release. "residual": it is added
    # to the condition's first image (g(y), or y for the baseline) and starts at zero, so that an
    # untrained model returns g(y): for short runs (the CPU demo), not the paper's setting.
    predict: Literal["x0", "residual"] = "x0"

    def __post_init__(self) -> None:
        for name in ("image_size", "model_channels", "num_res_blocks", "norm_groups", "swin_dim", "swin_heads",
                     "swin_depth", "window_size", "head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scale != 4:
            raise ValueError(f"scale must be 4 (the head upsamples twice by 2, as the release's), got {self.scale}")
        # Bounds on the module count (the parameter count is checked where networks are built).
        for name, bound in (("num_res_blocks", 32), ("swin_depth", 32)):
            if getattr(self, name) > bound:
                raise ValueError(f"{name} must be <= {bound}, got {getattr(self, name)}")
        if len(self.channel_mult) > 8:
            raise ValueError(f"channel_mult may have at most 8 levels, got {len(self.channel_mult)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {list(self.channel_mult)}")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.norm_groups:
                raise ValueError(f"model_channels * {mult} = {self.model_channels * mult} is not divisible by "
                                 f"norm_groups {self.norm_groups}")
        if self.swin_dim % self.swin_heads:
            raise ValueError(f"swin_dim {self.swin_dim} is not divisible by swin_heads {self.swin_heads}")
        if self.swin_dim % self.norm_groups:
            raise ValueError(f"swin_dim {self.swin_dim} is not divisible by norm_groups {self.norm_groups}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size % self.lr_multiple:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {self.lr_multiple} "
                             "(window_size * 2 ** (levels - 1)), so that every level's map tiles into windows")

    @property
    def lr_multiple(self) -> int:
        """LR sides must be multiples of this: every UNet level's feature map tiles into Swin windows.

        The first stage unshuffles HR by ``scale``, so unshuffled sides equal LR sides.
        """
        return self.window_size * 2 ** (len(self.channel_mult) - 1)


@dataclass(config=SECTION)
class AuxConfig:
    """The frozen auxiliary SR net g, any architecture in basicsr's ARCH_REGISTRY (plus the
    release's ATD); the default is the release's ATD light x4."""

    arch: str = "ATD"
    options: dict[str, Any] = field(default_factory=lambda: dict(ATD_LIGHT_X4))
    # A basicsr-style checkpoint (.pth with "params"/"params_ema", or .safetensors); None
    # leaves the net randomly initialised, which only tests and smoke runs should do.
    weights: str | None = None
    # Key inside a .pth checkpoint; None picks "params_ema", else "params", else the file itself.
    weights_key: str | None = None
    # LR sides are reflect-padded to a multiple of this before the net (window attention needs
    # it); 1 leaves sizes to the net: ATD pads itself by mirroring, as the release does.
    pad_multiple: int = 1
    # Training loss of the aux net itself (train-aux job): l1_weight * L1 + lpips_weight * LPIPS.
    l1_weight: float = 1.0
    lpips_weight: float = 0.0

    def __post_init__(self) -> None:
        if not self.arch:
            raise ValueError("arch must name a basicsr architecture, e.g. SwinIR or MSRResNet")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
        if self.l1_weight < 0 or self.lpips_weight < 0:
            raise ValueError("l1_weight and lpips_weight must be >= 0")


@dataclass(config=SECTION)
class LossConfig:
    """Diffusion training loss: MSE(x0_hat, x0) + lpips_weight * LPIPS_vgg(clamp(x0_hat), x0)."""

    lpips_weight: float = 0.5
    # torchvision's VGG16 ImageNet weights (vgg16-397923af.pth); None: the torch hub cache
    # ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints).
    lpips_backbone: str | None = None
    # Tests only: a missing backbone becomes a random one (the loss value is then meaningless).
    allow_random_backbone: bool = False

    def __post_init__(self) -> None:
        if self.lpips_weight < 0:
            raise ValueError(f"lpips_weight must be >= 0, got {self.lpips_weight}")


@dataclass(config=SECTION)
class MetricsConfig:
    """Full-reference metrics: PSNR/SSIM on the Y channel (images in [0, 1]) and LPIPS."""

    crop_border: int = 0
    test_y_channel: bool = True

    def __post_init__(self) -> None:
        if self.crop_border < 0:
            raise ValueError(f"crop_border must be >= 0, got {self.crop_border}")


@dataclass(config=SECTION)
class InferenceConfig:
    """Sampling and tiling of ``UPSRPipeline.upscale``; tile sizes are in LR pixels."""

    sampler: Literal["ddim", "ancestral"] = "ddim"
    seed: int = 0
    # The authors' setting for large images: LR tiles of 512 with stride 448 (64 px overlap).
    tile: int = 512
    stride: int = 448
    # Tiles per network call; also how many small (untiled) images of one size share a call.
    tile_batch: int = 4
    # Images with an LR side above `tile`: "blend" samples the whole image once and splits only
    # each denoiser call into tiles blended with a cosine window (one prior noise, no seams);
    # "release" samples every LR tile separately with its own noise and averages the overlaps
    # uniformly, as the authors' test code does.
    tiling: Literal["blend", "release"] = "blend"
    # Largest output (HR) image in pixels; None: what the device's free memory holds now
    # (UPSRPipeline.max_output_pixels). Larger images are refused before any work.
    max_output_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.tile < 1 or self.tile_batch < 1:
            raise ValueError("tile and tile_batch must be >= 1")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.max_output_pixels is not None and self.max_output_pixels < 1:
            raise ValueError(f"max_output_pixels must be >= 1 or null, got {self.max_output_pixels}")
        if not 1 <= self.stride <= self.tile:
            raise ValueError(f"stride must be in [1, tile={self.tile}], got {self.stride}")
