"""`upsr train-aux` and `upsr train` on real Ray (2 CPU workers) and MLflow on a SQLite file.

The networks are the tiny ones of configs/tiny.yaml on 128x128 crops; LPIPS runs on a randomly
initialised VGG trunk (no downloads here), and the diffusion loss of most runs leaves LPIPS out
to keep the suite short (the end-to-end run keeps it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from pipelines import config as config_module
from pipelines.errors import UserError
from pipelines.dataset import open_dataset
from pipelines.images import decode_png
from pipelines.synth import synthesize
from pipelines.train_data import open_training_data, split_sources, validation_batches
from tests.support import VENV_BIN, interrupt, make_bucket, photo, start_job, wait_for, write_photos

REPO = Path(__file__).resolve().parent.parent
BASE_OVERRIDES = ["synth.crop_size=128", "synth.crops_per_image=8", "train_data.materialize=true"]
# Runs that test the loop's machinery rather than learning: no LPIPS, no validation pass.
QUICK = ["loss.lpips_weight=0", "train.val_batches=0", "train.checkpoint_every=4"]


def losses(client: MlflowClient, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("train")
    photos = write_photos(root / "photos")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"

    def make_config(*overrides: str):
        return config_module.load(REPO / "configs" / "tiny.yaml", [
            *BASE_OVERRIDES, f"mlflow.tracking_uri={tracking_uri}", f"train.storage_path={root / 'ray'}",
            f"aux_train.storage_path={root / 'ray'}", *overrides])

    data = root / "data"
    synthesize(str(photos), str(data), make_config())
    mlflow.set_tracking_uri(tracking_uri)
    return {"root": root, "data": str(data), "tracking_uri": tracking_uri, "config": make_config}


@pytest.fixture(scope="module")
def aux_run(workspace):
    from pipelines.train_aux import train_aux

    # Validated on the held-out photographs whole, and stopped by aux_train.plateau: no gain can
    # exceed a 100 dB min_delta, so the validations at 40 and 60 make two without gain after the
    # best (the first, at 20), and the run stops at step 60 of 80, exporting step 20's aux net.
    # Both paths run in a real job here.
    return train_aux(workspace["data"], workspace["config"](
        "aux_train.steps=80", "aux_train.lr=0.003", "aux_train.validate_every=20",
        "aux_train.plateau={metric: val_psnr_gain_over_bicubic, patience: 2, min_delta: 100}",
        f"train_data.val_photos={workspace['root'] / 'photos'}", "train_data.val_photo_side=128"), "aux")


def mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
def test_train_aux_end_to_end(workspace, aux_run):
    from upsr.aux_net import build_aux_net, load_aux_weights

    client = MlflowClient()
    run = client.get_run(aux_run.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["job"] == "train-aux"
    history = [value for _, value in losses(client, aux_run.run_id)]
    assert len(history) == 60 and all(np.isfinite(history))
    folder = Path(aux_run.checkpoint_uri)
    assert folder.name == "checkpoint_00000060"
    aux = build_aux_net(workspace["config"]().aux)
    load_aux_weights(aux, folder / "aux.safetensors")

    # The tiny aux net starts close to bicubic and gains ~1 % of L1 in 60 steps, less than the
    # batch-to-batch noise of the logged loss; so the objective is measured over the whole train
    # split, before (the workers' seeded initialisation) and after training. The exported net is
    # step 20's EMA (restore_best), too few steps to be sure of a gain; the checkpoint's trained
    # weights (model.safetensors, step 60) carry the claim.
    config = workspace["config"]()
    dataset = open_dataset(workspace["data"])
    train_sources, _ = split_sources(sorted({s for s in pq.read_table(dataset.shard_paths, columns=["source"])
                                             ["source"].to_pylist()}), config.train_data.val_fraction,
                                     config.train_data.split_seed)
    rows = [r for r in pq.read_table(dataset.shard_paths).to_pylist() if r["source"] in train_sources]
    lr = torch.stack([torch.from_numpy(decode_png(r["lr_png"])).permute(2, 0, 1) for r in rows]).float() / 255
    hr = torch.stack([torch.from_numpy(decode_png(r["hr_png"])).permute(2, 0, 1) for r in rows]).float() / 255
    torch.manual_seed(config.aux_train.seed)
    initial = build_aux_net(config.aux)
    trained = build_aux_net(config.aux)
    trained.load_state_dict(load_file(str(folder / "model.safetensors")))
    with torch.no_grad():
        before = torch.mean(torch.abs(initial(lr) - hr)).item()
        after = torch.mean(torch.abs(trained(lr) - hr)).item()
    assert after < before, (before, after)
    artifacts = {a.path for a in client.list_artifacts(aux_run.run_id, "aux")}
    assert artifacts == {"aux/aux.safetensors", "aux/aux_config.json"}
    # Validation scored the held-out photographs and measured g against bicubic on them.
    gains = [m.value for m in client.get_metric_history(aux_run.run_id, "val_psnr_gain_over_bicubic")]
    assert len(gains) == 3 and all(np.isfinite(gains))
    assert run.data.metrics["stopped_on_plateau_at_step"] == 60
    # The exported aux net is the best validation's (the first: nothing beat it by 100 dB).
    assert run.data.metrics["restored_best_from_step"] == 20


TINY_ATD = ("aux.arch=ATD", "aux.options={upscale: 4, embed_dim: 16, depths: [2], num_heads: [2], window_size: 8, "
            "category_size: 32, num_tokens: 8, reducted_dim: 4, convffn_kernel_size: 3, mlp_ratio: 1}")


def test_train_aux_trains_the_release_atd(tmp_path):
    """train-aux's task with the release's ATD: its steps move the weights, and the exported file
    loads back into the configured architecture. (The job around the task is the same for every
    architecture: test_train_aux_end_to_end.)"""
    from pipelines.train_aux import AuxTask
    from upsr.aux_net import build_aux_net, load_aux_weights

    config = config_module.load(REPO / "configs" / "tiny.yaml", list(TINY_ATD))
    torch.manual_seed(0)
    task = AuxTask(config, torch.device("cpu"))
    untrained = {name: tensor.clone() for name, tensor in task.model.net.state_dict().items()}
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-3)
    lr_images, hr_images = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 64, 64)
    for _ in range(3):
        loss = task.losses(task.model, lr_images, hr_images, torch.Generator())["loss"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    task.export(task.model, tmp_path)
    aux = build_aux_net(config.aux)
    load_aux_weights(aux, tmp_path / "aux.safetensors")
    trained = aux.net.state_dict()
    assert any(not torch.equal(trained[name], tensor) for name, tensor in untrained.items())
    assert all(torch.equal(trained[name], tensor) for name, tensor in task.model.net.state_dict().items())


@pytest.mark.slow
def test_train_end_to_end_registers_a_loadable_model(workspace, aux_run, tmp_path):
    import upsr
    from pipelines.train import train

    # With the options of large runs on: two micro-batches per step, the Swin-UNet's levels
    # recomputed in the backward pass (tests/test_optimization.py checks their gradients).
    config = workspace["config"]("train.steps=20", "train.validate_every=10", "loss.lpips_weight=0.5",
                                 "train.grad_accum_steps=2", "train.activation_checkpointing=true")
    result = train(workspace["data"], aux_run.checkpoint_uri, config, "e2e")
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["train.steps"] == "20" and params["denoiser.model_channels"] == "32"
    assert params["global_batch_size"] == "16"  # 2 workers x 4 x 2 micro-batches
    assert params["aux.weights"].endswith("aux.safetensors")
    tags = run.data.tags
    manifest_hash = open_dataset(workspace["data"]).manifest_hash
    assert tags["dataset_manifest_sha256"] == manifest_hash
    [training_input] = run.inputs.dataset_inputs
    assert training_input.dataset.digest == manifest_hash[:36] and training_input.dataset.name == "data"
    assert [(tag.key, tag.value) for tag in training_input.tags] == [("mlflow.data.context", "training")]
    assert json.loads(training_input.dataset.profile) == {
        "rows": open_dataset(workspace["data"]).manifest["counts"]["rows"], "train_rows": int(params["train_rows"]),
        "train_photos": int(params["train_sources"]), "val_photos": int(params["val_sources"])}
    assert int(params["train_rows"]) > 0 and int(params["val_sources"]) > 0
    assert tags["ray_version"] and tags["git_commit"]

    history = losses(client, result.run_id)
    assert [step for step, _ in history] == list(range(1, 21))
    values = [value for _, value in history]
    assert mean(values[-5:]) < 0.8 * mean(values[:5]), values
    assert losses(client, result.run_id, "nonfinite_steps")[-1][1] == 0
    assert [step for step, _ in losses(client, result.run_id, "val_psnr")] == [10, 20]
    # The diagnostics of upsr.diagnostics at every validation.
    metrics = run.data.metrics
    diagnostics = ["val_aux_psnr_gain", "val_psnr_low_uncertainty", "val_psnr_high_uncertainty", "val_w_mean",
                   "val_w_at_floor", "val_w_saturated", *(f"val_x0_mse_t{t}" for t in range(config.diffusion.steps))]
    for key in diagnostics:
        assert [step for step, _ in losses(client, result.run_id, key)] == [10, 20], key
    assert config.weight.floor <= metrics["val_w_mean"] <= 1
    assert 0 <= metrics["val_w_at_floor"] <= 1 and 0 <= metrics["val_w_saturated"] <= 1
    # MLflow's system metrics, per worker (no GPU here: CPU, memory, disk and network only).
    for rank in range(config.train.num_workers):
        assert 0 <= metrics[f"system/rank{rank}/cpu_utilization_percentage"] <= 100
        assert metrics[f"system/rank{rank}/system_memory_usage_megabytes"] > 0

    # Validation panels as MLflow image series (key and step: the UI's step slider).
    images = [a.path for a in client.list_artifacts(result.run_id, "images") if a.path.endswith(".png")]
    series = sorted(tuple(Path(path).name.split("+")[:3:2]) for path in images)
    assert series == [("validation_grid", "10"), ("validation_grid", "20"), ("w_histogram", "10"),
                      ("w_histogram", "20")]
    grid = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, dst_path=str(tmp_path),
        artifact_path=next(p for p in images if Path(p).name.startswith("validation_grid+step+20+")))
    assert np.asarray(Image.open(grid)).shape == (4 * 128, 5 * 128, 3)
    assert {a.path for a in client.list_artifacts(result.run_id, "dataset")} == {"dataset/_manifest.json"}
    assert {a.path for a in client.list_artifacts(result.run_id, "config")} == {"config/resolved.yaml"}

    version = client.get_model_version_by_alias("upsr", "challenger")
    assert version.run_id == result.run_id
    import pipelines.registry  # noqa: F401  (registers the models:/ resolver)

    pipeline = upsr.load("models:/upsr@challenger")
    lr_image = photo(32, 48, 7)
    upscaled = pipeline.upscale(lr_image)
    assert upscaled.shape == (128, 192, 3)
    # The registered model serves through MLflow's generic pyfunc interface too, same output.
    served = mlflow.pyfunc.load_model("models:/upsr@challenger").predict(lr_image)
    assert np.array_equal(served, upscaled)

    (tmp_path / "in").mkdir()
    Image.fromarray(lr_image).save(tmp_path / "in" / "small.png")
    completed = subprocess.run(
        [str(VENV_BIN / "upsr"), "upscale", str(tmp_path / "in" / "small.png"), "--out", str(tmp_path / "out"),
         "--model", "models:/upsr@challenger", "--device", "cpu"],
        capture_output=True, text=True, env=os.environ | {"MLFLOW_TRACKING_URI": workspace["tracking_uri"]})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert np.asarray(Image.open(tmp_path / "out" / "small.png")).shape == (128, 192, 3)


@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed_and_the_same_name_resumes_from_s3(workspace, aux_run, s3_endpoint, tmp_path):
    """``upsr train`` with checkpoints on S3, interrupted with Ctrl-C (SIGINT) after its first
    registered checkpoint: the run is KILLED, and a second run of the same name resumes from the
    latest checkpoint there with the step, optimizer, schedule and EMA carried on."""
    from pipelines.train import DiffusionTask, train
    from pipelines.training_loop import STATE_FILE, ema_update, restore_training_state, warmup_factor
    from torch.optim.swa_utils import AveragedModel

    bucket = make_bucket(s3_endpoint, "train-runs")
    overrides = [*QUICK, "train.storage_path=s3://train-runs/ray", f"storage.s3_endpoint={s3_endpoint}"]

    def latest_registered_step() -> int | None:
        # A checkpoint folder appears before Ray Train's controller registers it; a resume starts
        # from the latest registered one.
        try:
            body = bucket.get_object(Bucket="train-runs", Key="ray/resume/checkpoint_manager_snapshot.json")["Body"]
            return ((json.loads(body.read()).get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step")
        except (bucket.exceptions.NoSuchKey, ValueError):
            return None

    settings = [item for override in (*BASE_OVERRIDES, f"mlflow.tracking_uri={workspace['tracking_uri']}",
                                      f"aux_train.storage_path={workspace['root'] / 'ray'}", *overrides,
                                      "train.steps=400", "ray.num_cpus=2") for item in ("--set", override)]
    process = start_job("train", "--data", workspace["data"], "--aux", aux_run.checkpoint_uri,
                        "--config", "configs/tiny.yaml", *settings, "--name", "resume")
    wait_for(lambda: latest_registered_step() is not None, "registered checkpoint", process)
    interrupt(process)
    runs = mlflow.search_runs(experiment_names=["upsr"], filter_string="tags.ray_run_name = 'resume'",
                              output_format="list")
    assert [run.info.status for run in runs] == ["KILLED"]
    assert runs[0].data.tags["end_reason"].startswith("interrupted")
    start = latest_registered_step()
    assert start % 4 == 0

    second = train(workspace["data"], aux_run.checkpoint_uri,
                   workspace["config"](*overrides, f"train.steps={start + 4}"), "resume")
    assert second.checkpoint_uri == f"s3://train-runs/ray/resume/checkpoint_{start + 4:08d}"
    client = MlflowClient()
    assert client.get_run(second.run_id).info.status == "FINISHED"
    assert losses(client, second.run_id, "resumed_from_step") == [(start, start)]
    assert [step for step, _ in losses(client, second.run_id)] == list(range(start + 1, start + 5))
    assert client.get_model_version_by_alias("upsr", "challenger").run_id == second.run_id
    keys = {item["Key"] for item in bucket.list_objects_v2(Bucket="train-runs")["Contents"]}
    for step in (start, start + 4):
        assert f"ray/resume/checkpoint_{step:08d}/training_state.pt" in keys
        assert f"ray/resume/checkpoint_{step:08d}/upsr/weights.safetensors" in keys

    def download(uri: str) -> Path:
        prefix = uri.removeprefix("s3://train-runs/") + "/"
        folder = tmp_path / Path(prefix).name
        for key in (k for k in keys if k.startswith(prefix) and not k.endswith("/")):  # not folder markers
            (folder / key[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
            bucket.download_file("train-runs", key, str(folder / key[len(prefix):]))
        return folder

    # Restoring the checkpoint it started from into fresh objects reproduces its saved state exactly.
    config = workspace["config"]("loss.lpips_weight=0")
    checkpoint = download(f"s3://train-runs/ray/resume/checkpoint_{start:08d}")
    task = DiffusionTask(config, torch.device("cpu"))
    model = task.model
    ema = AveragedModel(model, multi_avg_fn=ema_update(config.train.ema_decay, config.train.ema_warmup),
                        use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(config.train.warmup_steps))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = restore_training_state(checkpoint, model, ema, optimizer, scheduler, scaler)
    assert state.step == start
    for name, tensor in load_file(str(checkpoint / "ema.safetensors")).items():
        assert torch.equal(ema.state_dict()[name], tensor), name
    for name, tensor in load_file(str(checkpoint / "model.safetensors")).items():
        assert torch.equal(model.state_dict()[name], tensor), name
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    restored = optimizer.state_dict()
    for index, values in saved["optimizer"]["state"].items():
        for key, tensor in values.items():
            assert torch.equal(restored["state"][index][key], tensor), (index, key)
    assert scheduler.state_dict()["last_epoch"] == start

    # The resumed run carried that state on: Adam's step counts, the EMA's average count and
    # the schedule went on from there instead of restarting.
    final = download(second.checkpoint_uri)
    final_state = torch.load(final / STATE_FILE, weights_only=True)
    assert final_state["step"] == start + 4
    assert all(int(values["step"]) == start + 4 for values in final_state["optimizer"]["state"].values())
    assert final_state["scheduler"]["last_epoch"] == start + 4
    # The EMA counts the initial weights as one average (it starts from them, as the release's does).
    assert int(load_file(str(final / "ema.safetensors"))["n_averaged"]) == start + 5


def read_epochs(config, data_uri: str, shuffle_seeds: list[int], world_size: int = 2) -> list[list[torch.Tensor]]:
    """What each of ``world_size`` Ray Train workers reads in one epoch (its HR batches), the data
    opened, split and sharded as a training job does; the workers read side by side."""
    import ray
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.train_data import ingest_config, iter_batches

    data = open_training_data(data_uri, config.train_data, config.storage)
    shards = ingest_config(config.train_data, ["train"]).configure(
        data.datasets, world_size=world_size, worker_handles=None,
        worker_node_ids=[ray.get_runtime_context().get_node_id()] * world_size)

    def read(rank: int) -> list[torch.Tensor]:
        return [hr for _, hr in iter_batches(shards[rank]["train"], 4, config.train_data, torch.device("cpu"),
                                             shuffle_seed=shuffle_seeds[rank])]

    with ThreadPoolExecutor(world_size) as pool:
        return list(pool.map(read, range(world_size)))


@pytest.mark.slow
def test_a_deterministic_config_feeds_every_worker_the_same_batches_on_every_run(workspace):
    config, data = workspace["config"]("train_data.deterministic=true"), workspace["data"]
    first, again = read_epochs(config, data, [1, 2]), read_epochs(config, data, [1, 2])
    assert len(first[0]) == len(first[1]) > 2
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first[rank], again[rank], strict=True))
    assert not torch.equal(first[0][0], first[1][0])
    # The shuffle seed is what orders the rows: another seed, another order of the same rows.
    reseeded = read_epochs(config, data, [3, 2])[0]
    assert not all(torch.equal(a, b) for a, b in zip(first[0], reseeded))
    assert sorted(x.sum().item() for x in torch.cat(first[0])) == sorted(x.sum().item() for x in torch.cat(reseeded))


def init_checkpoint(folder: Path, config) -> Path:
    """A tiny UPSR checkpoint of seeded random networks, to start training from."""
    from upsr.aux_net import build_aux_net
    from upsr.checkpoint import CheckpointConfig, save_checkpoint
    from upsr.denoiser import build_denoiser
    from upsr.diffusion import UNWDiffusion

    torch.manual_seed(123)
    return save_checkpoint(folder, build_denoiser(config.denoiser), build_aux_net(config.aux),
                           UNWDiffusion.from_config(config.diffusion), CheckpointConfig(
                               denoiser=config.denoiser, aux=config.aux, diffusion=config.diffusion,
                               weight=config.weight, inference=config.inference))


@pytest.mark.slow
def test_init_from_and_a_killed_worker_resuming_from_the_last_checkpoint(workspace, tmp_path):
    """Training starts from ``--init-from``'s checkpoint (the denoiser, its EMA and the aux net);
    one worker is SIGKILLed after the first registered checkpoint and the worker group restarts
    from there. A learning rate far below float32 resolution keeps the weights at the start's
    throughout, so the exported model must still be the start's."""
    from pipelines.train import train

    source = init_checkpoint(tmp_path / "start", workspace["config"]())

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    snapshot = workspace["root"] / "ray" / "fault" / "checkpoint_manager_snapshot.json"
    killed: list[tuple[int, int]] = []

    def kill_rank_1_after_first_checkpoint():
        # Ray Train hands a restarted worker group the latest checkpoint its controller has
        # registered (recorded in the snapshot file), which can trail a worker's report.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (pid_dir / "rank1.pid").exists() and snapshot.exists():
                latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("metrics", {})
                if latest.get("step"):
                    pid = int((pid_dir / "rank1.pid").read_text())
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, latest["step"]))
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1_after_first_checkpoint, daemon=True)
    killer.start()
    config = workspace["config"](*QUICK, "train.steps=15", "train.checkpoint_every=5", "train.max_failures=1",
                                 "train.lr=1.0e-15", f"train.debug.pid_dir={pid_dir}")
    result = train(workspace["data"], None, config, "fault", init_from=str(source))
    killer.join(timeout=5)
    assert killed, "the test never saw a worker pid and a registered checkpoint"
    pid, checkpoint_step = killed[0]
    assert Path(result.checkpoint_uri).name == "checkpoint_00000015"
    client = MlflowClient()
    assert losses(client, result.run_id, "resumed_from_step") == [(checkpoint_step, checkpoint_step)]
    steps = [step for step, _ in losses(client, result.run_id)]
    assert sorted(set(steps)) == list(range(1, 16)), steps
    # The killed attempt may have logged a few steps past the checkpoint before the controller
    # registered it; the resumed attempt logs those again, once, from checkpoint_step + 1 on.
    repeated = sorted(step for step in set(steps) if steps.count(step) > 1)
    assert repeated == list(range(checkpoint_step + 1, checkpoint_step + 1 + len(repeated))), steps
    assert all(steps.count(step) <= 2 for step in repeated), steps
    assert int((pid_dir / "rank1.pid").read_text()) != pid

    started = load_file(str(source / "weights.safetensors"))
    exported = load_file(str(Path(result.checkpoint_uri) / "upsr" / "weights.safetensors"))
    assert exported.keys() == started.keys()
    for name, tensor in started.items():  # the EMA (exported) and the aux net both come from the start
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-7, msg=name)
    for name, tensor in load_file(str(Path(result.checkpoint_uri) / "model.safetensors")).items():
        torch.testing.assert_close(tensor, started["denoiser." + name], rtol=0, atol=1e-7, msg=name)
    assert client.get_run(result.run_id).data.tags["init_from"] == str(source)


@pytest.mark.slow
def test_a_nan_batch_is_skipped_and_counted_and_consecutive_ones_stop_the_run(workspace, aux_run):
    """One non-finite step is skipped and counted, and the good steps after it reset the streak;
    three in a row stop the run as FAILED."""
    from pipelines.train import train
    from pipelines.training_loop import TrainingFailed

    config = workspace["config"](*QUICK, "train.steps=10", "train.max_failures=0", "train.max_consecutive_nonfinite=3",
                                 "train.debug.inject_nan_at_steps=[3,6,7,8]")
    with pytest.raises(TrainingFailed, match="3 consecutive non-finite steps .* the last at step 8"):
        train(workspace["data"], aux_run.checkpoint_uri, config, "nan")
    runs = mlflow.search_runs(experiment_names=["upsr"], filter_string="tags.ray_run_name = 'nan'",
                              output_format="list")
    assert [run.info.status for run in runs] == ["FAILED"]
    assert "3 consecutive non-finite steps" in runs[0].data.tags["end_reason"]
    client = MlflowClient()
    run_id = runs[0].info.run_id
    assert [step for step, _ in losses(client, run_id)] == [1, 2, 4, 5]
    assert (5, 1.0) in losses(client, run_id, "nonfinite_steps")


def test_init_from_must_fit_the_configured_denoiser(tmp_path):
    from pipelines.train import train

    config = config_module.load(REPO / "configs" / "tiny.yaml")
    source = init_checkpoint(tmp_path / "start", config)
    wider = config_module.load(REPO / "configs" / "tiny.yaml", ["denoiser.model_channels=64"])
    with pytest.raises(UserError, match="its denoiser has model_channels = 32, the config says 64"):
        train(str(tmp_path / "no-data"), None, wider, "never", init_from=str(source))
    with pytest.raises(UserError, match="--init-from .*missing"):
        train(str(tmp_path / "no-data"), None, config, "never", init_from=str(tmp_path))


@pytest.mark.slow
def test_a_folder_without_manifest_is_refused(workspace, aux_run, tmp_path):
    from pipelines.train import train

    (tmp_path / "part-00000-000.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="_manifest.json"):
        train(str(tmp_path), aux_run.checkpoint_uri, workspace["config"](), "no-manifest")


def test_validation_split_is_deterministic_and_by_source():
    sources = [f"photo{i}.png" for i in range(20) for _ in range(3)]
    train, val = split_sources(sources, 0.2, seed=0)
    assert len(val) == 4 and not set(train) & set(val) and len(train) + len(val) == 20
    assert split_sources(list(reversed(sources)), 0.2, seed=0) == (train, val)
    assert split_sources(sources, 0.2, seed=1) != (train, val)
    assert split_sources(["a", "b"], 0.01, seed=0)[1] and split_sources(["a"], 0.5, seed=0) == (["a"], [])


def test_params_are_the_flat_config_with_secrets_redacted():
    from dataclasses import dataclass, field

    from pipelines.tracking import REDACTED, loggable_params

    @dataclass
    class Service:
        url: str = "http://example"
        api_token: str = "abc123"
        password: str | None = None

    @dataclass
    class Root:
        service: Service = field(default_factory=Service)
        lr: float = 1e-4

    params = loggable_params(Root())
    assert params == {"service.url": "http://example", "service.api_token": REDACTED, "service.password": "None",
                      "lr": "0.0001"}
    assert "train.lr" in loggable_params(config_module.Config())


def test_each_rank_restores_from_its_own_copy_of_a_remote_checkpoint(tmp_path):
    import pyarrow.fs
    from ray.train import Checkpoint

    from pipelines.training_loop import private_copy

    saved = tmp_path / "checkpoint_00000004"
    saved.mkdir()
    (saved / "training_state.pt").write_bytes(bytes(range(256)) * 64)
    # Any filesystem but the local one is downloaded, as from S3.
    remote = Checkpoint(saved.name, filesystem=pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem()))
    with remote.as_directory() as shared_0, remote.as_directory() as shared_1:
        assert shared_0 == shared_1  # Ray's copy is one per node, re-downloaded by a late reader
    with private_copy(remote) as rank_0, private_copy(remote) as rank_1:
        assert rank_0 != rank_1
        assert (rank_0 / "training_state.pt").read_bytes() == (rank_1 / "training_state.pt").read_bytes() \
            == (saved / "training_state.pt").read_bytes()
    assert not rank_0.exists() and not rank_1.exists()
    with private_copy(Checkpoint.from_directory(str(saved))) as in_place:
        assert in_place == saved


def test_git_commit_comes_from_the_checkout_else_from_the_environment(tmp_path, monkeypatch):
    from pipelines.tracking import git_commit

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    monkeypatch.setenv("UPSR_GIT_COMMIT", "0" * 40)
    assert git_commit(REPO) == head  # the checkout wins over a stale variable
    assert git_commit(tmp_path) == "0" * 40  # an uploaded working dir has no .git
    monkeypatch.delenv("UPSR_GIT_COMMIT")
    assert git_commit(tmp_path) is None


def test_aux_checkpoints_must_exist_and_match_the_configured_architecture(tmp_path, monkeypatch):
    import json as json_module

    from pipelines.train import resolve_aux
    from upsr.config_loader import to_dict

    config = config_module.load(REPO / "configs" / "tiny.yaml")
    with pytest.raises(UserError, match="no such file or folder"):
        resolve_aux(str(tmp_path / "missing"), config)
    with pytest.raises(UserError, match="holds no aux.safetensors"):
        resolve_aux(str(tmp_path), config)

    (tmp_path / "aux.safetensors").write_bytes(b"")
    (tmp_path / "aux_config.json").write_text(json_module.dumps(to_dict(config.aux)))
    resolved, weights = resolve_aux(str(tmp_path), config)
    assert weights == str(tmp_path / "aux.safetensors") and resolved.aux.weights == weights

    other = to_dict(config.aux) | {"options": {**config.aux.options, "num_feat": 8}}
    (tmp_path / "aux_config.json").write_text(json_module.dumps(other))
    with pytest.raises(UserError, match="aux.options"):
        resolve_aux(str(tmp_path), config)

    # A weights file given by a relative path is made absolute: Tune trials and Ray Train workers
    # run in other folders than the one the command was given in.
    monkeypatch.chdir(tmp_path.parent)
    resolved, weights = resolve_aux(f"{tmp_path.name}/aux.safetensors", config)
    assert weights == str(tmp_path / "aux.safetensors") == resolved.aux.weights


@pytest.mark.slow
def test_the_training_data_streams_and_only_materialized_data_reorders_blocks(workspace, capsys):
    """No all-to-all operator between the read and the workers, so an epoch's first batch does
    not wait for the whole epoch to decode (benchmarks/data_path.py measured it at 73-79 % of
    the epoch with the block shuffle); data decoded once may reorder its blocks."""
    def plan(*overrides: str) -> str:
        config = workspace["config"](*overrides)
        open_training_data(workspace["data"], config.train_data, config.storage).train.explain()
        return capsys.readouterr().out

    streamed = plan("train_data.materialize=false")  # the module's runs materialize their few crops
    assert "decode_pairs" in streamed and "RandomizeBlockOrder" not in streamed, streamed
    assert "RandomizeBlockOrder" in plan("train_data.materialize=true")


@pytest.mark.slow
def test_validation_crops_are_the_same_held_out_crops_in_every_run(workspace):
    data = open_training_data(workspace["data"], workspace["config"]().train_data, workspace["config"]().storage)
    dataset = open_dataset(workspace["data"])
    rows = pq.read_table(dataset.shard_paths).to_pylist()
    held_out = [decode_png(r["hr_png"]).tobytes() for r in rows if r["source"] in data.val_sources]
    assert data.val_sources and 2 < len(held_out) < len(rows)

    first = data.validation_pairs(2, 2)
    assert [hr.tobytes() for batch in first for hr in batch["hr"]] == held_out[:4]  # in the dataset's order
    assert first[0]["lr"].shape == (2, 32, 32, 3) and first[0]["hr"].shape == (2, 128, 128, 3)
    again = open_training_data(workspace["data"], workspace["config"]().train_data, workspace["config"]().storage)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again.validation_pairs(2, 2)) for k in ("lr", "hr"))
    assert sum(len(batch["hr"]) for batch in data.validation_pairs(10_000, 2)) == len(held_out)
    assert data.validation_pairs(0, 2) == []
    batches = validation_batches(data.validation_pairs(len(held_out), 2), torch.device("cpu"))
    assert [len(hr) for _, hr in batches] == [2] * (len(held_out) // 2) + [1] * (len(held_out) % 2)
    assert batches[0][1].dtype == torch.float32 and float(batches[0][1].max()) <= 1


@pytest.mark.slow
def test_validation_on_whole_photographs_degrades_each_held_out_photo_once(workspace):
    photos = workspace["root"] / "photos"
    settings = workspace["config"](f"train_data.val_photos={photos}").train_data
    data = open_training_data(workspace["data"], settings, workspace["config"]().storage)
    batches = data.validation_pairs(1, 4)  # whole photographs: every held-out one, whatever val_batches says
    assert len(batches) == len(data.val_sources) >= 1
    for batch in batches:
        # write_photos' 240x200 photographs: the largest centred square, a multiple of 64.
        assert batch["hr"].shape == (1, 192, 192, 3) and batch["lr"].shape == (1, 48, 48, 3)
    name = data.val_sources[0]
    photo = decode_png((photos / name).read_bytes())
    assert np.array_equal(batches[0]["hr"][0], photo[4:196, 24:216])
    again = open_training_data(workspace["data"], settings, workspace["config"]().storage).validation_pairs(1, 4)
    assert all(np.array_equal(a["lr"], b["lr"]) for a, b in zip(batches, again))
    smaller = workspace["config"](f"train_data.val_photos={photos}", "train_data.val_photo_side=128").train_data
    assert open_training_data(workspace["data"], smaller, workspace["config"]().storage).validation_pairs(
        1, 4)[0]["hr"].shape == (1, 128, 128, 3)

    elsewhere = workspace["config"](f"train_data.val_photos={workspace['root'] / 'no-photos'}").train_data
    with pytest.raises(UserError, match=r"train_data.val_photos: .*no-photos/photo\d.png does not exist"):
        open_training_data(workspace["data"], elsewhere, workspace["config"]().storage).validation_pairs(1, 4)


def test_the_run_page_is_a_server_link_or_the_mlflow_ui_command(tmp_path):
    from pipelines.config import MlflowConfig
    from pipelines.tracking import connect, run_page

    settings = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = connect(settings)
    run_id = MlflowClient().create_run(experiment_id).info.run_id
    assert run_page(settings, run_id) == (f"`mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}`, "
                                          f"then http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}")


def test_a_plateau_is_so_many_validations_without_a_gain_above_min_delta():
    from pipelines.config import PlateauConfig
    from pipelines.training_loop import LoopState, plateau_reached

    plateau = PlateauConfig(metric="val_gain", patience=2, min_delta=0.1)
    state = LoopState()
    decisions = [plateau_reached(plateau, state, {"val_gain": value}, step)
                 for step, value in zip((10, 20, 30, 40, 50), (1.0, 1.05, 1.2, 1.25, 1.28))]
    # 1.05 is within min_delta of 1.0; 1.2 beats it; 1.25 and 1.28 are within 0.1 of 1.2.
    assert decisions == [False, False, False, False, True]
    assert (state.plateau_best, state.plateau_best_step) == (1.2, 30)
    lower = PlateauConfig(metric="val_lpips", mode="min", patience=1)
    assert not plateau_reached(lower, LoopState(), {"val_lpips": 0.3}, 10)
    assert plateau_reached(lower, LoopState(plateau_best=0.2), {"val_lpips": 0.3}, 10)
    with pytest.raises(UserError, match="plateau.metric: 'val_gain' is not a validation metric .*val_psnr"):
        plateau_reached(plateau, LoopState(), {"val_psnr": 20.0}, 10)
