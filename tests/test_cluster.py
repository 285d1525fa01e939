"""The jobs on a running cluster, end to end, against real processes on 127.0.0.1.

``infra/local/stack.sh`` (what users run) starts a Ray head (``ray start --head``, token
authentication), an MLflow tracking server (SQLite, artifacts proxied to S3) and an S3 endpoint
(moto). Every job then goes through the real ``ray job submit`` CLI with ``--working-dir .``,
exactly as on a cluster: synth (sample photographs -> ``s3://.../data``), train (2 Ray Train
workers, checkpoints on ``s3://.../runs``, the aux net's weights read from the bucket; train-aux
runs through the same fit, tracking and checkpoint code), evaluate and promote; then a second training job is stopped with ``ray job stop``. The test checks
what each job left in the bucket and on the MLflow server, that the AWS secret reached the
jobs only through the head's process environment (never logs, job metadata, MLflow params or
tags, written configs), and that ``stack.sh stop`` ends every process the stack started and
nothing else (the session's own Ray instance keeps working).

The networks are the tiny ones of configs/tiny.yaml on 128x128 crops, trained for a few steps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.support import TEST_SECRET, VENV_BIN

REPO = Path(__file__).resolve().parent.parent
STACK = REPO / "infra" / "local" / "stack.sh"
BUCKET = "upsr-it"
MARKER = "UPSR_STACK_ID"
TRAIN_STEPS = 4
CONFIG = ["--config", "configs/tiny.yaml", "--set", "synth.crop_size=128", "--set", "synth.crops_per_image=2"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
HEAD = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
# Variables of this test process that must not reach the clients: they would name another
# Ray instance or another token.
CLIENT_DROPS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")


def stack_command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STACK), *args], capture_output=True, text=True, timeout=timeout)


def parse_exports(text: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S*)$", text, flags=re.MULTILINE))


def process_info(pid: int) -> tuple[int, bytes] | None:
    """(session id, environment) of a live, non-zombie process; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[3]), environ)


def stack_processes(stack_id: str, sessions: set[int]) -> set[int]:
    """Every live process in one of the stack's sessions or carrying its id in its environment."""
    needle = f"{MARKER}={stack_id}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = process_info(int(entry.name))
            if info and (info[0] in sessions or needle in info[1].split(b"\0")):
                found.add(int(entry.name))
    return found


class Stack:
    def __init__(self, state_dir: Path, exports: dict[str, str]):
        self.state_dir = state_dir
        self.exports = exports
        self.state = json.loads((state_dir / "state.json").read_text())
        self.dashboard = exports["RAY_API_SERVER_ADDRESS"]
        self.token = Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        self.env = {k: v for k, v in os.environ.items() if k not in CLIENT_DROPS} | exports

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "ray"), *args], capture_output=True, text=True, cwd=REPO,
                              env=self.env, timeout=timeout)

    def api(self, path: str, token: str | None = "stack") -> tuple[int, str]:
        token = self.token if token == "stack" else token
        request = urllib.request.Request(f"{self.dashboard}{path}",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def start(self, job_id: str, *args: str) -> None:
        """``ray job submit --working-dir . --no-wait`` of one ``upsr`` job."""
        # The uploaded working dir has no .git: the commit travels in the job's environment.
        runtime_env = json.dumps({"env_vars": {"UPSR_GIT_COMMIT": HEAD}})
        submitted = self.ray("job", "submit", "--address", self.dashboard, "--working-dir", ".",
                             "--runtime-env-json", runtime_env, "--submission-id", job_id, "--no-wait", "--",
                             "upsr", *args)
        assert submitted.returncode == 0, submitted.stderr[-3000:]

    def info(self, job_id: str) -> dict:
        status, body = self.api(f"/api/jobs/{job_id}")
        assert status == 200, body
        return json.loads(body)

    def wait(self, job_id: str, timeout: float = 420) -> dict:
        """The job's final info (SUCCEEDED, FAILED or STOPPED)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info(job_id)
            if info["status"] in TERMINAL:
                break
            assert time.monotonic() < deadline, f"{job_id} still {info['status']} after {timeout} s"
            time.sleep(1)
        return info

    def submit(self, job_id: str, *args: str, timeout: float = 420) -> dict:
        """``ray job submit --working-dir .`` of one ``upsr`` job, then wait for it to succeed."""
        self.start(job_id, *args)
        info = self.wait(job_id, timeout)
        if info["status"] != "SUCCEEDED":
            logs = self.ray("job", "logs", "--address", self.dashboard, job_id)
            pytest.fail(f"{job_id}: {info['status']} ({info.get('message')})\n{logs.stdout[-6000:]}")
        return info


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ray_local):
    state_dir = tmp_path_factory.mktemp("stack")
    started = stack_command("start", "--state-dir", str(state_dir), "--bucket", BUCKET, "--num-cpus", "2")
    assert started.returncode == 0, started.stderr[-5000:]
    try:
        yield Stack(state_dir, parse_exports(started.stdout))
    finally:
        # The test stops the stack itself and checks the result; this is for a test that failed early.
        if (state_dir / "state.json").exists():
            stack_command("stop", "--state-dir", str(state_dir))


def s3_keys(endpoint: str) -> dict[str, bytes | None]:
    """Every key of the bucket; the content of the small text files (configs, manifests, summaries)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    keys: dict[str, bytes | None] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            small_text = item["Key"].endswith((".yaml", ".json", ".txt", "MLmodel")) and item["Size"] < 1_000_000
            keys[item["Key"]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read() if small_text else None
    return keys


@pytest.mark.slow
def test_jobs_on_a_running_cluster_with_s3_and_an_mlflow_server(stack, ray_local):
    import ray

    exports = stack.exports
    assert exports["RAY_AUTH_MODE"] == "token"
    assert exports["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    # Token authentication is on: the job API refuses a request without the token, or a wrong one.
    assert stack.api("/api/jobs/", token=None)[0] == 401
    assert stack.api("/api/jobs/", token="0" * 64)[0] == 403
    # The secret reaches the jobs through the head's process environment, and only that way.
    head_environ = Path(f"/proc/{stack.state['pids']['ray_head']}/environ").read_bytes().split(b"\0")
    assert f"AWS_SECRET_ACCESS_KEY={TEST_SECRET}".encode() in head_environ

    data, runs = f"s3://{BUCKET}/data", f"s3://{BUCKET}/runs"
    stack.submit("it-synth", "synth", "--output", data, *CONFIG)
    aux_weights = f"s3://{BUCKET}/aux/aux.safetensors"
    upload_random_aux_weights(exports["AWS_ENDPOINT_URL_S3"], aux_weights)
    stack.submit("it-train", "train", "--data", data, "--aux", aux_weights, *CONFIG, "--name", "upsr",
                 "--set", f"train.steps={TRAIN_STEPS}", "--set", "train.checkpoint_every=2",
                 "--set", f"train.validate_every={TRAIN_STEPS}", "--set", f"train.storage_path={runs}")
    evaluation = f"s3://{BUCKET}/evaluations/challenger/metrics.parquet"
    stack.submit("it-evaluate", "evaluate", "--model", "models:/upsr@challenger", "--data", data,
                 "--out", evaluation, *CONFIG)
    stack.submit("it-promote", "promote", "--candidate", "models:/upsr@challenger", "--eval", data, *CONFIG)
    client = MlflowClient(tracking_uri=exports["MLFLOW_TRACKING_URI"])
    stop_a_training_job(stack, client, data, aux_weights, runs)

    # The working directory went up without the virtualenv and the ignored runs/ folder (100+ MB).
    packages = list(Path(stack.state["ray_temp_dir"]).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*"))
    assert packages
    for package in packages:
        assert not (package / ".venv").exists()
        assert sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) < 30 * 2**20

    # Shards, checkpoints, evaluation outputs and MLflow's artifacts are in the bucket.
    keys = s3_keys(exports["AWS_ENDPOINT_URL_S3"])
    assert {"data/_manifest.json", "data/_config.yaml", "data/_quarantine.parquet"} <= set(keys)
    assert [k for k in keys if re.fullmatch(r"data/part-[\w-]+\.parquet", k)]
    assert manifest_rows(keys["data/_manifest.json"]) == 9 * 2
    for step in range(2, TRAIN_STEPS + 1, 2):
        assert {f"runs/upsr/checkpoint_{step:08d}/training_state.pt",
                f"runs/upsr/checkpoint_{step:08d}/upsr/weights.safetensors"} <= set(keys)
    assert {"evaluations/challenger/metrics.parquet", "evaluations/challenger/metrics.summary.json"} <= set(keys)

    experiment = client.get_experiment_by_name("upsr")
    runs_by_name = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    run = runs_by_name["upsr"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["git_commit"] == HEAD
    # Proxied artifacts: the run stores through the server, which writes to S3.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    prefix = f"mlflow/{experiment.experiment_id}/{run.info.run_id}/artifacts/"
    assert f"{prefix}config/resolved.yaml" in keys and f"{prefix}dataset/_manifest.json" in keys
    assert run.data.params["checkpoint_storage"] == f"{runs}/upsr" and run.data.params["aux.weights"] == aux_weights
    assert [m.step for m in client.get_metric_history(runs_by_name["upsr"].info.run_id, "loss")] == \
        list(range(1, TRAIN_STEPS + 1))

    challenger = client.get_model_version_by_alias("upsr", "challenger")
    champion = client.get_model_version_by_alias("upsr", "champion")
    assert challenger.run_id == runs_by_name["upsr"].info.run_id
    assert champion.version == challenger.version
    # The registered version's source is the logged model (models:/m-...), stored under the experiment.
    model_id = challenger.source.removeprefix("models:/")
    model_prefix = f"mlflow/{experiment.experiment_id}/models/{model_id}/artifacts/"
    assert f"{model_prefix}MLmodel" in keys and f"{model_prefix}artifacts/upsr/weights.safetensors" in keys
    evaluations = [run for run in client.search_runs(
        [e.experiment_id for e in client.search_experiments()]) if run.data.tags.get("job") == "evaluate"]
    assert evaluations and all(run.info.status == "FINISHED" for run in evaluations)

    # The secret is nowhere but in the processes' environment.
    job_ids = ("it-synth", "it-train", "it-evaluate", "it-promote")
    listing = stack.ray("job", "list", "--address", stack.dashboard)
    assert listing.returncode == 0 and all(job_id in listing.stdout for job_id in job_ids)
    assert listing.stdout.count("status=<JobStatus.SUCCEEDED") == len(job_ids)
    texts = {"ray job list": listing.stdout + listing.stderr, "job API": stack.api("/api/jobs/")[1]}
    for job_id in job_ids:
        logs = stack.ray("job", "logs", "--address", stack.dashboard, job_id)
        assert logs.returncode == 0 and "upsr" in logs.stdout
        texts[f"ray job logs {job_id}"] = logs.stdout + logs.stderr
        texts[f"job API {job_id}"] = stack.api(f"/api/jobs/{job_id}")[1]
    # The training job's console names its MLflow run's page on the server, and its progress.
    train_logs = texts["ray job logs it-train"]
    assert f"MLflow run: {exports['MLFLOW_TRACKING_URI'].rstrip('/')}/#/experiments/" in train_logs
    assert f"train step {TRAIN_STEPS}/{TRAIN_STEPS} (100%): loss " in train_logs
    all_runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(all_runs) >= 2
    for run in all_runs:
        texts[f"MLflow run {run.info.run_name}"] = json.dumps([run.data.params, run.data.tags])
    for version in client.search_model_versions("name = 'upsr'"):
        texts[f"model version {version.version}"] = json.dumps(version.tags)
    texts |= {f"s3://{BUCKET}/{key}": content.decode(errors="replace") for key, content in keys.items() if content}
    texts |= {f"stack state {f.name}": f.read_text(errors="replace") for f in stack.state_dir.rglob("*")
              if f.is_file() and f.suffix != ".db"}
    assert len(texts) > 20
    leaks = [where for where, text in texts.items() if TEST_SECRET in text]
    assert not leaks, f"the AWS secret appears in: {leaks}"

    # Stop: every process the stack started ends, and nothing else does.
    sessions = set(stack.state["pids"].values())
    before = stack_processes(stack.state["stack_id"], sessions)
    assert set(stack.state["pids"].values()) <= before and len(before) > len(sessions)
    stopped = stack_command("stop", "--state-dir", str(stack.state_dir))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not stack_processes(stack.state["stack_id"], sessions)
    assert not Path(stack.state["ray_temp_dir"]).exists()
    assert not (stack.state_dir / "state.json").exists()
    assert ray.get(ray.put("still here")) == "still here"
    assert ray.get(ray.remote(lambda: 1 + 1).remote()) == 2


def stop_a_training_job(stack: Stack, client: MlflowClient, data: str, aux_weights: str, runs: str) -> None:
    """``ray job stop`` of a training job once it has logged a step: the job ends STOPPED, its
    MLflow run KILLED with the reason (not RUNNING), and it registers no model version."""
    versions = len(client.search_model_versions("name = 'upsr'"))
    stack.start("it-train-stopped", "train", "--data", data, "--aux", aux_weights, *CONFIG, "--name", "upsr-stopped",
                "--set", "train.steps=100000", "--set", f"train.storage_path={runs}")
    deadline = time.monotonic() + 300
    while True:
        found = client.search_runs([client.get_experiment_by_name("upsr").experiment_id],
                                   "attributes.run_name = 'upsr-stopped'")
        if found and client.get_metric_history(found[0].info.run_id, "loss"):
            break
        assert stack.info("it-train-stopped")["status"] not in TERMINAL, "the training job ended before it was stopped"
        assert time.monotonic() < deadline, "the training job logged no step within 300 s"
        time.sleep(1)
    stopped = stack.ray("job", "stop", "--address", stack.dashboard, "it-train-stopped")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert stack.wait("it-train-stopped")["status"] == "STOPPED"
    run = client.get_run(found[0].info.run_id)
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["end_reason"].startswith("interrupted"), run.data.tags
    assert len(client.search_model_versions("name = 'upsr'")) == versions


def upload_random_aux_weights(endpoint: str, uri: str) -> None:
    """Seeded random weights of the tiny config's aux net, written to ``uri`` on the stack's S3."""
    import boto3
    import torch
    from safetensors.torch import save

    from pipelines import config as config_module
    from upsr.aux_net import build_aux_net

    torch.manual_seed(0)
    net = build_aux_net(config_module.load(REPO / "configs" / "tiny.yaml").aux).net
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=save(net.state_dict()))


def manifest_rows(manifest: bytes) -> int:
    return json.loads(manifest)["counts"]["rows"]
