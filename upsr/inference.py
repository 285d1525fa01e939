"""``UPSRPipeline``: LR images in, x4 SR images out, with padding, tiling and batching.

Large images are tiled *inside* every sampling step: the sampler runs on the whole image
(so the prior noise is drawn once at full size and every tile sees the same noise), and
only the denoiser call is split into overlapping tiles whose ``x0_hat`` predictions are
blended with a cosine-tapered window. Seams therefore cannot accumulate across steps, and
a tiled run matches an untiled one away from the network's receptive-field effects.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from upsr.aux_net import reflect_pad_to_multiple, sr_condition
from upsr.config import InferenceConfig, NoiseWeightConfig
from upsr.denoiser import make_denoise_fn
from upsr.diffusion import DenoiseFn, UNWDiffusion

ImageInput = np.ndarray | Sequence[np.ndarray] | torch.Tensor

# Memory an image needs per output pixel beyond the networks' per-tile activations: the growth
# of peak RSS per output pixel measured by benchmarks/upscale_memory.py (120-173 bytes for
# "blend", 17-35 for "release" in the runs of benchmarks/README.md), with a margin for that
# run-to-run spread. "blend" keeps about 35 float32 maps at the full size while sampling (x_t,
# y, g(y), w, the condition, blending buffers, temporaries); "release" only its accumulators
# and the input.
BYTES_PER_OUTPUT_PIXEL = {"blend": 192, "release": 48}


class ImageTooLarge(ValueError):
    """An image whose output would not fit the pixel limit; raised before any work on it."""


def free_memory(device: torch.device) -> int:
    """Bytes free now: the GPU's for a CUDA device, else the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis covering ``[0, size)``; the last tile is flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_window(length: int, overlap: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """1-D weight: 1 inside, a raised-cosine ramp over ``overlap`` pixels at both ends.

    The ramp never reaches 0, so an image border covered by a single tile keeps a weight.
    """
    weight = torch.ones(length, device=device, dtype=dtype)
    ramp_length = min(overlap, length // 2)
    if ramp_length > 0:
        position = (torch.arange(ramp_length, device=device, dtype=dtype) + 0.5) / ramp_length
        ramp = 0.5 - 0.5 * torch.cos(math.pi * position)
        weight[:ramp_length] = ramp
        weight[-ramp_length:] = ramp.flip(0)
    return weight


def tiled_map(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], tile: int, stride: int, tile_batch: int,
    scale: int = 1,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile`` x ``tile`` crops of ``inputs`` (all B x C x H x W with one
    H, W), ``tile_batch`` crops per call, and blend its outputs (``scale`` times the crop size).

    ``fn`` receives each input's crops concatenated along the batch: crop-major, image-minor.
    """
    batch, _, height, width = inputs[0].shape
    tile_h, tile_w = min(tile, height), min(tile, width)
    origins = [(top, left) for top in tile_starts(height, tile_h, stride)
               for left in tile_starts(width, tile_w, stride)]
    like = inputs[0]
    overlap = (tile - stride) * scale
    window = (blend_window(tile_h * scale, overlap, like.device, like.dtype)[:, None]
              * blend_window(tile_w * scale, overlap, like.device, like.dtype)[None, :])
    blended: torch.Tensor | None = None
    total_weight = torch.zeros(height * scale, width * scale, device=like.device, dtype=like.dtype)
    for first in range(0, len(origins), tile_batch):
        group = origins[first:first + tile_batch]
        crops = [(slice(top, top + tile_h), slice(left, left + tile_w)) for top, left in group]
        outputs = fn(*(torch.cat([x[:, :, rows, cols] for rows, cols in crops]) for x in inputs)).split(batch)
        for (top, left), output in zip(group, outputs):
            if blended is None:
                blended = like.new_zeros(batch, output.shape[1], height * scale, width * scale)
            rows = slice(top * scale, (top + tile_h) * scale)
            cols = slice(left * scale, (left + tile_w) * scale)
            blended[:, :, rows, cols] += output * window
            total_weight[rows, cols] += window
    return blended / total_weight


def tiled_denoise_fn(denoise: DenoiseFn, tile: int, stride: int, tile_batch: int) -> DenoiseFn:
    """``denoise`` on overlapping HR tiles of ``x_t`` and ``cond``, blended back to full size."""

    def denoise_tiled(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        def denoise_crops(x_crops: torch.Tensor, cond_crops: torch.Tensor) -> torch.Tensor:
            return denoise(x_crops, t.repeat(x_crops.shape[0] // t.shape[0]), cond_crops)

        return tiled_map(denoise_crops, [x_t, cond], tile, stride, tile_batch)

    return denoise_tiled


def check_tile(config: InferenceConfig, lr_multiple: int) -> None:
    """Inference settings fit a denoiser whose LR inputs must be a multiple of ``lr_multiple``."""
    if config.tile % lr_multiple:
        raise ValueError(f"inference.tile ({config.tile}) must be a multiple of {lr_multiple}: "
                         "the denoiser's Swin windows at its coarsest level need it")


class UPSRPipeline:
    """The deployable model: aux net, denoiser and sampler behind one ``upscale`` call."""

    def __init__(
        self,
        denoiser: nn.Module,
        aux_net: nn.Module,
        diffusion: UNWDiffusion,
        weight_config: NoiseWeightConfig,
        inference_config: InferenceConfig,
    ):
        self.denoiser = denoiser.eval()
        self.aux_net = aux_net.eval()
        self.diffusion = diffusion
        self.weight_config = weight_config
        self.scale = denoiser.config.scale
        self.lr_multiple = denoiser.config.lr_multiple
        self.inference_config = inference_config

    @property
    def inference_config(self) -> InferenceConfig:
        return self._inference_config

    @inference_config.setter
    def inference_config(self, config: InferenceConfig) -> None:
        check_tile(config, self.lr_multiple)
        self._inference_config = config

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str) -> UPSRPipeline:
        self.denoiser.to(device)
        self.aux_net.to(device)
        return self

    @torch.no_grad()
    def upscale(self, images: ImageInput, seed: int | None = None,
                noise: torch.Tensor | None = None) -> np.ndarray | list[np.ndarray] | torch.Tensor:
        """x4 super-resolution of a uint8 HxWx3 array, a list of them, or a float Bx3xhxw tensor in [0, 1].

        Returns the same kind: uint8 array(s) or a float tensor on the input's device. ``seed``
        replaces ``inference_config.seed`` for this call; each network call draws its noise
        from a generator seeded with it, so a caller that needs one image's result to be the
        same whatever else is upscaled passes one image and its own seed per call.

        ``noise`` is the prior noise in pixel space (standard normal, Bx3xHxW at the output size
        4h x 4w, or at the size of the LR padded to ``lr_multiple``): sampling starts from
        ``x_T = y + kappa sqrt(eta_T) w noise`` in the [-1, 1] convention, so that another
        implementation's sample can be reproduced (the release draws it as ``PixelShuffle(4)``
        of its (B, 48, h, w) draw). Noise at the output size is extended over the padding with
        draws from the seed. It takes one array or a tensor batch, not a list.
        """
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise ValueError(f"expected a float Bx3xhxw tensor in [0, 1], got {images.dtype} {tuple(images.shape)}")
            self.check_size(images.shape[0] * images.shape[2], images.shape[3])
            return self._upscale_batch(images.to(self.device, torch.float32), seed, noise).to(images.device)
        single = isinstance(images, np.ndarray)
        arrays = [images] if single else list(images)
        for index, array in enumerate(arrays):
            if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                described = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
                raise ValueError(f"image {index}: expected a uint8 HxWx3 RGB array, got {described}")
        if noise is not None and not single:
            raise ValueError("noise= takes one image or a tensor batch, not a list of images")
        for array in arrays:
            self.check_size(*array.shape[:2])
        outputs: list[np.ndarray | None] = [None] * len(arrays)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, array in enumerate(arrays):
            by_shape.setdefault(array.shape, []).append(index)
        for shape, indices in by_shape.items():
            per_call = 1 if self._needs_tiling(*shape[:2]) else self.inference_config.tile_batch
            for first in range(0, len(indices), per_call):
                chunk = indices[first:first + per_call]
                lr = torch.from_numpy(np.stack([arrays[i] for i in chunk])).to(self.device)
                sr = self._upscale_batch(lr.permute(0, 3, 1, 2).float() / 255, seed, noise)
                sr_uint8 = (sr * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                for i, image in zip(chunk, sr_uint8):
                    outputs[i] = image
        return outputs[0] if single else outputs

    def max_output_pixels(self) -> int:
        """``inference.max_output_pixels``, or as many output pixels as free memory holds now."""
        config = self.inference_config
        if config.max_output_pixels is not None:
            return config.max_output_pixels
        return free_memory(self.device) // BYTES_PER_OUTPUT_PIXEL[config.tiling]

    def check_size(self, height: int, width: int) -> None:
        """Raise ``ImageTooLarge`` when an LR image of this size would exceed the output limit."""
        output = height * width * self.scale**2
        limit = self.max_output_pixels()
        if output > limit:
            raise ImageTooLarge(f"{width}x{height} would upscale to {width * self.scale}x{height * self.scale} = "
                                f"{output:,} pixels, more than the {limit:,} allowed "
                                "(inference.max_output_pixels, default: what free memory holds)")

    def _needs_tiling(self, height: int, width: int) -> bool:
        padded_side = -(-max(height, width) // self.lr_multiple) * self.lr_multiple
        return padded_side > self.inference_config.tile

    def _upscale_batch(self, lr: torch.Tensor, seed: int | None, noise: torch.Tensor | None) -> torch.Tensor:
        config = self.inference_config
        generator = torch.Generator(device=lr.device).manual_seed(config.seed if seed is None else seed)
        if noise is not None:
            noise = self._check_noise(noise, lr)
        if self._needs_tiling(*lr.shape[-2:]) and config.tiling == "release":
            return self._sample_tiles_separately(lr, generator, noise)
        return self._sample(lr, generator, noise)

    def _check_noise(self, noise: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = lr.shape
        if noise.dim() == 3:
            noise = noise[None]
        padded = [-(-side // self.lr_multiple) * self.lr_multiple * self.scale for side in (height, width)]
        allowed = [(batch, 3, height * self.scale, width * self.scale), (batch, 3, *padded)]
        if not noise.is_floating_point() or tuple(noise.shape) not in allowed:
            raise ValueError(f"noise must be a float tensor of shape {allowed[0]} (or {allowed[1]}, the padded "
                             f"size), got {noise.dtype} {tuple(noise.shape)}")
        return noise.to(lr.device, torch.float32)

    def _prior_noise(self, noise: torch.Tensor | None, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The prior noise at ``y``'s (padded) size: ``noise`` where given, the seed's draws elsewhere."""
        drawn = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        if noise is None:
            return drawn
        drawn[..., : noise.shape[-2], : noise.shape[-1]] = noise
        return drawn

    def _sample(self, lr: torch.Tensor, generator: torch.Generator, noise: torch.Tensor | None) -> torch.Tensor:
        """The whole (padded) image sampled at once; denoiser calls split into blended tiles when large."""
        height, width = lr.shape[-2:]
        padded = reflect_pad_to_multiple(lr, self.lr_multiple)
        config = self.inference_config
        aux_net = self.aux_net
        denoise = make_denoise_fn(self.denoiser, self.diffusion)
        if self._needs_tiling(height, width):
            # The aux net is tiled too: window attention over a whole large LR image needs many GB.
            def aux_net(lr_image: torch.Tensor) -> torch.Tensor:
                return tiled_map(self.aux_net, [lr_image], config.tile, config.stride, config.tile_batch, self.scale)

            denoise = tiled_denoise_fn(denoise, config.tile * self.scale, config.stride * self.scale,
                                       config.tile_batch)
        condition = sr_condition(aux_net, padded, self.weight_config, self.denoiser.config.use_sr_condition,
                                 self.scale)
        x0 = self.diffusion.sample(denoise, condition.y, condition.cond, condition.weight, sampler=config.sampler,
                                   generator=generator, prior_noise=self._prior_noise(noise, condition.y, generator))
        return ((x0 + 1) / 2)[..., : height * self.scale, : width * self.scale].clamp(0, 1)

    def _sample_tiles_separately(self, lr: torch.Tensor, generator: torch.Generator,
                                 noise: torch.Tensor | None) -> torch.Tensor:
        """The release's tiling: every LR tile sampled on its own, overlaps averaged uniformly.

        Tiles are drawn in row-major order, each with its own prior noise (``noise``'s crop
        where given); ``tile_batch`` of them share a network call.
        """
        config = self.inference_config
        batch, _, height, width = lr.shape
        tile_h, tile_w = min(config.tile, height), min(config.tile, width)
        origins = [(top, left) for top in tile_starts(height, tile_h, config.stride)
                   for left in tile_starts(width, tile_w, config.stride)]
        s = self.scale
        total = lr.new_zeros(batch, 3, height * s, width * s)
        count = lr.new_zeros(1, 1, height * s, width * s)
        for first in range(0, len(origins), config.tile_batch):
            group = origins[first:first + config.tile_batch]
            crops = torch.cat([lr[:, :, top:top + tile_h, left:left + tile_w] for top, left in group])
            tile_noise = None
            if noise is not None:
                tile_noise = torch.cat([noise[:, :, top * s:(top + tile_h) * s, left * s:(left + tile_w) * s]
                                        for top, left in group])
            for (top, left), sr in zip(group, self._sample(crops, generator, tile_noise).split(batch)):
                total[:, :, top * s:(top + tile_h) * s, left * s:(left + tile_w) * s] += sr
                count[:, :, top * s:(top + tile_h) * s, left * s:(left + tile_w) * s] += 1
        return total / count
