"""The MLflow model registry: registering a checkpoint as a model version, model URIs, versions,
their tags and aliases.

A model is logged as an MLflow *pyfunc* model whose only artifact is the UPSR checkpoint folder
(``upsr.checkpoint.save_checkpoint``: safetensors + JSON), not with MLflow's PyTorch flavour:
that one pickles the module (or tries ``torch.export``), which ties the model to the code
version that saved it and unpickles on load. The pyfunc wrapper is logged as code
(``pipelines/pyfunc_model.py``, MLflow's "models from code"), so nothing is pickled either.

Promotion decisions are written as ``upsr.promote.*`` tags on the model versions; the
registry's aliases (never the deprecated stages) say which version is the champion.
Importing this module registers a resolver so that ``upsr.load("models:/upsr@challenger")``
downloads the registered checkpoint folder.
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

import basicsr_compat
import upsr as upsr_package
from pipelines.config import MlflowConfig
from pipelines.errors import UserError
from pipelines.pyfunc_model import CHECKPOINT_ARTIFACT
from pipelines.storage import redact_uri
from pipelines.tracking import client, connect, tracking_uri
from upsr.checkpoint import register_uri_resolver

log = logging.getLogger(__name__)

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


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


MODEL_NAME_IN_RUN = "model"


PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


# What the pyfunc model imports: the upsr package and the basicsr shim it needs, shipped as code;
# the libraries they import, pinned to this environment's versions.
MODEL_CODE = (Path(upsr_package.__file__).parent, Path(basicsr_compat.__file__))
MODEL_REQUIREMENTS = ("torch", "torchvision", "basicsr", "numpy", "scipy", "pydantic", "pyyaml", "safetensors")
# One uint8 RGB image of any size in, the x4 upscale out (HxWx3 -> 4Hx4Wx3).
IMAGE_SIGNATURE = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
                                 outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]))
INPUT_EXAMPLE = np.full((16, 16, 3), 128, dtype=np.uint8)


def log_and_register_model(settings: MlflowConfig, run_id: str, checkpoint_folder: Path) -> int:
    """Log the checkpoint folder as the run's pyfunc model, register it and point the alias at
    the new version; returns the version number."""
    connect(settings)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN, python_model=str(PYFUNC_CODE),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_folder)},
            # The model's own code travels with it (MLflow puts code/ on sys.path when it loads the
            # model), so that the registry alone serves it; no package index has this project.
            code_paths=[str(path) for path in MODEL_CODE],
            # Listed rather than inferred: inference would load the model in a subprocess.
            pip_requirements=[f"{name}=={metadata.version(name)}" for name in MODEL_REQUIREMENTS],
            signature=IMAGE_SIGNATURE, input_example=INPUT_EXAMPLE,
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


def use_project_store(settings: MlflowConfig) -> None:
    """Make ``upsr.load("models:/...")`` in this process read the project's MLflow store (the
    configured one, MLFLOW_TRACKING_URI, or runs/mlflow.db), as every job does."""
    mlflow.set_tracking_uri(tracking_uri(settings))
