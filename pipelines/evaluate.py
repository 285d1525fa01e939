"""Evaluate a model on an eval set: Ray Data batch inference in an actor pool, per-image metrics.

The eval set (``pipelines.eval_set``: a synthesised dataset, a folder of LR/HR pairs, or LR
images only) flows through a fixed pool of actors that each load the model once (on a GPU
when the cluster has GPUs, or as ``evaluate.actor_gpus`` says) and upscale one image per
call, tiled as the model's inference config says. Every image is sampled with its own seed, derived from
``inference.seed`` and its id, so its result does not depend on the batch it came in, the
number of actors or the layout it was read from.

Per image: PSNR and SSIM (Y channel) and LPIPS against the HR image when there is one; LR
consistency (PSNR of the SR image downscaled back to the LR size, against the LR) and the
paper's CLIPIQA, MUSIQ, MANIQA and NIQE (pyiqa's, from local weight files:
``upsr.no_reference_metrics``), which need no reference; the seconds spent upscaling; the
SHA-256 of the input files. An image that cannot be read or upscaled becomes a row with an
``error`` and makes the evaluation partial.

Outputs: the per-image table (Parquet; written whole or not at all), a summary JSON beside it
(aggregates, the model and its resolved version, the eval-set hash, what could not be
computed and why), and an MLflow run holding both, the aggregates as metrics, a few
side-by-side images (LR bicubic | SR | HR) and ``upsr.eval.*`` tags that ``upsr promote``
uses to find and reuse the evaluation.

Exit status: 0 when every image was evaluated, 1 when any image failed or the run broke, 2
on a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import config as config_module
from pipelines import registry, storage, tracking
from pipelines.entry import progress_bar, run_job
from pipelines.errors import UserError, caused_by_interrupt, last_line
from pipelines.config import Config
from pipelines.eval_actor import EvaluateImages
from pipelines.eval_contract import (
    ACTOR_SCHEMA,
    FULL_REFERENCE,
    JOB,
    METRICS,
    METRICS_VERSION,
    PANEL_COLUMN,
    RESULT_SCHEMA,
    Evaluation,
    LpipsSetting,
    NoReferenceSetting,
    completeness_problems,
    lpips_setting,
    no_reference_setting,
    settings_hash,
    summary_uri,
    table_content_hash,
)
from pipelines.eval_set import EvalSet, open_eval_set
from pipelines.ray_env import actor_pool_gpus, init_ray, model_actor_arguments, require_shared
from pipelines.synth import add_config_arguments
from upsr.config_loader import to_dict
from upsr.no_reference_metrics import HIGHER_IS_BETTER

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint folder or registered model (models:/NAME@ALIAS or models:/NAME/VERSION)")
    parser.add_argument("--data", required=True, metavar="EVAL",
                        help="eval set, local or s3://: a synthesised dataset, a folder with lr/ and hr/ "
                             "subfolders (pairs matched by path without extension), or a folder of LR images")
    parser.add_argument("--out", metavar="FILE",
                        help="per-image table (.parquet, local or s3://); the summary goes beside it as "
                             "<name>.summary.json (default: <evaluate.output_dir>/<time>-<model>/metrics.parquet)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = config_module.load(args.config, args.set)
    model = registry.resolve_model(args.model, config.mlflow)
    evaluation = evaluate(model, open_eval_set(args.data, config.storage), config, args.out)
    return 0 if evaluation.complete else 1


def default_output(model: registry.ModelRef, output_dir: str) -> str:
    folder = f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}-{model.slug}"
    if storage.is_s3(output_dir):
        return f"{output_dir.rstrip('/')}/{folder}/metrics.parquet"
    return str(Path(output_dir, folder, "metrics.parquet").resolve())


def evaluate(model: registry.ModelRef, eval_set: EvalSet, config: Config, out_uri: str | None = None) -> Evaluation:
    """Run the evaluation, write its outputs and its MLflow run; never raises for a failed image
    or a broken Ray run (``complete`` is then False and the run is marked FAILED)."""
    out_uri = out_uri or default_output(model, config.evaluate.output_dir)
    if not out_uri.endswith(".parquet"):
        raise UserError(f"--out {out_uri}: the per-image table is Parquet: give a path ending in .parquet")
    lpips = lpips_setting(config.loss)
    if lpips.mode == "random":
        log.warning("LPIPS: %s", lpips.description)
    no_reference = no_reference_setting(config.evaluate)
    settings = settings_hash(config, lpips, no_reference)
    init_ray(config.ray)
    require_shared(config.ray, {"mlflow.tracking_uri": tracking.tracking_uri(config.mlflow)})
    gpus = actor_pool_gpus(config.evaluate, "evaluate")
    mlflow_client = tracking.client(config.mlflow)
    with tracking.run_ended_unless_done(lambda: create_run(mlflow_client, config, model, eval_set, lpips, settings),
                                        mlflow_client) as run_id:
        log_inputs(mlflow_client, run_id, config, model, eval_set, lpips, out_uri, gpus)
        log.info("evaluating %s on %s (%s, %d images); MLflow run: %s", model.label, eval_set.uri,
                 eval_set.layout, len(eval_set.ids), tracking.run_page(config.mlflow, run_id))
        started = time.monotonic()
        try:
            rows = run_inference(model, eval_set, config, lpips, no_reference, gpus)
        except Exception as error:  # noqa: BLE001  (whatever broke the Ray run, the evaluation failed)
            if caused_by_interrupt(error):
                raise KeyboardInterrupt(str(error)) from error
            log.exception("the evaluation of %s failed", model.label)
            reason = last_line(str(error)) or type(error).__name__
            mlflow_client.set_tag(run_id, tracking.EVAL_TAG + "error", reason[:5000])
            mlflow_client.set_terminated(run_id, "FAILED")
            summary = {"complete": False, "error": reason, "model": model_summary(model), "mlflow_run_id": run_id}
            return Evaluation(RESULT_SCHEMA.empty_table(), summary, complete=False, run_id=run_id,
                              problems=[f"the evaluation run failed: {reason}"])

        panels = {row["id"]: row[PANEL_COLUMN] for row in rows.select(["id", PANEL_COLUMN]).to_pylist()
                  if row[PANEL_COLUMN] is not None}
        table = rows.drop_columns([PANEL_COLUMN]).sort_by("id")
        problems = completeness_problems(table, eval_set.ids)
        complete = not problems
        set_hash = table_content_hash(table) if complete else None
        summary = build_summary(table, model, eval_set, config, lpips, no_reference, settings, set_hash, problems,
                                out_uri, run_id, time.monotonic() - started)
        write_outputs(table, summary, out_uri, config)
        log_results(mlflow_client, run_id, model, eval_set, table, summary, panels)
        mlflow_client.set_terminated(run_id, "FINISHED" if complete else "FAILED")
    report(summary, problems, out_uri, tracking.run_page(config.mlflow, run_id))
    return Evaluation(table, summary, complete, run_id, problems)


def create_run(mlflow_client, config: Config, model: registry.ModelRef, eval_set: EvalSet, lpips: LpipsSetting,
               settings: str) -> str:
    """The evaluation's MLflow run, with the tags that let ``promote`` find it again; returns its id."""
    experiment_id = tracking.connect(config.mlflow)
    tags = {"job": JOB, tracking.TAG_MODEL_URI: model.load_uri, tracking.TAG_SETTINGS_HASH: settings,
            tracking.EVAL_TAG + "layout": eval_set.layout, tracking.EVAL_TAG + "lpips": lpips.mode,
            tracking.TAG_COMPLETE: "false"}
    if model.version:
        tags |= {tracking.TAG_MODEL_NAME: model.name, tracking.TAG_MODEL_VERSION: model.version}
    return mlflow_client.create_run(experiment_id, run_name=f"evaluate-{model.slug}", tags=tags).info.run_id


def log_inputs(mlflow_client, run_id: str, config: Config, model: registry.ModelRef, eval_set: EvalSet,
               lpips: LpipsSetting, out_uri: str, gpus: float) -> None:
    from mlflow.entities import Param

    params = {"model": model.uri, "model_loaded": model.load_uri, "eval_set": eval_set.uri,
              "eval_layout": eval_set.layout, "eval_images": len(eval_set.ids), "seed": config.inference.seed,
              "lpips": lpips.description, "output": out_uri, "gpus_per_actor": gpus,
              **{f"metrics.{k}": v for k, v in to_dict(config.metrics).items()},
              **{f"evaluate.{k}": v for k, v in to_dict(config.evaluate).items()}}
    mlflow_client.log_batch(run_id, params=[Param(key, storage.redact_uri(str(value))[:6000])
                                            for key, value in params.items()])
    if model.model_id:
        from mlflow.entities import LoggedModelInput

        mlflow_client.log_inputs(run_id, models=[LoggedModelInput(model.model_id)])


def run_inference(model: registry.ModelRef, eval_set: EvalSet, config: Config, lpips: LpipsSetting,
                  no_reference: NoReferenceSetting, gpus: float) -> pa.Table:
    """The actor pool over the eval set (``gpus`` per actor); one result row per image that reached an actor."""
    from ray.data import ActorPoolStrategy

    settings = config.evaluate
    actor_settings = {
        "seed": config.inference.seed, "metrics": to_dict(config.metrics),
        # LR-only sets never need LPIPS: building its VGG costs seconds per actor.
        "lpips": lpips.mode if eval_set.has_reference else "off",
        "lpips_backbone": lpips.backbone, "no_reference": no_reference.plan.files,
        # None: each actor's limit is what its device's free memory holds (UPSRPipeline.max_output_pixels).
        "max_output_pixels": config.inference.max_output_pixels,
        "panel_ids": list(eval_set.ids[:settings.side_by_side]),
    }
    results = eval_set.ray_dataset().map_batches(
        EvaluateImages,
        fn_constructor_kwargs={"model_uri": model.load_uri, "location": eval_set.location, "settings": actor_settings,
                               **model_actor_arguments(settings)},
        batch_size=settings.batch_size, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=settings.num_actors),
        num_cpus=settings.actor_cpus, num_gpus=gpus)
    tables = []
    with progress_bar(len(eval_set.ids), "evaluate", "image") as bar:
        for block in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            tables.append(block.select(ACTOR_SCHEMA.names).cast(ACTOR_SCHEMA))
            bar.update(block.num_rows)
    return pa.concat_tables(tables) if tables else ACTOR_SCHEMA.empty_table()


def aggregates(table: pa.Table) -> dict[str, dict[str, float | int | bool]]:
    """mean, std (sample), median and count of each metric over the images that have it."""
    summary = {}
    for name, higher_is_better in METRICS.items():
        values = np.array([v for v in table[name].to_pylist() if v is not None], dtype=np.float64)
        if values.size:
            summary[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                             "median": float(np.median(values)), "count": int(values.size),
                             "higher_is_better": higher_is_better}
    return summary


def model_summary(model: registry.ModelRef) -> dict[str, Any]:
    return {"uri": model.uri, "loaded": model.load_uri, "name": model.name, "version": model.version}


def build_summary(table: pa.Table, model: registry.ModelRef, eval_set: EvalSet, config: Config, lpips: LpipsSetting,
                  no_reference: NoReferenceSetting, settings: str, set_hash: str | None, problems: list[str],
                  out_uri: str, run_id: str, seconds: float) -> dict[str, Any]:
    computed = aggregates(table)
    images = len(eval_set.ids)
    not_computed: dict[str, str] = {}
    if not eval_set.has_reference:
        not_computed |= {name: "needs an HR reference; the eval set has LR images only" for name in FULL_REFERENCE}
    elif lpips.mode == "off":
        not_computed["lpips"] = lpips.description
    not_computed |= no_reference.plan.not_computed
    for name in no_reference.plan.files:
        missing = images - computed.get(name, {}).get("count", 0)
        if missing:
            not_computed[name] = f"{missing} of {images} images have none" + (
                ": NIQE needs SR images of at least 192x192 and is undefined for flat images" if name == "niqe" else "")
    not_computed |= {name: "not in evaluate.no_reference_metrics" for name in HIGHER_IS_BETTER
                     if name not in config.evaluate.no_reference_metrics}
    upscale_seconds = [s for s in table["seconds"].to_pylist() if s is not None]
    return {
        "complete": not problems,
        "problems": problems,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_summary(model),
        "eval_set": {"uri": eval_set.uri, "layout": eval_set.layout, "images": images,
                     "with_reference": eval_set.has_reference, "hash": set_hash},
        "metrics": computed,
        "not_computed": not_computed,
        "lpips": lpips.description if lpips.mode != "off" and eval_set.has_reference else None,
        "no_reference_weights": no_reference.weights,
        "settings": {"seed": config.inference.seed, "metrics": to_dict(config.metrics),
                     "metrics_version": METRICS_VERSION, "hash": settings,
                     "per_image_seed": "derive_seed(inference.seed, 'evaluate', id)"},
        "failed_images": sum(1 for error in table["error"].to_pylist() if error),
        "seconds": {"total": seconds, "upscale_mean": float(np.mean(upscale_seconds)) if upscale_seconds else None},
        "table": out_uri,
        "mlflow_run_id": run_id,
    }


def write_outputs(table: pa.Table, summary: dict[str, Any], out_uri: str, config: Config) -> None:
    """The table, then the summary; each appears whole or not at all (storage.write_bytes)."""
    for uri, data in ((out_uri, table_bytes(table)), (summary_uri(out_uri), json.dumps(summary, indent=2).encode())):
        parent, name = uri.rsplit("/", 1) if storage.is_s3(uri) else (str(Path(uri).parent), Path(uri).name)
        storage.write_bytes(storage.locate(parent, config.storage), name, data)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def log_results(mlflow_client, run_id: str, model: registry.ModelRef, eval_set: EvalSet, table: pa.Table,
                summary: dict[str, Any], panels: dict[str, bytes]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {"images": summary["eval_set"]["images"], "failed_images": summary["failed_images"]}
    for name, stats in summary["metrics"].items():
        values |= {f"{name}_{stat}": stats[stat] for stat in ("mean", "std", "median", "count")}
    if summary["seconds"]["upscale_mean"] is not None:
        values["seconds_per_image"] = summary["seconds"]["upscale_mean"]
    set_hash = summary["eval_set"]["hash"]
    dataset_name = dataset_digest = None
    if set_hash:
        dataset_name, dataset_digest = tracking.log_dataset_input(
            mlflow_client, run_id, eval_set.location.uri, set_hash, "evaluation",
            {"images": summary["eval_set"]["images"]})
    # Linked to the registered version's logged model (MLflow 3), the aggregates show on its page.
    mlflow_client.log_batch(run_id, metrics=[
        Metric(key, float(value), now, 0, model_id=model.model_id, dataset_name=dataset_name,
               dataset_digest=dataset_digest)
        for key, value in values.items()])
    with tempfile.TemporaryDirectory(prefix="upsr-eval-") as folder:
        root = Path(folder)
        (root / "evaluation").mkdir()
        (root / tracking.TABLE_ARTIFACT).write_bytes(table_bytes(table))
        (root / tracking.SUMMARY_ARTIFACT).write_text(json.dumps(summary, indent=2))
        if panels:
            (root / "side_by_side").mkdir()
            for image_id, png in panels.items():
                (root / "side_by_side" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', image_id)}.png").write_bytes(png)
        mlflow_client.log_artifacts(run_id, folder)
    tags = {tracking.TAG_COMPLETE: str(summary["complete"]).lower(),
            tracking.EVAL_TAG + "images": str(summary["eval_set"]["images"]),
            tracking.EVAL_TAG + "failed_images": str(summary["failed_images"])}
    if set_hash:
        tags[tracking.TAG_SET_HASH] = set_hash
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


def report(summary: dict[str, Any], problems: list[str], out_uri: str, run_page: str) -> None:
    lines = [f"  {name:15s} mean {s['mean']:.4f}  std {s['std']:.4f}  median {s['median']:.4f}  (n={s['count']}, "
             f"{'higher' if s['higher_is_better'] else 'lower'} is better)"
             for name, s in summary["metrics"].items()]
    lines += [f"  not computed: {name}: {why}" for name, why in summary["not_computed"].items()]
    if summary["lpips"] and "lpips" in summary["metrics"]:
        lines.append(f"  lpips computed with: {summary['lpips']}")
    lines += [f"  {name} computed with: {weights}" for name, weights in summary["no_reference_weights"].items()
              if name in summary["metrics"]]
    log.info("evaluation of %s on %s (%d images, eval-set hash %s):\n%s\n  table: %s\n  summary: %s\n"
             "  MLflow run: %s", summary["model"]["loaded"], summary["eval_set"]["uri"], summary["eval_set"]["images"],
             summary["eval_set"]["hash"] or "none (incomplete)", "\n".join(lines), out_uri, summary_uri(out_uri),
             run_page)
    for problem in problems:
        log.error("evaluation incomplete: %s", problem)


if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
