"""Train the auxiliary SR net g on a synthesised dataset (Ray Train), logged to MLflow.

The net is the configured basicsr architecture (``aux`` section), trained with
``aux.l1_weight * L1 + aux.lpips_weight * LPIPS`` under the ``aux_train`` settings. Every
checkpoint folder holds ``aux.safetensors`` (the EMA weights, loadable with
``upsr.aux_net.load_aux_weights``) and ``aux_config.json`` (the architecture); pass the last
one to ``upsr train --aux``. Re-running with the same ``--name`` continues from the latest
checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from pipelines import config as config_module
from pipelines.entry import run_job
from pipelines.config import Config
from pipelines.synth import add_config_arguments
from pipelines.training_loop import TrainingJob
from upsr.config_loader import to_dict

log = logging.getLogger(__name__)

AUX_WEIGHTS_FILE = "aux.safetensors"
AUX_CONFIG_FILE = "aux_config.json"
JOB = "train-aux"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="synthesised dataset (folder or s3:// prefix)")
    add_config_arguments(parser)
    parser.add_argument("--name", help="Ray Train run name; an existing one is continued from its latest "
                                       "checkpoint (default: a new name from the date and time)")


def default_run_name(prefix: str) -> str:
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run(args: argparse.Namespace) -> int:
    config = config_module.load(args.config, args.set)
    result = train_aux(args.data, config, args.name or default_run_name("upsr-aux"))
    log.info("aux net checkpoint: %s (pass it to `upsr train --aux`)", result.checkpoint_uri)
    return 0


def train_aux(data_uri: str, config: Config, run_name: str):
    """Run the job; returns ``training_loop.FitResult`` (its checkpoint holds ``aux.safetensors``)."""
    from pipelines import tracking
    from pipelines.training_loop import fit

    def log_weights(result) -> None:
        client = tracking.client(config.mlflow)
        with result.checkpoint.as_directory() as folder:
            for name in (AUX_WEIGHTS_FILE, AUX_CONFIG_FILE):
                client.log_artifact(result.run_id, str(Path(folder, name)), "aux")
        client.set_tag(result.run_id, "aux_checkpoint", result.checkpoint_uri)

    return fit(TRAIN_AUX, config, data_uri, run_name, publish=log_weights)


class AuxTask:
    """The aux net, trained on LR -> HR pairs in [0, 1]."""

    def __init__(self, config: Config, device: torch.device):
        from upsr.aux_net import AuxTrainingLoss, build_aux_net

        self.config = config
        self.model = build_aux_net(config.aux)
        self.loss = AuxTrainingLoss(config.aux, config.loss.lpips_backbone, config.loss.allow_random_backbone).to(device)

    def losses(self, model: nn.Module, lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator):
        return self.loss(model(lr), hr)

    @torch.no_grad()
    def validate(self, ema_model: nn.Module, batches: Iterator, step: int, logger) -> dict[str, float]:
        from upsr.aux_net import bicubic_upsample
        from upsr.metrics import full_reference_metrics, psnr

        ema_model.eval()
        scores: dict[str, list[torch.Tensor]] = {}
        for index, (lr, hr) in enumerate(batches):
            sr = ema_model(lr)
            bicubic = bicubic_upsample(lr, hr.shape[-1] // lr.shape[-1]).clamp(0, 1)
            values = full_reference_metrics(sr, hr, self.config.metrics, self.loss.lpips)
            # What UPSR's condition and weighting depend on: how much g beats plain interpolation.
            values["psnr_gain_over_bicubic"] = values["psnr"] - psnr(bicubic, hr, self.config.metrics)
            for key, value in values.items():
                scores.setdefault(key, []).append(value.float().cpu())
            if index == 0:
                logger.image(image_grid([bicubic, sr, hr]), "validation_grid", step)
        ema_model.train()
        return {f"val_{key}": float(torch.cat(values).mean()) for key, values in scores.items()}

    def export(self, ema_model: nn.Module, folder: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema_model.net.state_dict().items()},
                  str(folder / AUX_WEIGHTS_FILE))
        architecture = replace(self.config.aux, weights=None, weights_key=None)
        (folder / AUX_CONFIG_FILE).write_text(json.dumps(to_dict(architecture), indent=2) + "\n")


def image_grid(columns: list[torch.Tensor], rows: int = 4) -> np.ndarray:
    """uint8 HxWx3 grid: one row per image (at most ``rows``), one column per (B, 3, H, W) batch in [0, 1]."""
    count = min(rows, columns[0].shape[0])
    tiles = [torch.cat([column[i].float().clamp(0, 1) for column in columns], dim=-1) for i in range(count)]
    grid = torch.cat(tiles, dim=-2)
    return (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


TRAIN_AUX = TrainingJob(JOB, "aux_train", AuxTask)

if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
