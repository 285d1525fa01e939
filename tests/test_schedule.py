"""The noise schedule against the numbers published with UPSR and ResShift (DESIGN §1)."""

import math

import pytest
import torch

from upsr.config import DiffusionConfig
from upsr.schedule import eta_schedule
from upsr.config_loader import ConfigError, from_dict


def test_upsr_default_schedule_matches_published_values():
    etas = eta_schedule(steps=5, kappa=2.5, power=0.2, min_noise_level=0.2, eta_end=0.99)
    assert etas.dtype == torch.float64
    # The published values are rounded to 6 decimals, hence 1e-5 on the sqrt scale.
    expected = torch.tensor([0.031623, 0.430011, 0.633908, 0.816602, 0.99], dtype=torch.float64)
    torch.testing.assert_close(etas.sqrt(), expected, atol=1e-5, rtol=0)


def test_resshift_schedule_without_cap():
    etas = eta_schedule(steps=4, kappa=2.0, power=0.3, min_noise_level=0.2, eta_end=0.99, eta_1_cap=None)
    # Published to 4 decimals.
    torch.testing.assert_close(
        etas, torch.tensor([0.01, 0.2705, 0.5797, 0.9801], dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_cap_only_binds_when_smaller():
    # min_noise_level / kappa = 0.02 < sqrt(0.001) ~ 0.0316: the cap must not change eta_1.
    capped = eta_schedule(steps=4, kappa=10.0, power=0.3, min_noise_level=0.2, eta_end=0.99, eta_1_cap=0.001)
    uncapped = eta_schedule(steps=4, kappa=10.0, power=0.3, min_noise_level=0.2, eta_end=0.99, eta_1_cap=None)
    torch.testing.assert_close(capped, uncapped, atol=0, rtol=0)
    assert math.isclose(capped[0].item(), 0.02**2, rel_tol=1e-12)


@pytest.mark.parametrize("steps", [2, 5, 15, 50])
def test_schedule_is_increasing_with_exact_ends(steps):
    etas = eta_schedule(steps=steps, kappa=2.5, power=0.2, min_noise_level=0.2, eta_end=0.99)
    assert etas.shape == (steps,)
    assert bool((etas[1:] > etas[:-1]).all())
    # Ends come from closed forms; only float rounding separates them.
    assert math.isclose(etas[0].item(), 0.001, rel_tol=1e-12)
    assert math.isclose(etas[-1].item(), 0.99**2, rel_tol=1e-12)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"steps": 1}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"kappa": 0.0}, "kappa"),
        ({"kappa": float("inf")}, "kappa"),
        ({"power": -0.1}, "power"),
        ({"min_noise_level": 0.0}, "min_noise_level"),
        ({"eta_end": 1.01}, "eta_end"),
        ({"eta_end": 0.0}, "eta_end"),
        ({"eta_end": 0.01}, "eta_end"),  # below sqrt(eta_1): the schedule would decrease
        ({"eta_1_cap": 0.0}, "eta_1_cap"),
        ({"eta_1_cap": 2.0}, "eta_1_cap"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    args = {"steps": 5, "kappa": 2.5, "power": 0.2, "min_noise_level": 0.2, "eta_end": 0.99} | kwargs
    with pytest.raises(ValueError, match=name):
        eta_schedule(**args)
    with pytest.raises(ValueError, match=name):
        DiffusionConfig(**args)


def test_config_defaults_are_the_paper_schedule_and_bad_keys_are_named():
    cfg = DiffusionConfig()
    assert (cfg.steps, cfg.kappa, cfg.power, cfg.min_noise_level, cfg.eta_end, cfg.eta_1_cap) == (
        5, 2.5, 0.2, 0.2, 0.99, 0.001
    )
    resshift = from_dict(DiffusionConfig, {"steps": 4, "kappa": 2, "power": 0.3, "eta_1_cap": None})
    assert resshift.eta_1_cap is None and resshift.kappa == 2.0
    with pytest.raises(ConfigError, match="kappa"):
        from_dict(DiffusionConfig, {"kappa": -1.0}, source="x.yaml")
