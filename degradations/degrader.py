"""Performing recorded degradations on a batch of HR crops.

Two sets of primitives give the same operations:

* ``"basicsr"`` — basicsr's ``filter2D`` (reflect-padded correlation) and ``DiffJPEG``, in
  torch on the CPU or CUDA: the authors' primitives, and the path for CUDA actors.
* ``"opencv"`` — ``cv2.filter2D`` (the same reflect-101 correlation with the same kernel;
  OpenCV switches to a DFT for large kernels) and a real libjpeg encode/decode at the
  recorded quality (4:2:0, the standard tables that DiffJPEG approximates). Several times
  faster on the CPU; ``tests/test_degradations.py`` shows both give the same blur and an
  equivalent JPEG.

Noise uses basicsr's torch functions under a torch RNG seeded from the record, resizing uses
``torch.nn.functional.interpolate`` as Real-ESRGAN does, for both sets.

Reproducibility: the same record applied to the same HR crop with the same primitives gives
the same LR bytes on the same device (no operation here is non-deterministic). Across devices
(CPU vs CUDA) or primitive sets, results agree only approximately: float reductions are
ordered differently and torch's CPU and CUDA generators draw different noise fields from the
same seed, so replay a dataset on the kind of device and with the primitives that made it
(both are in the dataset's manifest).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import basicsr_compat  # noqa: F401  (before any basicsr import)
from basicsr.data.degradations import (
    add_gaussian_noise_pt,
    bivariate_Gaussian,
    bivariate_generalized_Gaussian,
    bivariate_plateau,
    circular_lowpass_kernel,
    rgb_to_grayscale,
)
from basicsr.utils import DiffJPEG
from basicsr.utils.img_process_util import filter2D

from degradations.record import RECORD_VERSION

PRIMITIVES = ("opencv", "basicsr")


def build_kernel(spec: dict[str, Any]) -> np.ndarray:
    """The blur kernel a record describes, zero-padded to ``spec["pad_to"]`` (float32)."""
    size, pad_to, kind = spec["size"], spec["pad_to"], spec["type"]
    if kind == "sinc":
        with np.errstate(divide="ignore", invalid="ignore"):  # basicsr fills the 0/0 centre afterwards
            kernel = circular_lowpass_kernel(spec["cutoff"], size, pad_to=0)
    else:
        isotropic = not kind.endswith("aniso")
        args = (size, spec["sigma_x"], spec["sigma_y"], spec["theta"])
        if kind in ("iso", "aniso"):
            kernel = bivariate_Gaussian(*args, isotropic=isotropic)
        elif kind.startswith("generalized"):
            kernel = bivariate_generalized_Gaussian(*args, spec["beta"], isotropic=isotropic)
        elif kind.startswith("plateau"):
            kernel = bivariate_plateau(*args, spec["beta"], isotropic=isotropic)
        else:
            raise ValueError(f"unknown kernel type {kind!r} in degradation record")
    kernel = kernel / np.sum(kernel)
    pad = (pad_to - size) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad))).astype(np.float32)


class Degrader:
    """Applies degradation records to HR crops with one set of primitives on one device.

    Construct once per worker (DiffJPEG holds tables on the device) and call ``apply``.
    """

    def __init__(self, primitives: str = "opencv", device: str = "cpu"):
        if primitives not in PRIMITIVES:
            raise ValueError(f"primitives must be one of {PRIMITIVES}, got {primitives!r}")
        if primitives == "opencv" and torch.device(device).type != "cpu":
            raise ValueError("primitives 'opencv' runs on the CPU; use 'basicsr' on CUDA")
        self.primitives = primitives
        self.device = torch.device(device)
        self._jpeg = DiffJPEG(differentiable=False).to(self.device) if primitives == "basicsr" else None

    @torch.inference_mode()
    def apply(self, hr_batch: np.ndarray | Sequence[np.ndarray], records: Sequence[dict[str, Any]]) -> np.ndarray:
        """uint8 HR crops (N, H, W, 3) and one record each -> uint8 LR crops (N, H/s, W/s, 3)."""
        hr = np.stack(list(hr_batch)) if not isinstance(hr_batch, np.ndarray) else hr_batch
        if hr.dtype != np.uint8 or hr.ndim != 4 or hr.shape[-1] != 3:
            raise ValueError(f"expected uint8 crops of shape (N, H, W, 3), got {hr.dtype} {hr.shape}")
        if len(records) != len(hr):
            raise ValueError(f"{len(hr)} crops but {len(records)} records")
        for record in records:
            if record.get("version") != RECORD_VERSION:
                raise ValueError(f"degradation record version {record.get('version')!r} is not {RECORD_VERSION}")
        images = torch.from_numpy(hr).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        # Stage-1 blur runs on the whole batch: all crops still share one size.
        kernels = np.stack([build_kernel(r["stage1"]["kernel"]) for r in records])
        blurred = self.blur(images, kernels)
        lr = [self._after_first_blur(blurred[i:i + 1], records[i], hr.shape[1:3]) for i in range(len(records))]
        return torch.cat(lr).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()

    def _after_first_blur(self, image: torch.Tensor, record: dict[str, Any], hr_size: tuple[int, int]) -> torch.Tensor:
        scale = record["scale"]
        stage1 = record["stage1"]
        resize = stage1["resize"]
        image = F.interpolate(image, scale_factor=resize["scale"], mode=resize["mode"])
        image = self.add_noise(image, stage1["noise"])
        image = self.jpeg(image, stage1["jpeg_quality"])

        stage2 = record["stage2"]
        if stage2 is not None:
            if stage2["kernel"] is not None:
                image = self.blur(image, build_kernel(stage2["kernel"])[None])
            resize = stage2["resize"]
            size = (int(hr_size[0] / scale * resize["scale"]), int(hr_size[1] / scale * resize["scale"]))
            image = F.interpolate(image, size=size, mode=resize["mode"])
            image = self.add_noise(image, stage2["noise"])
            image = self.jpeg(image, stage2["jpeg_quality"])

        final = record["final"]
        lr_size = (hr_size[0] // scale, hr_size[1] // scale)
        if final["order"] == "resize_then_jpeg":
            image = self._resize_and_sinc(image, lr_size, final)
            image = self.jpeg(image, final["jpeg_quality"])
        else:
            image = self.jpeg(image, final["jpeg_quality"])
            image = self._resize_and_sinc(image, lr_size, final)
        return torch.clamp((image * 255.0).round(), 0, 255)

    def _resize_and_sinc(self, image, lr_size, final):
        image = F.interpolate(image, size=lr_size, mode=final["resize_mode"])
        if final["sinc"] is not None:
            image = self.blur(image, build_kernel(final["sinc"])[None])
        return image

    def blur(self, images: torch.Tensor, kernels: np.ndarray) -> torch.Tensor:
        """Correlate each image (N, 3, H, W) with its kernel (N, k, k), reflect-padded."""
        if self.primitives == "basicsr":
            # basicsr's filter2D reshapes with view(), which needs contiguous input (e.g. after DiffJPEG).
            return filter2D(images.contiguous(), torch.from_numpy(kernels).to(images.device))
        pixels = images.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC: one OpenCV call filters 3 channels
        out = np.empty_like(pixels)
        for i, kernel in enumerate(kernels):
            # BORDER_REFLECT_101 is torch's "reflect" padding, which filter2D uses.
            out[i] = cv2.filter2D(pixels[i], -1, trim_zero_border(kernel), borderType=cv2.BORDER_REFLECT_101)
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def jpeg(self, image: torch.Tensor, quality: int) -> torch.Tensor:
        """JPEG round trip of one image (1, 3, H, W) at an integer quality."""
        image = torch.clamp(image, 0, 1)
        if self.primitives == "basicsr":
            return self._jpeg(image.contiguous(), quality=image.new_tensor([float(quality)]))
        rgb = np.clip(np.rint(image[0].numpy() * 255.0), 0, 255).astype(np.uint8)
        bgr = cv2.merge([rgb[2], rgb[1], rgb[0]])
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed at quality {quality}")
        decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
        planes = np.stack([decoded[..., 2], decoded[..., 1], decoded[..., 0]]).astype(np.float32) / 255.0
        return torch.from_numpy(planes)[None]

    def add_noise(self, image: torch.Tensor, noise: dict[str, Any]) -> torch.Tensor:
        """Add a record's Gaussian or Poisson noise to one image (1, 3, H, W), clipped to [0, 1]."""
        gray = 1.0 if noise["gray"] else 0.0
        devices = [image.device] if image.device.type == "cuda" else []
        # basicsr draws from torch's global generator; a forked, seeded one makes the field replayable.
        with torch.random.fork_rng(devices=devices):
            # What torch.manual_seed does for this image's device, without its per-call lazy
            # seeding of every other accelerator backend (~1 ms each on a CPU-only machine).
            torch.default_generator.manual_seed(noise["seed"])
            if devices:
                with torch.cuda.device(image.device):
                    torch.cuda.manual_seed(noise["seed"])
            if noise["kind"] == "gaussian":
                return add_gaussian_noise_pt(image, sigma=noise["sigma"], gray_noise=gray, clip=True, rounds=False)
            return torch.clamp(image + poisson_noise(image, noise["scale"], noise["gray"]), 0, 1)


def trim_zero_border(kernel: np.ndarray) -> np.ndarray:
    """The kernel without the zero rows and columns that pad it to ``pad_to``, kept centred.

    Correlating with the zero ring adds nothing, and a reflected border pixel maps to the same
    source pixel whatever the padding width, so the result is the same; a 7x7 kernel padded
    to 21x21 filters ~5x faster (OpenCV switches to a DFT above 11x11).
    """
    nonzero = np.flatnonzero(np.abs(kernel).sum(axis=0) + np.abs(kernel).sum(axis=1))
    if nonzero.size == 0:
        return kernel
    ring = min(nonzero[0], kernel.shape[0] - 1 - nonzero[-1])
    return kernel[ring:kernel.shape[0] - ring, ring:kernel.shape[1] - ring] if ring else kernel


def poisson_noise(image: torch.Tensor, scale: float, gray: bool) -> torch.Tensor:
    """basicsr's ``generate_poisson_noise_pt`` for one image, drawing the same numbers.

    basicsr counts grey levels with ``torch.unique`` (a sort: ~20 ms per 256 crop on a CPU);
    a 256-bin histogram gives the same count. basicsr draws the grey field first and then a
    colour field that grey noise discards, so skipping that second draw changes nothing: a
    seeded generator yields identical noise (checked against basicsr in the tests).
    """

    def shot_noise(img: torch.Tensor) -> torch.Tensor:
        levels = torch.clamp((img * 255.0).round(), 0, 255)
        img = levels / 255.0
        distinct = int(torch.bincount(levels.flatten().long(), minlength=256).count_nonzero())
        vals = img.new_tensor([2 ** np.ceil(np.log2(distinct))]).view(1, 1, 1, 1)
        return torch.poisson(img * vals) / vals - img

    if gray:
        return shot_noise(rgb_to_grayscale(image, num_output_channels=1)).expand_as(image) * scale
    return shot_noise(image) * scale


@lru_cache(maxsize=4)
def _degrader(primitives: str, device: str) -> Degrader:
    return Degrader(primitives, device)


def apply(hr_batch, records, primitives: str = "opencv", device: str = "cpu") -> np.ndarray:
    """Functional form of :meth:`Degrader.apply` (one cached ``Degrader`` per setting)."""
    return _degrader(primitives, device).apply(hr_batch, records)
