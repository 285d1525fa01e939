"""Credentials given to the jobs reach nothing they write.

The training job (train-aux shares its fit, tracking and checkpoints) runs against an MLflow
tracking server on 127.0.0.1 that this test starts and stops (by process group), with
credentials in ``MLFLOW_TRACKING_URI`` (user:password@), in ``storage.s3_endpoint``
(user:password@ and a query token) and in ``AWS_SECRET_ACCESS_KEY``. Then every file the
jobs wrote is searched: the dataset, the Ray Train checkpoints, the Ray
session's logs, and the MLflow server's database and artifact store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import config as config_module
from tests.support import TEST_SECRET, VENV_BIN, free_port, write_photos

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TRACKING_SECRET = "tracking-userinfo-secret"
ENDPOINT_SECRET = "endpoint-userinfo-secret"
QUERY_SECRET = "endpoint-query-secret"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    with (root / "server.log").open("w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"root": root, "port": port}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def files_under(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("*") if path.is_file()]


def test_credentials_reach_nothing_the_jobs_write(mlflow_server, tmp_path, ray_local, monkeypatch):
    import ray

    from safetensors.torch import save_file

    from pipelines.synth import synthesize
    from pipelines.train import train
    from upsr.aux_net import build_aux_net

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://upsr:{TRACKING_SECRET}@127.0.0.1:{mlflow_server['port']}")
    endpoint = f"https://AKIAEXAMPLE:{ENDPOINT_SECRET}@minio.example:9000/?signature={QUERY_SECRET}"

    def config(*overrides: str):
        return config_module.load(REPO / "configs" / "tiny.yaml", [
            "synth.crop_size=128", "synth.crops_per_image=4", "train_data.materialize=true",
            f"storage.s3_endpoint={endpoint}", f"train.storage_path={tmp_path / 'ray'}",
            f"aux_train.storage_path={tmp_path / 'ray'}", "mlflow.experiment=secrets", *overrides])

    data = tmp_path / "data"
    synthesize(str(write_photos(tmp_path / "photos")), str(data), config())
    # Random aux weights: train-aux runs through the same fit, tracking and checkpoint code.
    aux_weights = tmp_path / "aux.safetensors"
    save_file(build_aux_net(config().aux).net.state_dict(), str(aux_weights))
    quick = ["val_batches=0", "steps=2", "checkpoint_every=2"]
    result = train(str(data), str(aux_weights), config(*(f"train.{o}" for o in quick), "loss.lpips_weight=0"),
                   "upsr-secrets")

    client = MlflowClient(f"http://127.0.0.1:{mlflow_server['port']}")
    params = client.get_run(result.run_id).data.params
    assert params["storage.s3_endpoint"] == "https://minio.example:9000/?signature=***"
    assert client.get_run(result.run_id).info.status == "FINISHED"

    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    written = files_under(tmp_path, mlflow_server["root"], session_logs)
    assert any(path.name == "weights.safetensors" for path in written)
    assert any(path.suffix == ".db" for path in written) and any(path.name == "config.yaml" for path in written)
    leaks = {secret: [str(path) for path in written if secret.encode() in path.read_bytes()]
             for secret in (TRACKING_SECRET, ENDPOINT_SECRET, QUERY_SECRET, TEST_SECRET)}
    assert not any(leaks.values()), leaks
