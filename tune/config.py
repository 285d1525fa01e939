"""Config section of ``upsr tune``: the search space, search algorithm, scheduler and objective.

Search-space keys are dotted keys of the whole config (``weight.tau``, ``train.lr``); that
they exist and that every value the space can produce has the right type is checked by
``tune.space`` against the root config before any trial starts (this module cannot import
the root config: ``pipelines.config`` imports it). Invalid values here raise ``ValueError``
naming the key; ``upsr.config_loader`` adds the file and section.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Literal

from pydantic.dataclasses import dataclass

from upsr.config_loader import SECTION

# What ``upsr train``'s validation logs (DiffusionTask.validate): the objective's vocabulary.
VALIDATION_METRICS = ("val_psnr", "val_ssim", "val_lpips")
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")


@dataclass(config=SECTION)
class Distribution:
    """One searched key: exactly one of the four, e.g. ``{loguniform: [0.01, 0.5]}``.

    ``uniform``/``loguniform`` take [low, high]; ``choice`` samples one of its values;
    ``grid`` runs every value (with random/grid search only: Optuna samples, it cannot
    enumerate).
    """

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    def __post_init__(self) -> None:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}, got {given or 'none'}")
        if self.uniform is not None and not self.uniform[0] < self.uniform[1]:
            raise ValueError(f"uniform needs [low, high] with low < high, got {list(self.uniform)}")
        if self.loguniform is not None and not 0 < self.loguniform[0] < self.loguniform[1]:
            raise ValueError(f"loguniform needs [low, high] with 0 < low < high, got {list(self.loguniform)}")
        for name in ("choice", "grid"):
            if getattr(self, name) == []:
                raise ValueError(f"{name} needs at least one value")

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def argument(self) -> Any:
        return getattr(self, self.kind)


@dataclass(config=SECTION)
class VariantSet:
    """Named variants that each set several keys at once (e.g. the ablation's arms).

    The trial records the chosen name (``variant.<set>`` tag on its MLflow run), so reports
    group trials by it. ``search: grid`` runs every variant; ``choice`` samples one per trial.
    """

    search: Literal["grid", "choice"] = "grid"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The ranking a claim predicts, best first (e.g. the paper's ablation): the report says in its
    # first lines whether the measured ranking matches it. Empty: no claim to check.
    expected_order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError("options needs at least one named variant")
        unknown = [name for name in self.expected_order if name not in self.options]
        if unknown or len(set(self.expected_order)) != len(self.expected_order):
            raise ValueError(f"expected_order must list distinct variants of {list(self.options)}, got "
                             f"{self.expected_order}")


@dataclass(config=SECTION)
class TuneConfig:
    """``upsr tune``: which keys to search, how, and what "better" means.

    Every trial is a full ``upsr train`` run (Ray Train, its own MLflow child run) of the
    base config with the trial's values; Ray Tune reports once per checkpoint, so the
    scheduler's time unit (``grace_period``, ``max_t``) is checkpoints (``train.checkpoint_every``
    steps), and ``train.validate_every`` must equal ``train.checkpoint_every`` so that every
    report carries fresh validation metrics.
    """

    # Dotted config key -> distribution, e.g. {"weight.tau": {"loguniform": [0.01, 0.5]}}.
    search_space: dict[str, Distribution] = field(default_factory=dict)
    # Set name -> variants; each set is one more dimension of the search.
    variants: dict[str, VariantSet] = field(default_factory=dict)
    # optuna: TPE (needs no grid); random: random sampling, grids crossed; grid: every
    # dimension must be a grid (or a grid variant set).
    search_algorithm: Literal["optuna", "random", "grid"] = "optuna"
    # Trials for optuna/random; for grid, how many times the whole grid runs.
    num_samples: int = 8
    # Seed of the sampler (optuna, random): the same search proposes the same trials.
    seed: int = 0
    # asha stops trials whose objective trails at a rung; fifo runs every trial to the end.
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    # ASHA's rungs are at grace_period * reduction_factor^k reports, up to max_t (0: the reports
    # of a full trial, ceil(train.steps / train.checkpoint_every)). A trial that no rung stops
    # runs all its train.steps.
    max_t: int = 0
    reduction_factor: float = 2.0
    # The objective is sum(weight * metric) over validation metrics, optimised in ``mode``:
    # the fidelity/perception trade-off is this choice of weights, e.g. {val_psnr: 1,
    # val_lpips: -20} under max trades 1 dB of PSNR for 0.05 of LPIPS.
    objective: dict[str, float] = field(default_factory=lambda: {"val_psnr": 1.0})
    mode: Literal["max", "min"] = "max"
    # 0: as many as the cluster holds, from train.num_workers x train.cpus_per_worker (and
    # GPUs) per trial, leaving data_cpus free for Ray Data's read and decode tasks.
    max_concurrent_trials: int = 0
    data_cpus: float = 1.0
    # CPU reserved by each trial's driver (the function that runs the TorchTrainer and waits
    # on it). Ray Tune refuses an empty request, so a token amount stands for "almost none".
    driver_cpus: float = 0.01
    # Times a failed trial is restarted (it resumes its Ray Train run from its last checkpoint);
    # a trial that still fails is reported and the search goes on.
    max_failures: int = 0
    # Folder or s3:// prefix of the search (Tune's state and every trial's checkpoints);
    # None: train.storage_path's default. The same --name under it resumes the search.
    storage_path: str | None = None
    # Where the best trial's config is written (and logged to the search's MLflow run);
    # None: best_config.yaml in runs/tune/<search name>/.
    best_config_path: str | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.grace_period < 1:
            raise ValueError("num_samples and grace_period must be >= 1")
        if self.max_t < 0 or self.max_concurrent_trials < 0 or self.max_failures < 0:
            raise ValueError("max_t, max_concurrent_trials and max_failures must be >= 0")
        if self.max_t and self.max_t < self.grace_period:
            raise ValueError(f"max_t ({self.max_t}) must be >= grace_period ({self.grace_period})")
        if self.reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")
        if self.data_cpus < 0 or self.driver_cpus <= 0:
            raise ValueError("data_cpus must be >= 0 and driver_cpus > 0 (Ray Tune refuses an empty request)")
        if not self.objective:
            raise ValueError(f"objective needs at least one weighted metric of {', '.join(VALIDATION_METRICS)}")
        for name, weight in self.objective.items():
            if name not in VALIDATION_METRICS:
                raise ValueError(f"objective: unknown metric {name!r} (known: {', '.join(VALIDATION_METRICS)})")
            if weight == 0:
                raise ValueError(f"objective: the weight of {name} is 0; leave the metric out instead")
        for key in self.search_space:
            if "." not in key:
                raise ValueError(f"search_space: {key!r} is not a dotted config key such as weight.tau")
        for name in self.variants:
            if not name.isidentifier():
                raise ValueError(f"variants: set name {name!r} must be a plain name such as arm")
        dimensions = {k: d.kind for k, d in self.search_space.items()} | {
            f"variants.{n}": s.search for n, s in self.variants.items()}
        if self.search_algorithm == "optuna":
            grids = [key for key, kind in dimensions.items() if kind == "grid"]
            if grids:
                raise ValueError(f"{grids[0]}: grid is not supported by search_algorithm optuna (it samples); "
                                 "use choice, or search_algorithm random or grid")
        if self.search_algorithm == "grid":
            if not dimensions:
                raise ValueError("search_algorithm grid needs at least one grid dimension")
            sampled = [key for key, kind in dimensions.items() if kind != "grid"]
            if sampled:
                raise ValueError(f"{sampled[0]}: search_algorithm grid runs grids only, got "
                                 f"{dimensions[sampled[0]]}; use search_algorithm random to mix")

    def describe_objective(self) -> str:
        """The objective as a formula, e.g. ``max 1*val_psnr - 20*val_lpips``."""
        formula = " ".join(f"{'-' if weight < 0 else '+'} {abs(weight):g}*{name}"
                           for name, weight in self.objective.items())
        # The first term's "+ " goes without saying; its "- " becomes a sign.
        formula = formula[2:] if formula.startswith("+") else "-" + formula[2:]
        return f"{self.mode} {formula}"

    def objective_value(self, metrics: dict[str, float]) -> float | None:
        """The weighted sum, or None while a metric in it has not been measured."""
        if any(name not in metrics for name in self.objective):
            return None
        return sum(weight * float(metrics[name]) for name, weight in self.objective.items())
