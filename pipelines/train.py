"""Train UPSR on a synthesised dataset with a frozen auxiliary SR net (Ray Train), logged to MLflow.

Each step: y = bicubic(LR), g(y) from the frozen aux net (loaded once per worker), the noise
weight w from the configured family, t uniform, x_t from the anisotropic forward marginal,
x0_hat = denoiser(scale_input(x_t, t), t, [g(y), y]) and MSE + lambda * LPIPS (DESIGN §1).
Every checkpoint folder also holds ``upsr/``, an ``upsr.load``-able checkpoint of the EMA
weights; at the end the last one is logged as the run's model and registered as
``mlflow.registered_model`` with alias ``mlflow.alias``. Re-running with the same ``--name``
(and storage) continues from the latest checkpoint.

``--init-from`` starts the denoiser (and its EMA) from an UPSR checkpoint folder or a
``models:/`` URI instead of random weights, e.g. the release imported by ``upsr import-official``;
without ``--aux`` the aux net comes from that checkpoint too. The driver reads it once and hands
the tensors to the workers through Ray's object store (a task option), so workers on other
nodes need no access to the driver's files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import nn

from pipelines import config as config_module
from pipelines import storage
from pipelines.entry import run_job
from pipelines.errors import UserError
from pipelines.config import Config
from pipelines.synth import add_config_arguments
from pipelines.train_aux import AUX_CONFIG_FILE, AUX_WEIGHTS_FILE, default_run_name, image_grid
from pipelines.training_loop import TrainingJob
from upsr.config import AuxConfig
from upsr.config_loader import ConfigError, from_dict, to_dict

log = logging.getLogger(__name__)

JOB = "train"
EXPORT_FOLDER = "upsr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="synthesised dataset (folder or s3:// prefix)")
    parser.add_argument("--aux",
                        help="aux net: a `upsr train-aux` checkpoint folder (or s3:// prefix), or a weights file "
                             "(.safetensors or basicsr .pth) for the configured aux architecture; "
                             "default with --init-from: that checkpoint's aux net")
    parser.add_argument("--init-from", metavar="PATH_OR_URI",
                        help="start from this UPSR checkpoint's denoiser (folder or models:/NAME@ALIAS) to fine-tune")
    add_config_arguments(parser)
    parser.add_argument("--name", help="Ray Train run name; an existing one is continued from its latest "
                                       "checkpoint (default: a new name from the date and time)")


def run(args: argparse.Namespace) -> int:
    config = config_module.load(args.config, args.set)
    if args.aux is None and args.init_from is None:
        raise UserError("--aux is required (without --init-from there is no aux net to start from)")
    result = train(args.data, args.aux, config, args.name or default_run_name("upsr"), init_from=args.init_from)
    log.info("model registered as models:/%s@%s (checkpoint %s)", config.mlflow.registered_model,
             config.mlflow.alias, result.checkpoint_uri)
    return 0


def resolve_aux(aux_uri: str, config: Config) -> tuple[Config, str]:
    """The config with the aux section of a train-aux checkpoint, and the weights file's URI.

    A train-aux folder carries its architecture; it must match the configured one, since the
    config is what the logged model and the registry record.
    """
    location = storage.locate(aux_uri, config.storage)
    if not storage.exists(location, AUX_WEIGHTS_FILE):
        if not storage.exists(location):
            raise UserError(f"--aux {aux_uri}: no such file or folder")
        if location.fs.get_file_info(location.path).type == pafs.FileType.Directory:
            raise UserError(f"--aux {aux_uri}: the folder holds no {AUX_WEIGHTS_FILE}; is it a train-aux checkpoint?")
        # Absolute: Tune trials and Ray Train workers do not run in the submitting folder.
        return replace(config, aux=replace(config.aux, weights=location.uri)), location.uri
    if storage.exists(location, AUX_CONFIG_FILE):
        try:
            stored = from_dict(AuxConfig, json.loads(storage.read_bytes(location, location.join(AUX_CONFIG_FILE))),
                               source=location.child_uri(AUX_CONFIG_FILE))
        except (ConfigError, json.JSONDecodeError) as error:
            raise UserError(f"--aux {aux_uri}: {error}") from None
        architecture = ("arch", "options", "pad_multiple")
        differs = [name for name in architecture if getattr(stored, name) != getattr(config.aux, name)]
        if differs:
            raise UserError(f"--aux {aux_uri} was trained with aux.{differs[0]} = {getattr(stored, differs[0])!r}, "
                            f"the config says {getattr(config.aux, differs[0])!r}: use the same aux section")
    weights = location.child_uri(AUX_WEIGHTS_FILE)
    return replace(config, aux=replace(config.aux, weights=weights, weights_key=None)), weights


def local_weights(uri: str, config: Config) -> Path:
    """A local path of the aux weights: the file itself, or a download of an s3:// one."""
    if not storage.is_s3(uri):
        return Path(uri)
    location = storage.locate(uri, config.storage)
    suffix = Path(location.path).suffix
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(storage.read_bytes(location, location.path))
    return Path(handle.name)


def read_init(init_from: str, config: Config, with_aux: bool):
    """The checkpoint to start from, checked against the config: its denoiser must be the
    configured one (the weights have to fit), and its aux net is taken when ``with_aux``."""
    import pipelines.registry  # noqa: F401  (registers the models:/ resolver for read_checkpoint)
    from upsr.checkpoint import CheckpointError, read_checkpoint

    try:
        stored = read_checkpoint(init_from)
    except (CheckpointError, OSError) as error:
        raise UserError(f"--init-from {init_from}: {error}") from None
    ours, theirs = to_dict(config.denoiser), to_dict(stored.config.denoiser)
    differs = [key for key in ours if ours[key] != theirs[key]]
    if differs:
        raise UserError(f"--init-from {init_from}: its denoiser has {differs[0]} = {theirs[differs[0]]!r}, the config "
                        f"says {ours[differs[0]]!r}; set denoiser.{differs[0]} (or use that checkpoint's config)")
    for section in ("diffusion", "weight"):
        if getattr(stored.config, section) != getattr(config, section):
            log.warning("--init-from %s was trained with other %s settings (%s); fine-tuning with the config's (%s)",
                        init_from, section, getattr(stored.config, section), getattr(config, section))
    if with_aux:
        config = replace(config, aux=replace(stored.config.aux, weights=None, weights_key=None))
    return config, {"denoiser": stored.denoiser_state, "aux": stored.aux_state if with_aux else None}


def train(data_uri: str, aux_uri: str | None, config: Config, run_name: str, init_from: str | None = None):
    """Run the job; returns ``training_loop.FitResult`` after registering the model."""
    from pipelines import registry
    from pipelines.training_loop import fit

    task_options, run_tags = {}, {}
    if init_from:
        config, task_options["init_state"] = read_init(init_from, config, with_aux=aux_uri is None)
        run_tags["init_from"] = init_from
    if aux_uri:
        config, _ = resolve_aux(aux_uri, config)

    def register(result) -> None:
        with result.checkpoint.as_directory() as folder:
            registry.log_and_register_model(config.mlflow, result.run_id, Path(folder) / EXPORT_FOLDER)

    return fit(TRAIN, config, data_uri, run_name, task_options=task_options, run_tags=run_tags, publish=register)


class DiffusionTask:
    """The UPSR denoiser trained with the frozen aux net (DESIGN §1).

    ``init_state``: {"denoiser": state dict, "aux": state dict or None} to start from (``--init-from``).
    """

    def __init__(self, config: Config, device: torch.device, init_state: dict | None = None):
        from upsr.aux_net import build_aux_net, freeze
        from upsr.denoiser import build_denoiser
        from upsr.diffusion import UNWDiffusion
        from upsr.losses import DiffusionLoss
        from upsr.objective import UPSRObjective

        self.config = config
        self.model = build_denoiser(config.denoiser)
        aux = config.aux
        init_state = init_state or {}
        if init_state.get("denoiser") is not None:
            self.model.load_state_dict(init_state["denoiser"], strict=True)
        if aux.weights:
            aux = replace(aux, weights=str(local_weights(aux.weights, config)))
        elif init_state.get("aux") is None:
            log.warning("aux.weights is not set: the aux net g is randomly initialised")
        aux_net = build_aux_net(aux)
        if init_state.get("aux") is not None:
            aux_net.load_state_dict(init_state["aux"], strict=True)
        self.aux = freeze(aux_net).to(device)
        self.diffusion = UNWDiffusion.from_config(config.diffusion)
        self.loss = DiffusionLoss(config.loss).to(device)
        self.objective = UPSRObjective(self.aux, self.diffusion, config.weight, self.loss,
                                       config.denoiser.use_sr_condition, config.denoiser.scale)
        self._lpips_for_metrics = None

    def losses(self, model: nn.Module, lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator):
        return self.objective(model, lr, hr, generator)

    def lpips_for_metrics(self) -> nn.Module:
        if self.loss.lpips is not None:
            return self.loss.lpips
        if self._lpips_for_metrics is None:
            from upsr.losses import build_lpips

            self._lpips_for_metrics = build_lpips(self.config.loss.lpips_backbone,
                                                  self.config.loss.allow_random_backbone).to(self.aux_device)
        return self._lpips_for_metrics

    @property
    def aux_device(self) -> torch.device:
        return next(self.aux.parameters()).device

    @torch.no_grad()
    def validate(self, ema_model: nn.Module, batches: Iterator, step: int, logger) -> dict[str, float]:
        """The EMA model sampled as it is deployed (``UPSRPipeline``, the configured sampler), batch
        ``i`` of the validation batches with seed ``inference.seed + i``: PSNR, SSIM, LPIPS, and
        the diagnostics of ``upsr.diagnostics`` (aux gain, w statistics, PSNR by uncertainty,
        x0 error per step)."""
        from upsr import diagnostics
        from upsr.inference import UPSRPipeline
        from upsr.metrics import full_reference_metrics

        pipeline = UPSRPipeline(ema_model, self.aux, self.diffusion, self.config.weight, self.config.inference)
        per_image: dict[str, list[torch.Tensor]] = {}
        per_batch: dict[str, list[float]] = {}
        for index, (lr, hr) in enumerate(batches):
            seed = self.config.inference.seed + index
            sr = pipeline.upscale(lr, seed=seed)
            condition = self.objective.condition(lr)
            values = full_reference_metrics(sr, hr, self.config.metrics, self.lpips_for_metrics())
            values |= {"aux_psnr_gain": diagnostics.aux_gain(condition, hr)}
            values |= diagnostics.psnr_by_uncertainty(sr, hr, condition)
            for key, value in values.items():
                per_image.setdefault(key, []).append(value.float().cpu())
            batch_values = diagnostics.weight_statistics(condition.weight, self.config.weight.floor)
            generator = torch.Generator(lr.device).manual_seed(seed)
            errors = diagnostics.x0_error_per_step(ema_model, self.diffusion, condition, hr, generator)
            batch_values |= {f"x0_mse_t{t}": error for t, error in enumerate(errors)}
            for key, value in batch_values.items():
                per_batch.setdefault(key, []).append(value)
            if index == 0:
                self.log_samples(condition, sr, hr, step, logger)
        ema_model.train()
        return ({f"val_{key}": float(torch.cat(values).mean()) for key, values in per_image.items()}
                | {f"val_{key}": sum(values) / len(values) for key, values in per_batch.items()})

    def log_samples(self, condition, sr: torch.Tensor, hr: torch.Tensor, step: int, logger) -> None:
        """Grid LR bicubic | g(y) | w | UPSR | HR, and a histogram of w."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        floor = self.config.weight.floor
        # w lies in [floor, 1]: stretched to black..white, channels averaged.
        weight_map = ((condition.weight.mean(dim=1, keepdim=True) - floor) / max(1 - floor, 1e-6)).expand_as(sr)
        columns = [(condition.y + 1) / 2, (condition.g_y + 1) / 2, weight_map, sr, hr]
        logger.image(image_grid(columns), "validation_grid", step)
        figure = Figure(figsize=(5, 3))
        axes = figure.add_subplot()
        axes.hist(condition.weight.float().flatten().cpu().numpy(), bins=50, range=(0, 1))
        axes.set_xlabel("noise weight w")
        axes.set_ylabel("pixels x channels")
        axes.set_title(f"step {step}")
        figure.tight_layout()
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        logger.image(np.asarray(canvas.buffer_rgba())[..., :3].copy(), "w_histogram", step)

    def export(self, ema_model: nn.Module, folder: Path) -> None:
        from upsr.checkpoint import CheckpointConfig, save_checkpoint

        config = self.config
        save_checkpoint(folder / EXPORT_FOLDER, ema_model, self.aux, self.diffusion, CheckpointConfig(
            denoiser=config.denoiser, aux=config.aux, diffusion=config.diffusion, weight=config.weight,
            inference=config.inference))


TRAIN = TrainingJob(JOB, "train", DiffusionTask)

if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
