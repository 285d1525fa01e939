"""Nothing lost, nothing leaked: destructive flags, dataset manifests, config values, credentials.

Each test here failed before its fix (issue #14); none needs Ray or a server.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import config as config_module
from pipelines import storage
from cli.main import main
from pipelines.errors import UserError
from pipelines.dataset import MANIFEST, MARKER, IncompleteDataset, open_dataset
from pipelines.synth import prepare_output, synthesize
from tests.conftest import REPO
from upsr.config_loader import ConfigError

TINY = REPO / "configs" / "tiny.yaml"


def local(path) -> storage.Location:
    return storage.resolve(str(path))


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "photo.png").write_bytes(b"an input the user cares about")
    return folder


@pytest.mark.parametrize("output", ["photos", "photos/out", "."])
def test_synth_output_must_not_overlap_the_input(tmp_path, photos, output):
    for overwrite in (False, True):
        with pytest.raises(UserError, match="overlap"):
            synthesize(str(photos), str(tmp_path / output), config_module.load(TINY), overwrite=overwrite)
    assert (photos / "photo.png").read_bytes() == b"an input the user cares about"


def test_synth_overlap_is_checked_on_s3_too():
    source, output = storage.resolve("s3://bucket/photos"), storage.resolve("s3://bucket")
    assert storage.overlaps(source, output) and storage.overlaps(output, source)
    assert not storage.overlaps(storage.resolve("s3://bucket/photos"), storage.resolve("s3://bucket/photos2"))
    with pytest.raises(UserError, match="overlap"):
        prepare_output(source, output, overwrite=True)


def test_overwrite_refuses_a_folder_holding_other_files(tmp_path, photos):
    output = tmp_path / "runs"
    output.mkdir()
    (output / "mlflow.db").write_bytes(b"someone's tracking store")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds files that upsr synth did not write .*mlflow.db"):
            prepare_output(local(photos), local(output), overwrite)
    assert (output / "mlflow.db").read_bytes() == b"someone's tracking store"
    # A dataset of ours with a foreign file beside it is refused as a whole, too.
    (output / MANIFEST).write_text("{}")
    with pytest.raises(UserError, match="mlflow.db"):
        prepare_output(local(photos), local(output), overwrite=True)
    assert (output / MANIFEST).exists()


def test_overwrite_deletes_only_a_dataset_of_ours(tmp_path, photos):
    output = tmp_path / "data"
    output.mkdir()
    ours = [MARKER, "_config.yaml", "part-00000-000.parquet", "_quarantine.parquet", MANIFEST,
            f"{MANIFEST}.tmp-{'0' * 32}"]
    for name in ours:
        (output / name).write_bytes(b"x")
    with pytest.raises(UserError, match="holds a dataset written by upsr synth; pass --overwrite"):
        prepare_output(local(photos), local(output), overwrite=False)
    prepare_output(local(photos), local(output), overwrite=True)
    assert not list(output.iterdir())
    # An interrupted run (marker, no manifest) is ours as well.
    (output / MARKER).write_text("{}")
    (output / "part-00003-001.parquet").write_bytes(b"half")
    with pytest.raises(UserError, match="an unfinished dataset written by upsr synth"):
        prepare_output(local(photos), local(output), overwrite=False)
    prepare_output(local(photos), local(output), overwrite=True)
    assert not list(output.iterdir())
    prepare_output(local(photos), local(output), overwrite=False)  # empty: fine


def test_synth_output_that_is_a_file_is_named(tmp_path, photos):
    target = tmp_path / "file.parquet"
    target.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare_output(local(photos), local(target), overwrite=True)
    assert target.read_bytes() == b"x"


def write_dataset(folder, manifest) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["a", "b"]}), folder / "part-00000-000.parquet")
    (folder / MANIFEST).write_text(json.dumps(manifest))


GOOD_MANIFEST = {"schema_version": 1, "counts": {"rows": 2}, "config": {},
                 "shards": [{"file": "part-00000-000.parquet", "rows": 2}]}


@pytest.mark.parametrize("manifest, message", [
    ([1, 2], "expected a JSON object, got list"),
    ({k: v for k, v in GOOD_MANIFEST.items() if k != "shards"}, "key 'shards' is missing"),
    ({**GOOD_MANIFEST, "shards": [{"file": "/etc/passwd", "rows": 2}]}, "not a shard file name inside the dataset"),
    ({**GOOD_MANIFEST, "shards": [{"file": "../other/part-00000-000.parquet", "rows": 2}]}, "inside the dataset"),
    ({**GOOD_MANIFEST, "shards": [{"file": "part-00000-001.parquet", "rows": 2}]}, "part-00000-001.parquet, which is missing"),
    ({**GOOD_MANIFEST, "shards": [{"file": "part-00000-000.parquet", "rows": 5}]}, "holds 2 rows"),
    ({**GOOD_MANIFEST, "shards": ["part-00000-000.parquet"]}, "is not {\"file\": name"),
])
def test_manifests_are_checked_and_cannot_point_outside(tmp_path, manifest, message):
    write_dataset(tmp_path / "set", manifest)
    with pytest.raises(IncompleteDataset, match=message.replace("(", r"\(").replace("{", r"\{")):
        open_dataset(str(tmp_path / "set"))


def test_a_corrupt_shard_is_named(tmp_path):
    write_dataset(tmp_path / "set", GOOD_MANIFEST)
    (tmp_path / "set" / "part-00000-000.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(IncompleteDataset, match="part-00000-000.parquet is not a readable Parquet file"):
        open_dataset(str(tmp_path / "set"))
    write_dataset(tmp_path / "ok", GOOD_MANIFEST)
    assert open_dataset(str(tmp_path / "ok")).shard_paths[0].endswith("part-00000-000.parquet")


@pytest.mark.parametrize("override, key", [
    ("promote.margin=.nan", "promote.margin"),
    ("train.lr=.inf", "train.lr"),
    ("train.grad_clip=.nan", "train.grad_clip"),
    ("weight.tau=-.inf", "weight.tau"),
    ("synth.max_actors=-1", "max_actors"),
    ("synth.actor_cpus=-1", "actor_cpus"),
    ("inference.seed=18446744073709551616", "seed"),
])
def test_nan_inf_and_negative_settings_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        config_module.load(TINY, [override])


def test_numbers_written_without_a_dot_are_numbers():
    assert config_module.load(TINY, ["train.lr=1e-5"]).train.lr == 1e-5


def test_a_binary_config_file_is_a_clean_error(tmp_path, caplog):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with caplog.at_level(logging.ERROR):
        assert main(["synth", "--output", str(tmp_path / "out"), "--config", str(binary)]) == 2
    assert "weights.bin is not valid YAML" in caplog.text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("uri, expected", [
    ("https://user:secret@mlflow.example/path", "https://mlflow.example/path"),
    ("http://token@127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("postgresql://mlflow:secret@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("https://host/api?token=secret&x=1", "https://host/api?token=***&x=***"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("sqlite:////abs/runs/mlflow.db", "sqlite:////abs/runs/mlflow.db"),
    ("/local/path", "/local/path"),
    ("models:/upsr@champion", "models:/upsr@champion"),
])
def test_uris_lose_their_credentials(uri, expected):
    assert storage.redact_uri(uri) == expected


def test_configs_and_params_never_hold_credentials_the_config_carries():
    from pipelines.tracking import loggable_params

    config = config_module.load(TINY, ["storage.s3_endpoint=https://AKIA:endpoint-secret@minio.example:9000",
                                       "mlflow.tracking_uri=https://user:tracking-secret@mlflow.example"])
    assert "endpoint-secret" in config.storage.s3_endpoint  # kept for the code that connects
    written = config_module.to_yaml(config) + json.dumps(loggable_params(config))
    assert "endpoint-secret" not in written and "tracking-secret" not in written
    assert "minio.example:9000" in written and "mlflow.example" in written


def test_evaluate_checks_a_local_model_before_ray_and_mlflow(tmp_path, caplog, monkeypatch):
    import pipelines.evaluate

    def no_ray(settings):
        raise AssertionError("Ray was started before --model was checked")

    monkeypatch.setattr(pipelines.evaluate, "init_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with caplog.at_level(logging.ERROR):
        assert main(["evaluate", "--model", str(tmp_path / "nothing"), "--data", str(tmp_path)]) == 2
    assert "--model" in caplog.text and "is not a checkpoint folder" in caplog.text
    assert not (tmp_path / "runs").exists()  # no MLflow store was opened either


def test_ctrl_c_that_library_clean_up_turns_into_another_error_is_still_an_interrupt(caplog, monkeypatch):
    """Ray Data's listing threads, interrupted, fail in their own clean-up with a RuntimeError whose
    context is the KeyboardInterrupt (seen in CI on ``upsr promote``); the job must still exit 130."""
    import argparse
    import threading

    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # the job quiets it for its exit

    from pipelines.entry import execute

    def interrupted_in_clean_up(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot join thread before it is started")

    def broken(args):
        raise RuntimeError("a real bug")

    assert execute(interrupted_in_clean_up, argparse.Namespace()) == 130
    assert "interrupted" in caplog.text
    with pytest.raises(RuntimeError, match="a real bug"):
        execute(broken, argparse.Namespace())


def test_no_mlflow_run_is_left_running_whatever_stops_the_job():
    """A Ctrl-C that lands while the run is being created is held until its id is known; whatever
    stops the job after that ends the run, KILLED for an interrupt, FAILED for an error, and says why."""
    import os
    import signal

    from pipelines.tracking import END_REASON_TAG, run_ended_unless_done

    class Client:
        def __init__(self):
            self.ended, self.tags = [], {}

        def set_terminated(self, run_id, status):
            self.ended.append((run_id, status))

        def set_tag(self, run_id, key, value):
            self.tags[run_id, key] = value

    client = Client()
    handler_before = signal.getsignal(signal.SIGINT)  # whatever the test session has installed

    def create_interrupted() -> str:
        os.kill(os.getpid(), signal.SIGINT)  # delivered mid-creation
        return "run-1"

    with pytest.raises(KeyboardInterrupt):
        with run_ended_unless_done(create_interrupted, client):
            pytest.fail("the block must not start after an interrupt")
    with pytest.raises(RuntimeError):
        with run_ended_unless_done(lambda: "run-2", client):
            raise RuntimeError("broken\nthe disk is full")
    with run_ended_unless_done(lambda: "run-3", client) as run_id:
        assert run_id == "run-3"
    assert client.ended == [("run-1", "KILLED"), ("run-2", "FAILED")], client.ended
    assert client.tags["run-1", END_REASON_TAG].startswith("interrupted"), client.tags
    assert client.tags["run-2", END_REASON_TAG] == "RuntimeError: the disk is full", client.tags
    # The handlers held during creation are put back as they were.
    assert signal.getsignal(signal.SIGINT) is handler_before, (signal.getsignal(signal.SIGINT), handler_before)
