"""Connecting to Ray: a configured cluster, RAY_ADDRESS, or a fresh local instance."""

from __future__ import annotations

import logging
import math
import os
from typing import Any
from urllib.parse import urlparse

import ray
import ray.data

from pipelines.config import ActorPoolConfig, RayConfig
from pipelines.errors import UserError, interrupt_on_sigterm

log = logging.getLogger(__name__)


def init_ray(settings: RayConfig) -> None:
    """Connect once per process. Without an address, start a private local instance.

    ``address="local"`` is explicit on purpose: a bare ``ray.init()`` would attach to any Ray
    cluster already running on this machine, someone else's included.
    """
    # Datasets copy this context when they are created and carry it to the Ray Train workers
    # and split coordinators that run them.
    ray.data.DataContext.get_current().enable_progress_bars = settings.data_progress_bars
    if ray.is_initialized():
        return
    address = cluster_address(settings)
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=settings.num_cpus, include_dashboard=False)
    interrupt_on_sigterm()  # ray.init's own handler would exit without unwinding


def actor_pool_gpus(settings: ActorPoolConfig, section: str) -> float:
    """GPUs per actor of the pool of config ``section``: its ``actor_gpus``, or when unset one
    GPU per actor if the cluster has GPUs now.

    Refuses a pool that not even one actor fits in; warns when fewer than asked fit now.
    """
    resources = ray.cluster_resources()
    gpus = settings.actor_gpus if settings.actor_gpus is not None else float(resources.get("GPU", 0) >= 1)
    fits = int(resources.get("CPU", 0) // settings.actor_cpus) if settings.actor_cpus else settings.num_actors
    if gpus:
        fits = min(fits, int(resources.get("GPU", 0) // gpus))
    if fits < 1:
        raise UserError(f"the Ray cluster has no room for one {section} actor ({section}.actor_cpus "
                        f"{settings.actor_cpus}, {section}.actor_gpus {gpus}): {resources}")
    if fits < settings.num_actors:
        log.warning("the Ray cluster holds %d of the %d %s actors asked for now; Ray Data waits for the rest (an "
                    "autoscaling cluster adds nodes; a fixed one needs a lower %s.num_actors)",
                    fits, settings.num_actors, section, section)
    return gpus


def model_actor_arguments(settings: ActorPoolConfig) -> dict[str, Any]:
    """The constructor arguments every model actor of the pool takes (``start_model_actor``)."""
    import mlflow

    # The tracking URI travels by reference: its credentials stay out of actor specs and logs.
    return {"tracking_uri": ray.put(mlflow.get_tracking_uri()), "threads": max(1, math.ceil(settings.actor_cpus))}


def start_model_actor(tracking_uri: ray.ObjectRef, threads: int):
    """In a model actor: torch's threads for its CPUs, the driver's MLflow store (a relative default
    would resolve against this worker's folder) so that ``models:/`` URIs load, and its device."""
    import mlflow
    import torch

    import pipelines.registry  # noqa: F401  (registers the models:/ resolver)

    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(ray.get(tracking_uri))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cluster_address(settings: RayConfig) -> str | None:
    """The existing cluster a job connects to, or None for a private local instance."""
    return settings.address or os.environ.get("RAY_ADDRESS") or None


def is_local_location(uri: str) -> bool:
    """A path, file:// or sqlite:// URI: on one machine's disk (s3://, http(s)://, postgresql://... are not)."""
    return urlparse(uri).scheme in ("", "file", "sqlite") or (len(uri) > 1 and uri[1] == ":")  # C:\\


def require_shared(settings: RayConfig, locations: dict[str, str]) -> None:
    """Refuse, on an existing cluster, the ``locations`` (config key -> URI) that live on local disk.

    Without it the job would succeed and lose its output: checkpoints written on whichever node a
    worker ran, an MLflow database inside a submitted job's temporary working folder.
    """
    address = cluster_address(settings)
    if settings.allow_local or not address:
        return
    local = {key: uri for key, uri in locations.items() if is_local_location(uri)}
    if not local:
        return
    listed = "; ".join(f"{key} = {uri}" for key, uri in local.items())
    raise UserError(
        f"connected to the Ray cluster at {address}, but {listed} "
        f"{'is a location' if len(local) == 1 else 'are locations'} on one machine's disk: other nodes cannot "
        "see it and a submitted job's working folder is deleted when the job ends. Set "
        + " and ".join(SHARED_HINTS.get(key, f"{key} to shared storage") for key in local)
        + ", or pass --allow-local (ray.allow_local=true) if every node mounts that path")


SHARED_HINTS = {
    "mlflow.tracking_uri": "MLFLOW_TRACKING_URI (or mlflow.tracking_uri) to the MLflow server's URL",
    "train.storage_path": "train.storage_path to an s3:// prefix",
    "aux_train.storage_path": "aux_train.storage_path to an s3:// prefix",
    "tune.storage_path": "tune.storage_path (or train.storage_path) to an s3:// prefix",
    "--output": "--output to an s3:// prefix",
}
