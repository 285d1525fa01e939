"""MLflow runs: where runs go, what they record, and how evaluation runs are found again.

The training jobs' driver opens the run (params, tags, config and manifest artifacts); inside
Ray Train only rank 0 logs (metrics, sample grids). Every invocation of a job is its own MLflow
run, tagged with the Ray Train run name it continues. Evaluation runs carry ``upsr.eval.*``
tags (model name and version, eval-set hash, a hash of the metric settings, whether every image
was evaluated) so that ``upsr promote`` can find an earlier evaluation of the same version on
the same content under the same settings and reuse its per-image table. The model registry is
``pipelines.registry``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from pipelines.config import MlflowConfig, public_dict
from pipelines.errors import caused_by_interrupt, interrupts_deferred, last_line
from pipelines.storage import redact_uri
from upsr.config_loader import flatten

if TYPE_CHECKING:
    from pipelines.registry import ModelRef

log = logging.getLogger(__name__)

REDACTED = "***"
# Why a run ended KILLED or FAILED.
END_REASON_TAG = "end_reason"
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


def run_page(settings: MlflowConfig, run_id: str) -> str:
    """Where a person opens the run: its page on a tracking server, or for a local store the
    ``mlflow ui`` command that serves it and the page's path there."""
    uri = tracking_uri(settings)
    page = f"#/experiments/{MlflowClient(uri).get_run(run_id).info.experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{redact_uri(uri).rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {redact_uri(uri)}`, then http://127.0.0.1:5000/{page}"


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

    def create() -> str:
        # The fluent call adds MLflow's own tags (user, source); the run stays open for the job.
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
        mlflow.end_run("RUNNING")
        return run.info.run_id

    with run_ended_unless_done(create, MlflowClient()) as run_id:
        mlflow.start_run(run_id=run_id)
        try:
            mlflow.log_params(loggable_params(config))
            mlflow.log_text(config_yaml, "config/resolved.yaml")
            mlflow.log_dict(manifest, "dataset/_manifest.json")
        finally:
            mlflow.end_run("RUNNING")
    return run_id


@contextmanager
def run_ended_unless_done(create: Callable[[], str], client: MlflowClient) -> Iterator[str]:
    """``create()`` an MLflow run and yield its id; if the block raises, the run ends KILLED (Ctrl-C,
    ``ray job stop``) or FAILED, with the reason in its ``end_reason`` tag: no run is left RUNNING.

    Interrupts are held while the run is created: one that lands then is raised once the id is known.
    """
    run_id = None
    try:
        with interrupts_deferred():
            run_id = create()
        yield run_id
    except BaseException as error:
        if run_id is not None:
            interrupted = caused_by_interrupt(error)
            reason = ("interrupted (Ctrl-C, or SIGTERM from `ray job stop`)" if interrupted
                      else f"{type(error).__name__}: {last_line(str(error))}")
            client.set_tag(run_id, END_REASON_TAG, reason[:5000])
            client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")
        raise


def log_dataset_input(client: MlflowClient, run_id: str, uri: str, digest: str, context: str,
                      profile: dict[str, Any] | None = None) -> tuple[str, str]:
    """The run's dataset as an MLflow input (``context``: training or evaluation), named by its
    folder, identified by ``digest`` (MLflow keeps 36 characters), with ``profile`` (row counts);
    returns the (name, digest) that metrics computed on it refer to."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    public_uri = redact_uri(uri)
    dataset = Dataset(name=Path(public_uri.rstrip("/")).name or "dataset", digest=digest[:36],
                      source_type="s3" if public_uri.startswith("s3://") else "local",
                      source=json.dumps({"uri": public_uri}), profile=json.dumps(profile) if profile else None)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    return dataset.name, dataset.digest


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

    def image(self, image: np.ndarray, key: str, step: int) -> None:
        """One image of a series (``key``) at a step: the MLflow UI shows the series with a step slider."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def artifacts(self, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


def start_system_metrics(settings: MlflowConfig, run_id: str, uri: str, rank: int, resumed: bool):
    """MLflow's system-metrics thread for this worker (CPU, memory, disk, network; GPUs through
    nvidia-ml-py), logging ``system/rank<N>/...`` to the run; None when turned off. ``finish()`` it."""
    if not settings.system_metrics_interval_s:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=settings.system_metrics_interval_s,
                                   node_id=f"rank{rank}", tracking_uri=uri, resume_logging=resumed)
    monitor.start()
    return monitor


EVAL_TAG = "upsr.eval."


TAG_MODEL_NAME = EVAL_TAG + "model_name"


TAG_MODEL_VERSION = EVAL_TAG + "model_version"


TAG_MODEL_URI = EVAL_TAG + "model_uri"


TAG_SET_HASH = EVAL_TAG + "set_hash"


TAG_SETTINGS_HASH = EVAL_TAG + "settings_hash"


TAG_COMPLETE = EVAL_TAG + "complete"


TABLE_ARTIFACT = "evaluation/metrics.parquet"


SUMMARY_ARTIFACT = "evaluation/summary.json"


def client(settings: MlflowConfig) -> MlflowClient:
    connect(settings)
    return MlflowClient()


def find_evaluation(settings: MlflowConfig, model: ModelRef, set_hash: str, settings_hash: str) -> str | None:
    """The newest finished, complete evaluation run of this model version on this content with
    these metric settings; None when there is none (or the model is not registered)."""
    if model.version is None:
        return None
    mlflow_client = client(settings)
    experiment = mlflow_client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        return None
    conditions = {TAG_MODEL_NAME: model.name, TAG_MODEL_VERSION: model.version, TAG_SET_HASH: set_hash,
                  TAG_SETTINGS_HASH: settings_hash, TAG_COMPLETE: "true"}
    filter_string = " and ".join(f"tags.`{key}` = '{value}'" for key, value in conditions.items())
    runs = mlflow_client.search_runs([experiment.experiment_id], f"{filter_string} and attributes.status = 'FINISHED'",
                                     max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def load_evaluation_table(settings: MlflowConfig, run_id: str) -> pa.Table:
    connect(settings)
    with tempfile.TemporaryDirectory(prefix="upsr-eval-") as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TABLE_ARTIFACT, dst_path=folder)
        return pq.read_table(path)
