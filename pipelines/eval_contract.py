"""The evaluation contract: what an evaluation of a model on an eval set is, and when one can be
reused instead of run again.

The per-image table's schema, the metrics and which way is better, the settings that decide an
image's numbers besides the model and the image (``settings_hash``), the content hash of a
table's images and the completeness check. ``upsr evaluate`` writes evaluations to this
contract; ``upsr promote`` reads and reuses them by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.config import Config, EvaluateConfig, LossConfig
from pipelines.eval_set import content_hash
from upsr.config_loader import to_dict
from upsr.no_reference_metrics import HIGHER_IS_BETTER, Plan, resolve


# Bump when an image's numbers change for the same model, image and settings (a metric's
# definition, the seeding): stored evaluations of another version are then not reused.
# 2: NIQE is pyiqa's, and CLIPIQA, MUSIQ and MANIQA came.
METRICS_VERSION = 2


# metric -> higher is better
METRICS = {"psnr": True, "ssim": True, "lpips": False, "lr_consistency": True, **HIGHER_IS_BETTER}


FULL_REFERENCE = ("psnr", "ssim", "lpips")


RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("lr_width", pa.int32()), ("lr_height", pa.int32()),
    ("lr_sha256", pa.string()), ("hr_sha256", pa.string()), ("seed", pa.int64()),
    *((name, pa.float64()) for name in METRICS),
    ("seconds", pa.float64()), ("error", pa.string()),
])


PANEL_COLUMN = "panel_png"


ACTOR_SCHEMA = RESULT_SCHEMA.append(pa.field(PANEL_COLUMN, pa.binary()))


@dataclass
class LpipsSetting:
    """How LPIPS is computed here: with pretrained VGG16 weights, a seeded random trunk, or not at all."""

    mode: str  # "pretrained", "random" or "off"
    backbone: str | None
    description: str


def lpips_setting(loss: LossConfig) -> LpipsSetting:
    """Decided once on the driver, so every actor computes LPIPS the same way (or none does)."""
    from upsr.checkpoint import file_sha256
    from upsr.losses import default_vgg16_path

    path = Path(loss.lpips_backbone) if loss.lpips_backbone else default_vgg16_path()
    if path.is_file():
        return LpipsSetting("pretrained", str(path), f"VGG16 {path.name} (sha256 {file_sha256(path)[:16]})")
    if loss.allow_random_backbone:
        return LpipsSetting("random", None, "randomly initialised VGG16 trunk (loss.allow_random_backbone; no "
                                            "weights at " f"{path}): LPIPS values are not meaningful, only "
                                            "comparable between evaluations made the same way")
    return LpipsSetting("off", None, f"no VGG16 weights at {path}: set loss.lpips_backbone to torchvision's "
                                     "vgg16-397923af.pth")


@dataclass
class NoReferenceSetting:
    """The no-reference metrics computed here, decided once on the driver as LPIPS is: the files of
    each (``plan.files``, which the actors load), what those are, and why the others are not."""

    plan: Plan
    weights: dict[str, str]


def no_reference_setting(settings: EvaluateConfig) -> NoReferenceSetting:
    plan = resolve(settings.no_reference_metrics, settings.iqa_weights_dir)
    return NoReferenceSetting(plan, plan.describe())


def settings_hash(config: Config, lpips: LpipsSetting, no_reference: NoReferenceSetting) -> str:
    """What besides the model and the images decides an image's numbers; part of the reuse key."""
    settings = {"metrics_version": METRICS_VERSION, "metrics": to_dict(config.metrics),
                "seed": config.inference.seed, "lpips": lpips.description if lpips.mode != "off" else "off",
                "no_reference": no_reference.weights}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class Evaluation:
    """One model's per-image results on an eval set; ``complete`` when every image was evaluated."""

    table: pa.Table
    summary: dict[str, Any]
    complete: bool
    run_id: str | None = None
    problems: list[str] = field(default_factory=list)
    reused: bool = False

    @property
    def set_hash(self) -> str | None:
        return self.summary.get("eval_set", {}).get("hash")


def table_content_hash(table: pa.Table) -> str:
    """The eval-set content hash (``pipelines.eval_set``) of the images a result table covers."""
    return content_hash(zip(*(table[name].to_pylist() for name in ("id", "lr_sha256", "hr_sha256"))))


def completeness_problems(table: pa.Table, expected_ids: tuple[str, ...]) -> list[str]:
    """Why the results are not a full evaluation of the eval set (empty when they are)."""
    ids = table["id"].to_pylist()
    problems = []
    missing = sorted(set(expected_ids) - set(ids))
    if missing:
        problems.append(f"{len(missing)} image(s) have no result: {', '.join(missing[:5])}")
    if len(ids) != len(set(ids)) or set(ids) - set(expected_ids):
        problems.append(f"{len(ids)} results for {len(expected_ids)} images (duplicates or unknown ids)")
    failed = [(row["id"], row["error"]) for row in table.select(["id", "error"]).to_pylist() if row["error"]]
    if failed:
        problems.append(f"{len(failed)} image(s) failed: " + "; ".join(f"{i}: {e}" for i, e in failed[:5]))
    return problems


def summary_uri(table_uri: str) -> str:
    return table_uri[: -len(".parquet")] + ".summary.json"


JOB = "evaluate"
