"""Upscale images x4 with a trained UPSR checkpoint (a folder or a registered URI).

IN may be image files, folders or ``s3://`` prefixes (searched recursively), and ``--out`` a
folder or an ``s3://`` prefix. Each output is a PNG named after its input; inputs found in a
folder keep their path relative to that folder. Single images are upscaled in this process; a
folder or prefix runs as a Ray Data job over an actor pool (``upscale.num_actors`` replicas on
the cluster's CPUs or GPUs, each loading the model once).

Nothing is lost: an output never replaces an input, images whose output exists are skipped
unless ``--overwrite``, and an output appears whole or not at all (local files are renamed into
place, S3 objects appear on completion), so an interrupted run is finished by running it again.
An image that cannot be read, or whose output would exceed the pixel limit, is listed with its
reason in ``failed.json`` beside the outputs; the others are all written, and the exit status is
1. Usage errors (paths, flags, the model, two inputs with one output name) exit with 2 before
any image is upscaled.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines import config as config_module
from pipelines import registry, storage
from pipelines.config import IMAGE_EXTENSIONS, Config
from pipelines.entry import progress_bar, run_job
from pipelines.errors import UserError
from pipelines.images import RejectedImage, decode_rgb, encode_png
from pipelines.synth import add_config_arguments
from upsr.config_loader import from_dict, to_dict, updated

log = logging.getLogger(__name__)

FAILED_FILE = "failed.json"
WRITER = "upsr upscale"
# zlib level of the output PNGs: lossless at every level; 6 is PNG's usual size/speed balance.
PNG_COMPRESSION = 6
RESULT_SCHEMA = pa.schema([("name", pa.string()), ("input", pa.string()), ("error", pa.string())])


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 2**64)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files, folders or s3:// prefixes of images")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix (created if missing)")
    parser.add_argument("--model", required=True, help="checkpoint folder or URI (e.g. models:/upsr@champion)")
    parser.add_argument("--tile", type=int, help="LR tile size (default: the checkpoint's inference.tile)")
    parser.add_argument("--stride", type=int, help="LR tile stride (default: the checkpoint's inference.stride)")
    parser.add_argument("--batch", type=int, help="tiles or images per network call (inference.tile_batch)")
    parser.add_argument("--tiling", choices=("blend", "release"),
                        help="large images: blend denoiser tiles in every step, or sample tiles separately as the "
                             "release does (default: the checkpoint's inference.tiling)")
    parser.add_argument("--max-output-pixels", type=int,
                        help="refuse images whose output has more pixels (default: what free memory holds)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="in-process runs (single images); default: cuda when available. A folder's actors use "
                             "GPUs when upscale.actor_gpus (or the cluster) gives them one")
    parser.add_argument("--seed", type=seed, help="sampling seed (default: the checkpoint's inference.seed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="upscale again images whose output exists, replacing it (never an input); default: skip")
    add_config_arguments(parser)


@dataclass(frozen=True)
class Images:
    """What one run upscales: the input roots, one row per image (``root`` index, ``path`` in
    its filesystem, output ``name`` under ``--out``), and whether any input was a folder."""

    roots: list[storage.Location]
    rows: list[dict[str, Any]]
    from_folders: bool


def collect_inputs(inputs: list[str], out: storage.Location, config: Config) -> Images:
    """Every input image and its output name; folders and prefixes are searched recursively."""
    roots: list[storage.Location] = []
    rows: list[dict[str, Any]] = []
    from_folders = False
    for text in inputs:
        try:
            root = storage.locate(text, config.storage)
            kind = root.fs.get_file_info(root.path).type
        except (ValueError, OSError) as error:
            raise UserError(f"{text}: {error}") from None
        index = len(roots)
        roots.append(root)
        if kind == pafs.FileType.Directory:
            if storage.overlaps(root, out):
                raise UserError(f"--out {out.uri} and the input folder {root.uri} overlap: the outputs would be "
                                "read as inputs on the next run; choose an --out outside the inputs")
            found = [info.path for info in storage.list_files(root) if is_image_name(info.path)]
            if not found:
                raise UserError(f"{text}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            rows += [{"root": index, "path": path, "name": output_name(storage.relative(root, path))}
                     for path in found]
            from_folders = True
        elif kind == pafs.FileType.File:
            rows.append({"root": index, "path": root.path, "name": output_name(posixpath.basename(root.path))})
        else:
            raise UserError(f"{text}: no such file, folder or prefix")
    sources: dict[str, str] = {}
    for row in rows:
        source = roots[row["root"]].fs.normalize_path(row["path"])
        if row["name"] in sources:
            raise UserError(f"{sources[row['name']]} and {source} would both be written to "
                            f"{out.child_uri(row['name'])}; rename one or upscale them into different --out folders")
        sources[row["name"]] = source
    return Images(roots, rows, from_folders)


def is_image_name(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def output_name(relative_path: str) -> str:
    return posixpath.splitext(relative_path)[0] + ".png"


def check_outputs(images: Images, out: storage.Location) -> None:
    """Before any work: the output folder is usable and no output is an input."""
    kind = out.fs.get_file_info(out.path).type
    if kind == pafs.FileType.File:
        raise UserError(f"--out {out.uri} is a file, not a folder")
    if storage.is_s3(out.uri):
        bucket = out.path.split("/", 1)[0]
        if out.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise UserError(f"--out {out.uri}: bucket {bucket} does not exist (or these credentials cannot see it)")
    else:
        existing = next(parent for parent in [Path(out.path), *Path(out.path).parents] if parent.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"--out {out.uri}: {existing} is not writable")
    inputs = {(type(images.roots[row["root"]].fs), row["path"]) for row in images.rows}
    for row in images.rows:
        if (type(out.fs), out.join(row["name"])) in inputs:
            raise UserError(f"{out.child_uri(row['name'])} is an input: upscale never writes over its inputs; "
                            "choose another --out")


def existing_outputs(out: storage.Location) -> set[str]:
    return {storage.relative(out, info.path) for info in storage.list_files(out)}


def inference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: value for name, value in (("tile", args.tile), ("stride", args.stride), ("tile_batch", args.batch),
                                            ("seed", args.seed), ("tiling", args.tiling),
                                            ("max_output_pixels", args.max_output_pixels)) if value is not None}


def inference_settings(model: registry.ModelRef, args: argparse.Namespace):
    """The checkpoint's inference config with the command line's changes, checked before any work."""
    from upsr.checkpoint import CheckpointError, inspect_checkpoint
    from upsr.inference import check_tile

    try:
        checkpoint = inspect_checkpoint(model.load_uri).config
    except (CheckpointError, OSError) as error:
        raise UserError(f"--model {args.model}: {str(error).splitlines()[0]}") from None
    inference = checkpoint.inference
    try:
        changed = updated(inference, **inference_overrides(args))
        check_tile(changed, checkpoint.denoiser.lr_multiple)
        return changed
    except ValueError as error:  # ConfigError included
        raise UserError(f"--tile/--stride/--batch/--max-output-pixels (checkpoint defaults: tile {inference.tile}, "
                        f"stride {inference.stride}): {error}") from None


class ImageUpscaler:
    """One model, loaded once; reads, upscales and writes one image at a time."""

    def __init__(self, model_uri: str, inference: dict[str, Any], roots: list[storage.Location],
                 out: storage.Location, device: str):
        import upsr
        from upsr.config import InferenceConfig

        self.pipeline = upsr.load(model_uri, device=device)
        self.pipeline.inference_config = from_dict(InferenceConfig, inference)
        self.max_lr_pixels = self.pipeline.max_output_pixels() // self.pipeline.scale**2
        self.roots = roots
        self.out = out

    def upscale(self, row: dict[str, Any]) -> dict[str, str | None]:
        """Write one output; an image that cannot be done is returned with the reason."""
        from upsr.inference import ImageTooLarge

        root = self.roots[row["root"]]
        source = root.fs.normalize_path(row["path"])
        try:
            image = read_image(storage.read_bytes(root, row["path"]), self.max_lr_pixels)
            data = encode_png(self.pipeline.upscale(image), PNG_COMPRESSION)
        except (RejectedImage, ImageTooLarge) as error:
            return {"name": row["name"], "input": source, "error": str(error)}
        except OSError as error:
            return {"name": row["name"], "input": source, "error": f"cannot be read: {error}"}
        try:
            storage.write_bytes(self.out, row["name"], data)
        except OSError as error:
            return {"name": row["name"], "input": source, "error": f"cannot be written: {error}"}
        return {"name": row["name"], "input": source, "error": None}


class UpscaleImages:
    """Ray Data actor: an ``ImageUpscaler`` on this actor's device."""

    def __init__(self, model_uri: str, inference: dict[str, Any], roots: list[storage.Location],
                 out: storage.Location, tracking_uri: Any, threads: int):
        from pipelines.ray_env import start_model_actor

        self.upscaler = ImageUpscaler(model_uri, inference, roots, out, start_model_actor(tracking_uri, threads))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.upscaler.upscale(row) for row in batch.to_pylist()], schema=RESULT_SCHEMA)


def read_image(data: bytes, max_lr_pixels: int):
    try:
        return decode_rgb(data, max_pixels=max_lr_pixels, min_side=1)
    except RejectedImage as error:
        if str(error).startswith("too many pixels"):
            raise RejectedImage(f"too large: its x4 output would exceed the pixel limit (--max-output-pixels; "
                                f"default: what free memory holds): {error}") from None
        raise RejectedImage(f"cannot be read as an image: {error}") from None


def upscale_in_process(images: Images, todo: list[dict[str, Any]], model: registry.ModelRef, inference,
                       out: storage.Location, args: argparse.Namespace):
    import torch
    from mlflow.exceptions import MlflowException

    from upsr.checkpoint import CheckpointError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    try:
        upscaler = ImageUpscaler(model.load_uri, to_dict(inference), images.roots, out, device)
    except (CheckpointError, MlflowException, OSError) as error:
        raise UserError(f"--model {args.model}: {str(error).splitlines()[0]}") from None
    log.info("upscaling %d image(s) on %s with %s", len(todo), device, model.label)
    for row in todo:
        yield upscaler.upscale(row)


def upscale_on_ray(images: Images, todo: list[dict[str, Any]], model: registry.ModelRef, inference,
                   out: storage.Location, config: Config):
    """The images through a Ray Data actor pool; results arrive as images finish."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines import tracking
    from pipelines.ray_env import actor_pool_gpus, init_ray, model_actor_arguments, require_shared

    init_ray(config.ray)
    local = {"--out": out.uri, **{f"IN {root.uri}": root.uri for root in images.roots}}
    if model.version is None:
        local["--model"] = model.load_uri
    else:  # the actors download the registered model from MLflow
        local["mlflow.tracking_uri"] = tracking.tracking_uri(config.mlflow)
    require_shared(config.ray, local)
    settings = config.upscale
    gpus = actor_pool_gpus(settings, "upscale")
    log.info("upscaling %d image(s) with %s on %d actor(s) (%s CPU, %s GPU each)", len(todo), model.label,
             settings.num_actors, settings.actor_cpus, gpus)
    results = ray.data.from_items(todo, override_num_blocks=min(len(todo), 64 * settings.num_actors)).map_batches(
        UpscaleImages,
        fn_constructor_kwargs={"model_uri": model.load_uri, "inference": to_dict(inference), "roots": images.roots,
                               "out": out, **model_actor_arguments(settings)},
        batch_size=1, batch_format="pyarrow", compute=ActorPoolStrategy(size=settings.num_actors),
        num_cpus=settings.actor_cpus, num_gpus=gpus)
    yield from results.iter_rows()


def write_failures(out: storage.Location, failures: list[dict[str, str]]) -> None:
    """``failed.json`` when images failed; a stale one of ours is removed when none did."""
    if failures:
        storage.write_bytes(out, FAILED_FILE, (json.dumps({"writer": WRITER, "failed": failures}, indent=2) + "\n")
                            .encode())
        return
    try:
        if json.loads(storage.read_bytes(out, out.join(FAILED_FILE))).get("writer") == WRITER:
            storage.delete_files(out, [FAILED_FILE])
    except (OSError, ValueError, AttributeError):
        pass


def run(args: argparse.Namespace) -> int:
    config = config_module.load(args.config, args.set)
    try:
        out = storage.locate(args.out, config.storage)
    except ValueError as error:
        raise UserError(f"--out {args.out}: {error}") from None
    images = collect_inputs(args.inputs, out, config)
    check_outputs(images, out)
    registry.use_project_store(config.mlflow)
    model = registry.resolve_model(args.model, config.mlflow)
    inference = inference_settings(model, args)
    done = set() if args.overwrite else existing_outputs(out)
    todo = [row for row in images.rows if row["name"] not in done]
    counts = Counter(skipped=len(images.rows) - len(todo))
    if counts["skipped"]:
        log.info("skipping %d of %d image(s) whose output exists in %s (--overwrite upscales them again)",
                 counts["skipped"], len(images.rows), out.uri)
    failures: list[dict[str, str]] = []
    if todo:
        results = (upscale_on_ray(images, todo, model, inference, out, config) if images.from_folders
                   else upscale_in_process(images, todo, model, inference, out, args))
        with progress_bar(len(todo), "upscale", "image") as bar:
            for result in results:
                if result["error"]:
                    log.error("%s: %s", result["input"], result["error"])
                    failures.append({"input": result["input"], "reason": result["error"]})
                counts["failed" if result["error"] else "written"] += 1
                bar.update()
    write_failures(out, failures)
    log.info("%d written, %d skipped (output exists), %d failed%s; outputs in %s", counts["written"],
             counts["skipped"], counts["failed"], f" (reasons in {out.child_uri(FAILED_FILE)})" if failures else "",
             out.uri)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
