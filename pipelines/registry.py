"""The MLflow side of evaluation and promotion: model URIs, evaluation runs, version tags, aliases.

Evaluation runs carry ``upsr.eval.*`` tags (model name and version, eval-set hash, a hash of
the metric settings, whether every image was evaluated) so that ``upsr promote`` can find an
earlier evaluation of the same version on the same content under the same settings and
reuse its per-image table instead of re-running the model. Promotion decisions are written
as ``upsr.promote.*`` tags on the model versions; the registry's aliases (never the
deprecated stages) say which version is the champion.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.storage import redact_uri
from pipelines.config import MlflowConfig

log = logging.getLogger(__name__)

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")

EVAL_TAG = "upsr.eval."
TAG_MODEL_NAME = EVAL_TAG + "model_name"
TAG_MODEL_VERSION = EVAL_TAG + "model_version"
TAG_MODEL_URI = EVAL_TAG + "model_uri"
TAG_SET_HASH = EVAL_TAG + "set_hash"
TAG_SETTINGS_HASH = EVAL_TAG + "settings_hash"
TAG_COMPLETE = EVAL_TAG + "complete"
TABLE_ARTIFACT = "evaluation/metrics.parquet"
SUMMARY_ARTIFACT = "evaluation/summary.json"

PROMOTE_TAG = "upsr.promote."
# MLflow refuses longer model-version tag values; a reason quoting a long error is cut.
_MAX_TAG_VALUE = 5000
TAG_PREVIOUS_CHAMPION = PROMOTE_TAG + "previous_champion"


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: what the user named, and what every actor loads.

    A registered model is pinned to its version (``models:/NAME/VERSION``) on the driver, so
    that an alias moving during an evaluation cannot give actors different models.
    """

    uri: str
    load_uri: str
    name: str | None = None
    version: str | None = None
    # MLflow 3's logged-model id of a registered version: evaluation metrics link to it.
    model_id: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.version else self.load_uri

    @property
    def slug(self) -> str:
        text = f"{self.name}-v{self.version}" if self.version else Path(self.load_uri).name
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "model"


def client(settings: MlflowConfig) -> MlflowClient:
    tracking.connect(settings)
    return MlflowClient()


def resolve_model(uri: str, settings: MlflowConfig) -> ModelRef:
    """A checkpoint folder, or a registered ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``."""
    if not uri.startswith("models:/"):
        from upsr.checkpoint import CheckpointError, inspect_checkpoint

        folder = Path(uri).expanduser().resolve()
        try:  # before Ray starts or a run is opened: a wrong path fails at once
            inspect_checkpoint(folder)
        except CheckpointError as error:
            raise UserError(f"--model {uri}: {error}") from None
        return ModelRef(uri=uri, load_uri=str(folder))
    return version_ref(resolve_version(client(settings), uri), uri)


def resolve_version(mlflow_client: MlflowClient, uri: str) -> ModelVersion:
    match = MODEL_URI.match(uri)
    if not match:
        raise UserError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match.group("name", "alias", "version")
    try:
        if alias:
            return mlflow_client.get_model_version_by_alias(name, alias)
        return mlflow_client.get_model_version(name, version)
    except MlflowException as error:
        raise UserError(f"{uri}: not in the registry at {redact_uri(mlflow.get_tracking_uri())}: "
                        f"{error.message}") from None


def version_ref(version: ModelVersion, uri: str | None = None) -> ModelRef:
    pinned = f"models:/{version.name}/{version.version}"
    return ModelRef(uri=uri or pinned, load_uri=pinned, name=version.name, version=str(version.version),
                    model_id=logged_model_id(version))


def logged_model_id(version: ModelVersion) -> str | None:
    """The MLflow 3 logged model behind a version. Some stores (SQLite) leave ``model_id`` empty
    on the version; its source is then ``models:/<model id>``."""
    if version.model_id:
        return version.model_id
    match = re.match(r"^models:/(m-[0-9a-f]+)$", version.source or "")
    return match.group(1) if match else None


def alias_version(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version an alias points at; None when the alias (or the registered model) does not exist."""
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        # MLflow reports a missing model as RESOURCE_DOES_NOT_EXIST, a missing alias as INVALID_PARAMETER_VALUE.
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_version_tags(mlflow_client: MlflowClient, name: str, version: str, tags: dict[str, object]) -> None:
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, str(value)[:_MAX_TAG_VALUE])


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
    tracking.connect(settings)
    with tempfile.TemporaryDirectory(prefix="upsr-eval-") as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TABLE_ARTIFACT, dst_path=folder)
        return pq.read_table(path)
