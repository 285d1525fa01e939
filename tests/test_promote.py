"""`upsr promote` on real Ray (2 CPUs) and a real MLflow registry on SQLite.

Two constructed tiny models make the comparison unambiguous without training: a *flat* one
whose output conv is zero (every SR image is mid-grey: poor, but close to the photographs'
mean) and a *broken* one whose output conv is randomised with a large std (saturated noise,
far worse on every image). LPIPS is off (no VGG16 weights, no random trunk) and PSNR decides.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines import config as config_module
from pipelines.errors import UserError
from tests.support import encode, photo

REPO = Path(__file__).resolve().parent.parent
MODEL = "upsr-promote-tests"


# --- the decision rule (no Ray) ---


@pytest.mark.parametrize("mean, low, high, margin, promoted, words", [
    (0.5, 0.2, 0.8, 0.0, True, "excludes zero"),
    (0.5, -0.1, 1.1, 0.0, False, "does not exclude zero"),
    (0.5, 0.2, 0.8, 0.5, False, "does not exceed the margin 0.5"),
    (0.6, 0.2, 0.9, 0.5, True, "exceeds the margin 0.5"),
    (-0.4, -0.7, -0.1, 0.0, False, "does not exceed the margin"),
])
def test_decide_needs_the_margin_and_an_interval_above_zero(mean, low, high, margin, promoted, words):
    from pipelines.config import PromoteConfig
    from pipelines.promote import decide
    from upsr.stats import PairedComparison

    comparison = PairedComparison(mean, low, high, confidence=0.95, count=10, samples=1000)
    wins, reason = decide(comparison, PromoteConfig(margin=margin))
    assert wins is promoted and words in reason and "95% CI" in reason


def test_paired_scores_refuse_evaluations_of_different_images():
    import pyarrow as pa

    from pipelines.promote import paired_scores

    def table(ids, hr="h", psnr=20.0):
        return pa.Table.from_pylist([{"id": i, "lr_sha256": "l", "hr_sha256": hr, "psnr": psnr} for i in ids])

    candidate, champion = paired_scores(table(["b", "a"], psnr=21.0), table(["a", "b"]), "psnr")
    assert candidate.tolist() == [21.0, 21.0] and champion.tolist() == [20.0, 20.0]
    with pytest.raises(ValueError, match=r"2 image id\(s\) appear in only one evaluation: b, c"):
        paired_scores(table(["a", "b"]), table(["a", "c"]), "psnr")
    with pytest.raises(ValueError, match="differ in content"):
        paired_scores(table(["a"], hr="x"), table(["a"]), "psnr")
    with pytest.raises(ValueError, match="have no psnr"):
        paired_scores(table(["a"], psnr=None), table(["a"]), "psnr")


# --- the registry on Ray and MLflow ---


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_local, tiny_config):
    root = tmp_path_factory.mktemp("promote")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    config_file = root / "promote.yaml"
    config = config_module.load(REPO / "configs" / "tiny.yaml", [
        f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=promote-tests", f"mlflow.registered_model={MODEL}",
        "loss.allow_random_backbone=false", f"loss.lpips_backbone={root / 'no-vgg16.pth'}",
        "evaluate.side_by_side=1", "evaluate.batch_size=4", f"evaluate.output_dir={root / 'evaluations'}",
        "promote.bootstrap_samples=2000"])
    config_file.write_text(config_module.to_yaml(config))

    eval_set = root / "eval"
    for index in range(6):
        hr = photo(128, 128, 10 + index)
        (eval_set / "hr").mkdir(parents=True, exist_ok=True)
        (eval_set / "lr").mkdir(parents=True, exist_ok=True)
        (eval_set / "hr" / f"img{index}.png").write_bytes(encode(hr, "PNG"))
        lr = np.asarray(Image.fromarray(hr).resize((32, 32), Image.BICUBIC))
        (eval_set / "lr" / f"img{index}.png").write_bytes(encode(lr, "PNG"))
    from pipelines.tracking import connect

    experiment = connect(config.mlflow)  # artifacts beside the database, not under the working folder
    return {"root": root, "config": config, "config_file": config_file, "eval": eval_set,
            "experiment": experiment}


def register(workspace, tiny_config, kind: str) -> str:
    """Save a tiny checkpoint of the given kind, log it from a fresh run and register it (@challenger)."""
    import torch

    from pipelines.registry import log_and_register_model
    from upsr.aux_net import build_aux_net, freeze
    from upsr.checkpoint import WEIGHTS_FILE, CheckpointConfig, save_checkpoint
    from upsr.denoiser import build_denoiser
    from upsr.diffusion import UNWDiffusion

    torch.manual_seed(0)
    denoiser = build_denoiser(tiny_config.denoiser)
    with torch.no_grad():
        if kind == "broken":
            torch.nn.init.normal_(denoiser.conv_last.weight, std=1.0)
            torch.nn.init.normal_(denoiser.conv_last.bias, std=1.0)
        else:  # "flat": a zero output conv gives x0_hat = 0, every SR pixel mid-grey
            torch.nn.init.zeros_(denoiser.conv_last.weight)
            torch.nn.init.zeros_(denoiser.conv_last.bias)
    folder = workspace["root"] / f"checkpoint-{kind}-{len(list(workspace['root'].glob('checkpoint-*')))}"
    save_checkpoint(folder, denoiser, freeze(build_aux_net(tiny_config.aux)),
                    UNWDiffusion.from_config(tiny_config.diffusion),
                    CheckpointConfig(denoiser=tiny_config.denoiser, aux=tiny_config.aux,
                                     diffusion=tiny_config.diffusion, weight=tiny_config.weight,
                                     inference=tiny_config.inference))
    if kind == "unloadable":  # the weights no longer match the checksum written beside them
        weights = folder / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:-16])
    run_id = MlflowClient().create_run(workspace["experiment"], run_name=kind).info.run_id
    return str(log_and_register_model(workspace["config"].mlflow, run_id, folder))


def promote(workspace, *arguments: str, eval_set: Path | None = None) -> int:
    from pipelines.promote import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    if "--rollback" not in arguments:
        arguments = ("--candidate", f"models:/{MODEL}@challenger", "--eval", str(eval_set or workspace["eval"]),
                     *arguments)
    return run(parser.parse_args([*arguments, "--config", str(workspace["config_file"])]))


def champion() -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(MODEL, "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


def promote_tags(version: str) -> dict[str, str]:
    tags = MlflowClient().get_model_version(MODEL, version).tags
    return {key[len("upsr.promote."):]: value for key, value in tags.items() if key.startswith("upsr.promote.")}


@pytest.mark.slow
def test_promotion_lifecycle(workspace, tiny_config, caplog):
    caplog.set_level(logging.INFO)

    # 1. The first model becomes champion, after an evaluation that proves it runs.
    broken = register(workspace, tiny_config, "broken")
    assert promote(workspace) == 0
    assert champion() == broken
    tags = promote_tags(broken)
    assert tags["decision"] == "promoted" and "first champion" in tags["reason"]
    assert tags["champion_version"] == "none" and "previous_champion" not in tags
    first_hash = tags["eval_set_hash"]
    assert len(first_hash) == 64 and float(tags["candidate_mean"]) > 0
    # The evaluation's aggregates are linked to the version's logged model (MLflow 3).
    source = MlflowClient().get_model_version(MODEL, broken).source
    linked = {m.key: m.value for m in MlflowClient().get_logged_model(source.removeprefix("models:/")).metrics}
    assert linked["psnr_mean"] == pytest.approx(float(tags["candidate_mean"])) and linked["images"] == 6

    # 2. A clearly better model (flat grey beats saturated noise on every image) takes over; the
    #    champion's stored evaluation is reused instead of running the model again.
    caplog.clear()
    flat = register(workspace, tiny_config, "flat")
    assert promote(workspace) == 0
    assert champion() == flat
    tags = promote_tags(flat)
    assert tags["decision"] == "promoted" and tags["previous_champion"] == broken
    assert (tags["candidate_version"], tags["champion_version"], tags["role"]) == (flat, broken, "candidate")
    assert float(tags["ci_low"]) > 0 and float(tags["mean_difference"]) > 1.0
    assert float(tags["mean_difference"]) == pytest.approx(float(tags["candidate_mean"]) - float(tags["champion_mean"]))
    assert tags["images"] == "6" and tags["primary_metric"] == "psnr" and tags["eval_set_hash"] == first_hash
    old = promote_tags(broken)
    assert old["role"] == "champion" and old["decision"] == "promoted" and old["candidate_version"] == flat
    assert any("reusing evaluation run" in r.getMessage() and f"v{broken}:" in r.getMessage() for r in caplog.records)
    assert any("PROMOTED" in r.getMessage() for r in caplog.records)

    # 3. A worse challenger leaves the champion in place, and says why.
    caplog.clear()
    worse = register(workspace, tiny_config, "broken")
    assert promote(workspace) == 0
    assert champion() == flat
    tags = promote_tags(worse)
    assert tags["decision"] == "kept" and "does not exceed the margin" in tags["reason"]
    assert float(tags["mean_difference"]) < 0 and float(tags["ci_high"]) < 0
    assert "previous_champion" not in tags
    assert promote_tags(flat)["decision"] == "kept" and promote_tags(flat)["role"] == "champion"
    assert tags["decided_at"] == promote_tags(flat)["decided_at"]
    assert any("reusing evaluation run" in r.getMessage() and f"v{flat}:" in r.getMessage() for r in caplog.records)
    assert any("KEPT" in r.getMessage() for r in caplog.records)

    # 4. A candidate that cannot even load fails its evaluation: exit 1, aliases untouched. (A
    #    partial evaluation, e.g. a corrupt image, takes the same path: test_evaluate shows it.)
    caplog.clear()
    unloadable = register(workspace, tiny_config, "unloadable")
    assert promote(workspace) == 1
    assert champion() == flat
    assert str(MlflowClient().get_model_version_by_alias(MODEL, "challenger").version) == unloadable
    tags = promote_tags(unloadable)
    assert tags["decision"] == "evaluation_failed" and "does not match the checksum" in tags["reason"]
    assert promote_tags(flat)["decision"] == "evaluation_failed" and promote_tags(flat)["role"] == "champion"

    # 5. Rollback returns the alias to the champion that the current one replaced, and tags both.
    assert promote(workspace, "--rollback") == 0
    assert champion() == broken
    assert promote_tags(flat)["decision"] == "rolled_back" and promote_tags(broken)["decision"] == "restored"
    with pytest.raises(UserError, match="nothing to roll back to"):
        promote(workspace, "--rollback")
    assert champion() == broken

    # 6. Another promotion moves the alias while this one compares: this one changes nothing.
    from pipelines import promote as promote_module

    compare_with_stored = promote_module.evaluation_of

    def concurrent_promotion(model, *args):
        MlflowClient().set_registered_model_alias(MODEL, "champion", worse)
        return compare_with_stored(model, *args)

    tags_before = promote_tags(flat)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(promote_module, "evaluation_of", concurrent_promotion)
        with pytest.raises(UserError, match=f"moved to v{worse} while .* was compared with .*v{broken}"):
            promote(workspace, "--candidate", f"models:/{MODEL}/{flat}")
    assert champion() == worse and promote_tags(flat) == tags_before


@pytest.mark.slow
def test_a_registered_model_is_served_from_the_registry_alone(workspace, tiny_config, tmp_path):
    """`mlflow models serve -m models:/...` answers an upscale request: the model carries its code
    (upsr and the basicsr shim, as code_paths), pinned requirements that a package index has (not
    this project), a signature and an input example."""
    import json
    import os
    import signal
    import subprocess
    import urllib.request

    from tests.support import VENV_BIN, free_port, wait_for

    version = register(workspace, tiny_config, "flat")
    uri = f"models:/{MODEL}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "model")))
    assert (local / "code" / "upsr" / "inference.py").is_file() and (local / "code" / "basicsr_compat.py").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    assert not any(line.startswith("upsr-ray") for line in requirements)
    assert any(line.startswith("torch==") for line in requirements)
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": (-1, -1, 3)}}]
    assert (local / "input_example.json").is_file()

    port = free_port()
    environment = {**os.environ, "MLFLOW_TRACKING_URI": workspace["config"].mlflow.tracking_uri,
                   # `mlflow models serve` starts uvicorn by name, from PATH.
                   "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=environment, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def answers() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200
        except OSError:
            return False

    try:
        # ~30 s alone on 2 CPUs (torch and the model load in the server); far more beside other jobs.
        wait_for(answers, "the model server", server, timeout=600)
        image = photo(16, 20, 3)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"inputs": image.tolist()}).encode())
        predictions = np.asarray(json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    # x4, and the "flat" model's x0 = 0 is mid-grey everywhere.
    assert predictions.shape == (64, 80, 3) and np.abs(predictions - 128).max() <= 8
