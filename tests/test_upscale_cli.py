"""``upsr upscale`` end to end on a small photograph with a tiny, randomly initialised checkpoint."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from tests.conftest import REPO
from tests.support import encode, make_bucket, photo


def write_photo(path, width: int, height: int) -> None:
    from skimage import data

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC).save(path)


def test_upscale_files_and_folders(tmp_path, tiny_checkpoint, ray_local, caplog):
    """A folder runs as a Ray Data job over the actor pool; its outputs keep their relative paths."""
    inputs = tmp_path / "in"
    write_photo(inputs / "astronaut.png", 40, 28)
    write_photo(inputs / "nested" / "small.jpg", 24, 24)
    single = tmp_path / "single.png"
    write_photo(single, 72, 40)  # larger than the tiny config's 64-pixel tile: tiled
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(["upscale", str(inputs), str(single), "--out", str(out), "--model", str(tiny_checkpoint),
                     "--seed", "3", "--batch", "2", "--set", "upscale.num_actors=2"])
    assert code == 0
    assert "on 2 actor(s)" in caplog.text and "3 written, 0 skipped (output exists), 0 failed" in caplog.text
    expected = {out / "astronaut.png": (160, 112), out / "nested" / "small.png": (96, 96), out / "single.png": (288, 160)}
    for path, size in expected.items():
        with Image.open(path) as image:
            assert image.size == size and image.mode == "RGB"
    assert np.asarray(Image.open(out / "single.png")).std() > 0
    assert sorted(p.name for p in out.rglob("*")) == ["astronaut.png", "nested", "single.png", "small.png"]

    # The same image upscaled in this process (a single file) is the same image: same seed, same model.
    again = tmp_path / "again"
    assert main(["upscale", str(single), "--out", str(again), "--model", str(tiny_checkpoint), "--seed", "3",
                 "--batch", "2"]) == 0
    assert (again / "single.png").read_bytes() == (out / "single.png").read_bytes()


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims another size (a decompression bomb as far as a reader can tell)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_bad_files_are_reported_and_every_good_one_is_written(tmp_path, tiny_checkpoint, ray_local, caplog):
    inputs = tmp_path / "in"
    write_photo(inputs / "a.png", 24, 16)
    (inputs / "b_broken.png").write_bytes(b"not an image")
    (inputs / "c_huge.png").write_bytes(png_claiming_size(100_000, 100_000))  # 1.6e11 output pixels
    write_photo(inputs / "d.png", 16, 16)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(["upscale", str(inputs), "--out", str(out), "--model", str(tiny_checkpoint)]) == 1
    assert "2 written, 0 skipped (output exists), 2 failed" in caplog.text
    assert (out / "a.png").exists() and (out / "d.png").exists()
    failed = {Path(item["input"]).name: item["reason"] for item in json.loads((out / "failed.json").read_text())["failed"]}
    assert failed.keys() == {"b_broken.png", "c_huge.png"}
    assert "cannot be read as an image" in failed["b_broken.png"]
    assert "too large: its x4 output would exceed the pixel limit" in failed["c_huge.png"]
    assert not [path for path in out.iterdir() if ".tmp-" in path.name]
    # A configured limit below an image's output refuses it before any work.
    assert main(["upscale", str(inputs / "a.png"), "--out", str(tmp_path / "o2"), "--model", str(tiny_checkpoint),
                 "--max-output-pixels", "1000"]) == 1
    reason = json.loads((tmp_path / "o2" / "failed.json").read_text())["failed"][0]["reason"]
    assert reason.startswith("too large") and "exceeds max_pixels 62" in reason  # 1000 // 16 LR pixels


def test_inputs_are_never_written_over_and_existing_outputs_are_skipped_unless_overwrite(tmp_path, tiny_checkpoint,
                                                                                          caplog):
    folder = tmp_path / "inplace"
    write_photo(folder / "photo.png", 20, 16)
    original = (folder / "photo.png").read_bytes()
    for inputs, out in ((folder, folder), (folder, folder / "sr"), (folder / "photo.png", folder)):
        for flags in ([], ["--overwrite"]):
            assert main(["upscale", str(inputs), "--out", str(out), "--model", str(tiny_checkpoint), *flags]) == 2
            assert (folder / "photo.png").read_bytes() == original and not (folder / "sr").exists()

    out = tmp_path / "out"
    arguments = ["upscale", str(folder / "photo.png"), "--out", str(out), "--model", str(tiny_checkpoint)]
    assert main(arguments) == 0
    first = (out / "photo.png").read_bytes()
    (out / "photo.png").write_bytes(b"an earlier output")
    with caplog.at_level(logging.INFO):
        assert main(arguments) == 0
    assert "0 written, 1 skipped (output exists), 0 failed" in caplog.text
    assert (out / "photo.png").read_bytes() == b"an earlier output"
    assert main(arguments + ["--overwrite"]) == 0 and (out / "photo.png").read_bytes() == first


def test_usage_errors_are_named_before_any_work(tmp_path, tiny_checkpoint, caplog, monkeypatch):
    write_photo(tmp_path / "ok.png", 16, 16)
    ok = str(tmp_path / "ok.png")
    cases = [
        (["--out", str(tmp_path / "o"), "--model", str(tmp_path)], "format.json is missing"),
        (["--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint), "--tile", "40", "--stride", "32"],
         "inference.tile (40) must be a multiple of 16"),
        (["--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint), "--tile", "32"],
         "stride 48): stride must be in [1, tile=32]"),
        (["--out", ok, "--model", str(tiny_checkpoint)], "is a file, not a folder"),
        ([str(tmp_path / "sub" / "ok.jpg"), "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint)],
         "would both be written to"),
    ]
    write_photo(tmp_path / "sub" / "ok.jpg", 16, 16)
    for arguments, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["upscale", ok, *arguments]) == 2, arguments
        assert message in caplog.text, (arguments, caplog.text)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["upscale", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o"),
                     "--model", str(tiny_checkpoint)]) == 2
    assert "missing.png: no such file, folder or prefix" in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        main(["upscale", ok, "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint), "--seed", str(2**64)])
    assert exit_info.value.code == 2

    # A registered model is looked up in the project's MLflow store (runs/mlflow.db), not ./mlflow.db.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["upscale", ok, "--out", str(tmp_path / "o"), "--model", "models:/upsr@challenger"]) == 2
    assert "models:/upsr@challenger" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "mlflow.db").exists() and (tmp_path / "runs" / "mlflow.db").exists()
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders: nothing to refuse")
def test_a_read_only_output_folder_is_refused(tmp_path, tiny_checkpoint):
    write_photo(tmp_path / "ok.png", 16, 16)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    assert main(["upscale", str(tmp_path / "ok.png"), "--out", str(locked / "o"), "--model",
                 str(tiny_checkpoint)]) == 2


@pytest.mark.slow
def test_runs_as_a_module(tmp_path, tiny_checkpoint):
    write_photo(tmp_path / "photo.png", 20, 16)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.upscale", str(tmp_path / "photo.png"), "--out", str(tmp_path / "out"),
         "--model", str(tiny_checkpoint), "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out" / "photo.png").size == (80, 64)


@pytest.mark.slow
def test_an_s3_prefix_is_upscaled_to_s3_and_a_rerun_does_only_what_is_missing(tiny_checkpoint, ray_local, s3_endpoint,
                                                                            caplog):
    bucket = "upscale-prefix"
    client = make_bucket(s3_endpoint, bucket)
    client.put_object(Bucket=bucket, Key="in/a.png", Body=encode(photo(16, 24, 0), "PNG"))
    client.put_object(Bucket=bucket, Key="in/sub/b.jpg", Body=encode(photo(16, 16, 1), "JPEG"))
    client.put_object(Bucket=bucket, Key="in/notes.txt", Body=b"not an image: not an input")
    arguments = ["upscale", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out", "--model", str(tiny_checkpoint),
                 "--set", f"storage.s3_endpoint={s3_endpoint}"]

    def outputs() -> dict[str, tuple[int, int]]:
        import io

        keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
        return {key: Image.open(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())).size
                for key in keys}

    with caplog.at_level(logging.INFO):
        assert main(arguments) == 0
    assert "2 written, 0 skipped (output exists), 0 failed" in caplog.text
    assert outputs() == {"out/a.png": (96, 64), "out/sub/b.png": (64, 64)}

    client.delete_object(Bucket=bucket, Key="out/a.png")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(arguments) == 0
    assert "1 written, 1 skipped (output exists), 0 failed" in caplog.text
    assert outputs() == {"out/a.png": (96, 64), "out/sub/b.png": (64, 64)}

    # Two inputs with one output name: refused before any work, whatever their filesystems.
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["upscale", f"s3://{bucket}/in/a.png", f"s3://{bucket}/in/sub/", *arguments[2:]]) == 0
        assert main(["upscale", f"s3://{bucket}/in/a.png", f"s3://{bucket}/in/", *arguments[2:]]) == 2
    assert f"s3://{bucket}/out/a.png" in caplog.text and "would both be written" in caplog.text
