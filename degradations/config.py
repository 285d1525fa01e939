"""Settings of the Real-ESRGAN second-order degradation; defaults are UPSR's values.

Invalid values raise ``ValueError`` naming the key; the config loader adds the file.
Key names follow Real-ESRGAN's option files (``jpeg_range``, ``resize_prob2``, ...), so a
user coming from basicsr recognises them; a trailing ``2`` means the second stage.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


# The project's config-section policy (upsr.config_loader.SECTION): unknown keys and NaN/inf refused.
@dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False, strict=True))
class DegradationConfig:
    scale: int = 4
    # Where and with what the degradation runs. "opencv": OpenCV filtering and a real JPEG
    # codec on the CPU (fast; same kernels, real JPEG instead of DiffJPEG's approximation).
    # "basicsr": basicsr's filter2D and DiffJPEG in torch (the authors' primitives; for CUDA).
    primitives: Literal["opencv", "basicsr"] = "opencv"
    device: Literal["cpu", "cuda"] = "cpu"

    # Stage 1.
    blur_kernel_size: int = 21  # kernels are drawn with odd sizes 3..19 and padded to 21
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)

    # Stage 2. UPSR always applies it; ResShift applies it with probability 0.5.
    second_order_prob: float = 1.0
    second_blur_prob: float = 0.8
    blur_kernel_size2: int = 15
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)

    # Final stage: resize to LR size with a sinc filter, and JPEG, in random order.
    final_sinc_prob: float = 0.8
    final_sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if self.device == "cuda" and self.primitives == "opencv":
            raise ValueError("primitives 'opencv' runs on the CPU; use primitives: basicsr with device: cuda")
        for name in ("blur_kernel_size", "blur_kernel_size2"):
            size = getattr(self, name)
            if size < 5 or size % 2 == 0:
                raise ValueError(f"{name} must be an odd number >= 5, got {size}")
        for suffix in ("", "2"):
            kernels = getattr(self, f"kernel_list{suffix}")
            probs = getattr(self, f"kernel_prob{suffix}")
            unknown = [k for k in kernels if k not in KERNEL_TYPES]
            if unknown:
                raise ValueError(f"kernel_list{suffix}: unknown kernel type {unknown[0]!r} (known: {KERNEL_TYPES})")
            if len(kernels) != len(probs):
                raise ValueError(f"kernel_prob{suffix} needs one probability per kernel_list{suffix} entry")
            _check_distribution(f"kernel_prob{suffix}", probs)
            _check_distribution(f"resize_prob{suffix}", getattr(self, f"resize_prob{suffix}"))
        for name in ("sinc_prob", "sinc_prob2", "gaussian_noise_prob", "gaussian_noise_prob2", "gray_noise_prob",
                     "gray_noise_prob2", "second_order_prob", "second_blur_prob", "final_sinc_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in ("blur_sigma", "betag_range", "betap_range", "resize_range", "noise_range",
                     "poisson_scale_range", "jpeg_range", "blur_sigma2", "betag_range2", "betap_range2",
                     "resize_range2", "noise_range2", "poisson_scale_range2", "jpeg_range2", "final_sinc_cutoff"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high, got [{low}, {high}]")
        for name in ("jpeg_range", "jpeg_range2"):
            low, high = getattr(self, name)
            if high > 100:
                raise ValueError(f"{name}: JPEG quality is at most 100, got {high}")


def _check_distribution(name: str, probs: tuple[float, ...]) -> None:
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"{name} must be non-negative and sum to 1, got {list(probs)}")
