"""MLflow for the training jobs: where runs go, what they record, and the registered model.

The driver opens the run (params, tags, config and manifest artifacts) and, at the end, logs
and registers the model; inside Ray Train only rank 0 logs (metrics, sample grids). Every
invocation of a job is its own MLflow run, tagged with the Ray Train run name it continues.

The model is logged as an MLflow *pyfunc* model whose only artifact is the UPSR checkpoint
folder (``upsr.checkpoint.save_checkpoint``: safetensors + JSON), not with MLflow's PyTorch
flavour: that one pickles the module (or tries ``torch.export``), which ties the model to the
code version that saved it and unpickles on load. The pyfunc wrapper is logged as code
(``pipelines/pyfunc_model.py``, MLflow's "models from code"), so nothing is pickled either:
it keeps the safe folder format, loads with ``upsr.load`` and still gives
``mlflow.pyfunc.load_model`` and serving.

Importing this module registers a resolver so that ``upsr.load("models:/upsr@challenger")``
downloads the registered checkpoint folder.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from pipelines.config import MlflowConfig, public_dict
from pipelines.pyfunc_model import CHECKPOINT_ARTIFACT
from upsr.checkpoint import register_uri_resolver
from upsr.typed_config import flatten

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "model"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
REDACTED = "***"
_SECRET_KEY = re.compile(r"key|secret|token|password", re.IGNORECASE)
# MLflow rejects param values longer than this.
_MAX_PARAM_LENGTH = 6000


def tracking_uri(settings: MlflowConfig) -> str:
    """Config, then MLFLOW_TRACKING_URI, then a SQLite file under runs/ (absolute: workers agree)."""
    if settings.tracking_uri:
        return settings.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    database = Path("runs/mlflow.db").resolve()
    database.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{database}"


def artifact_location(settings: MlflowConfig, uri: str) -> str | None:
    if settings.artifact_location:
        return settings.artifact_location
    if uri.startswith("sqlite:///"):
        # MLflow's default for a file store is ./mlartifacts relative to the *current* folder,
        # which differs between the driver and Ray workers.
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def connect(settings: MlflowConfig, uri: str | None = None) -> str:
    """Point this process's MLflow client at ``uri`` (default: the configured store); returns the
    experiment id."""
    uri = uri or tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(settings.experiment, artifact_location=artifact_location(settings, uri))


def loggable_params(config: Any) -> dict[str, str]:
    """The flattened resolved config, credentials taken out of URIs and values of secret-looking
    keys replaced by ``***``."""
    params = {}
    for key, value in flatten(public_dict(config)).items():
        text = REDACTED if value is not None and _SECRET_KEY.search(key.rsplit(".", 1)[-1]) else str(value)
        params[key] = text[:_MAX_PARAM_LENGTH]
    return params


def git_commit(code_folder: Path = Path(__file__).resolve().parent) -> str | None:
    """HEAD of the git checkout the code runs from; else ``UPSR_GIT_COMMIT`` from the environment.

    A job submitted with ``ray job submit --working-dir .`` runs an uploaded copy without
    ``.git``, as does an installed package: the submitter passes the commit in the job's
    runtime environment (docs/cluster.md).
    """
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=code_folder)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("UPSR_GIT_COMMIT") or None


def start_run(settings: MlflowConfig, run_name: str, config: Any, job: str, manifest: dict[str, Any],
              manifest_hash: str, config_yaml: str, extra_tags: dict[str, str] | None = None) -> str:
    """Open an MLflow run with params, tags and the config and manifest artifacts; returns its id.

    ``extra_tags`` are the caller's (``mlflow.parentRunId`` makes the run a child of a search's run).
    """
    import ray

    experiment_id = connect(settings)
    tags = {"job": job, "ray_run_name": run_name, "ray_version": ray.__version__,
            "dataset_manifest_sha256": manifest_hash, "upsr_ray_version": metadata.version("upsr-ray"),
            **(extra_tags or {})}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    mlflow.log_params(loggable_params(config))
    mlflow.log_text(config_yaml, "config/resolved.yaml")
    mlflow.log_dict(manifest, "dataset/_manifest.json")
    mlflow.end_run("RUNNING")
    return run.info.run_id


def log_run_facts(settings: MlflowConfig, run_id: str, facts: dict[str, Any]) -> None:
    """Params that the config does not hold directly (the global batch, split sizes, storage)."""
    connect(settings)
    client = MlflowClient()
    for key, value in facts.items():
        client.log_param(run_id, key, str(value))


def finish_run(settings: MlflowConfig, run_id: str, status: str) -> None:
    connect(settings)
    MlflowClient().set_terminated(run_id, status)


class RunLogger:
    """What rank 0 logs from inside Ray Train: metrics with their step, and images.

    ``uri``: the tracking URI the driver resolved (a worker's own default would differ).
    """

    def __init__(self, settings: MlflowConfig, run_id: str, uri: str | None = None):
        connect(settings, uri)
        self.client = MlflowClient()
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.client.log_batch(self.run_id, metrics=[
            mlflow.entities.Metric(key, float(value), int(1000 * time.time()), step)
            for key, value in values.items()])

    def image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def artifacts(self, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


def log_and_register_model(settings: MlflowConfig, run_id: str, checkpoint_folder: Path) -> int:
    """Log the checkpoint folder as the run's pyfunc model, register it and point the alias at
    the new version; returns the version number."""
    connect(settings)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN, python_model=str(PYFUNC_CODE),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_folder)},
            # Listed rather than inferred: inference would load the model in a subprocess.
            pip_requirements=[f"upsr-ray=={metadata.version('upsr-ray')}"],
            registered_model_name=settings.registered_model)
        mlflow.end_run("RUNNING")
    version = int(info.registered_model_version)
    MlflowClient().set_registered_model_alias(settings.registered_model, settings.alias, str(version))
    log.info("registered %s version %d as @%s", settings.registered_model, version, settings.alias)
    return version


def download_registered_checkpoint(uri: str) -> Path:
    """``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) -> a local UPSR checkpoint folder.

    Uses the tracking URI of this process (``mlflow.set_tracking_uri`` or MLFLOW_TRACKING_URI).
    """
    # A fresh folder each time: an alias moves between versions, so a cache keyed on it would go stale.
    # It is removed when the process exits (the loaded weights live in memory by then).
    target = tempfile.mkdtemp(prefix="upsr-model-")
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=target))
    flavor = mlflow.models.Model.load(str(downloaded)).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get(CHECKPOINT_ARTIFACT, {}).get("path")
    if relative is None or not (downloaded / relative).is_dir():
        raise FileNotFoundError(f"{uri} is not an UPSR model: its MLmodel names no {CHECKPOINT_ARTIFACT!r} artifact folder")
    return downloaded / relative


register_uri_resolver("models:/", download_registered_checkpoint)
