"""Summaries over tasks: mean with a 95% confidence interval, and breakdowns by support size."""

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


def summarize(per_task: pd.DataFrame, metrics: list[str], prefix: str) -> dict[str, float]:
    """``{prefix/metric: mean, prefix/metric_ci95: half-width}`` for every metric column."""
    out: dict[str, float] = {}
    for m in metrics:
        mean, half, _ = mean_ci(per_task[m].to_numpy())
        out[f"{prefix}/{m}"] = mean
        out[f"{prefix}/{m}_ci95"] = half
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
