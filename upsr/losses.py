"""Training loss of the diffusion: ``MSE(x0_hat, x0) + lambda * LPIPS_vgg(clamp(x0_hat), x0)``.

The ``lpips`` package ships its calibrated linear layers, but the VGG16 trunk is torchvision's
ImageNet checkpoint, normally downloaded on first use. Here it is read from a given file or
the torch hub cache, so a machine without network fails early with a message saying where
to put it instead of mid-training.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from upsr.config import LossConfig

log = logging.getLogger(__name__)

VGG16_FILENAME = "vgg16-397923af.pth"
# torchvision's vgg16().features index -> the lpips trunk slice holding that layer.
_LPIPS_VGG_SLICES = ((range(0, 4), 1), (range(4, 9), 2), (range(9, 16), 3), (range(16, 23), 4), (range(23, 30), 5))


class LPIPSBackboneError(FileNotFoundError):
    """The VGG16 weights that LPIPS needs are not on this machine."""


def default_vgg16_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def build_lpips(backbone: str | Path | None = None, allow_random_backbone: bool = False) -> nn.Module:
    """Frozen ``lpips.LPIPS(net='vgg')`` taking images in [-1, 1].

    ``backbone``: torchvision VGG16 weights; None looks in the torch hub cache.
    """
    import lpips

    path = Path(backbone) if backbone else default_vgg16_path()
    if not path.is_file() and not allow_random_backbone:
        raise LPIPSBackboneError(
            f"LPIPS needs torchvision's VGG16 ImageNet weights; looked for {path} and found nothing. "
            f"Copy {VGG16_FILENAME} there (or set loss.lpips_backbone to its path), or set "
            "loss.lpips_weight: 0 to train without LPIPS."
        )
    # A random trunk is at least the same one in every process and run (fixed seed, the
    # caller's random state untouched), so that its scores compare between runs.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)  # lpips passes torchvision's deprecated `pretrained` flag
        torch.manual_seed(0)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if path.is_file():
        model.net.load_state_dict(_lpips_trunk_state(path), strict=True)
        log.info("LPIPS VGG16 trunk loaded from %s", path)
    else:
        log.warning("LPIPS not meaningful: no VGG16 weights at %s, using a randomly initialised trunk "
                    "(allow_random_backbone is set)", path)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _lpips_trunk_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise many different types
        raise LPIPSBackboneError(f"VGG16 weights {path} cannot be read: {error}") from None
    trunk = {}
    for layers, slice_index in _LPIPS_VGG_SLICES:
        for layer in layers:
            for name in ("weight", "bias"):
                key = f"features.{layer}.{name}"
                if key in state:
                    trunk[f"slice{slice_index}.{layer}.{name}"] = state[key]
    if len(trunk) != 26:  # 13 conv layers, weight and bias each
        raise LPIPSBackboneError(f"{path} is not torchvision's VGG16 state dict (found {len(trunk)} of 26 conv tensors)")
    return trunk


class DiffusionLoss(nn.Module):
    """``loss(x0_hat, x0)`` -> dict with "mse", "lpips" (when lambda > 0) and the weighted "loss"."""

    def __init__(self, config: LossConfig):
        super().__init__()
        self.lpips_weight = config.lpips_weight
        # lambda = 0 must not need the VGG weights at all.
        self.lpips = (
            build_lpips(config.lpips_backbone, config.allow_random_backbone) if config.lpips_weight > 0 else None
        )

    def forward(self, x0_hat: torch.Tensor, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"mse": F.mse_loss(x0_hat, x0)}
        total = terms["mse"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(x0_hat.clamp(-1, 1), x0).mean()
            total = total + self.lpips_weight * terms["lpips"]
        terms["loss"] = total
        return terms
