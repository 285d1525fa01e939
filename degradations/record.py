"""Drawing a degradation: every random choice of the second-order pipeline in one plain record.

``sample(seed, config)`` returns a JSON-serialisable dict; ``degradations.degrader.apply`` performs it.
Keeping the two apart is what makes a dataset auditable: a Parquet row stores its record, and
the LR image can be re-generated from the HR image and the record alone.

The distributions follow Real-ESRGAN as configured by UPSR (DESIGN §1), drawn per crop
(Real-ESRGAN draws resize and final-order choices once per batch; per crop is the finer,
replayable equivalent). JPEG qualities are drawn as integers because a real JPEG codec takes
integer qualities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from degradations.config import DegradationConfig

RECORD_VERSION = 1
RESIZE_MODES = ("area", "bilinear", "bicubic")
FINAL_ORDERS = ("resize_then_jpeg", "jpeg_then_resize")


def sample(seed: int, config: DegradationConfig | None = None) -> dict[str, Any]:
    """All random choices of one degradation, drawn from ``numpy.random.default_rng(seed)``."""
    config = config or DegradationConfig()
    rng = np.random.default_rng(seed)
    record: dict[str, Any] = {"version": RECORD_VERSION, "seed": int(seed), "scale": config.scale}
    record["stage1"] = {
        "kernel": _blur_kernel(rng, config.kernel_list, config.kernel_prob, config.blur_kernel_size,
                               config.blur_sigma, config.betag_range, config.betap_range, config.sinc_prob),
        "resize": _resize(rng, config.resize_prob, config.resize_range),
        "noise": _noise(rng, config.gaussian_noise_prob, config.noise_range, config.poisson_scale_range,
                        config.gray_noise_prob),
        "jpeg_quality": _quality(rng, config.jpeg_range),
    }
    stage2 = None
    if rng.random() < config.second_order_prob:
        blur = rng.random() < config.second_blur_prob
        stage2 = {
            "kernel": _blur_kernel(rng, config.kernel_list2, config.kernel_prob2, config.blur_kernel_size2,
                                   config.blur_sigma2, config.betag_range2, config.betap_range2,
                                   config.sinc_prob2) if blur else None,
            "resize": _resize(rng, config.resize_prob2, config.resize_range2),
            "noise": _noise(rng, config.gaussian_noise_prob2, config.noise_range2, config.poisson_scale_range2,
                            config.gray_noise_prob2),
            "jpeg_quality": _quality(rng, config.jpeg_range2),
        }
    record["stage2"] = stage2
    sinc = None
    if rng.random() < config.final_sinc_prob:
        size = _odd_size(rng, config.blur_kernel_size)
        sinc = {"type": "sinc", "size": size, "cutoff": float(rng.uniform(*config.final_sinc_cutoff)),
                "pad_to": config.blur_kernel_size}
    record["final"] = {
        "order": FINAL_ORDERS[int(rng.integers(2))],
        "resize_mode": RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))],
        "sinc": sinc,
        "jpeg_quality": _quality(rng, config.jpeg_range2),
    }
    return record


def _odd_size(rng: np.random.Generator, pad_to: int) -> int:
    # Kernel sizes are the odd numbers 3 .. pad_to - 2, as in ResShift's Real-ESRGAN dataset.
    sizes = list(range(3, pad_to - 1, 2))
    return sizes[int(rng.integers(len(sizes)))]


def _blur_kernel(rng, kernel_list, kernel_prob, pad_to, sigma_range, betag_range, betap_range, sinc_prob):
    size = _odd_size(rng, pad_to)
    if rng.random() < sinc_prob:
        # Real-ESRGAN: a wider cutoff range for large kernels avoids ringing-only kernels.
        low = math.pi / 3 if size < 13 else math.pi / 5
        return {"type": "sinc", "size": size, "cutoff": float(rng.uniform(low, math.pi)), "pad_to": pad_to}
    kind = str(kernel_list[int(rng.choice(len(kernel_list), p=np.asarray(kernel_prob) / sum(kernel_prob)))])
    sigma_x = float(rng.uniform(*sigma_range))
    if kind.endswith("aniso"):
        sigma_y = float(rng.uniform(*sigma_range))
        theta = float(rng.uniform(-math.pi, math.pi))
    else:
        sigma_y, theta = sigma_x, 0.0
    kernel = {"type": kind, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta,
              "beta": None, "pad_to": pad_to}
    if kind.startswith(("generalized", "plateau")):
        low, high = betag_range if kind.startswith("generalized") else betap_range
        # basicsr's draw: half the mass below beta = 1, half above.
        kernel["beta"] = float(rng.uniform(low, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, high))
    return kernel


def _resize(rng, probs, scale_range) -> dict[str, Any]:
    direction = ("up", "down", "keep")[int(rng.choice(3, p=np.asarray(probs) / sum(probs)))]
    if direction == "up":
        scale = float(rng.uniform(1.0, scale_range[1]))
    elif direction == "down":
        scale = float(rng.uniform(scale_range[0], 1.0))
    else:
        scale = 1.0
    return {"direction": direction, "scale": scale, "mode": RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]}


def _noise(rng, gaussian_prob, sigma_range, poisson_range, gray_prob) -> dict[str, Any]:
    if rng.random() < gaussian_prob:
        noise = {"kind": "gaussian", "sigma": float(rng.uniform(*sigma_range))}
    else:
        noise = {"kind": "poisson", "scale": float(rng.uniform(*poisson_range))}
    noise["gray"] = bool(rng.random() < gray_prob)
    # The noise field itself is re-drawn from this seed on replay.
    noise["seed"] = int(rng.integers(2**63 - 1))
    return noise


def _quality(rng, quality_range) -> int:
    return int(rng.integers(quality_range[0], quality_range[1] + 1))
