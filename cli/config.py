"""The root config: every job's sections (``pipelines.config.Config``) and the search's ``tune``.

A config file may hold all of them; each job reads its own sections, and ``upsr tune`` hands
the search its ``tune`` section apart from the config every trial trains with.
"""

from __future__ import annotations

from dataclasses import field, fields
from pathlib import Path

from pydantic.dataclasses import dataclass

from pipelines.config import Config
from tune.config import TuneConfig
from upsr.config_loader import SECTION, load_config


@dataclass(config=SECTION)
class RootConfig(Config):
    tune: TuneConfig = field(default_factory=TuneConfig)

    def jobs(self) -> Config:
        """The sections the jobs read (everything but ``tune``)."""
        return Config(**{f.name: getattr(self, f.name) for f in fields(Config)})


def load(paths: str | Path | list[str | Path] | None = None, overrides: list[str] = ()) -> RootConfig:
    """Defaults, then each file (with its ``base:`` files) in order, then ``--set`` overrides."""
    return load_config(RootConfig, paths, list(overrides))
