"""upsr.stats: the paired bootstrap (exact cases, the sign convention, its coverage) and the paired t-interval."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from upsr.stats import paired_bootstrap


def test_identical_differences_give_a_degenerate_interval_at_that_value():
    reference = np.array([20.0, 25.0, 31.0, 18.5])
    comparison = paired_bootstrap(reference + 0.25, reference, samples=500)
    assert comparison.mean_difference == pytest.approx(0.25)
    assert comparison.ci_low == pytest.approx(0.25) and comparison.ci_high == pytest.approx(0.25)
    assert comparison.excludes_zero and comparison.count == 4 and comparison.samples == 500


def test_lower_is_better_flips_the_sign_so_positive_means_the_candidate_wins():
    champion = np.array([0.30, 0.40, 0.35, 0.50])
    candidate = champion - 0.1  # lower LPIPS: better
    assert paired_bootstrap(candidate, champion, higher_is_better=False).mean_difference == pytest.approx(0.1)
    assert paired_bootstrap(candidate, champion, higher_is_better=True).mean_difference == pytest.approx(-0.1)


def test_pairing_removes_the_spread_between_images():
    # Images differ in difficulty by tens of dB; the candidate is 0.1 dB better on every one.
    # Unpaired, that gain would drown in the spread; paired, the interval is tight around it.
    rng = np.random.default_rng(1)
    champion = rng.uniform(15, 40, size=50)
    candidate = champion + 0.1 + rng.normal(0, 0.01, size=50)
    comparison = paired_bootstrap(candidate, champion)
    assert 0.09 < comparison.ci_low < comparison.mean_difference < comparison.ci_high < 0.11


def test_same_seed_same_interval_and_the_seed_matters():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=40), rng.normal(size=40)
    first, again = paired_bootstrap(a, b, seed=7), paired_bootstrap(a, b, seed=7)
    assert (first.ci_low, first.ci_high) == (again.ci_low, again.ci_high)
    other = paired_bootstrap(a, b, seed=8)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)


def test_interval_width_matches_the_bootstrap_standard_error():
    # The bootstrap distribution of a mean has standard deviation std(d, ddof=0) / sqrt(n); for
    # n = 400 it is close to normal, so the 95 % interval spans about +-1.96 of it.
    rng = np.random.default_rng(3)
    differences = rng.normal(0.3, 2.0, size=400)
    comparison = paired_bootstrap(differences, np.zeros(400), samples=20_000)
    expected_half_width = 1.96 * differences.std() / np.sqrt(differences.size)
    assert (comparison.ci_high - comparison.ci_low) / 2 == pytest.approx(expected_half_width, rel=0.05)
    assert (comparison.ci_high + comparison.ci_low) / 2 == pytest.approx(differences.mean(), abs=0.05)


def test_coverage_of_the_true_mean_is_close_to_the_confidence():
    rng = np.random.default_rng(4)
    experiments, covered = 300, 0
    for seed in range(experiments):
        differences = rng.normal(0.5, 1.0, size=40)
        comparison = paired_bootstrap(differences, np.zeros(40), samples=1000, seed=seed)
        covered += comparison.ci_low <= 0.5 <= comparison.ci_high
    # Percentile intervals undercover slightly at n = 40; 300 experiments give +-2.5 % noise.
    assert 0.88 <= covered / experiments <= 0.99


@pytest.mark.parametrize("candidate, reference, message", [
    ([1.0], [0.0], "at least 2"),
    ([1.0, 2.0], [0.0], "1-D arrays of one length"),
    ([1.0, float("nan")], [0.0, 0.0], "finite"),
])
def test_rejects_what_it_cannot_compare(candidate, reference, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(np.array(candidate), np.array(reference))


def test_t_interval_of_three_seeds_is_the_textbook_one():
    from upsr.stats import paired_t_interval

    candidate, reference = np.array([21.0, 21.5, 22.3]), np.array([20.8, 21.0, 21.6])
    differences = candidate - reference  # 0.2, 0.5, 0.7: mean 0.4667, sd 0.2517
    half = scipy.stats.t.ppf(0.975, 2) * differences.std(ddof=1) / np.sqrt(3)  # t(0.975, 2) = 4.303
    result = paired_t_interval(candidate, reference)
    assert result.mean_difference == pytest.approx(0.466667, abs=1e-6) and result.samples == 0
    mean = differences.mean()
    assert (result.ci_low, result.ci_high) == pytest.approx((mean - half, mean + half), abs=1e-9)
    assert half == pytest.approx(0.6252, abs=1e-4) and not result.excludes_zero
    flipped = paired_t_interval(reference, candidate, higher_is_better=False)
    assert (flipped.ci_low, flipped.ci_high) == pytest.approx((result.ci_low, result.ci_high))
    same = paired_t_interval(candidate + 1, candidate)
    assert same.ci_low == same.ci_high == 1.0 and same.excludes_zero
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_t_interval(candidate[:1], reference[:1])
