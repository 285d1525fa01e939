"""UPSR's residual-shifting diffusion with uncertainty-weighted (anisotropic) noise (DESIGN §1).

The forward process moves the HR image ``x_0`` towards the upsampled LR image ``y``:
``x_t = x_0 + eta_t (y - x_0) + kappa sqrt(eta_t) w eps``, with a per-pixel, per-channel noise
weight ``w`` (``upsr.uncertainty``); ``w == 1`` is ResShift.

Conventions: ``t`` is a 0-based integer tensor of shape ``(B,)`` (``t = 0 .. T-1`` index
``eta_1 .. eta_T``); per-sample coefficients are broadcast over the remaining dimensions.
``w`` is a tensor broadcastable to the image (or a number). The schedule is kept in float64
and cast to the input's dtype and device where it is used.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Literal

import torch

from upsr.schedule import eta_schedule

if TYPE_CHECKING:
    from upsr.config import DiffusionConfig

__all__ = ["UNWDiffusion", "DenoiseFn"]

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoise_fn(x_t, t, cond) -> x0_hat``; receives the unscaled ``x_t`` (apply
``UNWDiffusion.scale_input`` inside the model wrapper)."""

Weight = torch.Tensor | float


class UNWDiffusion:
    """Forward marginal, prior, posterior and the DDIM / ancestral samplers."""

    def __init__(self, etas: torch.Tensor, kappa: float) -> None:
        etas = torch.as_tensor(etas, dtype=torch.float64).detach().cpu()
        if etas.ndim != 1 or etas.numel() < 1:
            raise ValueError(f"etas must be a non-empty 1-D sequence, got shape {tuple(etas.shape)}")
        if not bool(((etas > 0) & (etas <= 1)).all()):
            raise ValueError(f"etas must lie in (0, 1], got {etas.tolist()}")
        if not bool((etas[1:] > etas[:-1]).all()):
            # The posterior divides by alpha_t = eta_t - eta_{t-1}.
            raise ValueError(f"etas must increase strictly, got {etas.tolist()}")
        if not (kappa > 0 and math.isfinite(kappa)):
            raise ValueError(f"kappa must be a positive finite number, got {kappa!r}")
        self.etas = etas
        self.kappa = float(kappa)
        self.etas_prev = torch.cat([etas.new_zeros(1), etas[:-1]])
        self.alphas = etas - self.etas_prev
        self._posterior_mean_x_t = self.etas_prev / etas
        self._posterior_mean_x0 = self.alphas / etas
        self._posterior_variance = self.kappa**2 * self.etas_prev / etas * self.alphas
        self._ddim_m = torch.sqrt(self.etas_prev / etas)
        self._ddim_k = 1 - self.etas_prev - (1 - etas) * self._ddim_m
        self._ddim_y = self.etas_prev - torch.sqrt(etas * self.etas_prev)
        self._input_scale = 1 / torch.sqrt(etas * self.kappa**2 * 0.3 + 0.25)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> UNWDiffusion:
        etas = eta_schedule(cfg.steps, cfg.kappa, cfg.power, cfg.min_noise_level, cfg.eta_end, cfg.eta_1_cap)
        return cls(etas, cfg.kappa)

    @property
    def num_steps(self) -> int:
        return self.etas.numel()

    def __repr__(self) -> str:
        return f"UNWDiffusion(num_steps={self.num_steps}, kappa={self.kappa}, etas={self.etas.tolist()})"

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` cast to ``like``'s dtype/device, shaped ``(B, 1, ..., 1)`` for broadcasting."""
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"t must be an integer tensor of shape (B,), got {t!r}")
        if t.shape[0] != like.shape[0]:
            raise ValueError(f"t has {t.shape[0]} entries but the batch has {like.shape[0]}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"t must lie in [0, {self.num_steps - 1}], got values {t.tolist()}")
        values = table.to(dtype=like.dtype).to(like.device)[t.to(like.device)]
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def _full(self, table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table`` at the last step (t = T-1) for every sample of ``like``."""
        t = torch.full((like.shape[0],), self.num_steps - 1, dtype=torch.long, device=like.device)
        return self._at(table, t, like)

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Uniform ``t`` in ``[0, T-1]`` per sample (training)."""
        return torch.randint(0, self.num_steps, (batch,), generator=generator, device=device)

    def scale_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser sees: ``x_t / sqrt(eta_t kappa^2 0.3 + 0.25)`` (roughly unit variance)."""
        return x_t * self._at(self._input_scale, t, x_t)

    def denoise(self, denoiser: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor:
        """The denoiser's ``x_0`` prediction from the raw ``x_t``: it sees the preconditioned input."""
        return denoiser(self.scale_input(x_t, t), t, cond)

    def q_sample(
        self,
        x0: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        w: Weight,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0, y)``: mean ``x_0 + eta_t (y - x_0)``, variance ``kappa^2 eta_t w^2``.

        ``noise`` (standard normal, ``x0``'s shape) is drawn from ``generator`` when omitted.
        """
        if noise is None:
            noise = _randn_like(x0, generator)
        eta = self._at(self.etas, t, x0)
        return x0 + eta * (y - x0) + self.kappa * eta.sqrt() * w * noise

    def prior_sample(
        self, y: torch.Tensor, w: Weight, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``x_T = y + kappa sqrt(eta_T) w eps``, the start of sampling."""
        if noise is None:
            noise = _randn_like(y, generator)
        return y + self.kappa * self._full(self.etas, y).sqrt() * w * noise

    def posterior_mean_variance(
        self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, w: Weight
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance (both ``x_t``'s shape) of ``q(x_{t-1} | x_t, x_0)``; variance 0 at t = 0."""
        mean = self._at(self._posterior_mean_x_t, t, x_t) * x_t + self._at(self._posterior_mean_x0, t, x_t) * x0
        variance = self._at(self._posterior_variance, t, x_t) * torch.as_tensor(w, dtype=x_t.dtype, device=x_t.device) ** 2
        return mean, variance.expand_as(x_t)

    def ddim_step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Deterministic step to ``x_{t-1}``; at t = 0 the coefficients reduce to returning ``x0_hat``.

        ``w`` does not appear: with the true ``x_0`` the step keeps ``x_t``'s noise ``eps`` and
        lands on ``q(x_{t-1} | x_0)``, whatever the weight that scaled it.
        """
        k = self._at(self._ddim_k, t, x_t)
        m = self._at(self._ddim_m, t, x_t)
        c = self._at(self._ddim_y, t, x_t)
        return k * x0_hat + m * x_t + c * y

    def ancestral_step(
        self,
        x_t: torch.Tensor,
        x0_hat: torch.Tensor,
        t: torch.Tensor,
        w: Weight,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``x_{t-1}`` from the posterior given ``x0_hat``; noiseless at t = 0."""
        mean, variance = self.posterior_mean_variance(x_t, x0_hat, t, w)
        if noise is None:
            noise = _randn_like(x_t, generator)
        return mean + variance.sqrt() * noise

    @torch.no_grad()
    def sample(
        self,
        denoise_fn: DenoiseFn,
        y: torch.Tensor,
        cond: torch.Tensor,
        w: Weight,
        sampler: Literal["ddim", "ancestral"] = "ddim",
        generator: torch.Generator | None = None,
        prior_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from ``x_T`` and return ``x_0`` clamped to [-1, 1].

        ``denoise_fn(x_t, t, cond)`` is called ``T`` times with the unscaled ``x_t``. ``prior_noise``
        (standard normal, ``y``'s shape) is the ``eps`` of ``x_T``; all other noise comes from
        ``generator`` (which must live on ``y``'s device) when given.
        """
        if sampler not in ("ddim", "ancestral"):
            raise ValueError(f"sampler must be 'ddim' or 'ancestral', got {sampler!r}")
        x = self.prior_sample(y, w, noise=prior_noise, generator=generator)
        for step in reversed(range(self.num_steps)):
            t = torch.full((y.shape[0],), step, dtype=torch.long, device=y.device)
            x0_hat = denoise_fn(x, t, cond)
            if sampler == "ddim":
                x = self.ddim_step(x, x0_hat, y, t)
            else:
                x = self.ancestral_step(x, x0_hat, t, w, generator=generator)
        return x.clamp(-1.0, 1.0)


def _randn_like(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
