"""Import the authors' released UPSR weights into an UPSR checkpoint folder (and the MLflow registry).

``upsr import-official --denoiser upsr.pth --aux atd_real.pth [--options 001_UPSR_RealSR_x4.yml]
--out DIR`` reads the release's files (``upsr.release``), rebuilds its networks with this
project's code, loads the weights strictly and writes a checkpoint folder that ``upsr.load``,
``upscale``, ``evaluate``, ``promote`` and ``train --init-from`` take. The folder samples as the
release's test code does, tiling included (``inference.tiling: release``). ``--register NAME``
also logs it to MLflow as a new version of NAME with the alias ``--alias``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from pipelines import config as config_module
from pipelines.entry import run_job
from pipelines.errors import UserError
from pipelines.synth import add_config_arguments

log = logging.getLogger(__name__)

# Which release files a checkpoint was imported from (names and SHA-256), stored in the folder.
SOURCE_FILE = "release_source.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--denoiser", required=True, type=Path, help="the release's denoiser checkpoint (upsr.pth)")
    parser.add_argument("--aux", required=True, type=Path, help="the release's aux-net checkpoint (atd_real.pth)")
    parser.add_argument("--options", type=Path,
                        help="the release's options YAML (network_g, network_mse, diffusion, val); "
                             "default: the published 001_UPSR_RealSR_x4.yml values")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is an UPSR checkpoint folder")
    parser.add_argument("--register", metavar="NAME", help="also register the checkpoint in MLflow as model NAME")
    parser.add_argument("--alias", help="alias of the registered version (default: the config's mlflow.alias)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = config_module.load(args.config, args.set)
    check_target(args.out, args.overwrite)
    folder = import_official(args.denoiser, args.aux, args.options, args.out)
    log.info("wrote %s (load it with upsr.load or pass it as --model / --init-from)", folder)
    if args.register:
        version = register(folder, replace(config.mlflow, registered_model=args.register,
                                           alias=args.alias or config.mlflow.alias), args)
        log.info("registered as models:/%s/%d (@%s)", args.register, version, args.alias or config.mlflow.alias)
    return 0


def check_target(out: Path, overwrite: bool) -> None:
    from upsr.checkpoint import FORMAT_FILE, is_checkpoint_folder

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it (only an UPSR checkpoint folder is replaced)")
    if not out.is_dir() or not is_checkpoint_folder(out):
        raise UserError(f"--out {out} is not an UPSR checkpoint folder (no {FORMAT_FILE} of ours): not replacing it")


def import_official(denoiser: Path, aux: Path, options: Path | None, out: Path) -> Path:
    """Read, check and write; on any error nothing is left at ``out``."""
    from upsr.checkpoint import CheckpointConfig, file_sha256, save_checkpoint
    from upsr.release import ReleaseImportError, import_release

    try:
        model = import_release(denoiser, aux, options)
    except ReleaseImportError as error:
        raise UserError(str(error)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        source = {
            "denoiser": {"file": denoiser.name, "sha256": file_sha256(denoiser)},
            "aux": {"file": aux.name, "sha256": file_sha256(aux)},
            "options": {"file": options.name, "sha256": file_sha256(options)} if options else None,
        }
        save_checkpoint(staging, model.denoiser, model.aux_net, model.diffusion, CheckpointConfig(
            denoiser=model.denoiser_config, aux=model.aux_config, diffusion=model.diffusion_config,
            weight=model.weight_config, inference=model.inference_config),
            extra_files={SOURCE_FILE: (json.dumps(source, indent=2) + "\n").encode()})
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def register(folder: Path, settings, args: argparse.Namespace) -> int:
    import mlflow

    from pipelines import registry, tracking

    experiment_id = tracking.connect(settings)
    source = json.loads((folder / SOURCE_FILE).read_text())
    tags = {"job": "import-official", "release.denoiser_sha256": source["denoiser"]["sha256"],
            "release.aux_sha256": source["aux"]["sha256"]}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"import-{args.register}", tags=tags)
    mlflow.log_params({"release.denoiser": str(args.denoiser), "release.aux": str(args.aux),
                       "release.options": str(args.options) if args.options else "published defaults"})
    mlflow.end_run("RUNNING")
    version = registry.log_and_register_model(settings, run.info.run_id, folder)
    tracking.finish_run(settings, run.info.run_id, "FINISHED")
    return version


if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
