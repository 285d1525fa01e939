"""Full-reference metrics: PSNR and SSIM on the Y channel (basicsr's), and LPIPS; and LR
consistency, which needs no reference. The paper's no-reference metrics (CLIPIQA, MUSIQ, MANIQA,
NIQE) are pyiqa's: ``upsr.no_reference_metrics``.

Images are float tensors (B, 3, H, W) in [0, 1], compared without 8-bit quantisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import basicsr_compat  # noqa: F401  (must precede basicsr)
from basicsr.metrics.psnr_ssim import calculate_psnr_pt, calculate_ssim_pt

from upsr.config import MetricsConfig


def _check(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if sr.shape != hr.shape or sr.dim() != 4:
        raise ValueError(f"metrics need two (B, 3, H, W) batches of one shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")


@torch.no_grad()
def psnr(sr: torch.Tensor, hr: torch.Tensor, config: MetricsConfig = MetricsConfig()) -> torch.Tensor:
    """Per-image PSNR in dB, shape (B,)."""
    _check(sr, hr)
    return calculate_psnr_pt(sr.clamp(0, 1), hr, crop_border=config.crop_border, test_y_channel=config.test_y_channel)


@torch.no_grad()
def ssim(sr: torch.Tensor, hr: torch.Tensor, config: MetricsConfig = MetricsConfig()) -> torch.Tensor:
    """Per-image SSIM, shape (B,)."""
    _check(sr, hr)
    return calculate_ssim_pt(sr.clamp(0, 1), hr, crop_border=config.crop_border, test_y_channel=config.test_y_channel)


@torch.no_grad()
def lpips_distance(lpips_model: nn.Module, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS, shape (B,); ``lpips_model`` from ``upsr.losses.build_lpips``."""
    _check(sr, hr)
    return lpips_model(sr.clamp(0, 1) * 2 - 1, hr * 2 - 1).flatten()


def full_reference_metrics(
    sr: torch.Tensor, hr: torch.Tensor, config: MetricsConfig = MetricsConfig(), lpips_model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Per-image "psnr", "ssim" and, with an LPIPS model, "lpips"."""
    scores = {"psnr": psnr(sr, hr, config), "ssim": ssim(sr, hr, config)}
    if lpips_model is not None:
        scores["lpips"] = lpips_distance(lpips_model, sr, hr)
    return scores


@torch.no_grad()
def lr_consistency(sr: torch.Tensor, lr: torch.Tensor, config: MetricsConfig = MetricsConfig()) -> torch.Tensor:
    """Per-image PSNR (dB) between the SR image downscaled to the LR size and the LR image, shape (B,).

    Needs no HR: a faithful x4 result, degraded back by an antialiased bicubic resize, should
    reproduce its input. It rewards fidelity to the LR only, not realism: bicubic upsampling
    itself scores high, so it complements full-reference metrics and never replaces them.
    """
    if sr.dim() != 4 or lr.dim() != 4 or sr.shape[:2] != lr.shape[:2]:
        raise ValueError(f"expected (B, 3, H, W) SR and LR batches, got {tuple(sr.shape)} and {tuple(lr.shape)}")
    down = F.interpolate(sr.clamp(0, 1), size=lr.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
    return psnr(down.clamp(0, 1), lr, config)
