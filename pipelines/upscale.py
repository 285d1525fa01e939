"""Upscale images x4 with a trained UPSR checkpoint (a folder or a registered URI).

IN may be image files or folders (searched recursively). Each output is a PNG named after
its input; inputs found in a folder keep their path relative to that folder.

Nothing is lost: an output never replaces an input, an existing output is replaced only with
``--overwrite``, and every PNG is written to a temporary name first, so an interrupted run
leaves no half-written image. An image that cannot be read, or whose output would exceed the
pixel limit, is skipped with its reason in ``failed.json`` beside the outputs; the others are
all written, and the exit status is 1. Usage errors (paths, flags, the model) exit with 2
before any image is upscaled.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines import config as config_module
from pipelines.entry import run_job
from pipelines.errors import UserError
from pipelines.config import IMAGE_EXTENSIONS
from pipelines.images import RejectedImage, decode_rgb
from pipelines.synth import add_config_arguments
from upsr.config_loader import updated

log = logging.getLogger(__name__)

FAILED_FILE = "failed.json"
WRITER = "upsr upscale"


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 2**64)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders of images")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--model", required=True, help="checkpoint folder or URI (e.g. models:/upsr@champion)")
    parser.add_argument("--tile", type=int, help="LR tile size (default: the checkpoint's inference.tile)")
    parser.add_argument("--stride", type=int, help="LR tile stride (default: the checkpoint's inference.stride)")
    parser.add_argument("--batch", type=int, help="tiles or images per network call (inference.tile_batch)")
    parser.add_argument("--tiling", choices=("blend", "release"),
                        help="large images: blend denoiser tiles in every step, or sample tiles separately as the "
                             "release does (default: the checkpoint's inference.tiling)")
    parser.add_argument("--max-output-pixels", type=int,
                        help="refuse images whose output has more pixels (default: what free memory holds)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--seed", type=seed, help="sampling seed (default: the checkpoint's inference.seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist (never inputs)")
    add_config_arguments(parser)


def collect_inputs(inputs: list[str], out_dir: Path) -> list[tuple[Path, Path]]:
    """(input file, output PNG) pairs; folders are searched recursively for image files."""
    pairs: list[tuple[Path, Path]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            pairs += [(p, out_dir / p.relative_to(path).with_suffix(".png")) for p in found]
        elif path.is_file():
            pairs.append((path, out_dir / f"{path.stem}.png"))
        else:
            raise UserError(f"{path}: no such file or folder")
    targets: dict[Path, Path] = {}
    for source, target in pairs:
        if target in targets:
            raise UserError(f"{source} and {targets[target]} would both be written to {target}")
        targets[target] = source
    return pairs


def check_outputs(pairs: list[tuple[Path, Path]], out_dir: Path, overwrite: bool) -> None:
    """Before any work: the output folder is usable, no output is an input, and none exists
    unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    existing = next((parent for parent in [out_dir, *out_dir.parents] if parent.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out_dir}: {existing} is not writable")
    inputs = {source.resolve() for source, _ in pairs}
    for source, target in pairs:
        if target.resolve() in inputs:
            raise UserError(f"{target} is an input: upscale never writes over its inputs; choose another --out")
        if target.exists() and not overwrite:
            raise UserError(f"{target} exists (an earlier output?); pass --overwrite to replace outputs")


def read_image(path: Path, max_lr_pixels: int) -> np.ndarray:
    try:
        return decode_rgb(path.read_bytes(), max_pixels=max_lr_pixels, min_side=1)
    except RejectedImage as error:
        if str(error).startswith("too many pixels"):
            raise RejectedImage(f"too large: its x4 output would exceed the pixel limit (--max-output-pixels; "
                                f"default: what free memory holds): {error}") from None
        raise RejectedImage(f"cannot be read as an image: {error}") from None
    except OSError as error:
        raise RejectedImage(f"cannot be read: {error}") from None


def write_png(image: np.ndarray, target: Path) -> None:
    """Write all of the PNG or none of it: a temporary file in the same folder, then a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            Image.fromarray(image).save(stream, format="PNG")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_failures(out_dir: Path, failures: list[dict[str, str]]) -> None:
    """``failed.json`` when images failed; a stale one of ours is removed when none did."""
    path = out_dir / FAILED_FILE
    if failures:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"writer": WRITER, "failed": failures}, indent=2) + "\n")
        return
    try:
        if json.loads(path.read_text()).get("writer") == WRITER:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def load_pipeline(args: argparse.Namespace, config):
    import torch
    from mlflow.exceptions import MlflowException

    import upsr
    from pipelines import registry
    from upsr.checkpoint import CheckpointError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    registry.use_project_store(config.mlflow)
    try:
        pipeline = upsr.load(args.model, device=device)
    except (CheckpointError, MlflowException, OSError) as error:
        raise UserError(f"--model {args.model}: {str(error).splitlines()[0]}") from None
    overrides = {name: value for name, value in (("tile", args.tile), ("stride", args.stride),
                                                 ("tile_batch", args.batch), ("seed", args.seed),
                                                 ("tiling", args.tiling),
                                                 ("max_output_pixels", args.max_output_pixels))
                 if value is not None}
    try:
        pipeline.inference_config = updated(pipeline.inference_config, **overrides)
    except ValueError as error:
        raise UserError(f"--tile/--stride/--batch/--max-output-pixels (checkpoint defaults: tile "
                        f"{pipeline.inference_config.tile}, stride {pipeline.inference_config.stride}): {error}") from None
    return pipeline, device


def run(args: argparse.Namespace) -> int:
    from upsr.inference import ImageTooLarge

    config = config_module.load(args.config, args.set)
    pairs = collect_inputs(args.inputs, args.out)
    check_outputs(pairs, args.out, args.overwrite)
    pipeline, device = load_pipeline(args, config)
    max_lr_pixels = pipeline.max_output_pixels() // pipeline.scale**2

    log.info("upscaling %d image(s) on %s with %s", len(pairs), device, args.model)
    failures: list[dict[str, str]] = []
    for source, target in tqdm(pairs, desc="upscale", unit="image"):
        try:
            upscaled = pipeline.upscale(read_image(source, max_lr_pixels))
        except (RejectedImage, ImageTooLarge) as error:
            log.error("%s: %s", source, error)
            failures.append({"input": str(source), "reason": str(error)})
            continue
        write_png(upscaled, target)
    write_failures(args.out, failures)
    if failures:
        log.error("%d of %d image(s) failed; reasons in %s", len(failures), len(pairs), args.out / FAILED_FILE)
        return 1
    log.info("wrote %d image(s) to %s", len(pairs), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
