"""Shared test helpers: credentials for the local S3 endpoint, free ports, small image files,
``upsr`` jobs started and interrupted as a user would.

The fixtures (a local Ray instance, a local S3 endpoint) are in conftest.py."""

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
from PIL import Image

VENV_BIN = Path(sys.executable).parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray workers inherit the environment when Ray starts, so test credentials for the local S3
# endpoint are set before any test starts Ray. moto accepts any key.
TEST_SECRET = "testing-secret-key"
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=TEST_SECRET, AWS_REGION="us-east-1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


REPO = Path(__file__).resolve().parent.parent
INTERRUPTED = "interrupted: nothing unfinished was marked finished"


def start_job(*args: str) -> subprocess.Popen:
    """``upsr ARGS`` in its own process (its own private Ray instance), from the repository root."""
    # SIGINT back to its default in the child: a shell starting the tests in the background
    # ignores it, and the child would inherit that.
    return subprocess.Popen([str(VENV_BIN / "upsr"), *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll ``condition`` until it holds; fail if the job ends first or ``timeout`` passes."""
    import pytest

    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended ({process.returncode}) before {what}:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.1)


def interrupt(process: subprocess.Popen) -> str:
    """SIGINT to the driver, as Ctrl-C sends it; checks the exit (130, the message, no traceback)
    and returns its stderr."""
    import pytest

    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the job did not exit within 120 s of SIGINT")
    assert process.returncode == 130, stderr[-3000:]
    assert INTERRUPTED in stderr, stderr[-3000:]
    assert "Traceback" not in stderr.split("interrupted:")[-1], stderr[-3000:]
    return stderr


def write_random_iqa_weights(folder: Path, names: tuple[str, ...], hf_cache: Path | None = None) -> Path:
    """pyiqa's networks for the no-reference metrics ``names``, RANDOMLY initialised (seeded), saved
    in ``folder`` under the file names ``upsr.no_reference_metrics`` looks for, as pyiqa stores the
    real ones: their scores show the wiring only, they are not the paper's. NIQE's pristine model is
    a random symmetric positive-definite Gaussian. MANIQA also needs timm's ViT-B/8 in the Hugging
    Face cache ``hf_cache`` (which must be the cache huggingface_hub uses while MANIQA is built)."""
    import pyiqa
    import scipy.io
    import torch

    from upsr.no_reference_metrics import weight_files

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in names:
        files = weight_files(name, folder)
        if name == "clipiqa":
            from pyiqa.archs.clip_model import CLIP

            # OpenAI's RN50 (pyiqa's CLIP loader reads the architecture from the shapes) as OpenAI
            # ships it, a TorchScript archive: from a file, that loader reads nothing else.
            clip = CLIP(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                        vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                        transformer_heads=8, transformer_layers=12).eval()
            tokens = torch.zeros(1, 77, dtype=torch.long)
            torch.jit.save(torch.jit.trace_module(clip, {"encode_text": tokens}), files["backbone"])
        elif name == "niqe":
            rng = np.random.default_rng(0)
            factor = rng.normal(size=(36, 36))
            scipy.io.savemat(files["pristine_model"], {"mu_prisparam": rng.normal(size=(1, 36)),
                                                       "cov_prisparam": factor @ factor.T / 36 + np.eye(36)})
        else:
            if name == "maniqa":
                write_random_timm_weights("vit_base_patch8_224", hf_cache)
            net = pyiqa.create_metric(name, device="cpu", pretrained=False).net
            torch.save(net.state_dict(), files["weights"])
    return folder


def write_random_timm_weights(model_name: str, hf_cache: Path) -> Path:
    """timm's ``model_name``, randomly initialised, where timm's hub loader finds its pretrained
    weights offline: ``<hf_cache>/models--<repo>/snapshots/<revision>/model.safetensors``."""
    import safetensors.torch
    import timm

    repo = timm.models.get_pretrained_cfg(model_name).hf_hub_id
    folder = hf_cache / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    path = folder / "snapshots" / revision / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(timm.create_model(model_name, pretrained=False).state_dict(), path)
    return path
