"""Uncertainty-guided noise weights (UPSR's u, DESIGN §1).

The auxiliary SR output ``g(y)`` and the bicubic upsampling ``y`` disagree most where the
LR image hides detail; ``psi = |g(y) - y| / 2`` (per pixel and channel, images in [-1, 1])
is that disagreement. Where ``psi`` is small the diffusion perturbs less (weight ``floor``),
where it reaches ``tau`` it gets ResShift's full noise (weight 1).

The paper fixed the shape of the map from ``psi`` to the weight by hand (linear). Here the
shape is a *profile*: a non-decreasing map of ``u = clamp(psi, 0, tau) / tau`` in [0, 1]
onto [0, 1] with ``profile(0) = 0`` and ``profile(1) = 1``, and the weight is
``floor + (1 - floor) * profile(u)``. Every family therefore shares the meaning of ``tau``
(the uncertainty at which noise is full) and ``floor`` (the least noise), so a search can
compare families on equal terms. Families live in ``WEIGHT_FAMILIES``; add one with
``register_weight_family``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from upsr.config import NoiseWeightConfig

__all__ = [
    "WEIGHT_FAMILIES",
    "Profile",
    "register_weight_family",
    "uncertainty",
    "noise_weight",
    "family_weight",
    "weight_from_config",
]

Profile = Callable[[torch.Tensor, "NoiseWeightConfig"], torch.Tensor]
"""``profile(u, cfg)``: non-decreasing, [0, 1] -> [0, 1], 0 at 0 and 1 at 1; reads its own
shape parameters from ``cfg``."""

WEIGHT_FAMILIES: dict[str, Profile] = {}


def register_weight_family(name: str) -> Callable[[Profile], Profile]:
    """Decorator adding a profile to ``WEIGHT_FAMILIES`` under ``name``."""

    def register(profile: Profile) -> Profile:
        if name in WEIGHT_FAMILIES:
            raise ValueError(f"noise-weight family {name!r} is already registered")
        WEIGHT_FAMILIES[name] = profile
        return profile

    return register


@register_weight_family("linear")
def _linear(u: torch.Tensor, cfg: NoiseWeightConfig) -> torch.Tensor:
    return u


@register_weight_family("power")
def _power(u: torch.Tensor, cfg: NoiseWeightConfig) -> torch.Tensor:
    # gamma < 1 raises the noise quickly for small disagreements, gamma > 1 keeps it low longer.
    return u**cfg.gamma


@register_weight_family("logistic")
def _logistic(u: torch.Tensor, cfg: NoiseWeightConfig) -> torch.Tensor:
    # A logistic S-curve centred at u = 1/2, rescaled to pass through (0, 0) and (1, 1);
    # small sharpness tends to the linear profile, large sharpness to a step at tau / 2.
    half_width = math.tanh(cfg.sharpness / 4)
    return (0.5 + 0.5 * torch.tanh(cfg.sharpness * (u - 0.5) / 2) / half_width).clamp(0.0, 1.0)


def uncertainty(g_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``psi = |g(y) - y| / 2``, per pixel and channel; both images in [-1, 1]."""
    if g_y.shape != y.shape:
        raise ValueError(f"g(y) and y must have the same shape, got {tuple(g_y.shape)} and {tuple(y.shape)}")
    return (g_y - y).abs() / 2


def _weight(psi: torch.Tensor, tau: float, floor: float, profile: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor!r}")
    if tau <= 0:
        return torch.ones_like(psi)
    u = psi.clamp(0.0, tau) / tau
    # lerp hits both ends exactly (floor at u = 0, 1 at u = 1), unlike floor + (1 - floor) * p.
    return torch.lerp(torch.full_like(psi, floor), torch.ones_like(psi), profile(u))


def noise_weight(g_y: torch.Tensor, y: torch.Tensor, tau: float = 0.1, floor: float = 0.4) -> torch.Tensor:
    """The paper's weight ``floor + (1 - floor) * clamp(psi, 0, tau) / tau``; ones when ``tau <= 0``."""
    return _weight(uncertainty(g_y, y), tau, floor, lambda u: u)


def family_weight(psi: torch.Tensor, cfg: NoiseWeightConfig) -> torch.Tensor:
    """Weight for uncertainty ``psi`` under the family, ``tau`` and ``floor`` that ``cfg`` names."""
    try:
        profile = WEIGHT_FAMILIES[cfg.family]
    except KeyError:
        raise ValueError(
            f"unknown noise-weight family {cfg.family!r} (known: {', '.join(sorted(WEIGHT_FAMILIES))})"
        ) from None
    return _weight(psi, cfg.tau, cfg.floor, lambda u: profile(u, cfg))


def weight_from_config(cfg: NoiseWeightConfig, g_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Noise weight ``w`` (same shape as ``y``) for the configured family."""
    return family_weight(uncertainty(g_y, y), cfg)
