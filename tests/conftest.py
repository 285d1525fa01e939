"""Shared test setup: offline mode and the tiny model of configs/tiny.yaml.

No network here: pretrained weights (VGG16 for LPIPS, SR nets) cannot be downloaded, so every
network in these tests is randomly initialised.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.support import VENV_BIN, free_port  # noqa: E402  (sets the test credentials before Ray starts)

# The tests' tensors are small: one intra-op thread is as fast, and on a shared small box
# several threads per process stall each other (measured 20x slower with 2 threads on 2 busy cores).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_config():
    from pipelines.config import load

    return load(TINY_CONFIG)


@pytest.fixture
def tiny_parts(tiny_config):
    """(denoiser, frozen aux net, diffusion) of the tiny config, seeded."""
    import torch

    from upsr.aux_net import build_aux_net, freeze
    from upsr.denoiser import build_denoiser
    from upsr.diffusion import UNWDiffusion

    torch.manual_seed(0)
    denoiser = build_denoiser(tiny_config.denoiser)
    aux_net = freeze(build_aux_net(tiny_config.aux))
    return denoiser, aux_net, UNWDiffusion.from_config(tiny_config.diffusion)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_config, tiny_parts):
    """A saved tiny checkpoint of randomly initialised networks."""
    from upsr.checkpoint import CheckpointConfig, save_checkpoint

    denoiser, aux_net, diffusion = tiny_parts
    config = CheckpointConfig(denoiser=tiny_config.denoiser, aux=tiny_config.aux, diffusion=tiny_config.diffusion,
                              weight=tiny_config.weight, inference=tiny_config.inference)
    return save_checkpoint(tmp_path / "tiny-checkpoint", denoiser, aux_net, diffusion, config)


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance with 2 CPUs for the whole session; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 that this fixture starts and stops (by process group)."""
    port = free_port()
    process = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                os.killpg(process.pid, signal.SIGKILL)
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield endpoint
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=10)
