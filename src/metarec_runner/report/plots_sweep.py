"""The plots of a sweep: the comparison of its groups (``sweep_comparison.png``) and the k-shot
curve (``kshot_curve.png``), with 95% Student's t-intervals over distinct seeds
(:mod:`metarec_runner.evaluate.stats`) clipped to the metric's declared range.

``matplotlib`` is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metarec_runner.report import plots_common as common

if TYPE_CHECKING:
    import pandas as pd

INTERVAL = "95% Student-t CI over seeds"


def comparison_bars(table: pd.DataFrame, metric: str) -> tuple[Any, Any, Any]:
    """``(mean, lo, hi)`` arrays of the comparison plot: ``mean ± ci95`` clipped to ``metric``'s
    declared range (:func:`metarec_runner.evaluate.stats.clip_to_range`); NaN bounds where a
    group has no interval."""
    mean = table["mean"].to_numpy(dtype=float)
    lo, hi = common.clipped_band(metric, mean, table["ci95"].to_numpy(dtype=float))
    return mean, lo, hi


def with_t_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``ci95`` filled in from ``std`` and ``n_seeds`` where it lacks one but has
    both (Student's t with n - 1 degrees of freedom, :func:`metarec_runner.evaluate.stats.
    t_critical`); a group with fewer than two seeds keeps NaN (no interval)."""
    import numpy as np

    from metarec_runner.evaluate.stats import t_critical

    if "ci95" in table.columns or not {"std", "n_seeds"} <= set(table.columns):
        return table
    n = table["n_seeds"].to_numpy(dtype=float)
    std = table["std"].to_numpy(dtype=float)
    half = [t_critical(int(k) - 1) * s / math.sqrt(k) if k >= 2 else np.nan
            for k, s in zip(n, std, strict=True)]
    return table.assign(ci95=half)


def _labels(table: pd.DataFrame, keys: list[str], has: Any) -> list[str]:
    labels = []
    for (_, row), with_ci in zip(table.iterrows(), has, strict=True):
        text = ", ".join(str(row[k]) if len(keys) == 1 else f"{k}={row[k]}" for k in keys)
        notes = []
        if "n_seeds" in table.columns:
            notes.append(f"{int(row['n_seeds'])} seed{'s' if int(row['n_seeds']) != 1 else ''}")
        elif "n_runs" in table.columns:
            notes.append(f"n={int(row['n_runs'])}")
        if not with_ci:
            notes.append("no CI")
        text += f"  ({': '.join(notes)})"
        labels.append(text if len(text) <= 60 else text[:57] + "...")
    return labels


def _group_keys(table: pd.DataFrame, label_columns: Sequence[str] | None) -> list[str]:
    keys = list(label_columns or table.attrs.get("group_by") or ())
    if not keys:
        cols = list(table.columns)
        keys = cols[:cols.index("n_runs")] if "n_runs" in cols else cols[:1]
    return keys


def _baseline_value(table: pd.DataFrame, keys: list[str], baseline: str | None) -> float | None:
    """The mean of the group whose label (or first key) equals ``baseline``, or None."""
    if not baseline:
        return None
    for _, row in table.iterrows():
        names = {str(row[k]) for k in keys} | {", ".join(f"{k}={row[k]}" for k in keys)}
        if baseline in names:
            return float(row["mean"])
    return None


def plot_comparison(table: pd.DataFrame, path: str | Path, metric: str,
                    label_columns: Sequence[str] | None = None,
                    lower_is_better: bool | None = None, *, sweep: str | None = None,
                    dataset: str | None = None, baseline: str | None = None) -> Path:
    """Group means with 95% Student's t-intervals over seeds, best at the top, full width.

    The bars are the table's intervals (``mean ± ci95``; for
    :func:`metarec_runner.report.compare.compare_table` the Student's t-interval over distinct
    seeds; a table with ``std`` and ``n_seeds`` but no ``ci95`` gets it from
    :func:`metarec_runner.evaluate.stats.t_critical`), clipped to the metric's declared range
    (an RMSE bar never dips below 0). A group without an interval (one distinct seed) gets a
    bare point and says so in its label.

    Args:
        table: one row per group with ``mean`` and ``ci95`` (and ``n_runs``, ``n_seeds``).
        path: the PNG to write.
        metric: the metric's name (axis label, and its range for clipping).
        label_columns: the columns naming a group (default: the table's ``group_by`` attribute,
            else every column before ``n_runs``).
        lower_is_better: for the label; default from the table's attributes.
        sweep, dataset: named in the title (e.g. the parent run's name and the dataset).
        baseline: a group's label (e.g. ``global``): a vertical line at its mean.
    """
    import numpy as np

    table = with_t_intervals(table)
    if table.empty or not {"mean", "ci95"} <= set(table.columns):
        raise ValueError("the comparison plot needs rows with 'mean' and 'ci95'")
    keys = _group_keys(table, label_columns)
    mean, lo, hi = comparison_bars(table, metric)
    has = ~np.isnan(lo)
    labels = _labels(table, keys, has)
    y = np.arange(len(labels))[::-1]  # first row (the best) at the top
    fig, (ax,) = common.figure(1, width=12.0, height=max(2.8, 0.45 * len(labels) + 1.6))
    ax.plot(mean[~has], y[~has], "o", color="C0")
    if has.any():
        err = np.vstack([mean[has] - lo[has], hi[has] - mean[has]])
        ax.errorbar(mean[has], y[has], xerr=err, fmt="o", color="C0", capsize=4, label=INTERVAL)
    base = _baseline_value(table, keys, baseline)
    if base is not None:
        ax.axvline(base, color="tab:red", ls="--", lw=1, label=f"baseline {baseline} {base:.4g}")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    lower = table.attrs.get("lower_is_better") if lower_is_better is None else lower_is_better
    direction = "" if lower is None else (" (lower is better)" if lower else " (higher is better)")
    over = f", {INTERVAL}" if "n_seeds" in table.columns else ", 95% CI"
    ax.set_xlabel(f"test {common.metric_label(metric)}: mean{over}{direction}")
    ax.set_ylabel(" × ".join(keys))
    what = f"test {common.metric_label(metric)} by {', '.join(keys)}"
    ax.set_title(common.with_context(what, common.sweep_title(sweep, dataset)))
    ax.grid(axis="x", alpha=0.3)
    common.legend_if_any(ax)
    return common.save(fig, path)


def plot_kshot_curve(table: pd.DataFrame, path: str | Path, metric: str,
                     title: str = "", *, sweep: str | None = None,
                     dataset: str | None = None) -> Path:
    """The k-shot curve of a sweep: ``metric`` against the support size k (categorical: the
    evaluator's shots, then ``all``), one line per algo, with its 95% Student-t band over
    distinct seeds clipped to the metric's range (no band for a one-seed algo).

    Args:
        table: :func:`metarec_runner.report.compare.shots_table` output (columns ``k``,
            ``algo``, ``mean``, ``ci95``).
        path: the PNG to write.
        metric: the metric's column name (``ndcg_at_10``).
        title: the figure's title (default: the metric, the number of algos, the sweep and the
            dataset).
        sweep, dataset: named in the default title.
    """
    from metarec_runner.report.compare import _shot_order

    fig, (ax,) = common.figure(1, width=8.0, height=5.0)
    ks = sorted(table["k"].astype(str).unique(), key=_shot_order)
    x = {k: i for i, k in enumerate(ks)}
    for algo, rows in table.groupby("algo", sort=False):
        rows = rows.assign(_x=rows["k"].astype(str).map(x)).sort_values("_x")
        mean, lo, hi = comparison_bars(rows, metric)
        line = ax.plot(rows["_x"], mean, marker="o", label=str(algo))[0]
        ax.fill_between(rows["_x"], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xticks(range(len(ks)), [f"k={k}" for k in ks])
    ax.set_xlabel("support ratings per test user (k; all = the whole support)")
    ax.set_ylabel(f"test {metric}: {common.metric_ylabel(metric)}, mean ± {INTERVAL}")
    what = f"{metric} by support size, {table['algo'].nunique()} algos"
    ax.set_title(title or common.with_context(what, common.sweep_title(sweep, dataset)))
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    return common.save(fig, path)
