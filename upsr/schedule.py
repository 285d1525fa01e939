"""ResShift's "exponential" noise schedule, with UPSR's cap on the first noise level (DESIGN §1).

``eta_t`` is the share of the residual ``y - x_0`` mixed into ``x_t``; it grows from almost
0 (``x_1`` is nearly the HR image) to almost 1 (``x_T`` is nearly ``y``). The schedule is
geometric on the square-root scale, with exponents ``beta_t = ((t-1)/(T-1))**p * (T-1)``;
``p < 1`` spends more steps near ``eta_T``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["eta_schedule", "check_schedule_args", "first_sqrt_eta"]


def first_sqrt_eta(kappa: float, min_noise_level: float, eta_1_cap: float | None) -> float:
    """``sqrt(eta_1)``; ``eta_1_cap=None`` leaves out UPSR's cap (ResShift's value)."""
    candidates = [min_noise_level / kappa, min_noise_level]
    if eta_1_cap is not None:
        candidates.append(math.sqrt(eta_1_cap))
    return min(candidates)


def check_schedule_args(
    steps: int,
    kappa: float,
    power: float,
    min_noise_level: float,
    eta_end: float,
    eta_1_cap: float | None = 0.001,
) -> None:
    """Raise ``ValueError`` naming the first argument that cannot give a valid schedule.

    Shared with ``DiffusionConfig`` so that a bad config fails when it is read, not when the
    trainer first builds the diffusion.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        # T = 1 leaves r = (eta_end / sqrt(eta_1)) ** (1 / (T - 1)) undefined.
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    for name, value in (("kappa", kappa), ("power", power), ("min_noise_level", min_noise_level)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not (isinstance(eta_end, (int, float)) and 0 < eta_end <= 1):
        # eta_end is sqrt(eta_T); eta_T > 1 would overshoot y.
        raise ValueError(f"eta_end (sqrt(eta_T)) must be in (0, 1], got {eta_end!r}")
    if eta_1_cap is not None and not (isinstance(eta_1_cap, (int, float)) and 0 < eta_1_cap <= 1):
        raise ValueError(f"eta_1_cap must be in (0, 1] or None, got {eta_1_cap!r}")
    start = first_sqrt_eta(kappa, min_noise_level, eta_1_cap)
    if not eta_end > start:
        # The posterior divides by alpha_t = eta_t - eta_{t-1}: the schedule must strictly increase.
        raise ValueError(
            f"eta_end ({eta_end}) must exceed sqrt(eta_1) = min(min_noise_level/kappa, min_noise_level"
            f"{', sqrt(eta_1_cap)' if eta_1_cap is not None else ''}) = {start:.6g}"
        )


def eta_schedule(
    steps: int,
    kappa: float,
    power: float,
    min_noise_level: float,
    eta_end: float,
    eta_1_cap: float | None = 0.001,
) -> torch.Tensor:
    """``eta_1 .. eta_T`` as a float64 tensor of length ``steps``.

    ``eta_end`` is ``sqrt(eta_T)``. ``eta_1_cap`` bounds ``eta_1`` (UPSR uses 0.001);
    ``None`` gives ResShift's schedule.
    """
    check_schedule_args(steps, kappa, power, min_noise_level, eta_end, eta_1_cap)
    start = first_sqrt_eta(kappa, min_noise_level, eta_1_cap)
    log_ratio = math.log(eta_end / start) / (steps - 1)
    beta = torch.linspace(0.0, 1.0, steps, dtype=torch.float64) ** power * (steps - 1)
    sqrt_eta = start * torch.exp(beta * log_ratio)
    return sqrt_eta**2
