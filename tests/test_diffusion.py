"""The anisotropic diffusion against formulas derived independently here (DESIGN §1).

Float64 throughout unless a test is about dtypes; analytic comparisons use 1e-12 (rounding
only), Monte-Carlo ones a tolerance of 5 standard errors of the estimate.
"""

import math

import pytest
import torch

from upsr.config import DiffusionConfig
from upsr.diffusion import UNWDiffusion
from upsr.schedule import eta_schedule

KAPPA = 2.0
SHAPE = (3, 4, 4)
F64 = torch.float64


def resshift() -> UNWDiffusion:
    # ResShift's T=4 schedule: eta = [0.01, 0.2705, 0.5797, 0.9801] (DESIGN §1).
    return UNWDiffusion(eta_schedule(4, KAPPA, 0.3, 0.2, 0.99, eta_1_cap=None), KAPPA)


def images(seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x0`` and ``y`` in [-1, 1] and a weight spread over UPSR's range [0.4, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, *SHAPE, generator=gen, dtype=F64) * 2 - 1
    y = torch.rand(batch, *SHAPE, generator=gen, dtype=F64) * 2 - 1
    w = 0.4 + 0.6 * torch.rand(batch, *SHAPE, generator=gen, dtype=F64)
    return x0, y, w


def steps(value: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.long)


def analytic_moments(diffusion, x0, y, t, w):
    """Mean and standard deviation of q_sample read off with noise 0 and noise 1."""
    mean = diffusion.q_sample(x0, y, t, w, noise=torch.zeros_like(x0))
    std = diffusion.q_sample(x0, y, t, w, noise=torch.ones_like(x0)) - mean
    return mean, std


@pytest.mark.parametrize("t", range(4))
def test_forward_marginal_monte_carlo(t):
    diffusion = resshift()
    x0, y, w = images(seed=t)
    n = 20_000
    gen = torch.Generator().manual_seed(100 + t)
    xs = diffusion.q_sample(x0.expand(n, *SHAPE), y.expand(n, *SHAPE), steps(t, n), w, generator=gen)
    eta = diffusion.etas[t].item()
    mean = x0 + eta * (y - x0)
    var = KAPPA**2 * eta * w**2
    # Standard error of the sample mean is std / sqrt(n); of the sample variance (Gaussian)
    # var * sqrt(2 / (n - 1)). 5 of them keep 48 pixels x 4 steps from failing by chance.
    assert bool(((xs.mean(0) - mean).abs() <= 5 * var.sqrt() / math.sqrt(n)).all())
    assert bool(((xs.var(0) - var).abs() <= 5 * var * math.sqrt(2 / (n - 1))).all())


@pytest.mark.parametrize("t", range(1, 4))
def test_one_step_transitions_compose_to_the_marginal(t):
    diffusion = resshift()
    x0, y, w = images(seed=10 + t)
    eta, eta_prev = diffusion.etas[t].item(), diffusion.etas[t - 1].item()
    alpha = eta - eta_prev
    # Analytic: x_t = x_{t-1} + alpha (y - x0) + kappa sqrt(alpha) w eps adds alpha to the
    # mean's share of the residual and kappa^2 alpha w^2 to the variance.
    mean_prev, std_prev = analytic_moments(diffusion, x0, y, steps(t - 1, 1), w)
    mean, std = analytic_moments(diffusion, x0, y, steps(t, 1), w)
    torch.testing.assert_close(mean_prev + alpha * (y - x0), mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(std_prev**2 + KAPPA**2 * alpha * w**2, std**2, atol=1e-12, rtol=0)
    # Monte-Carlo through the sampler itself: q_sample at t-1, then the transition.
    n = 20_000
    gen = torch.Generator().manual_seed(200 + t)
    x_prev = diffusion.q_sample(x0.expand(n, *SHAPE), y.expand(n, *SHAPE), steps(t - 1, n), w, generator=gen)
    eps = torch.randn(x_prev.shape, generator=gen, dtype=F64)
    x_t = x_prev + alpha * (y - x0) + KAPPA * math.sqrt(alpha) * w * eps
    assert bool(((x_t.mean(0) - mean).abs() <= 5 * std / math.sqrt(n)).all())
    assert bool(((x_t.var(0) - std**2).abs() <= 5 * std**2 * math.sqrt(2 / (n - 1))).all())


@pytest.mark.parametrize("t", range(1, 4))
def test_posterior_is_bayes_rule(t):
    diffusion = resshift()
    x0, y, w = images(seed=20 + t, batch=2)
    x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(30 + t), dtype=F64)
    eta, eta_prev = diffusion.etas[t].item(), diffusion.etas[t - 1].item()
    alpha = eta - eta_prev
    # Prior q(x_{t-1} | x0) times the transition q(x_t | x_{t-1}) read as a Gaussian in x_{t-1}.
    prior_mean, prior_var = x0 + eta_prev * (y - x0), KAPPA**2 * eta_prev * w**2
    lik_mean, lik_var = x_t - alpha * (y - x0), KAPPA**2 * alpha * w**2
    var = 1 / (1 / prior_var + 1 / lik_var)
    mean = var * (prior_mean / prior_var + lik_mean / lik_var)
    got_mean, got_var = diffusion.posterior_mean_variance(x_t, x0, steps(t, 2), w)
    torch.testing.assert_close(got_mean, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_var, var, atol=1e-12, rtol=0)


def test_posterior_at_first_step_is_x0_without_noise():
    diffusion = resshift()
    x0, y, w = images(seed=40, batch=2)
    mean, var = diffusion.posterior_mean_variance(torch.randn_like(x0), x0, steps(0, 2), w)
    torch.testing.assert_close(mean, x0, atol=1e-15, rtol=0)
    assert bool((var == 0).all()) and var.shape == x0.shape
    huge_noise = torch.full_like(x0, 1e6)
    assert torch.equal(diffusion.ancestral_step(torch.randn_like(x0), x0, steps(0, 2), w, noise=huge_noise), x0)


@pytest.mark.parametrize("w_one", [1.0, torch.ones(1, *SHAPE, dtype=F64)])
def test_unit_weight_is_plain_resshift(w_one):
    diffusion = resshift()
    etas = [0.01, 0.2705, 0.5797, 0.9801]  # ResShift's values, to 4 decimals
    t = torch.tensor([0, 1, 2, 3, 3, 1])
    batch = t.shape[0]
    x0, y, _ = images(seed=50, batch=batch)
    gen = torch.Generator().manual_seed(51)
    x_t, x0_hat, noise = (torch.randn(batch, *SHAPE, generator=gen, dtype=F64) for _ in range(3))
    eta = torch.tensor([etas[i] for i in t.tolist()], dtype=F64).view(-1, 1, 1, 1)
    eta_prev = torch.tensor([([0.0] + etas)[i] for i in t.tolist()], dtype=F64).view(-1, 1, 1, 1)
    alpha = eta - eta_prev
    # The schedule itself is only known to 4 decimals, hence the loose tolerance.
    close = lambda a, b: torch.testing.assert_close(a, b.expand_as(a), atol=1e-3, rtol=0)  # noqa: E731

    close(diffusion.q_sample(x0, y, t, w_one, noise), x0 + eta * (y - x0) + KAPPA * eta.sqrt() * noise)
    close(diffusion.prior_sample(y, w_one, noise), y + KAPPA * math.sqrt(etas[-1]) * noise)
    mean, var = diffusion.posterior_mean_variance(x_t, x0_hat, t, w_one)
    close(mean, eta_prev / eta * x_t + alpha / eta * x0_hat)
    close(var, KAPPA**2 * eta_prev / eta * alpha)
    close(diffusion.ancestral_step(x_t, x0_hat, t, w_one, noise), mean + var.sqrt() * noise)
    m = (eta_prev / eta).sqrt()
    k = 1 - eta_prev - (1 - eta) * m
    close(diffusion.ddim_step(x_t, x0_hat, y, t), k * x0_hat + m * x_t + (eta_prev - (eta * eta_prev).sqrt()) * y)
    close(diffusion.scale_input(x_t, t), x_t / (eta * KAPPA**2 * 0.3 + 0.25).sqrt())


def test_weight_scales_only_the_noise_elementwise():
    diffusion = resshift()
    x0, y, w = images(seed=60, batch=3)
    t = torch.tensor([0, 2, 3])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(61), dtype=F64)
    mean = diffusion.q_sample(x0, y, t, 1.0, torch.zeros_like(x0))
    torch.testing.assert_close(
        diffusion.q_sample(x0, y, t, w, noise) - mean, w * (diffusion.q_sample(x0, y, t, 1.0, noise) - mean),
        atol=1e-12, rtol=0,
    )
    prior_mean = diffusion.prior_sample(y, 1.0, torch.zeros_like(y))
    torch.testing.assert_close(
        diffusion.prior_sample(y, w, noise) - prior_mean, w * (diffusion.prior_sample(y, 1.0, noise) - prior_mean),
        atol=1e-12, rtol=0,
    )
    _, var_w = diffusion.posterior_mean_variance(x0, x0, t, w)
    _, var_1 = diffusion.posterior_mean_variance(x0, x0, t, 1.0)
    torch.testing.assert_close(var_w, w**2 * var_1, atol=1e-12, rtol=0)


def test_ddim_with_oracle_stays_on_the_marginal_of_any_start():
    diffusion = resshift()
    x0, y, w = images(seed=70, batch=2)
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(71), dtype=F64) * 3
    # Any x_T is x0 + eta_T (y - x0) + kappa sqrt(eta_T) w eps for some eps; a deterministic
    # step with the true x0 must keep that eps, so every x_{t-1} is on q(x_{t-1} | x0).
    eta_T = diffusion.etas[-1].item()
    eps = (x - x0 - eta_T * (y - x0)) / (KAPPA * math.sqrt(eta_T) * w)
    for t in reversed(range(1, diffusion.num_steps)):
        x = diffusion.ddim_step(x, x0, y, steps(t, 2))
        torch.testing.assert_close(x, diffusion.q_sample(x0, y, steps(t - 1, 2), w, eps), atol=1e-12, rtol=0)
    assert torch.equal(diffusion.ddim_step(x, x0, y, steps(0, 2)), x0)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_sample_with_oracle_returns_x0(sampler):
    diffusion = UNWDiffusion.from_config(DiffusionConfig())
    x0, y, w = images(seed=80, batch=2)
    cond = torch.randn(2, 6, 4, 4, dtype=F64)
    seen = []

    def oracle(x_t, t, c):
        assert c is cond and x_t.shape == x0.shape and t.shape == (2,)
        seen.append((t.tolist(), x_t.clone()))
        return x0

    out = diffusion.sample(oracle, y, cond, w, sampler=sampler, generator=torch.Generator().manual_seed(81))
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)
    assert [t for t, _ in seen] == [[s, s] for s in (4, 3, 2, 1, 0)]
    # The walk starts from the weighted prior, drawn from the caller's generator.
    expected_start = diffusion.prior_sample(y, w, generator=torch.Generator().manual_seed(81))
    assert torch.equal(seen[0][1], expected_start)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_sample_is_the_documented_loop(sampler):
    # A denoiser that depends on x_t, t and cond, so that any mis-wiring changes the output.
    diffusion = resshift()
    x0, y, w = images(seed=85, batch=2)
    cond = x0

    def denoiser(x_t, t, c):
        return 0.5 * diffusion.scale_input(x_t, t) + 0.1 * t.view(-1, 1, 1, 1) * c

    gen = torch.Generator().manual_seed(86)
    x = diffusion.prior_sample(y, w, generator=gen)
    for step in (3, 2, 1, 0):
        t = steps(step, 2)
        if sampler == "ddim":
            x = diffusion.ddim_step(x, denoiser(x, t, cond), y, t)
        else:
            x = diffusion.ancestral_step(x, denoiser(x, t, cond), t, w, generator=gen)
    out = diffusion.sample(denoiser, y, cond, w, sampler=sampler, generator=torch.Generator().manual_seed(86))
    torch.testing.assert_close(out, x.clamp(-1, 1), atol=1e-12, rtol=0)
    assert not torch.equal(x, x.clamp(-1, 1)), "the clamp must have been exercised"


def test_ancestral_step_with_oracle_keeps_the_marginal():
    # If x_t ~ q(x_t | x0) and x_{t-1} ~ q(x_{t-1} | x_t, x0), then x_{t-1} ~ q(x_{t-1} | x0).
    diffusion = resshift()
    x0, y, w = images(seed=90)
    t, n = 2, 20_000
    gen = torch.Generator().manual_seed(91)
    big = lambda a: a.expand(n, *SHAPE)  # noqa: E731
    x_t = diffusion.q_sample(big(x0), big(y), steps(t, n), w, generator=gen)
    x_prev = diffusion.ancestral_step(x_t, big(x0), steps(t, n), w, generator=gen)
    mean, std = analytic_moments(diffusion, x0, y, steps(t - 1, 1), w)
    assert bool(((x_prev.mean(0) - mean).abs() <= 5 * std / math.sqrt(n)).all())
    assert bool(((x_prev.var(0) - std**2).abs() <= 5 * std**2 * math.sqrt(2 / (n - 1))).all())


def test_sampling_is_reproducible_from_the_generator():
    diffusion = UNWDiffusion.from_config(DiffusionConfig())
    _, y, w = images(seed=100, batch=2)
    blur = lambda x_t, t, cond: 0.5 * x_t  # noqa: E731  (any non-oracle denoiser)
    run = lambda seed, sampler: diffusion.sample(  # noqa: E731
        blur, y, y, w, sampler=sampler, generator=torch.Generator().manual_seed(seed)
    )
    for sampler in ("ddim", "ancestral"):
        assert torch.equal(run(1, sampler), run(1, sampler))
        assert not torch.equal(run(1, sampler), run(2, sampler))
        out = run(1, sampler)
        assert out.min() >= -1 and out.max() <= 1


def test_dtype_follows_the_input_and_schedule_stays_float64():
    diffusion = UNWDiffusion.from_config(DiffusionConfig())
    assert diffusion.etas.dtype == F64
    x0, y, w = (a.float() for a in images(seed=110, batch=2))
    t = torch.tensor([0, 4])
    assert diffusion.q_sample(x0, y, t, w, torch.zeros_like(x0)).dtype == torch.float32
    assert diffusion.scale_input(x0, t).dtype == torch.float32
    mean, var = diffusion.posterior_mean_variance(x0, x0, t, w)
    assert mean.dtype == var.dtype == torch.float32
    assert diffusion.ddim_step(x0, x0, y, t).dtype == torch.float32


def test_from_config_and_attributes():
    cfg = DiffusionConfig()
    diffusion = UNWDiffusion.from_config(cfg)
    assert diffusion.num_steps == 5 and diffusion.kappa == 2.5
    torch.testing.assert_close(diffusion.etas, eta_schedule(5, 2.5, 0.2, 0.2, 0.99), atol=0, rtol=0)
    assert "num_steps=5" in repr(diffusion)


def test_sample_timesteps_is_uniform_over_steps():
    diffusion = resshift()
    t = diffusion.sample_timesteps(4000, generator=torch.Generator().manual_seed(120))
    assert t.shape == (4000,) and t.dtype == torch.long
    counts = torch.bincount(t, minlength=4)
    assert counts.numel() == 4
    # Each count is Binomial(4000, 1/4): mean 1000, std ~27; 5 std either side.
    assert bool(((counts - 1000).abs() <= 140).all())
    again = diffusion.sample_timesteps(4000, generator=torch.Generator().manual_seed(120))
    assert torch.equal(t, again)


@pytest.mark.parametrize(
    "t, message",
    [
        (torch.tensor([0.0, 1.0]), "integer tensor"),
        (torch.tensor([[0, 1]]), "integer tensor"),
        (2, "integer tensor"),
        (torch.tensor([0, 1, 2]), "batch has 2"),
        (torch.tensor([0, 4]), r"\[0, 3\]"),
        (torch.tensor([-1, 0]), r"\[0, 3\]"),
    ],
)
def test_bad_timesteps_raise(t, message):
    x0, y, w = images(seed=130, batch=2)
    with pytest.raises(ValueError, match=message):
        resshift().q_sample(x0, y, t, w)


@pytest.mark.parametrize(
    "etas, kappa, message",
    [
        ([0.1, 0.1, 0.5], 2.0, "increase"),
        ([0.0, 0.5], 2.0, r"\(0, 1\]"),
        ([0.5, 1.5], 2.0, r"\(0, 1\]"),
        ([], 2.0, "non-empty"),
        ([0.1, 0.5], 0.0, "kappa"),
    ],
)
def test_bad_construction_raises(etas, kappa, message):
    with pytest.raises(ValueError, match=message):
        UNWDiffusion(torch.tensor(etas, dtype=F64), kappa)


def test_unknown_sampler_raises():
    _, y, w = images(seed=140)
    with pytest.raises(ValueError, match="ddim"):
        resshift().sample(lambda x, t, c: x, y, y, w, sampler="euler")
