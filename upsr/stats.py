"""Paired comparison of two models' per-image scores on the same images.

The question a promotion asks is "is the candidate better than the champion on *these*
images?". Both models are scored on the same images, so the per-image differences carry the
signal and the image-to-image spread of difficulty cancels out; a paired bootstrap of the mean
difference gives a confidence interval without assuming the differences are normal (per-image
PSNR differences are typically skewed by a few hard images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.stats

# Resamples per vectorised batch: bounds memory (batch x images values) for large eval sets.
_BATCH = 1 << 22


@dataclass(frozen=True)
class PairedComparison:
    """Mean of ``candidate - reference`` (signed so that positive means the candidate is better)
    and its confidence interval: a percentile bootstrap (``samples`` resamples) or Student-t
    (``samples`` 0)."""

    mean_difference: float
    ci_low: float
    ci_high: float
    confidence: float
    count: int
    samples: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


def _checked_pairs(candidate: np.ndarray, reference: np.ndarray, too_few: str) -> tuple[np.ndarray, np.ndarray]:
    """Both score arrays as float64, checked: 1-D, one length of at least 2 (else ``too_few``), finite."""
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if candidate.shape != reference.shape or candidate.ndim != 1:
        raise ValueError(f"expected two 1-D arrays of one length, got shapes {candidate.shape} and {reference.shape}")
    if candidate.size < 2:
        raise ValueError(f"{too_few}, got {candidate.size}")
    if not (np.isfinite(candidate).all() and np.isfinite(reference).all()):
        raise ValueError("scores must be finite")
    return candidate, reference


def paired_bootstrap(
    candidate: np.ndarray,
    reference: np.ndarray,
    higher_is_better: bool = True,
    samples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Percentile bootstrap CI of the mean per-image difference; the arrays pair image i with image i.

    ``scipy.stats.bootstrap`` of the differences (percentile method): resampling images with
    replacement ``samples`` times, the same draws for both models (that is what makes it
    paired). Deterministic for a seed.
    """
    candidate, reference = _checked_pairs(candidate, reference, "a bootstrap interval needs at least 2 paired images")
    if samples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need samples >= 1 and 0 < confidence < 1, got {samples} and {confidence}")
    differences = candidate - reference if higher_is_better else reference - candidate
    # Resampling the per-image differences resamples both models' scores with the same indices.
    result = scipy.stats.bootstrap((differences,), np.mean, n_resamples=samples, confidence_level=confidence,
                                   method="percentile", random_state=np.random.default_rng(seed),
                                   batch=max(1, _BATCH // differences.size))
    low, high = result.confidence_interval
    if np.ptp(differences) == 0:  # every resample has the same mean; scipy reports no interval then
        low = high = differences[0]
    return PairedComparison(mean_difference=float(differences.mean()), ci_low=float(low), ci_high=float(high),
                            confidence=confidence, count=differences.size, samples=samples)


def paired_t_interval(
    candidate: np.ndarray,
    reference: np.ndarray,
    higher_is_better: bool = True,
    confidence: float = 0.95,
) -> PairedComparison:
    """Student-t confidence interval of the mean paired difference (``scipy.stats.ttest_rel``), for
    the few pairs a bootstrap cannot resample meaningfully (e.g. three seeds per arm); assumes the
    differences are roughly normal. ``samples`` is 0: the interval is analytic."""
    candidate, reference = _checked_pairs(candidate, reference, "a t-interval needs at least 2 pairs")
    better, worse = (candidate, reference) if higher_is_better else (reference, candidate)
    differences = better - worse
    if np.ptp(differences) == 0:  # no spread: the interval is the difference itself (scipy gives NaN)
        low = high = float(differences[0])
    else:
        low, high = scipy.stats.ttest_rel(better, worse).confidence_interval(confidence)
    return PairedComparison(mean_difference=float(differences.mean()), ci_low=float(low), ci_high=float(high),
                            confidence=confidence, count=differences.size, samples=0)
