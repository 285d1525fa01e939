"""The paper's no-reference metrics, CLIPIQA, MUSIQ, MANIQA and NIQE, computed with pyiqa (the
library the UPSR authors evaluated with), each from weight files in a local folder: nothing is
downloaded.

pyiqa's default variant of each, under pyiqa's own file names, so a folder that pyiqa filled on a
machine with internet access can be copied as it is:

- ``clipiqa``: CLIP RN50 with pyiqa's prompt pairs; OpenAI's ``RN50.pt`` (pyiqa keeps it in
  ``<torch hub>/clip``).
- ``musiq``: MUSIQ trained on KonIQ-10k, ``musiq_koniq_ckpt-e95806b9.pth``.
- ``maniqa``: MANIQA trained on KonIQ-10k, ``ckpt_koniq10k.pt``. pyiqa builds its ViT-B/8 trunk with
  timm's ImageNet weights before loading that checkpoint over the whole network, so those weights
  never change a score, but timm reads them from the Hugging Face cache (downloading them if they
  are not there): they are required too, where timm keeps them.
- ``niqe``: the NIQE authors' pristine-image model, ``niqe_modelparameters.mat``; without that file,
  the same model's parameters as basicsr's wheel ships them (``niqe_pris_params.npz``), so NIQE,
  which needed no download before pyiqa, still needs none.

Images are float (B, 3, H, W) RGB tensors in [0, 1].
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

NAMES = ("clipiqa", "musiq", "maniqa", "niqe")

# metric -> higher is better (pyiqa's ``lower_better``, negated)
HIGHER_IS_BETTER = {"clipiqa": True, "musiq": True, "maniqa": True, "niqe": False}

# NIQE fits a Gaussian over the features of 96x96 blocks: below 2x2 blocks there is no covariance to
# fit (pyiqa returns a number all the same). The networks resize or crop images of any size.
MIN_SIDE = {"niqe": 192}

# pyiqa's options of each metric's default variant, besides the weights given here.
PYIQA_OPTIONS = {"clipiqa": {}, "musiq": {"pretrained": False}, "maniqa": {"pretrained": False}, "niqe": {}}

MANIQA_TRUNK = "vit_base_patch8_224"
BASICSR_NIQE_MODEL = "basicsr/metrics/niqe_pris_params.npz"


def default_weights_dir() -> Path:
    """pyiqa's own download folder, ``<torch hub>/pyiqa``."""
    return Path(torch.hub.get_dir()) / "pyiqa"


def _file_name(url: str) -> str:
    return Path(urlparse(url).path).name


def weight_files(name: str, weights_dir: str | Path | None = None) -> dict[str, Path]:
    """Where metric ``name``'s weights are looked for, by role: in ``weights_dir``, or where pyiqa
    itself keeps them when it is None (``<torch hub>/pyiqa``, and ``<torch hub>/clip`` for CLIP)."""
    folder = Path(weights_dir) if weights_dir else default_weights_dir()
    if name == "clipiqa":
        from pyiqa.archs.clip_model import _MODELS

        clip_folder = folder if weights_dir else Path(torch.hub.get_dir()) / "clip"
        return {"backbone": clip_folder / _file_name(_MODELS["RN50"])}
    if name == "musiq":
        from pyiqa.archs.musiq_arch import default_model_urls

        return {"weights": folder / _file_name(default_model_urls["koniq10k"])}
    if name == "maniqa":
        from pyiqa.archs.maniqa_arch import default_model_urls

        return {"weights": folder / _file_name(default_model_urls["koniq"]), "trunk": maniqa_trunk_file()}
    if name == "niqe":
        from pyiqa.archs.niqe_arch import default_model_urls

        return {"pristine_model": folder / _file_name(default_model_urls["niqe"])}
    raise ValueError(f"unknown no-reference metric {name!r}: known are {', '.join(NAMES)}")


def maniqa_trunk_file() -> Path:
    """timm's ImageNet ViT-B/8 in the Hugging Face cache: the file when cached, else the folder looked in."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    repo = timm.models.get_pretrained_cfg(MANIQA_TRUNK).hf_hub_id
    cached = try_to_load_from_cache(repo, "model.safetensors")
    if isinstance(cached, str):
        return Path(cached)
    return Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"


@dataclass
class Plan:
    """What ``resolve`` found: the metrics that can be computed and the files of each (role -> path,
    as plain strings for other processes), and for the others why not."""

    files: dict[str, dict[str, str]] = field(default_factory=dict)
    not_computed: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, str]:
        """Each computable metric's weights, by file name and the start of its SHA-256."""
        from upsr.checkpoint import file_sha256

        described = {}
        for name, files in self.files.items():
            parts = [f"{Path(path).name} (sha256 {file_sha256(Path(path))[:16]})" for path in files.values()]
            described[name] = "pyiqa " + name + ": " + (", ".join(parts) or
                                                          f"pristine model of basicsr's {BASICSR_NIQE_MODEL}")
        return described


def resolve(names: list[str] | tuple[str, ...], weights_dir: str | Path | None = None) -> Plan:
    """Which of ``names`` can be computed from the files found (see ``weight_files``)."""
    plan = Plan()
    for name in dict.fromkeys(names):
        files = weight_files(name, weights_dir)
        if name == "niqe" and not files["pristine_model"].is_file():
            files = {}  # basicsr's copy of the pristine model
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            plan.not_computed[name] = "weights not found at " + ", ".join(missing)
        else:
            plan.files[name] = {role: str(path) for role, path in files.items()}
    return plan


def _basicsr_niqe_model() -> io.BytesIO:
    """basicsr's pristine-image model as the .mat file pyiqa's NIQE reads."""
    import importlib.util

    import scipy.io

    # Found, not imported: basicsr's package import needs basicsr_compat first and loads much more.
    model = np.load(Path(importlib.util.find_spec("basicsr").origin).parent.parent / BASICSR_NIQE_MODEL)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"mu_prisparam": model["mu_pris_param"], "cov_prisparam": model["cov_pris_param"]})
    buffer.seek(0)
    return buffer


def build(name: str, files: dict[str, str], device: str | torch.device = "cpu", **options: Any) -> torch.nn.Module:
    """pyiqa's metric ``name`` with its weights from ``files`` (a ``Plan.files`` entry) on ``device``;
    ``options`` go to ``pyiqa.create_metric`` after the defaults (tests use them to shrink MANIQA's
    20 crops)."""
    import pyiqa

    options = {**PYIQA_OPTIONS[name], **options}
    if name == "clipiqa":
        return pyiqa.create_metric(name, device=device, backbone=files["backbone"], **options)
    if name == "niqe":
        model = files["pristine_model"] if files else _basicsr_niqe_model()
        return pyiqa.create_metric(name, device=device, pretrained_model_path=model, **options)
    # MUSIQ and MANIQA: built without their checkpoint, which then goes over the whole network,
    # stored as pyiqa downloads it (a plain state dict).
    metric = pyiqa.create_metric(name, device=device, **options)
    metric.load_weights(files["weights"], weight_keys=None)
    return metric


class NoReferenceMetrics:
    """The metrics of a ``Plan``, each loaded once on ``device``; called on a batch of SR images."""

    def __init__(self, files: dict[str, dict[str, str]], device: str | torch.device = "cpu",
                 options: dict[str, dict[str, Any]] | None = None):
        self.metrics = {name: build(name, paths, device, **(options or {}).get(name, {}))
                        for name, paths in files.items()}

    @torch.no_grad()
    def __call__(self, sr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image scores (B,) float64 of each metric; NaN for images below its ``MIN_SIDE`` and
        where it is undefined (NIQE of a flat image)."""
        if sr.dim() != 4 or sr.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB images, got {tuple(sr.shape)}")
        sr = sr.clamp(0, 1)
        scores = {}
        for name, metric in self.metrics.items():
            if min(sr.shape[-2:]) < MIN_SIDE.get(name, 0):
                scores[name] = torch.full((sr.shape[0],), float("nan"), dtype=torch.float64)
            else:
                scores[name] = _scores(metric, sr)
        return scores


def _scores(metric: torch.nn.Module, sr: torch.Tensor) -> torch.Tensor:
    try:
        return metric(sr).reshape(-1).to("cpu", torch.float64)
    except torch.linalg.LinAlgError:  # NIQE of a flat image: no features to fit a Gaussian to
        if len(sr) == 1:
            return torch.full((1,), float("nan"), dtype=torch.float64)
        return torch.cat([_scores(metric, image[None]) for image in sr])
