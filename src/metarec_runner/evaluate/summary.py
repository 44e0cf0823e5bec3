"""Summaries over tasks: mean with a 95% confidence interval (normal approximation or a seeded
percentile bootstrap over tasks), and breakdowns by support size."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

Z_95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal (CLT interval over test tasks)."""


def mean_ci(values: np.ndarray) -> tuple[float, float, int]:
    """Mean, 95% CI half-width (normal approximation, ``1.96 * sd / sqrt(n)``) and n.

    NaN entries (undefined for that task) are skipped. With n < 2 the half-width is NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    half = Z_95 * v.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return float(v.mean()), float(half), n


CI_METHODS = ("normal", "bootstrap")


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float, int]:
    """Mean, percentile-bootstrap interval ``(lo, hi)`` over tasks, and n.

    Resamples the tasks ``n_boot`` times with replacement (numpy ``default_rng(seed)``, so the
    interval is reproducible) and takes the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
    of the resampled means. NaN entries are skipped first. With n < 2, lo and hi are NaN.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if n < 2:
        return float(v.mean()), float("nan"), float("nan"), n
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, min(n_boot, 4_000_000 // n))  # bound memory at ~32 MB of indices per chunk
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(v.mean()), float(lo), float(hi), n


def summarize(
    per_task: pd.DataFrame,
    metrics: list[str],
    prefix: str,
    ci: str = "normal",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """``{prefix/metric: mean, prefix/metric_ci95: half-width}`` for every metric column.

    ``ci="normal"``: the half-width is ``1.96 * sd / sqrt(n)``. ``ci="bootstrap"``: a 95%
    percentile bootstrap (:func:`bootstrap_ci`, same ``seed`` for every metric, so the metrics
    share resampled task sets when they have the same NaNs); adds ``prefix/metric_ci_lo`` and
    ``prefix/metric_ci_hi`` and sets ``_ci95`` to half the interval's width.
    """
    if ci not in CI_METHODS:
        raise ValueError(f"ci must be one of {CI_METHODS}, got {ci!r}")
    out: dict[str, float] = {}
    for m in metrics:
        if ci == "normal":
            mean, half, _ = mean_ci(per_task[m].to_numpy())
            out[f"{prefix}/{m}"] = mean
            out[f"{prefix}/{m}_ci95"] = half
        else:
            mean, lo, hi, _ = bootstrap_ci(per_task[m].to_numpy(), n_boot=n_boot, level=0.95, seed=seed)
            out[f"{prefix}/{m}"] = mean
            out[f"{prefix}/{m}_ci95"] = (hi - lo) / 2.0
            out[f"{prefix}/{m}_ci_lo"] = lo
            out[f"{prefix}/{m}_ci_hi"] = hi
    return out


def by_support_size(
    per_task: pd.DataFrame, metrics: list[str], edges: tuple[int, ...] = (5, 10, 20, 40)
) -> pd.DataFrame:
    """Mean and CI per support-size bucket (``<=5``, ``6-10``, ..., ``>40``): cold vs warm users."""
    bins = [0, *edges, np.inf]
    labels = [f"<={edges[0]}"] + [f"{a + 1}-{b}" for a, b in zip(edges[:-1], edges[1:])]
    labels.append(f">{edges[-1]}")
    bucket = pd.cut(per_task["n_support"], bins=bins, labels=labels, right=True)
    rows = []
    for label, group in per_task.groupby(bucket, observed=True):
        row: dict[str, object] = {"support_size": label, "tasks": len(group)}
        for m in metrics:
            mean, half, _ = mean_ci(group[m].to_numpy())
            row[m], row[f"{m}_ci95"] = mean, half
        rows.append(row)
    return pd.DataFrame(rows)
