"""``upsr upscale`` end to end on a small photograph with a tiny, randomly initialised checkpoint."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
from PIL import Image

from pipelines.cli import main
from tests.conftest import REPO


def write_photo(path, width: int, height: int) -> None:
    from skimage import data

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC).save(path)


def test_upscale_files_and_folders(tmp_path, tiny_checkpoint):
    inputs = tmp_path / "in"
    write_photo(inputs / "astronaut.png", 40, 28)
    write_photo(inputs / "nested" / "small.jpg", 24, 24)
    single = tmp_path / "single.png"
    write_photo(single, 72, 40)  # larger than the tiny config's 64-pixel tile: tiled
    out = tmp_path / "out"
    code = main(["upscale", str(inputs), str(single), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--seed", "3", "--batch", "2"])
    assert code == 0
    expected = {out / "astronaut.png": (160, 112), out / "nested" / "small.png": (96, 96), out / "single.png": (288, 160)}
    for path, size in expected.items():
        with Image.open(path) as image:
            assert image.size == size and image.mode == "RGB"
    assert np.asarray(Image.open(out / "single.png")).std() > 0


def test_bad_inputs_are_named_without_a_traceback(tmp_path, tiny_checkpoint, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with caplog.at_level(logging.ERROR):
        assert main(["upscale", str(broken), "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint)]) == 2
    assert "broken.png: cannot be read as an image" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["upscale", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o"),
                     "--model", str(tiny_checkpoint)]) == 2
    assert "missing.png: no such file or folder" in caplog.text

    write_photo(tmp_path / "ok.png", 16, 16)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["upscale", str(tmp_path / "ok.png"), "--out", str(tmp_path / "o"),
                     "--model", str(tmp_path)]) == 2
    assert "format.json is missing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["upscale", str(tmp_path / "ok.png"), "--out", str(tmp_path / "o"),
                     "--model", str(tiny_checkpoint), "--tile", "40", "--stride", "32"]) == 2
    assert "inference.tile (40) must be a multiple of 16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["upscale", str(tmp_path / "ok.png"), "--out", str(tmp_path / "o"),
                     "--model", str(tiny_checkpoint), "--tile", "32"]) == 2
    assert "stride 48): stride must be in [1, tile=32]" in caplog.text


def test_runs_as_a_module(tmp_path, tiny_checkpoint):
    write_photo(tmp_path / "photo.png", 20, 16)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.upscale", str(tmp_path / "photo.png"), "--out", str(tmp_path / "out"),
         "--model", str(tiny_checkpoint), "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out" / "photo.png").size == (80, 64)
