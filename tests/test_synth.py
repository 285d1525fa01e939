"""`upsr synth` end to end on real Ray (2 CPUs): shards, quarantine, manifest, determinism, S3."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import config as config_module
from pipelines.errors import UserError
from pipelines.dataset import MANIFEST, QUARANTINE, IncompleteDataset, open_dataset
from pipelines.images import decode_png
from pipelines.synth import CONFIG_FILE, synthesize
from pipelines.synth_verify import verify
from tests.support import TEST_SECRET, VENV_BIN, encode, make_bucket, photo

OVERRIDES = ["synth.crops_per_image=2", "synth.max_pixels=1000000", "synth.batch_size=3"]
GOOD = {
    "a.png": encode(photo(300, 400, 1), "PNG"),
    "nested/b.jpg": encode(photo(500, 380, 2), "JPEG", quality=90),
    "nested/deep/c.webp": encode(photo(280, 260, 3), "WEBP", quality=90),
    "d.bmp": encode(photo(260, 300, 4), "BMP"),
    "e.tiff": encode(photo(270, 270, 5), "TIFF"),
    "short_side.png": encode(photo(90, 300, 6), "PNG"),
    "grey.jpeg": encode(photo(300, 300, 7)[..., 0], "JPEG"),
    "sixteen_bit.png": cv2.imencode(".png", photo(260, 260, 8)[..., ::-1].astype(np.uint16) * 257)[1].tobytes(),
}
BAD = {
    "empty.png": (b"", "empty file"),
    "not_an_image.jpg": (b"plain text with an image extension", "not a decodable image"),
    "truncated.png": (encode(photo(400, 400, 9), "PNG")[:3000], "truncated image"),
    "tiny.png": (encode(photo(40, 40, 10), "PNG"), "too small"),
    "bomb.png": (encode(photo(1100, 1000, 11), "PNG"), "too many pixels"),
}


def write_tree(folder, files):
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / "notes.txt").write_text("not an image extension: ignored, not quarantined")
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("photos"), {**GOOD, **{k: v for k, (v, _) in BAD.items()}})


@pytest.fixture(scope="module")
def dataset(source, tmp_path_factory, ray_local):
    output = tmp_path_factory.mktemp("data") / "set"
    manifest = synthesize(str(source), str(output), config_module.load("configs/tiny.yaml", OVERRIDES))
    return output, manifest


def read_rows(folder):
    return pq.read_table(str(folder)).sort_by("id")  # pyarrow skips the _quarantine file ("_" prefix)


@pytest.mark.slow
def test_shards_quarantine_and_manifest(dataset):
    output, manifest = dataset
    counts = manifest["counts"]
    assert counts == {"files_seen": len(GOOD) + len(BAD), "files_processed": len(GOOD),
                      "files_quarantined": len(BAD), "rows": 2 * len(GOOD)}
    assert json.loads((output / MANIFEST).read_text()) == manifest
    assert config_module.load(output / CONFIG_FILE) == config_module.load("configs/tiny.yaml", OVERRIDES)

    quarantine = {row["source"]: row["reason"] for row in pq.read_table(output / QUARANTINE).to_pylist()}
    assert set(quarantine) == set(BAD)
    for name, (_, reason) in BAD.items():
        assert reason in quarantine[name], (name, quarantine[name])

    rows = read_rows(output)
    assert {"id", "source", "crop", "seed", "degradation", "hr_png", "lr_png"} <= set(rows.column_names)
    assert rows.num_rows == counts["rows"] == sum(s["rows"] for s in manifest["shards"])
    assert sorted(rows["id"].to_pylist()) == sorted(f"{name}#{i}" for name in GOOD for i in range(2))
    for row in rows.to_pylist():
        record = json.loads(row["degradation"])
        assert record["seed"] == row["seed"]
        assert decode_png(row["hr_png"]).shape == (256, 256, 3)
        assert decode_png(row["lr_png"]).shape == (64, 64, 3)
        assert row["crop"]["w"] == row["crop"]["h"] == 256


@pytest.mark.slow
def test_every_row_replays_bit_exactly(dataset):
    output, _ = dataset
    report = verify(open_dataset(str(output)), sample=0)
    assert report == {"checked": 2 * len(GOOD), "mismatches": []}


@pytest.mark.slow
def test_synth_verify_detects_a_tampered_row(dataset, tmp_path):
    output, manifest = dataset
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in [MANIFEST, QUARANTINE] + [s["file"] for s in manifest["shards"]]:
        (copy / name).write_bytes((output / name).read_bytes())
    shard = copy / manifest["shards"][0]["file"]
    table = pq.read_table(shard)
    lr = table["lr_png"].to_pylist()
    image = decode_png(lr[0])
    image[10, 10] = 255 - image[10, 10]
    lr[0] = cv2.imencode(".png", image[..., ::-1])[1].tobytes()
    table = table.set_column(table.schema.get_field_index("lr_png"), "lr_png", pa.array(lr, pa.binary()))
    pq.write_table(table, shard)
    result = subprocess.run([str(VENV_BIN / "upsr"), "synth-verify", str(copy), "--sample", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "mismatch in" in result.stderr and "1 mismatches" in result.stderr


@pytest.mark.slow
def test_existing_output_is_refused_unless_overwrite(dataset, source):
    output, manifest = dataset
    config = config_module.load("configs/tiny.yaml", OVERRIDES)
    with pytest.raises(UserError, match="--overwrite"):
        synthesize(str(source), str(output), config)
    again = synthesize(str(source), str(output), config, overwrite=True)
    assert again["counts"] == manifest["counts"]


@pytest.mark.slow
def test_a_rerun_writes_the_same_files_and_other_workers_and_batching_the_same_rows(dataset, source, tmp_path):
    output, first = dataset
    again = synthesize(str(source), str(tmp_path / "again"), config_module.load("configs/tiny.yaml", OVERRIDES))
    assert again["shards"] == first["shards"]
    for shard in first["shards"]:
        assert (tmp_path / "again" / shard["file"]).read_bytes() == (output / shard["file"]).read_bytes()
    other = config_module.load("configs/tiny.yaml", OVERRIDES + ["synth.batch_size=5", "synth.max_actors=1",
                                                                 "synth.rows_per_file=4", "synth.row_group_rows=2"])
    manifest = synthesize(str(source), str(tmp_path / "other"), other)
    assert len(manifest["shards"]) > 1
    assert read_rows(tmp_path / "other").equals(read_rows(output))


@pytest.mark.slow
def test_no_processable_file_is_a_clear_error(tmp_path, ray_local):
    folder = write_tree(tmp_path / "bad", {k: v for k, (v, _) in BAD.items()})
    with pytest.raises(UserError, match="none of the 5 image files"):
        synthesize(str(folder), str(tmp_path / "out"), config_module.load("configs/tiny.yaml", OVERRIDES))
    assert (tmp_path / "out" / QUARANTINE).exists()
    assert not (tmp_path / "out" / MANIFEST).exists()
    with pytest.raises(IncompleteDataset, match="no _manifest.json"):
        open_dataset(str(tmp_path / "out"))


@pytest.mark.slow
def test_console_script_and_module_entry_points(tmp_path):
    source = write_tree(tmp_path / "src", {"a.png": GOOD["a.png"], "b.jpg": GOOD["nested/b.jpg"]})
    output = tmp_path / "out"
    result = subprocess.run([str(VENV_BIN / "upsr"), "synth", "--input", str(source), "--output", str(output),
                             "--config", "configs/tiny.yaml", "--set", "ray.num_cpus=2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    crops = config_module.load("configs/tiny.yaml").synth.crops_per_image
    assert json.loads((output / MANIFEST).read_text())["counts"]["rows"] == 2 * crops
    verify_run = subprocess.run([sys.executable, "-m", "pipelines.synth_verify", str(output)],
                                capture_output=True, text=True)
    assert verify_run.returncode == 0 and "0 mismatches" in verify_run.stderr
    usage = subprocess.run([sys.executable, "-m", "pipelines.synth_verify", "--help"], capture_output=True, text=True)
    assert usage.stdout.startswith("usage: python -m pipelines.synth_verify "), usage.stdout[:200]

    bad_key = subprocess.run([sys.executable, "-m", "pipelines.synth", "--output", str(tmp_path / "x"),
                              "--set", "synth.crops_per_imag=3"], capture_output=True, text=True)
    assert bad_key.returncode == 2 and "unknown key synth.crops_per_imag" in bad_key.stderr
    refused = subprocess.run([str(VENV_BIN / "upsr"), "synth", "--input", str(source), "--output", str(output)],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr


@pytest.mark.slow
def test_s3_source_and_output(tmp_path, s3_endpoint, ray_local):
    client = make_bucket(s3_endpoint, "synth-test")
    for name in ("a.png", "nested/b.jpg"):
        client.put_object(Bucket="synth-test", Key=f"photos/{name}", Body=GOOD[name])
    client.put_object(Bucket="synth-test", Key="photos/empty.png", Body=b"")
    config = config_module.load("configs/tiny.yaml", OVERRIDES + [f"storage.s3_endpoint={s3_endpoint}"])
    manifest = synthesize("s3://synth-test/photos", "s3://synth-test/data", config)
    assert manifest["counts"]["rows"] == 4 and manifest["counts"]["files_quarantined"] == 1
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="synth-test", Prefix="data/")["Contents"]}
    assert {"data/_manifest.json", "data/_quarantine.parquet", "data/_config.yaml"} <= keys
    assert any(k.endswith(".parquet") and "/part-" in k for k in keys)
    config_text = client.get_object(Bucket="synth-test", Key="data/_config.yaml")["Body"].read().decode()
    assert TEST_SECRET not in config_text  # credentials come from the environment, never the config
    report = verify(open_dataset("s3://synth-test/data", s3_endpoint), sample=0)
    assert report == {"checked": 4, "mismatches": []}


def test_ray_data_progress_bars_are_off_unless_configured_and_datasets_carry_the_setting(ray_local):
    import ray.data

    from pipelines.config import RayConfig
    from pipelines.ray_env import init_ray

    init_ray(RayConfig(data_progress_bars=True))
    assert ray.data.range(1).context.enable_progress_bars
    init_ray(RayConfig())
    assert not ray.data.range(1).context.enable_progress_bars


@pytest.mark.parametrize("module", ["pipelines.synth", "pipelines.train_data"])
def test_modules_that_ray_data_tasks_unpickle_do_not_import_torch(module):
    # Ray Data's tasks and actors unpickle the synth datasink and the training data's decode
    # function in fresh worker processes; torch and basicsr there cost ~4 s per process (measured).
    probe = f"import sys, {module}; print(sorted({{'torch', 'basicsr'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_a_listed_file_missing_on_a_node_is_quarantined_unless_its_folder_is_missing(tmp_path):
    from pipelines import storage
    from pipelines.synth import load_crops

    settings = config_module.load("configs/tiny.yaml").synth
    source = write_tree(tmp_path / "src", {"a.png": GOOD["a.png"]})
    listed = pa.table({"path": [str(source / "gone.png")], "source": ["gone.png"]})
    rows = load_crops(listed, storage.resolve(str(source)), settings)
    assert rows["reason"].to_pylist()[0].startswith("unreadable:")  # deleted after listing: that file only
    elsewhere = tmp_path / "only-on-the-driver"
    with pytest.raises(UserError, match="only-on-the-driver does not exist on the Ray node .* shared filesystem"):
        load_crops(pa.table({"path": [str(elsewhere / "a.png")], "source": ["a.png"]}),
                   storage.resolve(str(elsewhere)), settings)
