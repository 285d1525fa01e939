"""`upsr tune`: the search space and objective (unit tests), and searches on real Ray Tune over
Ray Train with MLflow on a SQLite file (end-to-end tests, tiny networks on 64x64 crops).

The end-to-end searches use a randomly initialised aux net saved as a weights file (the
search machinery does not depend on how good g is) and LPIPS on a random VGG trunk (no
downloads here).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import scipy.stats
from mlflow.tracking import MlflowClient
from PIL import Image

from cli import config as root_config
from pipelines import config as config_module
from tests.support import write_photos
from tune.config import TuneConfig
from upsr.config_loader import ConfigError

REPO = Path(__file__).resolve().parent.parent
TUNE_TINY = REPO / "configs" / "tune_tiny.yaml"
BASE_OVERRIDES = ["synth.crop_size=64"]


def tiny_tune(*overrides: str):
    return root_config.load(TUNE_TINY, list(overrides))


# --- the search space, variants and objective (no Ray) ---------------------------------------


def test_search_space_of_the_tiny_config_becomes_ray_tune_dimensions():
    from ray.tune.search.sample import Categorical, Float

    from tune.space import check_space, param_space

    config = tiny_tune()
    check_space(config.jobs(), config.tune)
    space = param_space(config.tune)
    assert set(space) == {"values"}
    values = space["values"]
    tau = values["weight.tau"]
    assert isinstance(tau, Float) and (tau.lower, tau.upper) == (0.02, 0.5)
    assert isinstance(tau.get_sampler(), Float._LogUniform)
    assert isinstance(values["weight.floor"].get_sampler(), Float._Uniform)
    assert isinstance(values["weight.family"], Categorical)
    assert values["weight.family"].categories == ["linear", "power", "logistic"]
    assert values["diffusion.steps"].categories == [4, 5, 6]


def test_optuna_proposes_points_inside_the_space_that_make_valid_configs():
    from tune.search import search_algorithm
    from tune.trial import OBJECTIVE
    from tune.space import param_space, trial_config

    config = tiny_tune()
    searcher = search_algorithm(config.tune, max_concurrent=6)
    assert searcher.set_search_properties(OBJECTIVE, "max", param_space(config.tune))
    points = [searcher.suggest(f"t{index}") for index in range(6)]
    for point in points:
        values = point["values"]
        assert 0.02 <= values["weight.tau"] <= 0.5 and 0.2 <= values["weight.floor"] <= 0.8
        assert values["weight.family"] in ("linear", "power", "logistic") and values["diffusion.steps"] in (4, 5, 6)
        trial = trial_config(config.jobs(), config.tune, point, "trial")
        assert trial.weight.tau == values["weight.tau"] and trial.diffusion.steps == values["diffusion.steps"]
    assert len({p["values"]["weight.tau"] for p in points}) == 6


@pytest.mark.parametrize("overrides, message", [
    (["tune.search_space={weight.taux: {uniform: [0.1, 0.2]}}"], r"unknown key weight\.taux"),
    (["tune.search_space={wieght.tau: {uniform: [0.1, 0.2]}}"], r"wieght\.tau cannot be searched"),
    (["tune.search_space={synth.crop_size: {choice: [64, 128]}}"], r"synth\.crop_size cannot be searched"),
    (["tune.search_space={diffusion.steps: {uniform: [3, 6]}}"], r"diffusion\.steps = 3\.0.*expected an integer"),
    (["tune.search_space={weight.family: {choice: [linear, cubic]}}"],
     r"weight\.family = 'cubic'.*unknown noise-weight family"),
    (["tune.search_space={weight.floor: {uniform: [0.5, 1.5]}}"], r"weight\.floor = 1\.5.*floor must be in \[0, 1\]"),
    (["tune.search_space={}", "tune.search_algorithm=random",
      "tune.variants={arm: {options: {base: {denoiser.use_sr_conditon: false}}}}"],
     r"variants\.arm\.base.*unknown key denoiser\.use_sr_conditon"),
    (["tune.search_space={weight.tau: {uniform: [0.1, 0.2]}}", "tune.search_algorithm=random",
      "tune.variants={arm: {options: {base: {weight.tau: 0.0}}}}"], r"weight\.tau is also in search_space"),
    (["train.validate_every=8"], r"validate_every \(8\) must equal train\.checkpoint_every \(4\)"),
    (["train.val_batches=0"], r"val_batches must be >= 1"),
])
def test_search_space_errors_name_the_key_before_any_trial(overrides, message):
    from tune.space import check_space

    with pytest.raises(ConfigError, match=message):
        config = tiny_tune(*overrides)
        check_space(config.jobs(), config.tune)


@pytest.mark.parametrize("overrides, message", [
    (["tune.search_space={weight.tau: {normal: [0.1, 0.2]}}"], r"unknown key tune\.search_space\.weight\.tau\.normal"),
    (["tune.search_space={weight.tau: {uniform: [0.1, 0.2], choice: [0.1]}}"], r"weight\.tau: give exactly one"),
    (["tune.search_space={weight.tau: {loguniform: [0, 0.2]}}"], r"0 < low < high"),
    (["tune.search_space={weight.tau: {uniform: [0.3, 0.2]}}"], r"low < high"),
    (["tune.search_space={weight.tau: {grid: [0.1, 0.2]}}"],
     r"weight\.tau: grid is not supported by search_algorithm optuna"),
    (["tune.search_algorithm=grid"], r"weight\.family: search_algorithm grid runs grids only, got choice"),
    (["tune.objective={val_psnr: 1, val_fid: 1}"], r"objective: unknown metric 'val_fid'"),
    (["tune.objective={}"], r"objective needs at least one"),
    (["tune.search_space={tau: {uniform: [0.1, 0.2]}}"], r"'tau' is not a dotted config key"),
    (["tune.scheduler=hyperband"], r"tune\.scheduler: 'hyperband' is not one of"),
])
def test_tune_section_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_tune(*overrides)


def test_variants_set_several_keys_and_the_objective_is_explicit():
    from tune.space import trial_config, trial_overrides

    config = root_config.load(REPO / "configs" / "ablation.yaml")
    settings = config.tune
    point = {"values": {"train.seed": 2}, "variants": {"arm": "baseline"}}
    assert trial_overrides(settings, point) == {"weight.tau": 0.0, "denoiser.use_sr_condition": False,
                                                "train.seed": 2}
    baseline = trial_config(config.jobs(), settings, point, "trial")
    assert baseline.weight.tau == 0.0 and baseline.denoiser.use_sr_condition is False and baseline.train.seed == 2
    both = trial_config(config.jobs(), settings, {"values": {"train.seed": 0}, "variants": {"arm": "both"}}, "trial")
    assert both.weight.tau == config.weight.tau > 0 and both.denoiser.use_sr_condition is True

    tiny = TuneConfig(objective={"val_psnr": 1.0, "val_lpips": -20.0})
    assert tiny.describe_objective() == "max 1*val_psnr - 20*val_lpips"
    assert tiny.objective_value({"val_psnr": 25.0, "val_lpips": 0.25, "val_ssim": 0.7}) == pytest.approx(20.0)
    assert tiny.objective_value({"val_psnr": 25.0}) is None
    assert TuneConfig(objective={"val_lpips": 1.0}, mode="min").describe_objective() == "min 1*val_lpips"


@pytest.mark.parametrize("name", ["ablation.yaml", "ablation_gpu.yaml"])
def test_ablation_config_is_four_arms_times_three_seeds_on_equal_terms(name):
    from ray.tune.search.variant_generator import generate_variants

    from tune.space import check_space, param_space, trial_config

    config = root_config.load(REPO / "configs" / name)
    assert config.tune.variants["arm"].expected_order == ["both", "condition", "unw", "baseline"]
    check_space(config.jobs(), config.tune)
    points = [point for _, point in generate_variants(param_space(config.tune))]
    assert len(points) == 12
    arms = {}
    for point in points:
        trial = trial_config(config.jobs(), config.tune, point, "trial")
        arms.setdefault(point["variants"]["arm"], []).append(trial)
    assert list(arms) == ["baseline", "unw", "condition", "both"]
    flags = {name: {(t.weight.tau > 0, t.denoiser.use_sr_condition) for t in trials} for name, trials in arms.items()}
    assert flags == {"baseline": {(False, False)}, "unw": {(True, False)}, "condition": {(False, True)},
                     "both": {(True, True)}}
    for trials in arms.values():
        assert sorted(t.train.seed for t in trials) == [0, 1, 2]
        # Equal steps, data and everything else: only the arm's keys and the seed differ.
        for trial in trials:
            assert (trial.train.steps, trial.train_data, trial.diffusion, trial.loss) == (
                config.train.steps, config.train_data, config.diffusion, config.loss)


def test_the_search_configs_are_valid_searches():
    from tune.space import check_space

    for name in ("tune.yaml", "tune_tiny.yaml", "ablation.yaml", "ablation_gpu.yaml"):
        config = root_config.load(REPO / "configs" / name)
        check_space(config.jobs(), config.tune)


def test_concurrent_trials_follow_the_cluster_and_the_per_trial_resources():
    from pipelines.config import TrainConfig
    from tune.search import concurrent_trials

    settings = TuneConfig(data_cpus=1.0, driver_cpus=0.01)
    one_worker = TrainConfig(num_workers=1, cpus_per_worker=0.45, use_gpu=False)
    assert concurrent_trials(settings, one_worker, {"CPU": 2.0}) == 2
    assert concurrent_trials(settings, TrainConfig(num_workers=1, cpus_per_worker=0.5, use_gpu=False),
                             {"CPU": 2.0}) == 1
    assert concurrent_trials(settings, TrainConfig(num_workers=2, cpus_per_worker=1.0, use_gpu=True),
                             {"CPU": 64.0, "GPU": 8.0}) == 4
    assert concurrent_trials(settings, one_worker, {"CPU": 1.0}) == 1
    # A quarter of a GPU per worker: four one-worker trials share one GPU (CPUs would allow 7).
    shared_gpu = TrainConfig(num_workers=1, cpus_per_worker=2.0, use_gpu=True, gpus_per_worker=0.25)
    assert concurrent_trials(settings, shared_gpu, {"CPU": 16.0, "GPU": 1.0}) == 4
    # The GPU twin of the ablation runs its twelve trials four at a time on one 16-CPU GPU machine.
    gpu_twin = root_config.load(REPO / "configs" / "ablation_gpu.yaml")
    assert concurrent_trials(gpu_twin.tune, gpu_twin.train, {"CPU": 16.0, "GPU": 1.0}) == 4
    assert concurrent_trials(TuneConfig(max_concurrent_trials=3), one_worker, {"CPU": 2.0}) == 3


def test_exit_status_and_best_trial_follow_the_outcomes():
    """`upsr tune` exits 1 only when no trial produced a score; the best trial follows the mode,
    among the completed trials, and among those stopped early only when none completed."""
    from tune.search import COMPLETED, FAILED, STOPPED_EARLY, SearchOutcome, TrialSummary, best_trial

    def trial(name: str, outcome: str, objective: float | None = None) -> TrialSummary:
        metrics = {} if objective is None else {"objective": objective}
        return TrialSummary(name, outcome, {}, {}, metrics, step=None, reports=0)

    failed = [trial("a", FAILED), trial("b", FAILED)]
    assert not SearchOutcome("s", "run", "storage", failed, None, None).succeeded
    mixed = [*failed, trial("c", STOPPED_EARLY, 3.0), trial("d", COMPLETED, 2.0), trial("e", COMPLETED, float("nan"))]
    assert SearchOutcome("s", "run", "storage", mixed, None, None).succeeded
    assert best_trial(mixed, TuneConfig(mode="max")).trial_id == "d"
    assert best_trial([*mixed, trial("f", COMPLETED, 1.0)], TuneConfig(mode="min")).trial_id == "f"
    stopped = [trial("c", STOPPED_EARLY, 3.0), trial("g", STOPPED_EARLY, 4.0), trial("e", COMPLETED, float("nan"))]
    assert best_trial(stopped, TuneConfig(mode="max")).trial_id == "g"
    assert best_trial(stopped, TuneConfig(mode="min")).trial_id == "c"
    assert best_trial(failed, TuneConfig()) is None


# --- searches on real Ray and MLflow ---------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_local):
    import torch
    from safetensors.torch import save_file

    from pipelines.synth import synthesize
    from upsr.aux_net import build_aux_net

    root = tmp_path_factory.mktemp("tune")
    photos = write_photos(root / "photos")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"

    def make_config(*overrides: str):
        return tiny_tune(*BASE_OVERRIDES, f"mlflow.tracking_uri={tracking_uri}", f"train.storage_path={root / 'ray'}",
                         f"tune.best_config_path={root / 'best_config.yaml'}", *overrides)

    data = root / "data"
    synthesize(str(photos), str(data), make_config())
    torch.manual_seed(0)
    aux = root / "aux.safetensors"
    save_file(build_aux_net(make_config().aux).net.state_dict(), str(aux))
    mlflow.set_tracking_uri(tracking_uri)
    return {"root": root, "data": str(data), "aux": str(aux), "tracking_uri": tracking_uri, "config": make_config}


def live_placement_groups(ignore: set[str] = frozenset(), wait_s: float = 20.0) -> list[dict]:
    """Placement groups (other than ``ignore``) still holding resources, after giving removals
    ``wait_s`` to land."""
    from ray.util import placement_group_table

    deadline = time.monotonic() + wait_s
    while True:
        live = [pg for pg in placement_group_table().values()
                if pg["state"] != "REMOVED" and pg["placement_group_id"] not in ignore]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.5)


def children(parent_run_id: str) -> list:
    return mlflow.search_runs(experiment_names=["upsr"], output_format="list",
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def summary_rows(parent_run_id: str) -> list[dict[str, str]]:
    text = mlflow.artifacts.load_text(f"runs:/{parent_run_id}/summary/trials.csv")
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.slow
def test_asha_search_stops_a_worse_trial_early_and_writes_the_best_config(workspace, tmp_path):
    """Four trials run two at a time in grid order: two with a working learning rate, then two
    with one too small to move the weights (their EMA model stays at its random initialisation). The good ones report first, so each tiny-lr trial
    meets a better recorded SSIM at ASHA's rung (3 reports, step 12 of 16) and is stopped there;
    of the good ones, whichever reaches the rung first goes on, so at least one completes, and the
    best is chosen among the completed ones even where a stopped one had scored higher at step 12.
    (Measured on this data: SSIM 0.54 at initialisation, 0.75-0.83 after 12 good steps; PSNR
    separates them less reliably so early, hence the SSIM objective.)"""
    from tune.report import write_report
    from tune.search import COMPLETED, STOPPED_EARLY, search

    config = workspace["config"](
        "tune.search_algorithm=grid", "tune.num_samples=1", "tune.search_space={train.seed: {grid: [0, 1]}}",
        "tune.variants={lr: {options: {good: {train.lr: 0.002}, tiny: {train.lr: 1.0e-9}}}}",
        "train.steps=16", "tune.objective={val_ssim: 1.0}", "tune.scheduler=asha", "tune.grace_period=3",
        "tune.reduction_factor=2")
    before = {pg["placement_group_id"] for pg in live_placement_groups(wait_s=0)}
    outcome = search(workspace["data"], workspace["aux"], config.jobs(), config.tune, "asha")

    assert len(outcome.trials) == 4
    by_lr = {lr: [t for t in outcome.trials if t.point["variants"]["lr"] == lr] for lr in ("good", "tiny")}
    assert [(t.outcome, t.step, t.reports) for t in by_lr["tiny"]] == [(STOPPED_EARLY, 12, 3)] * 2
    completed = [t for t in by_lr["good"] if t.outcome == COMPLETED]
    assert completed and all((t.step, t.reports) == (16, 4) for t in completed)
    assert all(t.outcome in (COMPLETED, STOPPED_EARLY) for t in by_lr["good"])
    # The stopped trials' Ray Train workers do not keep their CPUs.
    leftovers = live_placement_groups(ignore=before)
    assert not leftovers, leftovers

    best = outcome.best
    assert best in completed and best.objective == best.metrics["val_ssim"]
    assert best.objective == max(t.objective for t in completed)
    best_config = config_module.load(outcome.best_config_path)
    assert best_config.train.lr == 0.002 and best_config.train.seed == best.point["values"]["train.seed"]
    assert best_config.mlflow.tracking_uri == config.mlflow.tracking_uri  # the user's config, not the runtime one

    client = MlflowClient()
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["job"] == "tune"
    assert parent.data.params["objective"] == "max 1*val_ssim"
    assert parent.data.metrics["trials_stopped_early"] == 4 - len(completed)
    assert parent.data.metrics["best_val_ssim"] == best.objective
    runs = children(outcome.parent_run_id)
    assert len(runs) == 4
    status = {run.data.tags["tune_trial_id"]: (run.info.status, run.data.tags["tune_outcome"]) for run in runs}
    assert status == {t.trial_id: ("FINISHED", COMPLETED) if t.outcome == COMPLETED else ("KILLED", STOPPED_EARLY)
                      for t in outcome.trials}
    best_run = client.get_run(best.run_id)
    assert best_run.data.params["train.lr"] == "0.002" and best_run.data.tags["variant.lr"] == "good"
    assert [m.step for m in client.get_metric_history(best.run_id, "val_ssim")] == [4, 8, 12, 16]
    assert {a.path for a in client.list_artifacts(outcome.parent_run_id, "best")} == {"best/best_config.yaml"}
    rows = summary_rows(outcome.parent_run_id)
    assert sorted((r["trial_id"], r["variant.lr"], r["outcome"]) for r in rows) == sorted(
        (t.trial_id, t.point["variants"]["lr"], t.outcome) for t in outcome.trials)
    assert all(float(r["objective"]) == float(r["val_ssim"]) for r in rows)

    notes = tmp_path / "notes.md"
    notes.write_text("The tiny learning rate cannot move the weights.\n")
    report = write_report(config.mlflow, outcome.parent_run_id, tmp_path / "report.md", expected_order=["good", "tiny"],
                          notes=notes)
    text = report.read_text()
    assert "**Outcome: the expected ranking (good > tiny) could not be checked: no completed trial in tiny.**" in text
    assert "## Differences, paired by `train.seed`" in text and "| good − tiny | 0 | — | — | — |" in text
    assert "## Diagnostics" in text and "x0 MSE at t = 0, 1, 2, 3, 4" in text
    assert "## Interpretation (written by hand: notes.md, not generated)\n\nThe tiny learning rate" in text
    # The aux weights were written by the test, not by a train-aux run: the report says so.
    assert "do not come from a train-aux run of this MLflow experiment" in text
    psnr = [t.metrics["val_psnr"] for t in completed]
    cell = f"{psnr[0]:.2f} (n = 1)" if len(psnr) == 1 else f"{np.mean(psnr):.2f} ± {np.std(psnr, ddof=1):.2f}"
    assert f"| good | `train.lr=0.002` | {len(completed)} |" in text and cell in text
    assert "| tiny | `train.lr=1e-09` | 0 |" in text and "(tiny: stopped_early)" in text
    assert Image.open(tmp_path / "report.png").size[0] > 600


@pytest.mark.slow
def test_a_failing_trial_is_reported_the_search_goes_on_and_resumes(workspace, caplog, tmp_path):
    """The ablation's baseline arm (w == 1, no g(y) condition) trains while a second arm
    diverges (NaN batches) and fails; the command exits 0, logs the failure and lists it in the
    search's run and report. Running it again resumes the search: only the failed trial runs
    again."""
    from cli.main import main
    from tune.search import COMPLETED, FAILED

    variants = ("tune.variants={arm: {options: {baseline: {weight.tau: 0.0, denoiser.use_sr_condition: false}, "
                "diverges: {train.debug.inject_nan_at_steps: [1, 2], train.max_consecutive_nonfinite: 2}}}}")
    overrides = [*BASE_OVERRIDES, f"mlflow.tracking_uri={workspace['tracking_uri']}",
                 f"train.storage_path={workspace['root'] / 'ray'}", f"tune.best_config_path={tmp_path / 'best.yaml'}",
                 "tune.search_algorithm=grid", "tune.num_samples=1", "tune.search_space={}", variants,
                 "tune.scheduler=fifo"]
    argv = ["--data", workspace["data"], "--aux", workspace["aux"], "--config", str(TUNE_TINY), "--name", "arms",
            "--report", str(tmp_path / "ablation.md"), *[a for o in overrides for a in ("--set", o)]]
    with caplog.at_level(logging.INFO):
        assert main(["tune", *argv]) == 0
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "FAILED" in r.getMessage()]
    assert len(failures) == 1 and "2 consecutive non-finite steps" in failures[0], failures

    parent_id = next(r.info.run_id for r in mlflow.search_runs(
        experiment_names=["upsr"], output_format="list", filter_string="tags.ray_run_name = 'arms'"))
    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 1
    rows = {r["variant.arm"]: r for r in summary_rows(parent_id)}
    assert {arm: row["outcome"] for arm, row in rows.items()} == {"baseline": COMPLETED, "diverges": FAILED}
    assert "consecutive non-finite" in rows["diverges"]["error"]
    assert parent.data.tags["failed_trials"] == rows["diverges"]["trial_id"]
    first = {run.data.tags["variant.arm"]: run for run in children(parent_id)}
    assert {arm: run.info.status for arm, run in first.items()} == {"baseline": "FINISHED", "diverges": "FAILED"}
    assert first["baseline"].data.params["denoiser.use_sr_condition"] == "False"

    text = (tmp_path / "ablation.md").read_text()
    assert "| baseline | `weight.tau=0.0`, `denoiser.use_sr_condition=false` | 1 |" in text
    assert "| diverges |" in text and "(diverges: failed)" in text
    assert "LPIPS here is not the paper's metric" in text and "trunk is randomly initialised" in text
    assert (tmp_path / "ablation.png").is_file()

    # Resume: the same name under the same storage continues the search with Tuner.restore.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["tune", *argv]) == 0
    assert any("resuming it" in r.getMessage() for r in caplog.records)
    runs = children(parent_id)
    assert sorted(run.data.tags["variant.arm"] for run in runs) == ["baseline", "diverges", "diverges"]
    assert {run.info.run_id for run in runs if run.data.tags["variant.arm"] != "diverges"} == {
        first["baseline"].info.run_id}
    superseded = [run for run in runs if run.data.tags["tune_outcome"] == "superseded"]
    assert [run.info.run_id for run in superseded] == [first["diverges"].info.run_id]
    assert client.get_run(parent_id).info.status == "FINISHED"
    rows = {r["variant.arm"]: r for r in summary_rows(parent_id)}
    assert {arm: row["outcome"] for arm, row in rows.items()} == {"baseline": COMPLETED, "diverges": FAILED}


def fake_trial(seed: int, **metrics: float):
    """What the report reads of a trial's MLflow run: its params and last metrics."""
    return SimpleNamespace(data=SimpleNamespace(params={"train.seed": str(seed)}, metrics=metrics))


def test_the_report_states_the_outcome_paired_differences_and_diagnostics_from_the_runs():
    from tune.report import Group, comparison_lines, diagnostics_lines, outcome_lines

    # PSNR per seed 0, 1, 2: both beats condition by exactly 0.3 dB on every seed (interval is a
    # point); condition vs unw differs by +0.5, -0.1, +0.2 (mean 0.2, interval straddles zero);
    # unw is below baseline on every seed, so the paper's order fails at its last step.
    psnr = {"both": [22.3, 22.8, 22.5], "condition": [22.0, 22.5, 22.2], "unw": [21.5, 22.6, 22.0],
            "baseline": [21.8, 22.9, 22.3]}
    groups = [Group(name, {}, [fake_trial(seed, val_psnr=value, val_ssim=0.5, val_lpips=0.1, val_w_mean=0.55,
                                          val_w_at_floor=0.6, val_x0_mse_t0=0.01, val_x0_mse_t1=0.03)
                               for seed, value in enumerate(values)], None)
              for name, values in psnr.items()]
    expected = ["both", "condition", "unw", "baseline"]

    outcome = outcome_lines(groups, expected, ["train.seed"])[0]
    assert outcome.startswith("**Outcome: the expected ranking (both > condition > unw > baseline, by PSNR) "
                              "did not reproduce.**")
    assert "Measured (PSNR, mean over each group's trials, dB): both 22.53 > baseline 22.33 > condition 22.23 > " \
           "unw 22.03" in outcome
    assert "both > condition holds (95 % interval above zero): +0.30 [+0.30, +0.30]" in outcome
    half = scipy.stats.t.ppf(0.975, 2) * np.std([0.5, -0.1, 0.2], ddof=1) / np.sqrt(3)
    assert f"condition > unw holds in the mean, within the noise: +0.20 [{0.2 - half:+.2f}, {0.2 + half:+.2f}]" \
        in outcome
    assert "unw > baseline is reversed (95 % interval below zero): -0.30 [-0.30, -0.30]" in outcome

    table = "\n".join(comparison_lines(groups, expected, ["train.seed"]))
    # The expected ranking's steps, then every group against the reference (baseline) once.
    rows = [line.split(" | ")[0] for line in table.splitlines()[5:] if line.startswith("| ")]
    assert rows == ["| both − condition", "| condition − unw", "| unw − baseline", "| both − baseline",
                    "| condition − baseline"]
    assert "| both − condition | 3 | **0.30 [0.30, 0.30]** | 0.0000 [0.0000, 0.0000] |" in table

    diagnostics = "\n".join(diagnostics_lines(groups))
    assert "x0 MSE at t = 0, 1" in diagnostics and "| unw | — | 0.550 | 60.0% | — | — | — | 0.0100 / 0.0300 |" \
        in diagnostics

    groups[3].runs.clear()
    assert "could not be checked: no completed trial in baseline" in outcome_lines(groups, expected, ["train.seed"])[0]
    assert outcome_lines(groups, [], ["train.seed"])[0].startswith("**Outcome.** Measured ranking")
