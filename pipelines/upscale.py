"""Upscale images x4 with a trained UPSR checkpoint (a folder or a registered URI).

IN may be image files or folders (searched recursively). Each output is a PNG named after
its input; inputs found in a folder keep their path relative to that folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines.cli import UserError, run_job
from pipelines.config import IMAGE_EXTENSIONS, SynthConfig
from pipelines.images import RejectedImage, decode_rgb

log = logging.getLogger(__name__)


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
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--seed", type=int, help="sampling seed (default: the checkpoint's inference.seed)")


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


def read_image(path: Path) -> np.ndarray:
    try:
        return decode_rgb(path.read_bytes(), max_pixels=SynthConfig().max_pixels, min_side=1)
    except RejectedImage as error:
        raise UserError(f"{path}: cannot be read as an image: {error}") from None
    except OSError as error:
        raise UserError(f"{path}: cannot be read: {error}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    import pipelines.tracking  # noqa: F401  (registers the models:/ URI resolver for --model)
    import upsr
    from upsr.checkpoint import CheckpointError

    pairs = collect_inputs(args.inputs, args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    try:
        pipeline = upsr.load(args.model, device=device)
    except CheckpointError as error:
        raise UserError(f"--model: {error}") from None
    overrides = {name: value for name, value in (("tile", args.tile), ("stride", args.stride),
                                                 ("tile_batch", args.batch), ("seed", args.seed),
                                                 ("tiling", args.tiling))
                 if value is not None}
    try:
        pipeline.inference_config = dataclasses.replace(pipeline.inference_config, **overrides)
    except ValueError as error:
        raise UserError(f"--tile/--stride/--batch (checkpoint defaults: tile {pipeline.inference_config.tile}, "
                        f"stride {pipeline.inference_config.stride}): {error}") from None

    log.info("upscaling %d image(s) on %s with %s", len(pairs), device, args.model)
    for source, target in tqdm(pairs, desc="upscale", unit="image"):
        image = read_image(source)
        upscaled = pipeline.upscale(image)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(upscaled).save(target)
    log.info("wrote %d image(s) to %s", len(pairs), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
