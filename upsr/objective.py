"""UPSR's training objective, in one place (DESIGN §1).

From an LR/HR pair in [0, 1]: ``y`` = bicubic x4 of the LR, ``g(y)`` from the frozen aux net and
the noise weight ``w`` (float32, outside autocast: ``upsr.aux_net.sr_condition``), ``t`` uniform per
sample, ``x_t`` from the anisotropic forward process, the denoiser's ``x_0`` prediction from the
preconditioned ``x_t`` (``UNWDiffusion.denoise``), and ``MSE + lambda LPIPS`` against the HR image.
Sampling lives in ``UPSRPipeline``; the two share the schedule object and the condition.
"""

from __future__ import annotations

import torch
from torch import nn

from upsr.aux_net import SRCondition, sr_condition
from upsr.config import NoiseWeightConfig
from upsr.diffusion import UNWDiffusion
from upsr.losses import DiffusionLoss


class UPSRObjective:
    """``objective(denoiser, lr, hr, generator)`` -> loss terms ("loss" is the one to minimise)."""

    def __init__(self, aux_net: nn.Module, diffusion: UNWDiffusion, weight_config: NoiseWeightConfig,
                 loss: DiffusionLoss, use_sr_condition: bool, scale: int = 4):
        self.aux_net = aux_net
        self.diffusion = diffusion
        self.weight_config = weight_config
        self.loss = loss
        self.use_sr_condition = use_sr_condition
        self.scale = scale

    def condition(self, lr: torch.Tensor) -> SRCondition:
        return sr_condition(self.aux_net, lr, self.weight_config, self.use_sr_condition, self.scale)

    def __call__(self, denoiser: nn.Module, lr: torch.Tensor, hr: torch.Tensor,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        condition = self.condition(lr)
        x0 = hr * 2 - 1
        t = self.diffusion.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.diffusion.q_sample(x0, condition.y, t, condition.weight, noise)
        x0_hat = self.diffusion.denoise(denoiser, x_t, t, condition.cond)
        return self.loss(x0_hat, x0)
