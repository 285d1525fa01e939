"""The search space of ``upsr tune``: Ray Tune dimensions from the ``tune`` section, and the
typed config of one trial.

A trial's sampled point is ``{"values": {dotted key: value}, "variants": {set: variant}}``;
``trial_config`` merges it onto the base config through ``upsr.config_loader``, so a trial
gets exactly the checks (key names, types, each section's own rules) that ``--set`` gets.
``check_space`` builds the config of every value a dimension can produce (both bounds of a
range) before the search starts, so that a typo or a wrong type stops the search before any
trial runs instead of failing every trial.
"""

from __future__ import annotations

import copy
from typing import Any

from pipelines.trials import Config
from tune.config import Distribution, TuneConfig
from upsr.config_loader import ConfigError, from_dict, merge_override, to_dict

# What a trial changes: how the diffusion model is built, trained and validated. The dataset
# (synth, degradation), its train/val split (train_data: opened once for every trial) and the
# aux net (--aux) are fixed for a whole search.
SEARCHABLE_SECTIONS = ("diffusion", "weight", "denoiser", "loss", "metrics", "inference", "train")
# Optuna's categorical distributions hold plain values only.
_OPTUNA_CHOICE_TYPES = (type(None), bool, int, float, str)


def require_searchable(key: str, source: str) -> None:
    if key.split(".", 1)[0] not in SEARCHABLE_SECTIONS:
        raise ConfigError(f"{source}: {key} cannot be searched: a trial trains the diffusion model on a fixed "
                          f"dataset with a fixed aux net; searchable sections: {', '.join(SEARCHABLE_SECTIONS)}")


def trial_overrides(settings: TuneConfig, point: dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value of a sampled point: its variants' keys, then its own values."""
    overrides: dict[str, Any] = {}
    for set_name, variant in point.get("variants", {}).items():
        overrides |= settings.variants[set_name].options[variant]
    return overrides | point.get("values", {})


def trial_config(base: Config, settings: TuneConfig, point: dict[str, Any], source: str) -> Config:
    """``base`` with the point's overrides, typed and checked like ``--set`` overrides."""
    data = copy.deepcopy(to_dict(base))
    for key, value in trial_overrides(settings, point).items():
        merge_override(data, key, value)
    return from_dict(Config, data, source=source)


def check_reporting(config: Config, source: str) -> None:
    """Every report Ray Tune receives (one per checkpoint) must carry fresh validation metrics."""
    train = config.train
    if train.validate_every != train.checkpoint_every:
        raise ConfigError(f"{source}: train.validate_every ({train.validate_every}) must equal "
                          f"train.checkpoint_every ({train.checkpoint_every}) in a search: Ray Tune ranks trials "
                          "on the validation metrics of each checkpoint's report")
    if train.val_batches < 1:
        raise ConfigError(f"{source}: train.val_batches must be >= 1 in a search: the objective is measured on "
                          "the validation split")


def check_space(base: Config, settings: TuneConfig, source: str = "tune") -> None:
    """Raise ``ConfigError`` naming the key if any value the space can produce is not a valid config."""
    check_reporting(base, source)
    explicit = set(settings.search_space)
    for key, distribution in settings.search_space.items():
        require_searchable(key, f"{source}.search_space")
        if settings.search_algorithm == "optuna" and distribution.kind == "choice":
            odd = [v for v in distribution.choice if not isinstance(v, _OPTUNA_CHOICE_TYPES)]
            if odd:
                raise ConfigError(f"{source}.search_space.{key}: optuna chooses among plain values (numbers, "
                                  f"strings, booleans), got {odd[0]!r}; use a variant set for structured values")
        # Both bounds of a range, every value of a choice or grid.
        for value in distribution.argument:
            check_trial(base, settings, {"values": {key: value}}, f"{source}.search_space.{key} = {value!r}")
    for set_name, variant_set in settings.variants.items():
        for variant, overrides in variant_set.options.items():
            where = f"{source}.variants.{set_name}.{variant}"
            for key in overrides:
                require_searchable(key, where)
                if key in explicit:
                    raise ConfigError(f"{where}: {key} is also in search_space; a key has one source per trial")
            check_trial(base, settings, {"variants": {set_name: variant}}, where)


def check_trial(base: Config, settings: TuneConfig, point: dict[str, Any], source: str) -> None:
    check_reporting(trial_config(base, settings, point, source), source)


def param_space(settings: TuneConfig) -> dict[str, Any]:
    """Ray Tune's ``param_space``: ``{"values": {key: dimension}, "variants": {set: dimension}}``."""
    import ray.tune

    def dimension(distribution: Distribution):
        low_high = distribution.argument
        return {"uniform": lambda: ray.tune.uniform(*low_high),
                "loguniform": lambda: ray.tune.loguniform(*low_high),
                "choice": lambda: ray.tune.choice(list(low_high)),
                "grid": lambda: ray.tune.grid_search(list(low_high))}[distribution.kind]()

    space: dict[str, Any] = {}
    if settings.search_space:
        space["values"] = {key: dimension(d) for key, d in settings.search_space.items()}
    if settings.variants:
        space["variants"] = {
            name: (ray.tune.grid_search if s.search == "grid" else ray.tune.choice)(list(s.options))
            for name, s in settings.variants.items()}
    return space
