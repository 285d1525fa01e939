"""Config sections of the model library (schedule, noise weighting, networks, losses, inference).

Plain dataclasses whose defaults are the paper's values (DESIGN §1); ``configs/tiny.yaml``
holds the tiny twin used by tests and CPU demos. Invalid values raise ``ValueError`` naming
the key; ``upsr.typed_config`` adds the file and section to the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DiffusionConfig:
    """Noise schedule (DESIGN §1): ResShift's exponential schedule with UPSR's cap on eta_1.

    ``eta_end`` is sqrt(eta_T); ``eta_1_cap: null`` gives ResShift's schedule.
    """

    steps: int = 5
    kappa: float = 2.5
    power: float = 0.2
    min_noise_level: float = 0.2
    eta_end: float = 0.99
    eta_1_cap: float | None = 0.001

    def __post_init__(self) -> None:
        from upsr.schedule import check_schedule_args  # lazy: keeps torch out of config parsing

        check_schedule_args(
            self.steps, self.kappa, self.power, self.min_noise_level, self.eta_end, self.eta_1_cap
        )


@dataclass
class NoiseWeightConfig:
    """Uncertainty-guided noise weight (the paper's u; see ``upsr.uncertainty``).

    ``tau <= 0`` turns the weighting off (plain ResShift noise). ``gamma`` shapes the
    ``power`` family, ``sharpness`` the ``logistic`` one; other families ignore them.
    """

    family: str = "linear"
    tau: float = 0.1
    floor: float = 0.4
    gamma: float = 1.0
    sharpness: float = 8.0

    def __post_init__(self) -> None:
        from upsr.uncertainty import WEIGHT_FAMILIES  # lazy: keeps torch out of config parsing

        if self.family not in WEIGHT_FAMILIES:
            raise ValueError(
                f"family: unknown noise-weight family {self.family!r} (known: {', '.join(sorted(WEIGHT_FAMILIES))})"
            )
        if not -float("inf") < self.tau < float("inf"):
            raise ValueError(f"tau must be a finite number (<= 0 turns the weighting off), got {self.tau!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {self.floor!r}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")
        if not self.sharpness > 0:
            raise ValueError(f"sharpness must be > 0, got {self.sharpness!r}")
