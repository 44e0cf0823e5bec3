"""The per-task table of an evaluation and its summaries over tasks: mean with a 95% confidence
interval (Student's t with n - 1 degrees of freedom, or a seeded percentile bootstrap over
tasks), and breakdowns by support size.

The interval arithmetic lives in :mod:`metarec_runner.evaluate.stats` (``mean_ci`` and
``bootstrap_ci`` are re-exported here); its docstring states what each interval is.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from metarec_runner.evaluate.stats import CI_METHODS, bootstrap_ci, mean_ci

__all__ = ["CI_METHODS", "TaskTable", "bootstrap_ci", "by_support_size", "mean_ci", "summarize"]


class TaskTable:
    """The per-task table of one evaluation, filled a batch of tasks at a time.

    Columns: :data:`COUNTS` first (``task_id``, the support, query, candidate and relevant
    counts, ``ranking_trivial``), then one float64 column per metric, in the order first added.
    Values are ``[B]`` arrays or tensors (moved to the CPU here).
    """

    COUNTS = ("task_id", "n_support", "n_query", "n_candidates", "n_relevant", "ranking_trivial")

    def __init__(self) -> None:
        self._counts: dict[str, list[np.ndarray]] = {k: [] for k in self.COUNTS}
        self._values: dict[str, list[np.ndarray]] = {}

    def add(self, counts: dict[str, object], values: dict[str, object]) -> None:
        """One batch: ``counts`` has every key of :data:`COUNTS`; ``values`` the metrics."""
        for key in self.COUNTS:
            self._counts[key].append(_numpy(counts[key]))
        for name, v in values.items():
            self._values.setdefault(name, []).append(_numpy(v, np.float64))

    def frame(self) -> pd.DataFrame:
        """The table so far: one row per task."""
        frame = pd.DataFrame({k: np.concatenate(v) for k, v in self._counts.items()})
        for name, v in self._values.items():
            frame[name] = np.concatenate(v)
        return frame


def _numpy(value, dtype: type | None = None) -> np.ndarray:
    """A ``[B]`` tensor (any device, any dtype) or array as a numpy array (of ``dtype``)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = (value.double() if dtype is np.float64 else value).numpy()
    return np.asarray(value, dtype=dtype)


def summarize(
    per_task: pd.DataFrame,
    metrics: list[str],
    prefix: str,
    ci: str = "normal",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """``{prefix/metric: mean, prefix/metric_ci95: half-width}`` for every metric column.

    ``ci="normal"``: the half-width of Student's t-interval over the n tasks where the metric is
    defined, ``t_{0.975, n-1} * sd / sqrt(n)`` (:func:`metarec_runner.evaluate.stats.t_interval`;
    NaN with n < 2). ``ci="bootstrap"``: a 95% percentile bootstrap (:func:`bootstrap_ci`, same
    ``seed`` for every metric, so the metrics share resampled task sets when they have the same
    NaNs); adds ``prefix/metric_ci_lo`` and ``prefix/metric_ci_hi`` and sets ``_ci95`` to half
    the interval's width.
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
    """Mean and 95% t-interval half-width over the tasks of each support-size bucket (``<=5``,
    ``6-10``, ..., ``>40``): cold vs warm users."""
    bins = [0, *edges, np.inf]
    labels = [f"<={edges[0]}"] + [f"{a + 1}-{b}" for a, b in itertools.pairwise(edges)]
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
