"""`upsr evaluate`: eval-set layouts, and batch evaluation on real Ray (2 CPUs) with MLflow on SQLite.

The model is the tiny one of configs/tiny.yaml with a randomised output conv; LPIPS runs on a
randomly initialised VGG trunk (no downloads here), and MUSIQ, where a test gives it weights, on
RANDOM weights (tests.support.write_random_iqa_weights): their values only show the wiring.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines import config as config_module
from cli.main import build_parser
from pipelines.errors import UserError
from pipelines.dataset import MANIFEST, SCHEMA_VERSION, SHARD_SCHEMA
from pipelines.eval_set import DATASET, LR_ONLY, PAIRS, open_eval_set
from pipelines.evaluate import METRICS, summary_uri
from pipelines.images import encode_png
from pipelines.registry import ModelRef
from tests.support import encode, photo, write_random_iqa_weights

REPO = Path(__file__).resolve().parent.parent


def write_image(path: Path, image: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(image, fmt))
    return path


# --- eval-set layouts (no Ray) ---


def test_pairs_match_by_relative_path_without_extension(tmp_path):
    write_image(tmp_path / "lr" / "city" / "a.png", photo(16, 16, 0))
    write_image(tmp_path / "hr" / "city" / "a.jpg", photo(64, 64, 0), "JPEG")
    write_image(tmp_path / "lr" / "b.png", photo(16, 16, 1))
    write_image(tmp_path / "hr" / "b.png", photo(64, 64, 1))
    (tmp_path / "lr" / "notes.txt").write_text("not an image: ignored")
    eval_set = open_eval_set(str(tmp_path))
    assert eval_set.layout == PAIRS and eval_set.has_reference
    assert eval_set.ids == ("b", "city/a")
    assert [Path(i.hr_path).name for i in eval_set.images] == ["b.png", "a.jpg"]


def test_unmatched_pairs_are_an_error_naming_them(tmp_path):
    write_image(tmp_path / "lr" / "a.png", photo(16, 16))
    write_image(tmp_path / "hr" / "a.png", photo(64, 64))
    write_image(tmp_path / "lr" / "only_lr.png", photo(16, 16))
    write_image(tmp_path / "hr" / "only_hr.png", photo(64, 64))
    with pytest.raises(UserError, match=r"2 image\(s\) without a partner.*hr/only_hr, lr/only_lr"):
        open_eval_set(str(tmp_path))


def test_lr_only_layouts(tmp_path):
    write_image(tmp_path / "flat" / "x.png", photo(16, 16))
    write_image(tmp_path / "flat" / "sub" / "y.webp", photo(16, 16), "WEBP")
    flat = open_eval_set(str(tmp_path / "flat"))
    assert (flat.layout, flat.ids, flat.has_reference) == (LR_ONLY, ("sub/y", "x"), False)
    write_image(tmp_path / "lr_folder" / "lr" / "z.png", photo(16, 16))
    assert open_eval_set(str(tmp_path / "lr_folder")).ids == ("z",)


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "no such folder"),
    (lambda root: write_image(root / "hr" / "a.png", photo(64, 64)), "hr/ folder without an lr/"),
    (lambda root: (root / "part-00000.parquet").write_bytes(b"PAR1"), "no _manifest.json"),
    (lambda root: (root / "readme.txt").write_text("hello"), "none of"),
    (lambda root: (write_image(root / "a.png", photo(16, 16)), write_image(root / "a.jpg", photo(16, 16), "JPEG")),
     "duplicate image id"),
])
def test_unusable_eval_sets_are_refused_with_a_reason(tmp_path, make, message):
    root = tmp_path / "eval"
    root.mkdir()
    make(root)
    with pytest.raises(UserError, match=message):
        open_eval_set(str(root))


def test_cli_parses_evaluate_and_promote():
    args = build_parser("evaluate").parse_args(["evaluate", "--model", "models:/upsr@champion", "--data", "d",
                                                "--set", "evaluate.num_actors=2"])
    assert (args.model, args.data, args.out) == ("models:/upsr@champion", "d", None)
    assert args.set == ["evaluate.num_actors=2"]
    args = build_parser("promote").parse_args(["promote", "--rollback"])
    assert args.rollback and args.candidate is None


# --- evaluation on Ray ---


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("evaluate")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)

    def make_config(*overrides: str):
        return config_module.load(REPO / "configs" / "tiny.yaml", [
            f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=evaluate-tests",
            f"evaluate.output_dir={root / 'evaluations'}", *overrides])

    return {"root": root, "config": make_config}


@pytest.fixture(scope="module")
def model(workspace, tiny_config):
    """The tiny checkpoint of conftest, built once for the module."""
    import torch

    from upsr.aux_net import build_aux_net, freeze
    from upsr.checkpoint import CheckpointConfig, save_checkpoint
    from upsr.denoiser import build_denoiser
    from upsr.diffusion import UNWDiffusion

    torch.manual_seed(0)
    denoiser = build_denoiser(tiny_config.denoiser)
    config = CheckpointConfig(denoiser=tiny_config.denoiser, aux=tiny_config.aux, diffusion=tiny_config.diffusion,
                              weight=tiny_config.weight, inference=tiny_config.inference)
    folder = save_checkpoint(workspace["root"] / "model", denoiser, freeze(build_aux_net(tiny_config.aux)),
                             UNWDiffusion.from_config(tiny_config.diffusion), config)
    return ModelRef(uri=str(folder), load_uri=str(folder))


def write_dataset(folder: Path, rows: list[dict]) -> None:
    """A dataset in the on-disk contract of pipelines.dataset (shards with SHARD_SCHEMA, the manifest
    last), as `upsr synth` writes it; test_cluster evaluates one that synth really made."""
    folder.mkdir(parents=True)
    shard = pa.Table.from_pylist([{"source": row["id"].split("#")[0], "crop": {"x": 0, "y": 0, "w": 128, "h": 128},
                                   "seed": index, "degradation": "{}", **row} for index, row in enumerate(rows)],
                                 schema=SHARD_SCHEMA)
    pq.write_table(shard, folder / "part-00000-000.parquet")
    manifest = {"schema_version": SCHEMA_VERSION, "shards": [{"file": "part-00000-000.parquet", "rows": len(rows)}],
                "counts": {"rows": len(rows)}, "columns": SHARD_SCHEMA.names,
                "config": config_module.public_dict(config_module.Config())}
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
def test_dataset_and_pairs_folder_give_identical_per_image_metrics(workspace, model):
    from pipelines.evaluate import evaluate

    root = workspace["root"]
    rows = []
    for index in range(4):  # synth's ids ("<source>#<crop>"), HR 128x128 and a 32x32 LR
        hr = photo(128, 128, 20 + index)
        lr = np.asarray(Image.fromarray(hr).resize((32, 32), Image.BICUBIC))
        rows.append({"id": f"photo{index // 2}.png#{index % 2}", "hr_png": encode_png(hr, 1),
                     "lr_png": encode_png(lr, 1)})
    data = root / "data"
    write_dataset(data, rows)
    pairs = root / "pairs"
    (pairs / "lr").mkdir(parents=True)
    (pairs / "hr").mkdir()
    for row in rows:  # the same bytes, named by id ("photo0.png#1" -> lr/photo0.png#1.png)
        (pairs / "lr" / f"{row['id']}.png").write_bytes(row["lr_png"])
        (pairs / "hr" / f"{row['id']}.png").write_bytes(row["hr_png"])

    from_dataset_set, from_pairs_set = open_eval_set(str(data)), open_eval_set(str(pairs))
    assert (from_dataset_set.layout, from_pairs_set.layout) == (DATASET, PAIRS)
    # One actor taking 4 images per call against two half-CPU actors taking one each.
    from_dataset = evaluate(model, from_dataset_set, workspace["config"]("evaluate.side_by_side=3"),
                            str(root / "out" / "dataset.parquet"))
    from_pairs = evaluate(model, from_pairs_set, workspace["config"](
        "evaluate.num_actors=2", "evaluate.actor_cpus=0.5", "evaluate.batch_size=1"),
        str(root / "out" / "pairs.parquet"))

    assert from_dataset.complete and from_pairs.complete
    ids = sorted(row["id"] for row in rows)
    assert from_dataset.table["id"].to_pylist() == from_pairs.table["id"].to_pylist() == ids
    for column in ("psnr", "ssim", "lpips", "lr_consistency", "seed", "lr_sha256", "hr_sha256", "lr_width"):
        assert from_dataset.table[column].to_pylist() == from_pairs.table[column].to_pylist(), column
    assert all(v is not None and np.isfinite(v) for v in from_dataset.table["psnr"].to_pylist())
    assert len(set(from_dataset.table["seed"].to_pylist())) == 4
    # 128x128 SR images are below NIQE's 192x192: recorded as not computable, not as a failure.
    assert from_dataset.table["niqe"].null_count == 4
    assert from_dataset.set_hash == from_pairs.set_hash == from_dataset_set.content_hash()

    # The files: the table as returned, the summary beside it.
    stored = pq.read_table(root / "out" / "dataset.parquet")
    assert stored.equals(from_dataset.table)
    summary = json.loads(Path(summary_uri(str(root / "out" / "dataset.parquet"))).read_text())
    assert summary["complete"] and summary["eval_set"] == {
        "uri": str(data), "layout": DATASET, "images": 4, "with_reference": True, "hash": from_dataset.set_hash}
    psnr = from_dataset.table["psnr"].to_numpy()
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(psnr.mean())
    assert summary["metrics"]["psnr"]["std"] == pytest.approx(psnr.std(ddof=1))
    assert summary["metrics"]["psnr"]["count"] == 4 and summary["metrics"]["lpips"]["higher_is_better"] is False
    assert "randomly initialised" in summary["lpips"]
    assert "musiq" in summary["not_computed"] and "niqe" in summary["not_computed"]

    # The MLflow run: aggregates, tags for promote, the table, the summary and three side-by-sides.
    client = MlflowClient()
    run = client.get_run(from_dataset.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["psnr_mean"] == pytest.approx(psnr.mean())
    assert run.data.metrics["images"] == 4 and run.data.metrics["failed_images"] == 0
    tags = run.data.tags
    assert tags["upsr.eval.set_hash"] == from_dataset.set_hash and tags["upsr.eval.complete"] == "true"
    assert tags["upsr.eval.model_uri"] == model.load_uri and tags["upsr.eval.lpips"] == "random"
    assert run.data.params["eval_layout"] == DATASET
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [from_dataset.set_hash[:36]]
    panels = sorted(a.path for a in client.list_artifacts(run.info.run_id, "side_by_side"))
    assert panels == [f"side_by_side/{i.replace('#', '_')}.png" for i in ids[:3]]
    panel = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=panels[0],
                                                dst_path=str(root / "panel"))
    assert np.asarray(Image.open(panel)).shape == (128, 3 * 128, 3)  # LR bicubic | SR | HR
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == {
        "evaluation/metrics.parquet", "evaluation/summary.json"}


@pytest.mark.slow
def test_lr_only_set_gets_no_reference_metrics_and_a_corrupt_file_makes_it_partial(workspace, model, caplog):
    from pipelines.evaluate import add_arguments, run

    folder = workspace["root"] / "lr_only"
    write_image(folder / "small.png", photo(20, 28, 3))
    write_image(folder / "tiled.png", photo(72, 80, 4))  # above the tiny config's 64-pixel tile: tiled
    (folder / "truncated.png").write_bytes(encode(photo(16, 16, 6), "PNG")[:60])
    out = workspace["root"] / "lr_only.parquet"
    # RANDOM MUSIQ weights (not the paper's): MUSIQ is computed, CLIPIQA and MANIQA have no weights.
    weights = write_random_iqa_weights(workspace["root"] / "iqa", ("musiq",))
    config_file = workspace["root"] / "evaluate.yaml"
    config_file.write_text(config_module.to_yaml(workspace["config"](f"evaluate.iqa_weights_dir={weights}")))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    status = run(parser.parse_args(["--model", model.uri, "--data", str(folder), "--out", str(out),
                                    "--config", str(config_file)]))

    assert status == 1  # partial: one image failed
    rows = {row["id"]: row for row in pq.read_table(out).to_pylist()}
    assert sorted(rows) == ["small", "tiled", "truncated"]
    assert [(rows[i]["lr_width"], rows[i]["lr_height"]) for i in ("small", "tiled")] == [(28, 20), (80, 72)]
    for row in (rows["small"], rows["tiled"]):
        assert row["error"] is None
        assert row["psnr"] is row["ssim"] is row["lpips"] is row["hr_sha256"] is None
        assert 10 < row["lr_consistency"] < 100
        assert np.isfinite(row["musiq"]) and row["clipiqa"] is row["maniqa"] is None
    assert rows["small"]["niqe"] is None  # a 112x80 SR image is below NIQE's 192 pixels
    assert np.isfinite(rows["tiled"]["niqe"])
    assert "truncated" in rows["truncated"]["error"] or "decodable" in rows["truncated"]["error"]
    assert all(rows["truncated"][name] is None for name in METRICS)

    summary = json.loads(Path(summary_uri(str(out))).read_text())
    assert not summary["complete"] and summary["failed_images"] == 1 and summary["eval_set"]["hash"] is None
    assert summary["eval_set"]["with_reference"] is False
    assert set(summary["metrics"]) == {"lr_consistency", "niqe", "musiq"}
    assert summary["metrics"]["niqe"]["count"] == 1
    assert summary["metrics"]["musiq"]["count"] == 2 and summary["metrics"]["niqe"]["higher_is_better"] is False
    assert all("HR reference" in summary["not_computed"][name] for name in ("psnr", "ssim", "lpips"))
    assert summary["not_computed"]["clipiqa"] == f"weights not found at {weights / 'RN50.pt'}"
    assert summary["not_computed"]["maniqa"].startswith(f"weights not found at {weights / 'ckpt_koniq10k.pt'}")
    assert "musiq_koniq_ckpt-e95806b9.pth (sha256 " in summary["no_reference_weights"]["musiq"]
    assert "basicsr" in summary["no_reference_weights"]["niqe"]  # no niqe_modelparameters.mat there
    run_info = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run_info.info.status == "FAILED" and run_info.data.tags["upsr.eval.complete"] == "false"
    assert "upsr.eval.set_hash" not in run_info.data.tags  # never found as a reusable evaluation
    assert run_info.data.metrics["musiq_mean"] == pytest.approx(summary["metrics"]["musiq"]["mean"])
    assert any("1 image(s) failed: truncated" in record.getMessage() for record in caplog.records)
