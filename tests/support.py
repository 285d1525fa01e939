"""Shared test helpers: a local Ray instance, a local S3 endpoint, small image files."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

VENV_BIN = Path(sys.executable).parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray workers inherit the environment when Ray starts, so test credentials for the local S3
# endpoint are set before any test starts Ray. moto accepts any key.
TEST_SECRET = "testing-secret-key"
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=TEST_SECRET, AWS_REGION="us-east-1")


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance with 2 CPUs for the whole session; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def make_bucket(endpoint: str, name: str):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return client


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour image (so JPEG and PNG behave as on photographs)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write_photos(folder: Path, count: int = 5) -> Path:
    """``count`` different 240x200 photographs, ``photo0.png`` ... in ``folder``: a training set."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"photo{index}.png").write_bytes(encode(photo(200, 240, index), "PNG"))
    return folder
