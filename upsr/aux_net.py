"""The auxiliary SR net g (DESIGN §1): any basicsr architecture, frozen during diffusion training.

``AuxSR`` wraps the basicsr net so that every caller gets the same contract: LR in [0, 1] of
any size in, HR around [0, 1] out (not clamped: the release feeds g(y) to the diffusion as the
net returns it). ``sr_condition`` turns an LR batch into what the diffusion needs: ``y``
(bicubic), ``g(y)``, both in [-1, 1], and the noise weight ``w``, always in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import basicsr_compat  # noqa: F401  (must precede basicsr)
import basicsr.archs  # noqa: F401  (registers the architectures)
import upsr.atd  # noqa: F401  (registers the release's ATD)
from basicsr.utils.registry import ARCH_REGISTRY

from upsr.config import AuxConfig, NoiseWeightConfig
from upsr.uncertainty import weight_from_config

log = logging.getLogger(__name__)


class AuxWeightsError(ValueError):
    """An aux-net checkpoint is missing, unreadable or does not fit the configured architecture."""


class AuxSR(nn.Module):
    """LR [0, 1] -> HR ~[0, 1]; pads LR for window-based architectures and crops the result back."""

    def __init__(self, net: nn.Module, scale: int, pad_multiple: int):
        super().__init__()
        self.net = net
        self.scale = scale
        self.pad_multiple = pad_multiple

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        height, width = lr.shape[-2:]
        padded = reflect_pad_to_multiple(lr, self.pad_multiple)
        return self.net(padded)[..., : height * self.scale, : width * self.scale]


def reflect_pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right borders up to a multiple; reflect where the image is large enough."""
    height, width = image.shape[-2:]
    pad_h = -height % multiple
    pad_w = -width % multiple
    if not pad_h and not pad_w:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)


def build_aux_net(config: AuxConfig) -> AuxSR:
    """The configured basicsr net, with weights from ``config.weights`` when set."""
    try:
        arch = ARCH_REGISTRY.get(config.arch)
    except KeyError:
        known = ", ".join(sorted(name for name, _ in ARCH_REGISTRY))
        raise ValueError(f"aux.arch: {config.arch!r} is not a basicsr architecture (known: {known})") from None
    try:
        net = arch(**config.options)
    except TypeError as error:
        raise ValueError(f"aux.options do not fit {config.arch}: {error}") from None
    scale = int(config.options.get("upscale", config.options.get("scale", 0)))
    if scale != 4:
        raise ValueError(f"aux.options must set upscale (or scale) to 4 for {config.arch}, got {scale or 'none'}")
    aux = AuxSR(net, scale, config.pad_multiple)
    if config.weights:
        load_aux_weights(aux, config.weights, config.weights_key)
    return aux


def load_aux_weights(aux: AuxSR, path: str | Path, key: str | None = None) -> None:
    """Load a basicsr-style checkpoint into ``aux.net``; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise AuxWeightsError(f"aux weights {path} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise many different types
        raise AuxWeightsError(f"aux weights {path} cannot be read: {error}") from None
    if key is not None:
        if key not in state:
            raise AuxWeightsError(f"aux weights {path} have no key {key!r} (keys: {', '.join(list(state)[:5])})")
        state = state[key]
    else:
        state = state.get("params_ema", state.get("params", state))
    try:
        aux.net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise AuxWeightsError(f"aux weights {path} do not fit the configured architecture: {error}") from None
    log.info("loaded aux SR weights from %s", path)


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and no gradients; callers still run it under ``torch.no_grad`` so no graph is kept."""
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def bicubic_upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)


@dataclass
class SRCondition:
    """What the diffusion needs from one LR batch, every image at HR size in [-1, 1] (w in [floor, 1])."""

    y: torch.Tensor
    g_y: torch.Tensor
    weight: torch.Tensor
    cond: torch.Tensor


@torch.no_grad()
def sr_condition(
    aux: Callable[[torch.Tensor], torch.Tensor], lr: torch.Tensor, weight_config: NoiseWeightConfig, use_sr_condition: bool, scale: int = 4
) -> SRCondition:
    """``y`` = bicubic x scale of LR, ``g(y)`` = aux(LR), ``w`` from the weight family, and the
    condition image ``[g(y), y]`` (or ``[y]`` for the baseline). ``lr`` is in [0, 1].

    Computed in float32 even inside an autocast region, as the release does: ``w`` thresholds
    small differences of ``g(y)`` and ``y``, which bf16 would round away.
    """
    with torch.autocast(lr.device.type, enabled=False):
        lr = lr.float()
        y = bicubic_upsample(lr * 2 - 1, scale)
        g_y = aux(lr) * 2 - 1
        weight = weight_from_config(weight_config, g_y, y)
        cond = torch.cat([g_y, y], dim=1) if use_sr_condition else y
    return SRCondition(y=y, g_y=g_y, weight=weight, cond=cond)


class AuxTrainingLoss(nn.Module):
    """The aux net's own objective: ``l1_weight * L1 + lpips_weight * LPIPS``, images in [0, 1]."""

    def __init__(self, config: AuxConfig, lpips_backbone: str | None = None, allow_random_backbone: bool = False):
        super().__init__()
        self.l1_weight = config.l1_weight
        self.lpips_weight = config.lpips_weight
        self.lpips = None
        if config.lpips_weight > 0:
            from upsr.losses import build_lpips

            self.lpips = build_lpips(lpips_backbone, allow_random_backbone)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"l1": F.l1_loss(sr, hr)}
        total = self.l1_weight * terms["l1"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(sr.clamp(0, 1) * 2 - 1, hr * 2 - 1).mean()
            total = total + self.lpips_weight * terms["lpips"]
        terms["loss"] = total
        return terms
