"""``upsr tune``: a Ray Tune search whose trials are ``upsr train`` runs on Ray Train.

``search`` checks the space against the config, opens (or, for a search name that exists
under the storage, re-opens) the search's MLflow run, and runs a ``Tuner`` over
``tune.trial.run_trial``: each trial merges its sampled point onto the base config and fits a
``TorchTrainer`` (the Ray Train V2 pattern) whose ``ObjectiveReportCallback`` forwards rank
0's report, validation metrics and objective included, to Ray Tune, once per checkpoint.
Each trial's MLflow run is a child of the search's run (``mlflow.parentRunId``). At the end
the search's run gets the trial table, the best trial's config (also written to a YAML
file) and the counts; trials that failed are reported and do not stop the others.

Resuming: the same name under the same storage continues the search with ``Tuner.restore``
(errored and unfinished trials run again; their Ray Train runs continue from their last
checkpoints) and keeps its MLflow run.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import platform
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray.tune
import yaml

from pipelines import trials as pipeline
from pipelines.trials import Config, MlflowConfig, TrainConfig, UserError
from tune.config import VALIDATION_METRICS, TuneConfig
from tune.space import check_space, param_space, trial_config, trial_overrides
from tune.trial import OBJECTIVE, TRIAL_TAG, VARIANT_TAG_PREFIX, SearchContext, StoppedTrialCleaner, run_trial
from upsr.config_loader import to_dict

log = logging.getLogger(__name__)

JOB = "tune"
# Tags: how a trial ended (on its MLflow run), whether LPIPS had pretrained weights (on the search's).
OUTCOME_TAG = "tune_outcome"
LPIPS_BACKBONE_TAG = "lpips_backbone"
SUMMARY_ARTIFACT = "summary/trials.csv"
SEARCH_CONFIG_ARTIFACT = "config/tune.yaml"
BEST_CONFIG_ARTIFACT = "best"
# Outcomes of a trial: it ran all its steps, the scheduler stopped it, it raised, or the
# search ended (was interrupted) before it did.
COMPLETED, STOPPED_EARLY, FAILED, UNFINISHED = "completed", "stopped_early", "failed", "unfinished"
_SEARCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def trial_dirname(trial) -> str:
    """Tune's folder of a trial: its id (the default spells out every value, long dotted keys included)."""
    return trial.trial_id


@dataclass
class TrialSummary:
    trial_id: str
    outcome: str
    point: dict[str, Any]
    overrides: dict[str, Any]
    metrics: dict[str, float]
    step: int | None
    reports: int
    run_id: str | None = None
    error: str | None = None

    @property
    def objective(self) -> float | None:
        return self.metrics.get(OBJECTIVE)


@dataclass
class SearchOutcome:
    name: str
    parent_run_id: str
    # Tune's state and the trials' Ray Train runs (folder or s3:// prefix).
    storage_uri: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_config_path: Path | None

    @property
    def succeeded(self) -> bool:
        """At least one trial ran to its end or was stopped by the scheduler with a score."""
        return any(t.outcome in (COMPLETED, STOPPED_EARLY) for t in self.trials)

    def count(self, outcome: str) -> int:
        return sum(t.outcome == outcome for t in self.trials)


def concurrent_trials(settings: TuneConfig, train: TrainConfig, resources: dict[str, float]) -> int:
    """``max_concurrent_trials``, or as many trials as the cluster's CPUs (less ``data_cpus``)
    and GPUs hold, each taking ``num_workers`` workers and its driver."""
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    per_trial_cpus = train.num_workers * train.cpus_per_worker + settings.driver_cpus
    limits = [int((resources.get("CPU", 0.0) - settings.data_cpus) // per_trial_cpus)]
    if train.use_gpu:
        limits.append(int(resources.get("GPU", 0.0) // (train.num_workers * train.gpus_per_worker)))
    return max(1, min(limits))


def reports_per_trial(train: TrainConfig) -> int:
    """Reports of a full run: one per ``checkpoint_every`` steps and one at the last step."""
    return math.ceil(train.steps / train.checkpoint_every)


def search(data_uri: str, aux_uri: str, config: Config, settings: TuneConfig, name: str) -> SearchOutcome:
    """Run (or resume) the search ``name`` of ``settings`` over trials of ``config``; returns its
    trials, the best one and where its config went.

    Everything that can be wrong with the config, the aux net or the data is found before the
    first trial starts.
    """
    if not _SEARCH_NAME.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder and runs)")
    check_space(config, settings)
    trial_scheduler = scheduler(settings, config.train)
    pipeline.init_ray(config)
    config, data = pipeline.open_search_inputs(data_uri, aux_uri, config)
    if not data.val_sources:
        raise UserError(f"{data_uri}: train_data.val_fraction = {config.train_data.val_fraction} leaves no "
                        f"validation photographs among {len(data.train_sources)}; a search needs them for its "
                        "objective")
    resources = ray.cluster_resources()
    concurrency = concurrent_trials(settings, config.train, resources)
    storage_path, filesystem, storage_uri = pipeline.checkpoint_storage(
        replace(config.train, storage_path=settings.storage_path or config.train.storage_path), config)
    pipeline.require_shared(config.ray, {"tune.storage_path": storage_uri,
                                         "mlflow.tracking_uri": pipeline.tracking_uri(config.mlflow)})
    experiment_path = f"{storage_path}/{name}"
    resumed = ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)

    from mlflow.tracking import MlflowClient

    # Driver-side MLflow calls use the resolved URI; the config that trials log keeps the user's setting.
    mlflow_settings = replace(config.mlflow, tracking_uri=pipeline.tracking_uri(config.mlflow))
    with pipeline.run_ended_unless_done(
            lambda: open_search_run(mlflow_settings, name, config, settings, data.dataset, resumed),
            MlflowClient(mlflow_settings.tracking_uri)) as parent_run_id:
        record_search_facts(mlflow_settings, parent_run_id, config, resources, resumed, {
            "objective": settings.describe_objective(), "max_concurrent_trials_resolved": concurrency,
            "data": data.dataset.location.uri, "aux": config.aux.weights, "search_storage": f"{storage_uri}/{name}"})

        cleaner = StoppedTrialCleaner.remote()
        # Paths resolved here: a trial's working folder is not the driver's. The trials' Ray Train
        # runs live in the search's folder, beside Tune's own state.
        runtime = replace(config, train=replace(config.train, storage_path=f"{storage_uri}/{name}/train"))
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(run_trial, context=SearchContext(
                runtime, settings, data, name, parent_run_id, cleaner, mlflow_settings.tracking_uri)),
            {"CPU": settings.driver_cpus})
        log.info("search %s: %s over %s, %s scheduler, objective %s, up to %d trials at once; storage %s/%s",
                 name, settings.search_algorithm, describe_space(settings), settings.scheduler,
                 settings.describe_objective(), concurrency, storage_uri, name)
        if resumed:
            log.info("search %s exists under %s: resuming it (errored and unfinished trials run again)",
                     name, storage_uri)
            tuner = ray.tune.Tuner.restore(experiment_path, trainable, resume_errored=True,
                                           storage_filesystem=filesystem)
        else:
            tuner = ray.tune.Tuner(
                trainable, param_space=param_space(settings),
                tune_config=ray.tune.TuneConfig(
                    metric=OBJECTIVE, mode=settings.mode, search_alg=search_algorithm(settings, concurrency),
                    scheduler=trial_scheduler, num_samples=settings.num_samples,
                    trial_dirname_creator=trial_dirname),
                run_config=ray.tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                              failure_config=ray.tune.FailureConfig(max_failures=settings.max_failures),
                                              verbose=1))
        try:
            results = tuner.fit()
        except ray.tune.TuneError as error:
            raise UserError(f"search {name}: {error}") from None
        finally:
            # Every trial has ended: whatever is still registered is a leftover.
            leftovers = ray.get(cleaner.sweep.remote())
            ray.kill(cleaner)
        if leftovers:
            log.info("removed %d Ray Train placement group(s) that stopped trials left", leftovers)

        trials = summarize_trials(results, config, settings)
        attach_child_runs(mlflow_settings, parent_run_id, trials)
        best = best_trial(trials, settings)
        best_path = None
        if best is not None:
            best_path = Path(settings.best_config_path or Path("runs", "tune", name, "best_config.yaml"))
            write_best_config(best_path, best, config, settings, name, parent_run_id)
        outcome = SearchOutcome(name, parent_run_id, f"{storage_uri}/{name}", trials, best, best_path)
        record_outcome(mlflow_settings, outcome)
        log_outcome(outcome, settings)
    return outcome


def describe_space(settings: TuneConfig) -> str:
    parts = [f"{key} {d.kind}{list(d.argument)}" for key, d in settings.search_space.items()]
    parts += [f"{name} {s.search}{list(s.options)}" for name, s in settings.variants.items()]
    return ", ".join(parts) or "the base config alone"


def search_algorithm(settings: TuneConfig, max_concurrent: int):
    """The searcher, limited to ``max_concurrent`` running trials (Tune ignores TuneConfig's
    max_concurrent_trials for a BasicVariantGenerator passed in, so both take it here)."""
    if settings.search_algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent)


def scheduler(settings: TuneConfig, train: TrainConfig):
    if settings.scheduler == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    max_t = settings.max_t or reports_per_trial(train)
    if max_t < settings.grace_period:
        raise UserError(f"tune.grace_period ({settings.grace_period}) exceeds the {max_t} reports of a trial "
                        "(train.steps / train.checkpoint_every): ASHA could never stop one")
    # Trials that reach max_t end on their own (their runs finish cleanly) instead of being stopped.
    return ASHAScheduler(time_attr="training_iteration", grace_period=settings.grace_period, max_t=max_t,
                         reduction_factor=settings.reduction_factor, stop_last_trials=False)


# --- MLflow: the search's run --------------------------------------------------------------


def open_search_run(settings: MlflowConfig, name: str, config: Config, search: TuneConfig, dataset,
                    resumed: bool) -> str:
    """The search's MLflow run: found again when resuming (same config and search only), else a new
    one. It holds the trials' base config (config/resolved.yaml) and the search (config/tune.yaml)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    config_yaml = pipeline.to_yaml(config)
    search_yaml = yaml.safe_dump(to_dict(search), sort_keys=False)
    experiment_id = pipeline.connect(settings)
    if resumed:
        runs = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list", max_results=1,
                                  filter_string=f"tags.job = '{JOB}' and tags.ray_run_name = '{name}'",
                                  order_by=["attributes.start_time DESC"])
        if runs:
            run_id = runs[0].info.run_id
            stored = (mlflow.artifacts.load_text(f"runs:/{run_id}/config/resolved.yaml"),
                      mlflow.artifacts.load_text(f"runs:/{run_id}/{SEARCH_CONFIG_ARTIFACT}"))
            if stored != (config_yaml, search_yaml):
                raise UserError(f"search {name} was started with another config (MLflow run {run_id}, "
                                "config/resolved.yaml and config/tune.yaml); resume it with that config or start "
                                "a new --name")
            MlflowClient().update_run(run_id, status="RUNNING")
            return run_id
        log.warning("search %s: its MLflow run was not found in %s; opening a new one", name,
                    pipeline.redact_uri(settings.tracking_uri))
    run_id = pipeline.start_run(settings, name, config, JOB, dataset.manifest, dataset.manifest_hash, config_yaml)
    MlflowClient().log_text(run_id, search_yaml, SEARCH_CONFIG_ARTIFACT)
    return run_id


def record_search_facts(settings: MlflowConfig, run_id: str, config: Config, resources: dict[str, float],
                        resumed: bool, facts: dict[str, Any]) -> None:
    """Params of a new search's run (params cannot change), and tags of where this session runs
    and whether LPIPS is meaningful there (pretrained VGG16 weights, or a random trunk)."""
    from mlflow.tracking import MlflowClient

    from upsr.losses import default_vgg16_path

    if not resumed:
        pipeline.log_run_facts(settings, run_id, facts)
    weights = Path(config.loss.lpips_backbone) if config.loss.lpips_backbone else default_vgg16_path()
    tags = {
        "machine": f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPUs",
        "ray_cluster": f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs",
        # As the driver sees it; workers on other nodes look in the same place.
        LPIPS_BACKBONE_TAG: "pretrained" if weights.is_file() else "random",
        "lpips_vgg16_weights": str(weights),
    }
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def summarize_trials(results: ray.tune.ResultGrid, config: Config, settings: TuneConfig) -> list[TrialSummary]:
    """Each trial's outcome, values and last reported scores, from Ray Tune's ``ResultGrid``; a
    trial that ended at a step before its last was stopped by the scheduler."""
    summaries = []
    for result in results:
        trial_id = Path(result.path).name  # trial_dirname names a trial's folder after its id
        last = result.metrics or {}
        point = dict(result.config or {})
        metrics = {key: float(last[key]) for key in (*VALIDATION_METRICS, OBJECTIVE) if key in last}
        step = last.get("step")
        error = None
        if result.error is not None:
            outcome = FAILED
            error = pipeline.last_line(str(result.error))
        elif step is None:
            outcome = UNFINISHED
        else:
            steps = trial_config(config, settings, point, source=f"trial {trial_id}").train.steps
            outcome = COMPLETED if step >= steps else STOPPED_EARLY
        summaries.append(TrialSummary(trial_id, outcome, point, trial_overrides(settings, point), metrics,
                                      step, int(last.get("training_iteration", 0)), error=error))
    return sorted(summaries, key=lambda summary: summary.trial_id)


def attach_child_runs(settings: MlflowConfig, parent_run_id: str, trials: list[TrialSummary]) -> None:
    """Link each trial to its MLflow run and close runs that the trial could not close itself.

    A trial stopped by the scheduler is ended by Ray before its function returns, its run left
    RUNNING or marked FAILED by the unwinding: the search sets it KILLED (tag ``tune_outcome =
    stopped_early``). A run whose trial was restarted (a retry, a resumed search) is superseded by
    the newer one.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    experiment_id = pipeline.connect(settings)
    client = MlflowClient()
    children = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  order_by=["attributes.start_time DESC"])
    latest: dict[str, Any] = {}
    for run in children:
        trial_id = run.data.tags.get(TRIAL_TAG)
        if trial_id in latest:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
            client.set_tag(run.info.run_id, OUTCOME_TAG, "superseded")
        else:
            latest[trial_id] = run
    status_of = {COMPLETED: "FINISHED", STOPPED_EARLY: "KILLED", FAILED: "FAILED", UNFINISHED: "KILLED"}
    for trial in trials:
        run = latest.get(trial.trial_id)
        if run is None:
            continue
        trial.run_id = run.info.run_id
        client.set_tag(run.info.run_id, OUTCOME_TAG, trial.outcome)
        if run.info.status != status_of[trial.outcome]:
            client.set_terminated(run.info.run_id, status_of[trial.outcome])


def best_trial(trials: list[TrialSummary], settings: TuneConfig) -> TrialSummary | None:
    """The trial with the best last objective among those that ran their full budget; trials stopped
    early compete (with what they reached) only when none completed. An objective measured after
    fewer steps is not comparable: the scheduler already judged those trials worse at their rung."""
    scored = [t for t in trials if t.outcome in (COMPLETED, STOPPED_EARLY) and t.objective is not None
              and math.isfinite(t.objective)]
    if not scored:
        return None
    scored = [t for t in scored if t.outcome == COMPLETED] or scored
    sign = 1 if settings.mode == "max" else -1
    return max(scored, key=lambda t: sign * t.objective)


def write_best_config(path: Path, best: TrialSummary, config: Config, settings: TuneConfig, name: str,
                      parent_run_id: str) -> None:
    """The base config with the best trial's values, ready for ``upsr train --config``."""
    chosen = trial_config(config, settings, best.point, source=f"trial {best.trial_id}")
    scores = ", ".join(f"{key} {value:.4g}" for key, value in best.metrics.items() if key != OBJECTIVE)
    values = ", ".join(f"{key}={value!r}" for key, value in best.overrides.items())
    header = (f"# Best trial of `upsr tune` search {name} (MLflow run {parent_run_id}): trial {best.trial_id},\n"
              f"# objective {settings.describe_objective()} = {best.objective:.6g} at step {best.step} ({scores}).\n"
              f"# Its values: {values or 'the base config'}.\n"
              "# Train it with: upsr train --data DATA --aux AUX --config <this file>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + pipeline.to_yaml(chosen))


def summary_csv(trials: list[TrialSummary]) -> str:
    """One row per trial: outcome, searched values, validation metrics, objective, run, error."""
    keys = sorted({key for t in trials for key in t.point.get("values", {})})
    sets = sorted({name for t in trials for name in t.point.get("variants", {})})
    columns = ["trial_id", "outcome", "step", "reports", *[f"{VARIANT_TAG_PREFIX}{s}" for s in sets], *keys,
               *VALIDATION_METRICS, OBJECTIVE, "mlflow_run_id", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for t in trials:
        writer.writerow({"trial_id": t.trial_id, "outcome": t.outcome, "step": t.step, "reports": t.reports,
                         **{f"{VARIANT_TAG_PREFIX}{s}": t.point.get("variants", {}).get(s) for s in sets},
                         **{k: t.point.get("values", {}).get(k) for k in keys},
                         **{m: t.metrics.get(m) for m in (*VALIDATION_METRICS, OBJECTIVE)},
                         "mlflow_run_id": t.run_id, "error": t.error})
    return buffer.getvalue()


def record_outcome(settings: MlflowConfig, outcome: SearchOutcome) -> None:
    """The search's run: the trial table, the counts, the best trial and its config file."""
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    pipeline.connect(settings)
    client = MlflowClient()
    run_id = outcome.parent_run_id
    client.log_text(run_id, summary_csv(outcome.trials), SUMMARY_ARTIFACT)
    now = int(time.time() * 1000)
    metrics = {f"trials_{key}": outcome.count(key) for key in (COMPLETED, STOPPED_EARLY, FAILED, UNFINISHED)}
    tags = {"failed_trials": ",".join(t.trial_id for t in outcome.trials if t.outcome == FAILED) or "none"}
    if outcome.best is not None:
        metrics |= {f"best_{key}": value for key, value in outcome.best.metrics.items()}
        tags |= {"best_trial_id": outcome.best.trial_id, "best_trial_run_id": outcome.best.run_id or ""}
        client.log_artifact(run_id, str(outcome.best_config_path), BEST_CONFIG_ARTIFACT)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, "FINISHED" if outcome.succeeded else "FAILED")


def log_outcome(outcome: SearchOutcome, settings: TuneConfig) -> None:
    for t in outcome.trials:
        values = ", ".join(f"{key}={value!r}" for key, value in t.overrides.items()) or "base config"
        if t.outcome == FAILED:
            log.warning("trial %s FAILED (%s): %s", t.trial_id, values, t.error)
        else:
            scores = ", ".join(f"{key} {value:.4g}" for key, value in t.metrics.items())
            log.info("trial %s %s at step %s (%s): %s", t.trial_id, t.outcome, t.step, values, scores or "no score")
    log.info("search %s: %d completed, %d stopped early, %d failed, %d unfinished; MLflow run %s, storage %s",
             outcome.name, outcome.count(COMPLETED), outcome.count(STOPPED_EARLY), outcome.count(FAILED),
             outcome.count(UNFINISHED), outcome.parent_run_id, outcome.storage_uri)
    if outcome.best is not None:
        log.info("best trial %s: %s = %.6g; its config: %s", outcome.best.trial_id, settings.describe_objective(),
                 outcome.best.objective, outcome.best_config_path)
    else:
        log.error("search %s: no trial produced a score", outcome.name)
