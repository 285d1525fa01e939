"""The evaluation actor: loads the model, LPIPS and the no-reference metrics once, then upscales
and scores one image at a time, each with its own seed, and renders side-by-side panels. Runs in a
Ray Data actor pool (``pipelines.evaluate.run_inference``)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.eval_contract import ACTOR_SCHEMA, JOB, PANEL_COLUMN
from pipelines.eval_set import sha256

log = logging.getLogger(__name__)


# Side-by-side panels of large images show the centre, at most this many HR pixels square.
PANEL_SIDE = 512


# LPIPS on a random trunk must at least be the same random trunk in every actor and run.
RANDOM_LPIPS_SEED = 0


class EvaluateImages:
    """Actor: loads the model (and the metrics' networks) once, then upscales and scores one image at a time."""

    def __init__(self, model_uri: str, location: storage.Location, settings: dict[str, Any], tracking_uri: Any,
                 threads: int):
        import dataclasses

        import torch

        import upsr
        from pipelines.ray_env import start_model_actor
        from upsr.config import MetricsConfig
        from upsr.config_loader import from_dict

        self.device = start_model_actor(tracking_uri, threads)
        self.pipeline = upsr.load(model_uri, device=self.device)
        if settings["max_output_pixels"] is not None:
            self.pipeline.inference_config = dataclasses.replace(
                self.pipeline.inference_config, max_output_pixels=settings["max_output_pixels"])
        self.location = location
        self.settings = settings
        self.metrics_config = from_dict(MetricsConfig, settings["metrics"])
        self.panel_ids = set(settings["panel_ids"])
        self.lpips = None
        if settings["lpips"] != "off":
            from upsr.losses import build_lpips

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_LPIPS_SEED)
                self.lpips = build_lpips(settings["lpips_backbone"], settings["lpips"] == "random").to(self.device)
        from upsr.no_reference_metrics import NoReferenceMetrics

        self.no_reference = NoReferenceMetrics(settings["no_reference"], self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.evaluate_one(row) for row in batch.to_pylist()], schema=ACTOR_SCHEMA)

    def read(self, row: dict[str, Any]) -> tuple[bytes, bytes | None]:
        if "lr_png" in row:
            return row["lr_png"], row["hr_png"]
        hr = storage.read_bytes(self.location, row["hr_path"]) if row.get("hr_path") else None
        return storage.read_bytes(self.location, row["lr_path"]), hr

    def evaluate_one(self, row: dict[str, Any]) -> dict[str, Any]:
        from pipelines.images import RejectedImage, decode_rgb, derive_seed

        image_id = row["id"]
        result: dict[str, Any] = {"id": image_id, "seed": derive_seed(self.settings["seed"], JOB, image_id)}
        try:
            lr_bytes, hr_bytes = self.read(row)
            result["lr_sha256"] = sha256(lr_bytes)
            result["hr_sha256"] = sha256(hr_bytes) if hr_bytes is not None else None
            # Sized to the x4 output, before decoding: a small file can claim a huge image.
            scale = self.pipeline.scale
            max_output = self.pipeline.max_output_pixels()
            lr = decode_rgb(lr_bytes, max_output // scale**2, min_side=1)
            result["lr_height"], result["lr_width"] = lr.shape[:2]
            hr = decode_rgb(hr_bytes, max_output, min_side=1) if hr_bytes is not None else None
            if hr is not None and hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
                raise ValueError(f"HR is {hr.shape[1]}x{hr.shape[0]}, expected x{scale} the LR's "
                                 f"{lr.shape[1]}x{lr.shape[0]}")
            started = time.perf_counter()
            sr = self.pipeline.upscale(lr, seed=result["seed"])
            result["seconds"] = time.perf_counter() - started
            result |= self.score(lr, sr, hr)
            if image_id in self.panel_ids:
                result[PANEL_COLUMN] = side_by_side(lr, sr, hr, scale)
        except (RejectedImage, ValueError, OSError) as error:
            log.warning("image %s: %s", image_id, error)
            result["error"] = f"{type(error).__name__}: {error}"
        except Exception as error:  # noqa: BLE001  (one image's failure is recorded, the rest go on)
            log.exception("image %s failed", image_id)
            result["error"] = f"{type(error).__name__}: {error}"
        return result

    def score(self, lr: np.ndarray, sr: np.ndarray, hr: np.ndarray | None) -> dict[str, float | None]:
        from upsr.metrics import full_reference_metrics, lr_consistency

        lr_t, sr_t = to_tensor(lr, self.device), to_tensor(sr, self.device)
        scores: dict[str, float | None] = {"lr_consistency": float(lr_consistency(sr_t, lr_t, self.metrics_config))}
        for name, values in self.no_reference(sr_t).items():
            scores[name] = float(values[0]) if math.isfinite(values[0]) else None  # NaN: too small or undefined
        if hr is not None:
            full = full_reference_metrics(sr_t, to_tensor(hr, self.device), self.metrics_config, self.lpips)
            scores |= {name: float(value) for name, value in full.items()}
        return scores


def to_tensor(image: np.ndarray, device):
    import torch

    # A copy: decoded images can be read-only views, which torch will not wrap.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255).to(device)


def side_by_side(lr: np.ndarray, sr: np.ndarray, hr: np.ndarray | None, scale: int) -> bytes:
    """PNG of LR bicubic | SR | HR (or LR bicubic | SR), the centre PANEL_SIDE square of large images."""
    import torch

    from pipelines.images import encode_png
    from upsr.aux_net import bicubic_upsample

    with torch.no_grad():
        bicubic = bicubic_upsample(to_tensor(lr, "cpu"), scale).clamp(0, 1)
    columns = [(bicubic[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), sr]
    if hr is not None:
        columns.append(hr)
    height, width = sr.shape[:2]
    top, left = max(0, (height - PANEL_SIDE) // 2), max(0, (width - PANEL_SIDE) // 2)
    crops = [column[top:top + PANEL_SIDE, left:left + PANEL_SIDE] for column in columns]
    return encode_png(np.concatenate(crops, axis=1), 1)
