"""Percentile-bootstrap confidence intervals for metrics that are averages over evaluation images.

A metric over a few hundred generated images is itself a random quantity; reporting it with an interval says whether
two checkpoints differ by more than the choice of evaluation images. Both functions resample the first axis (the
images) with replacement; the paired version uses the same resamples for two systems scored on the same images, so
the per-image difficulty cancels and the interval of the difference is much narrower than two separate intervals.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _check(values, n_resamples: int, level: float) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim < 1 or values.shape[0] < 2:
        raise ValueError(f"bootstrap needs at least 2 values along the first axis, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"bootstrap values contain {np.count_nonzero(~np.isfinite(values))} non-finite entries")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    return values


def _interval(stat, boot: np.ndarray, level: float):
    low, high = np.quantile(boot, [(1.0 - level) / 2, (1.0 + level) / 2], axis=0)
    if np.ndim(stat) == 0:  # a scalar statistic gives plain floats, ready for logging and json
        return float(stat), float(low), float(high)
    return stat, low, high


def bootstrap_ci(values, statistic: Callable[[np.ndarray], np.ndarray] = np.mean, n_resamples: int = 1000,
                 level: float = 0.95, seed: int = 0):
    """(estimate, low, high): statistic(values) and its percentile-bootstrap interval at `level`.

    values: (N, ...) with one row per image, e.g. a per-image metric array (N,). statistic maps an array of that
    shape to a scalar or an array (it is called on each resample, so it must reduce over the first axis; np.mean and
    np.median without `axis` reduce everything, which is the same for a 1-D array). Deterministic in `seed`.
    """
    values = _check(values, n_resamples, level)
    idx = np.random.default_rng(seed).integers(0, values.shape[0], (n_resamples, values.shape[0]))
    boot = np.stack([np.asarray(statistic(values[i])) for i in idx])
    return _interval(np.asarray(statistic(values)), boot, level)


def bootstrap_ci_paired(a, b, statistic: Callable[[np.ndarray], np.ndarray] = np.mean, n_resamples: int = 1000,
                        level: float = 0.95, seed: int = 0):
    """(estimate, low, high) of statistic(a) - statistic(b) for two systems scored on the same N images.

    Row i of `a` and of `b` must be the same image; each resample draws the same rows from both.
    """
    a, b = _check(a, n_resamples, level), _check(b, n_resamples, level)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired bootstrap needs the same images in both: {a.shape[0]} vs {b.shape[0]} rows")
    idx = np.random.default_rng(seed).integers(0, a.shape[0], (n_resamples, a.shape[0]))
    boot = np.stack([np.asarray(statistic(a[i])) - np.asarray(statistic(b[i])) for i in idx])
    return _interval(np.asarray(statistic(a)) - np.asarray(statistic(b)), boot, level)


def with_ci(values: dict[str, np.ndarray], prefix: str = "", seed: int = 0) -> dict:
    """{prefix + name: mean, prefix + name + '_ci': bootstrap 95 % interval} of per-example values; a metric with no
    values (no scored relation in a small set) is left out, one with a single value has no interval."""
    out = {}
    for name, v in values.items():
        v = np.asarray(v)
        if len(v) < 2:
            if len(v):
                out[f"{prefix}{name}"] = float(v[0])
            continue
        mean, low, high = bootstrap_ci(v, seed=seed)
        out[f"{prefix}{name}"] = float(mean)
        out[f"{prefix}{name}_ci"] = [float(low), float(high)]
    return out
