"""Connecting to Ray: a configured cluster, RAY_ADDRESS, or a fresh local instance."""

from __future__ import annotations

import logging
import os

import ray
import ray.data

from pipelines.config import RayConfig
from pipelines.errors import interrupt_on_sigterm

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
    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=settings.num_cpus, include_dashboard=False)
    interrupt_on_sigterm()  # ray.init's own handler would exit without unwinding
