"""upsr.diagnostics: exact values on constructed images."""

from __future__ import annotations

import math

import pytest
import torch

from upsr.aux_net import SRCondition
from upsr.diagnostics import aux_gain, psnr_by_uncertainty, weight_statistics, x0_error_per_step
from upsr.diffusion import UNWDiffusion
from upsr.schedule import eta_schedule


def condition(y: torch.Tensor, g_y: torch.Tensor, weight: torch.Tensor | None = None) -> SRCondition:
    """Images in [0, 1] -> the [-1, 1] condition the diffusion sees."""
    y, g_y = y * 2 - 1, g_y * 2 - 1
    return SRCondition(y=y, g_y=g_y, weight=torch.ones_like(y) if weight is None else weight,
                       cond=torch.cat([g_y, y], dim=1))


def test_aux_gain_is_the_psnr_difference_over_bicubic():
    hr = torch.full((2, 3, 8, 8), 0.5)
    gain = aux_gain(condition(hr + 0.1, hr + 0.01), hr)  # MSE 1e-2 vs 1e-4: 20 dB better
    torch.testing.assert_close(gain, torch.full((2,), 20.0), atol=1e-3, rtol=0)


def test_weight_statistics_count_the_floor_and_saturation():
    weight = torch.tensor([0.4, 0.4, 0.7, 1.0])
    assert weight_statistics(weight, floor=0.4) == pytest.approx(
        {"w_mean": 0.625, "w_at_floor": 0.5, "w_saturated": 0.25})


def test_psnr_by_uncertainty_separates_the_regions():
    hr = torch.full((1, 3, 6, 6), 0.5)
    y = hr.clone()
    g_y = hr.clone()
    g_y[..., :2, :] += 0.2  # the top third of rows is uncertain
    sr = hr.clone()
    sr[..., :2, :] += 0.1  # and only there is the SR image wrong
    values = psnr_by_uncertainty(sr, hr, condition(y, g_y))
    assert float(values["psnr_high_uncertainty"]) == pytest.approx(20.0, abs=1e-3)
    assert float(values["psnr_low_uncertainty"]) == pytest.approx(120.0, abs=1e-3)  # MSE 0, clamped at 1e-12


def test_x0_error_per_step_is_zero_for_a_perfect_denoiser_and_the_signal_for_a_silent_one():
    diffusion = UNWDiffusion(eta_schedule(5, 2.5, 0.2, 0.2, 0.99), 2.5)
    hr = torch.rand(2, 3, 8, 8)
    cond = condition(hr, hr)
    perfect = x0_error_per_step(lambda x, t, c: hr * 2 - 1, diffusion, cond, hr)
    silent = x0_error_per_step(lambda x, t, c: torch.zeros_like(x), diffusion, cond, hr)
    assert perfect == [0.0] * 5
    expected = float((hr * 2 - 1).square().mean())
    assert silent == pytest.approx([expected] * 5) and all(math.isfinite(v) for v in silent)
