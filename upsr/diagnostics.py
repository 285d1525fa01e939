"""Measurements that explain what the uncertainty-guided noise does (or fails to do) in a run.

UPSR's premise: where ``g(y)`` is close to ``y`` (flat, low-uncertainty regions) less noise keeps
the LR information, so the gain should show in those regions. That holds only if ``g`` is good
enough to tell regions apart and ``w`` actually varies. These functions measure each link:

- ``aux_gain``: how much better ``g(y)`` is than bicubic (PSNR, dB); near 0, ``g`` tells nothing.
- ``weight_statistics``: the mean of ``w``, the share of pixels at its floor and at 1; all at
  the floor means the weighting only lowered the overall noise level.
- ``psnr_by_uncertainty``: PSNR over the lowest and the highest third of pixels ranked by
  ``|g(y) - y|``, where the paper claims and does not claim its gain.
- ``x0_error_per_step``: the denoiser's x0-prediction error at every diffusion step.

Images in [0, 1] (``w`` and ``psi`` as ``upsr.aux_net.sr_condition`` gives them).
"""

from __future__ import annotations

import torch
from torch import nn

from upsr.aux_net import SRCondition
from upsr.diffusion import UNWDiffusion

# A pixel counts as at the floor or saturated within this distance (w is float32).
_EPSILON = 1e-6


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def aux_gain(condition: SRCondition, hr: torch.Tensor) -> torch.Tensor:
    """Per image: PSNR(g(y), HR) - PSNR(bicubic, HR) in dB."""
    g_y = ((condition.g_y + 1) / 2).clamp(0, 1)
    y = ((condition.y + 1) / 2).clamp(0, 1)
    return _psnr((g_y - hr).square().mean(dim=(1, 2, 3))) - _psnr((y - hr).square().mean(dim=(1, 2, 3)))


def weight_statistics(weight: torch.Tensor, floor: float) -> dict[str, float]:
    """Mean of ``w`` and the shares of its values at the floor and at 1 (pixels x channels)."""
    return {"w_mean": float(weight.mean()),
            "w_at_floor": float((weight <= floor + _EPSILON).float().mean()),
            "w_saturated": float((weight >= 1 - _EPSILON).float().mean())}


def psnr_by_uncertainty(sr: torch.Tensor, hr: torch.Tensor, condition: SRCondition) -> dict[str, torch.Tensor]:
    """Per image: PSNR over the third of pixels with the lowest and with the highest ``|g(y) - y|``
    (channels averaged), so that a gain in flat regions is not hidden by the textured ones."""
    uncertainty = (condition.g_y - condition.y).abs().mean(dim=1).flatten(1)  # (B, pixels)
    error = (sr - hr).square().mean(dim=1).flatten(1)
    third = max(1, uncertainty.shape[1] // 3)
    order = uncertainty.argsort(dim=1)
    low = error.gather(1, order[:, :third]).mean(dim=1)
    high = error.gather(1, order[:, -third:]).mean(dim=1)
    return {"psnr_low_uncertainty": _psnr(low), "psnr_high_uncertainty": _psnr(high)}


@torch.no_grad()
def x0_error_per_step(denoiser: nn.Module, diffusion: UNWDiffusion, condition: SRCondition, hr: torch.Tensor,
                      generator: torch.Generator | None = None) -> list[float]:
    """Mean squared x0-prediction error (images in [-1, 1]) at each step t = 0 .. T-1, every image
    noised with the same draw at every step."""
    x0 = hr * 2 - 1
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    errors = []
    for step in range(diffusion.num_steps):
        t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
        x_t = diffusion.q_sample(x0, condition.y, t, condition.weight, noise)
        x0_hat = diffusion.denoise(denoiser, x_t, t, condition.cond)
        errors.append(float((x0_hat - x0).square().mean()))
    return errors

