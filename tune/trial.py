"""What runs inside a ``upsr tune`` trial: the trial function, its Ray Train worker entry, the
callback that forwards reports to Ray Tune, and the actor that frees what stopped trials leave.

Kept apart from ``tune.search`` and light to import (Ray and ``tune.config`` only, the rest
imported where used): Ray Train's controller of every trial, and the cleaner actor, unpickle
these by reference and would otherwise import the whole training stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from tune.config import TuneConfig

if TYPE_CHECKING:
    from pipelines.trials import Config

log = logging.getLogger(__name__)

OBJECTIVE = "objective"
# Tags of a trial's MLflow run: which search and trial it belongs to, and its variants.
SEARCH_TAG = "tune_search"
TRIAL_TAG = "tune_trial_id"
VARIANT_TAG_PREFIX = "variant."


class ObjectiveReportCallback(TuneReportCallback):
    """``TuneReportCallback`` that adds the search's objective to the metrics it forwards.

    Runs in the trial's Ray Train controller. ``TuneReportCallback`` forwards rank 0's
    metrics, and rank 0 is the worker that validates.
    """

    def __init__(self, settings: TuneConfig):
        super().__init__()
        self.settings = settings

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        rank_zero = dict(metrics[0])
        value = self.settings.objective_value(rank_zero)
        if value is not None:
            rank_zero[OBJECTIVE] = value
        super().after_report(run_context, [rank_zero, *metrics[1:]], checkpoint)


@ray.remote(num_cpus=0)
class StoppedTrialCleaner:
    """Removes the Ray Train placement groups that trials leave when Ray Tune stops them.

    Ray Tune stops a trial (ASHA) by removing the trial's placement group, which ends the
    trial's actor and its Ray Train controller but not the controller's worker group, whose
    placement group stays reserved. Ray Train's PlacementGroupCleaner should remove it; it
    asks the state API, which needs the dashboard and fails where several Ray instances run on
    one machine, so on local instances (started without a dashboard) and shared hosts the
    group's CPUs would stay reserved and later trials would wait for them for ever. Here each
    trial's rank 0 registers its worker group under the trial's own group, and once that one
    is removed, so is the other.
    """

    def __init__(self, interval_s: float = 1.0):
        import threading

        self._lock = threading.Lock()
        self._groups: dict[str, tuple[Any, list[Any]]] = {}  # trial group id -> (trial group, train groups)
        threading.Thread(target=self._watch, args=(interval_s,), daemon=True).start()

    def add(self, trial_group, train_group) -> None:
        with self._lock:
            self._groups.setdefault(trial_group.id.hex(), (trial_group, []))[1].append(train_group)
        self.sweep()  # a worker group that started while its trial was being stopped goes at once

    def sweep(self) -> int:
        """Remove the worker groups of every trial whose own group is gone; returns how many."""
        from ray.util.placement_group import placement_group_table, remove_placement_group

        def removed(group) -> bool:
            return placement_group_table(group).get("state") == "REMOVED"

        with self._lock:
            ended = [key for key, (trial_group, _) in self._groups.items() if removed(trial_group)]
            leftovers = [group for key in ended for group in self._groups.pop(key)[1] if not removed(group)]
        for group in leftovers:
            remove_placement_group(group)
        return len(leftovers)

    def _watch(self, interval_s: float) -> None:
        import time

        while True:
            time.sleep(interval_s)
            self.sweep()


@dataclass(frozen=True)
class RegisterWorkerGroup:
    """Run by a trial's rank-0 worker before training: registers its worker group with the cleaner."""

    cleaner: Any
    trial_placement_group: Any

    def __call__(self) -> None:
        ray.get(self.cleaner.add.remote(self.trial_placement_group, ray.util.get_current_placement_group()))


@dataclass(frozen=True)
class SearchContext:
    """What every trial needs besides its sampled point (sent once through the object store)."""

    # The base config with the trials' Ray Train storage resolved by the driver (a trial's
    # working folder is not the driver's), and the search's settings.
    config: Config
    settings: TuneConfig
    # The dataset opened and split once (and decoded once, with train_data.materialize).
    data: Any
    search_name: str
    parent_run_id: str
    stopped_trial_cleaner: Any
    # The MLflow store the driver resolved; kept out of the config, which the trials log.
    tracking_uri: str


def run_trial(point: dict[str, Any], context: SearchContext) -> None:
    """One trial: ``upsr train`` of the base config with the point's values, no model registered."""
    from pipelines import trials
    from tune.space import trial_config

    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(context.config, context.settings, point, source=f"trial {trial_id}")
    tags = {"mlflow.parentRunId": context.parent_run_id, SEARCH_TAG: context.search_name, TRIAL_TAG: trial_id,
            **{f"{VARIANT_TAG_PREFIX}{name}": variant for name, variant in point.get("variants", {}).items()}}
    trials.train_trial(
        config, context.data, f"{context.search_name}-{trial_id}", tracking_uri=context.tracking_uri,
        callbacks=[ObjectiveReportCallback(context.settings)], run_tags=tags,
        rank0_setup=RegisterWorkerGroup(context.stopped_trial_cleaner, ray.util.get_current_placement_group()))
