"""The public entry point of the searches (``tune``): ``upsr train`` as one trial, and the little
around it that a search needs. ``tune`` imports nothing else of ``pipelines``.

A search opens its data once (``open_search_inputs``), keeps its trials' checkpoints under one
storage (``checkpoint_storage``), runs each trial with ``train_trial`` and records itself in
MLflow with the same run functions the jobs use.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from pipelines.config import Config, MlflowConfig, TrainConfig, to_yaml
from pipelines.errors import UserError, last_line
from pipelines.ray_env import require_shared
from pipelines.storage import redact_uri
from pipelines.tracking import connect, log_run_facts, run_ended_unless_done, start_run, tracking_uri

__all__ = [
    "Config", "MlflowConfig", "TrainConfig", "UserError", "last_line", "to_yaml", "redact_uri", "connect",
    "log_run_facts", "run_ended_unless_done", "start_run", "tracking_uri", "open_search_inputs",
    "checkpoint_storage", "train_trial", "init_ray", "require_shared",
]


def init_ray(config: Config) -> None:
    from pipelines.ray_env import init_ray as connect_ray

    connect_ray(config.ray)


def open_search_inputs(data_uri: str, aux_uri: str, config: Config) -> tuple[Config, Any]:
    """The config with the aux net resolved as ``upsr train --aux`` does, and the dataset opened and
    split once for every trial (``pipelines.train_data.TrainingData``)."""
    from pipelines.train import resolve_aux
    from pipelines.train_data import open_training_data

    config, _ = resolve_aux(aux_uri, config)
    return config, open_training_data(data_uri, config.train_data, config.storage)


def checkpoint_storage(settings: TrainConfig, config: Config) -> tuple[str, Any, str]:
    """(storage_path for Ray, its filesystem or None, the URI users see) of training runs."""
    from pipelines.training_loop import storage_settings

    return storage_settings(settings, config)


def train_trial(config: Config, data: Any, run_name: str, *, tracking_uri: str, callbacks: Sequence[Any] = (),
                run_tags: dict[str, str] | None = None, rank0_setup: Callable[[], None] | None = None) -> str:
    """Train ``config`` as ``upsr train`` does, without registering a model; returns the MLflow run id
    (FINISHED; a trial that the scheduler stops never returns here, and the search ends its run)."""
    from pipelines.train import TRAIN
    from pipelines.training_loop import fit

    result = fit(TRAIN, config, data.dataset.location.uri, run_name, callbacks=callbacks, run_tags=run_tags,
                 data=data, tracking_uri=tracking_uri, rank0_setup=rank0_setup)
    return result.run_id
