"""Ctrl-C (SIGINT) to the drivers of synth and promote mid-run, as a user would send it (train:
tests/test_train.py, where the interrupted run is the one a second run resumes).

Each job runs as the ``upsr`` command in its own process (with its own private Ray instance);
the test waits until the job is demonstrably mid-way, interrupts it, and checks what is left:
no output that looks finished, no MLflow run left RUNNING, no alias moved, a clear message,
exit status 130, and a rerun of the same command that works. ``ray job stop`` of a submitted
job is in tests/test_cluster.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipelines import config as config_module
from pipelines.dataset import MANIFEST, MARKER
from tests.support import VENV_BIN, interrupt, start_job, wait_for, write_photos

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config", "configs/tiny.yaml", "--set", "ray.num_cpus=2", "--set", "synth.crop_size=128"]
MODEL = "upsr-interrupts"


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
    process = start_job(*command)
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
def eval_data(workspace):
    """A small dataset (6 photographs), the promote test's eval set, made in this process on the
    session's Ray instance."""
    from pipelines.synth import synthesize

    config = config_module.load(REPO / "configs" / "tiny.yaml", [
        "synth.crop_size=128", "synth.crops_per_image=2", *workspace["settings"][1::2]])
    data = workspace["root"] / "small-data"
    synthesize(str(write_photos(workspace["root"] / "few", count=6)), str(data), config)
    return data


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


def test_sigint_to_promote_moves_nothing_and_the_rerun_decides(workspace, eval_data):
    client = MlflowClient()
    champion = register_tiny(workspace, 1)
    client.set_registered_model_alias(MODEL, "champion", champion)
    register_tiny(workspace, 2)
    command = ["promote", "--candidate", f"models:/{MODEL}@challenger", "--eval", str(eval_data), *TINY,
               *workspace["settings"], "--set", f"evaluate.output_dir={workspace['root'] / 'evaluations'}",
               "--set", "promote.bootstrap_samples=500"]

    def evaluating() -> bool:
        return any(run.data.tags.get("job") == "evaluate" for run in mlflow.search_runs(
            search_all_experiments=True, output_format="list"))

    process = start_job(*command)
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
