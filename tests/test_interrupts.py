"""Ctrl-C (SIGINT) to the drivers of synth, train and promote mid-run, as a user would send it.

Each job runs as the ``upsr`` command in its own process (with its own private Ray instance);
the test waits until the job is demonstrably mid-way, interrupts it, and checks what is left:
no output that looks finished, no MLflow run left RUNNING, no alias moved, a clear message,
exit status 130, and a rerun of the same command that works. ``ray job stop`` of a submitted
job is in tests/test_cluster.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipelines import config as config_module
from pipelines.dataset import MANIFEST, MARKER
from tests.support import VENV_BIN, write_photos

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config", "configs/tiny.yaml", "--set", "ray.num_cpus=2", "--set", "synth.crop_size=128"]
MODEL = "upsr-interrupts"


def start(*args: str) -> subprocess.Popen:
    # SIGINT back to its default in the child: a shell starting the tests in the background
    # ignores it, and the child would inherit that.
    return subprocess.Popen([str(VENV_BIN / "upsr"), *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended ({process.returncode}) before {what}:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.1)


def interrupt(process: subprocess.Popen) -> str:
    """SIGINT to the driver, as Ctrl-C sends it; returns its stderr after it exits."""
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the job did not exit within 120 s of SIGINT")
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted: nothing unfinished was marked finished" in stderr
    assert "Traceback" not in stderr.split("interrupted:")[-1]
    return stderr


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "upsr"), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("interrupts")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    settings = ["--set", f"mlflow.tracking_uri={tracking_uri}", "--set", f"mlflow.registered_model={MODEL}",
                "--set", f"train.storage_path={root / 'ray'}", "--set", f"aux_train.storage_path={root / 'ray'}"]
    return {"root": root, "photos": write_photos(root / "photos", count=24), "settings": settings}


def test_sigint_to_synth_leaves_no_finished_dataset_and_the_rerun_works(workspace):
    output = workspace["root"] / "data"
    command = ["synth", "--input", str(workspace["photos"]), "--output", str(output), *TINY,
               "--set", "synth.crops_per_image=24"]
    process = start(*command)
    # Mid-run: the dataset folder is ours and the first shard is written, the rest still degrading.
    wait_for(lambda: (output / MARKER).exists() and any(output.glob("part-*.parquet")), "first shard", process)
    interrupt(process)
    assert not (output / MANIFEST).exists()

    refused = run(*command)
    assert refused.returncode == 2 and "an unfinished dataset written by upsr synth" in refused.stderr
    again = run(*command, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (output / MANIFEST).exists()


@pytest.fixture(scope="module")
def trained(workspace):
    """A small dataset (6 photographs, also the promote test's eval set) and an aux-net checkpoint,
    made in this process on the session's Ray instance."""
    from pipelines.synth import synthesize
    from pipelines.train_aux import train_aux

    def config(*overrides: str):
        return config_module.load(REPO / "configs" / "tiny.yaml", [
            "synth.crop_size=128", "synth.crops_per_image=2", *workspace["settings"][1::2], *overrides])

    data = workspace["root"] / "small-data"
    synthesize(str(write_photos(workspace["root"] / "few", count=6)), str(data), config())
    aux = train_aux(str(data), config("aux_train.steps=2", "aux_train.checkpoint_every=2", "aux_train.val_batches=0"),
                    "aux")
    return {"data": data, "aux": Path(aux.checkpoint_uri)}


def train_command(workspace, trained, steps: int) -> list[str]:
    return ["train", "--data", str(trained["data"]), "--aux", str(trained["aux"]), *TINY, *workspace["settings"],
            "--name", "interrupted", "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=2",
            "--set", "train.val_batches=0", "--set", "loss.lpips_weight=0"]


def test_sigint_to_train_marks_the_run_killed_and_the_same_name_resumes(workspace, trained):
    snapshot = workspace["root"] / "ray" / "interrupted" / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        # A checkpoint folder appears before Ray Train's controller registers it; a resume starts
        # from the latest registered one.
        try:
            return bool((json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("metrics"))
        except (OSError, ValueError):
            return False

    process = start(*train_command(workspace, trained, steps=400))
    wait_for(registered, "registered checkpoint", process)
    interrupt(process)
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.ray_run_name = 'interrupted'",
                              output_format="list")
    assert [run.info.status for run in runs] == ["KILLED"]

    resumed = run(*train_command(workspace, trained, steps=6))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    latest = mlflow.search_runs(search_all_experiments=True, filter_string="tags.ray_run_name = 'interrupted'",
                                order_by=["start_time DESC"], output_format="list")[0]
    assert latest.info.status == "FINISHED"
    assert client.get_metric_history(latest.info.run_id, "resumed_from_step")[0].value >= 2
    assert client.get_model_version_by_alias(MODEL, "challenger").run_id == latest.info.run_id


def register_tiny(workspace, seed: int) -> str:
    """A tiny randomly initialised checkpoint registered as a new version of MODEL (@challenger)."""
    import torch

    from pipelines import registry, tracking
    from upsr.aux_net import build_aux_net
    from upsr.checkpoint import CheckpointConfig, save_checkpoint
    from upsr.denoiser import build_denoiser
    from upsr.diffusion import UNWDiffusion

    config = config_module.load(REPO / "configs" / "tiny.yaml",
                                [f"mlflow.tracking_uri={mlflow.get_tracking_uri()}", f"mlflow.registered_model={MODEL}"])
    torch.manual_seed(seed)
    folder = save_checkpoint(workspace["root"] / f"model-{seed}", build_denoiser(config.denoiser),
                             build_aux_net(config.aux), UNWDiffusion.from_config(config.diffusion), CheckpointConfig(
                                 denoiser=config.denoiser, aux=config.aux, diffusion=config.diffusion,
                                 weight=config.weight, inference=config.inference))
    experiment = tracking.connect(config.mlflow)
    run_id = mlflow.start_run(experiment_id=experiment, run_name=f"model-{seed}").info.run_id
    mlflow.end_run()
    return str(registry.log_and_register_model(config.mlflow, run_id, folder))


def test_sigint_to_promote_moves_nothing_and_the_rerun_decides(workspace, trained):
    client = MlflowClient()
    champion = register_tiny(workspace, 1)
    client.set_registered_model_alias(MODEL, "champion", champion)
    register_tiny(workspace, 2)
    command = ["promote", "--candidate", f"models:/{MODEL}@challenger", "--eval", str(trained["data"]), *TINY,
               *workspace["settings"], "--set", f"evaluate.output_dir={workspace['root'] / 'evaluations'}",
               "--set", "promote.bootstrap_samples=500"]

    def evaluating() -> bool:
        return any(run.data.tags.get("job") == "evaluate" for run in mlflow.search_runs(
            search_all_experiments=True, output_format="list"))

    process = start(*command)
    wait_for(evaluating, "evaluation run", process)
    interrupt(process)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == champion
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    assert not any(key.startswith("upsr.promote.") for key in challenger.tags)
    statuses = {run.info.status for run in mlflow.search_runs(search_all_experiments=True, output_format="list")
                if run.data.tags.get("job") == "evaluate"}
    assert "RUNNING" not in statuses

    decided = run(*command)
    assert decided.returncode == 0, decided.stderr[-3000:]
    assert client.get_model_version(MODEL, challenger.version).tags["upsr.promote.decision"] in ("promoted", "kept")


def test_config_files_written_by_the_jobs_load_back(workspace):
    """The dataset's _config.yaml (credentials taken out) is still a config the jobs read."""
    written = workspace["root"] / "data" / "_config.yaml"
    assert config_module.load(written).synth.crops_per_image == 24
