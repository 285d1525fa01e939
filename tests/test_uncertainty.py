"""Noise weights: the paper's linear map and every registered family share its guarantees."""

import pytest
import torch

from upsr.config import NoiseWeightConfig
from upsr.config_loader import ConfigError, from_dict
from upsr.uncertainty import (
    WEIGHT_FAMILIES,
    family_weight,
    noise_weight,
    register_weight_family,
    uncertainty,
    weight_from_config,
)

# Family settings that bend the profile visibly, so a property that only the linear map
# satisfies would fail for them.
FAMILY_CONFIGS = {
    "linear": {},
    "power": {"gamma": 2.5},
    "logistic": {"sharpness": 12.0},
}


def test_every_registered_family_is_covered_here():
    # A family added to the registry without adding it here would escape the property tests.
    assert set(WEIGHT_FAMILIES) == set(FAMILY_CONFIGS)


def test_linear_weight_is_the_papers_formula():
    g = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    tau, floor = 0.1, 0.4
    psi = (g - y).abs() / 2
    expected = floor + (1 - floor) * psi.clamp(0, tau) / tau
    torch.testing.assert_close(noise_weight(g, y, tau, floor), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(uncertainty(g, y), psi, atol=0, rtol=0)
    torch.testing.assert_close(
        weight_from_config(NoiseWeightConfig(tau=tau, floor=floor), g, y), expected, atol=1e-12, rtol=0
    )


def test_linear_weight_hits_floor_and_one_exactly():
    y = torch.zeros(5, dtype=torch.float64)
    g = torch.tensor([0.0, 0.1, 0.2, 0.5, 2.0], dtype=torch.float64)  # psi = 0, tau/2, tau, 2.5 tau, 10 tau
    w = noise_weight(g, y, tau=0.1, floor=0.4)
    assert w.tolist()[0] == 0.4
    assert w.tolist()[2:] == [1.0, 1.0, 1.0]
    assert abs(w[1].item() - 0.7) < 1e-12


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("floor", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_family_properties(family, floor, dtype):
    tau = 0.1
    cfg = NoiseWeightConfig(family=family, tau=tau, floor=floor, **FAMILY_CONFIGS[family])
    psi = torch.linspace(0, 3 * tau, 601, dtype=dtype)
    w = family_weight(psi, cfg)
    assert w.dtype == dtype and w.shape == psi.shape
    assert bool((w >= floor).all()) and bool((w <= 1).all())
    assert bool((w[1:] >= w[:-1]).all()), "weight must not decrease as uncertainty grows"
    assert w[0].item() == pytest.approx(floor, abs=1e-6)  # float32 rounding of floor
    assert bool((w[psi >= tau] == 1).all()), "noise must be full once psi reaches tau"
    if floor < 1:
        assert w[psi < tau].max() < 1, "the weight must still vary below tau"
    # The same psi through weight_from_config (psi = |g - y| / 2 with y = 0).
    torch.testing.assert_close(weight_from_config(cfg, 2 * psi, torch.zeros_like(psi)), w)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_non_positive_tau_gives_resshift(family, tau):
    cfg = NoiseWeightConfig(family=family, tau=tau, **FAMILY_CONFIGS[family])
    g = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert bool((weight_from_config(cfg, g, y) == 1).all())
    assert bool((noise_weight(g, y, tau=tau, floor=0.4) == 1).all())


def test_shape_parameters_change_the_shape():
    psi = torch.tensor([0.05], dtype=torch.float64)  # u = 1/2 at tau = 0.1
    assert family_weight(psi, NoiseWeightConfig(family="power", gamma=2.0, floor=0.0)).item() == pytest.approx(0.25)
    assert family_weight(psi, NoiseWeightConfig(family="power", gamma=1.0, floor=0.0)).item() == pytest.approx(0.5)
    # The S-curve is symmetric about its centre: u = 1/2 maps to 1/2 for any sharpness,
    # and below the centre a sharper curve gives less noise.
    assert family_weight(psi, NoiseWeightConfig(family="logistic", floor=0.0)).item() == pytest.approx(0.5)
    quarter = torch.tensor([0.025], dtype=torch.float64)
    soft = family_weight(quarter, NoiseWeightConfig(family="logistic", sharpness=1.0, floor=0.0)).item()
    sharp = family_weight(quarter, NoiseWeightConfig(family="logistic", sharpness=20.0, floor=0.0)).item()
    assert sharp < soft < 0.25


def test_unknown_family_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"'cubic'.*known: linear, logistic, power"):
        NoiseWeightConfig(family="cubic")
    with pytest.raises(ConfigError, match="cubic"):
        from_dict(NoiseWeightConfig, {"family": "cubic"}, source="tune.yaml")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"floor": -0.1}, "floor"),
        ({"floor": 1.5}, "floor"),
        ({"tau": float("nan")}, "tau"),
        ({"gamma": 0.0}, "gamma"),
        ({"sharpness": -1.0}, "sharpness"),
    ],
)
def test_bad_config_values_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NoiseWeightConfig(**kwargs)


def test_noise_weight_rejects_bad_inputs():
    with pytest.raises(ValueError, match="floor"):
        noise_weight(torch.zeros(3), torch.zeros(3), tau=0.1, floor=1.2)
    with pytest.raises(ValueError, match="same shape"):
        noise_weight(torch.zeros(3), torch.zeros(4), tau=0.1, floor=0.4)


def test_registering_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        register_weight_family("linear")(lambda u, cfg: u)
