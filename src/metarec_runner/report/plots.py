"""PNG plots of a run and of a sweep, from plain data frames, for MLflow artifacts.

Every function takes plain data (pandas frames) and a path, draws with matplotlib's
object-oriented API on an Agg canvas (headless: no display, no pyplot global state, safe in
parallel jobs) and returns the path it wrote. :func:`log_run_plots` draws a run's plots and logs
them; a plot that fails is skipped with a warning and never fails the run.

``matplotlib`` is imported inside the functions (it takes a moment), so importing
``metarec_runner.report.plots`` stays light.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"  # the artifact folder of a run's plots
MAX_PANELS = 6  # metrics drawn per figure (the first ones of the evaluator's list)
_CI_SUFFIXES = ("_ci95", "_ci_lo", "_ci_hi")


def _figure(n_panels: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_panels`` axes in rows of at most three (Agg canvas attached)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, max(1, n_panels))
    rows = math.ceil(max(1, n_panels) / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(max(1, n_panels))]
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _value_columns(frame: pd.DataFrame, prefix: str = "") -> list[str]:
    """Metric columns (``prefix``-ed, numeric) without their CI companions or ``best_*``."""
    out = []
    for col in frame.columns:
        name = col[len(prefix):] if col.startswith(prefix) else None
        if not name or name.endswith(_CI_SUFFIXES) or name.startswith("best_"):
            continue
        if frame[col].dtype.kind in "fiu" and frame[col].notna().any():
            out.append(col)
    return out


def _ci(frame: pd.DataFrame, col: str) -> Any:
    """The ``<col>_ci95`` half-widths, or None."""
    ci = f"{col}_ci95"
    return frame[ci].fillna(0.0).to_numpy(dtype=float) if ci in frame.columns else None


def plot_learning_curves(history: pd.DataFrame, path: str | Path,
                         metrics: Sequence[str] | None = None) -> Path:
    """Train loss and validation metrics per epoch (validation with its 95% CI band).

    Args:
        history: one row per epoch: ``epoch``, ``train/loss`` (and ``train/inner_loss``),
            ``val/<metric>`` and ``val/<metric>_ci95``.
        path: the PNG to write.
        metrics: validation metric names (``rmse``, ``ndcg_at_5``...); default: every
            ``val/`` column (at most :data:`MAX_PANELS`).
    """
    if history.empty or "epoch" not in history.columns:
        raise ValueError("learning curves need a history frame with an 'epoch' column and rows")
    epochs = history["epoch"].to_numpy()
    val_cols = ([f"val/{m}" for m in metrics if f"val/{m}" in history.columns] if metrics
                else _value_columns(history, "val/"))[:MAX_PANELS]
    train_cols = [c for c in ("train/loss", "train/inner_loss") if c in history.columns]
    fig, axes = _figure(1 + len(val_cols))
    for col in train_cols:
        axes[0].plot(epochs, history[col].to_numpy(dtype=float), marker="o", ms=3, label=col)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("epoch")
    if train_cols:
        axes[0].legend(fontsize=8)
    for ax, col in zip(axes[1:], val_cols, strict=True):
        y = history[col].to_numpy(dtype=float)
        ax.plot(epochs, y, marker="o", ms=3, color="tab:green")
        ci = _ci(history, col)
        if ci is not None:
            ax.fill_between(epochs, y - ci, y + ci, alpha=0.2, color="tab:green", label="95% CI")
        ax.set_title(col)
        ax.set_xlabel("epoch")
    return _save(fig, path)


def plot_few_shot_curve(frame: pd.DataFrame, path: str | Path,
                        metrics: Sequence[str] | None = None) -> Path:
    """Test metric against the support-set size, with 95% CIs.

    Args:
        frame: either the few-shot curve in long format (columns ``shots``, ``metric``,
            ``mean``, ``ci95``: every test user cut to k support ratings), or the
            ``by_support_size`` table (one row per bucket: ``support_size`` label, ``tasks``,
            ``<metric>``, ``<metric>_ci95``: users grouped by their own support size).
        path: the PNG to write.
        metrics: metric names; default: every metric (at most :data:`MAX_PANELS`).
    """
    if "shots" in frame.columns:
        return _plot_long(frame, path, "shots", "test {} vs support size k",
                          "support ratings per user (k)", metrics)
    if frame.empty or "support_size" not in frame.columns:
        raise ValueError("the few-shot curve needs a frame with rows and a 'shots' or "
                         "'support_size' column")
    cols = [m for m in metrics if m in frame.columns] if metrics else \
        [c for c in _value_columns(frame) if c != "tasks"]
    cols = cols[:MAX_PANELS]
    labels = [str(s) for s in frame["support_size"]]
    if "tasks" in frame.columns:
        labels = [f"{s}\n(n={int(n)})" for s, n in zip(labels, frame["tasks"], strict=True)]
    x = list(range(len(labels)))
    fig, axes = _figure(len(cols))
    for ax, col in zip(axes, cols, strict=True):
        ax.errorbar(x, frame[col].to_numpy(dtype=float), yerr=_ci(frame, col), marker="o", capsize=4)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"test {col} by support size")
        ax.set_xlabel("users' support-set size (ratings)")
    return _save(fig, path)


def plot_adaptation_curve(frame: pd.DataFrame, path: str | Path,
                          metrics: Sequence[str] | None = None) -> Path:
    """Query metric after 0..K inner steps, one panel per metric, with 95% CI bands.

    Args:
        frame: long format, columns ``steps``, ``metric``, ``mean``, ``ci95``.
        path: the PNG to write.
        metrics: metric names; default: every metric in ``frame`` (at most :data:`MAX_PANELS`).
    """
    return _plot_long(frame, path, "steps", "query {} vs inner steps",
                      "inner SGD steps on the support set", metrics)


def _plot_long(frame: pd.DataFrame, path: str | Path, x: str, title: str, xlabel: str,
               metrics: Sequence[str] | None) -> Path:
    """One panel per ``metric``: ``mean`` against ``x`` with a ``ci95`` band."""
    missing = {x, "metric", "mean", "ci95"} - set(frame.columns)
    if frame.empty or missing:
        raise ValueError(f"the curve needs rows with columns {x}, metric, mean, ci95 "
                         f"(missing: {', '.join(sorted(missing)) or 'rows'})")
    names = [m for m in dict.fromkeys(frame["metric"]) if not metrics or m in metrics][:MAX_PANELS]
    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names, strict=True):
        part = frame[frame["metric"] == name].sort_values(x)
        xs = part[x].to_numpy(dtype=float)
        mean = part["mean"].to_numpy(dtype=float)
        ci = part["ci95"].fillna(0.0).to_numpy(dtype=float)
        ax.plot(xs, mean, marker="o", ms=3)
        ax.fill_between(xs, mean - ci, mean + ci, alpha=0.2)
        ax.set_title(title.format(name))
        ax.set_xlabel(xlabel)
    return _save(fig, path)


def _range_of(metric: str) -> tuple[float | None, float | None]:
    """A metric's declared range ``(lower, upper)`` (``(None, None)`` when it is not declared)."""
    from metarec_runner.evaluate.metric_specs import UnknownMetric, spec_of

    try:
        spec = spec_of(metric)
    except UnknownMetric:
        return None, None
    return spec.lower_bound, spec.upper_bound


def comparison_bars(table: pd.DataFrame, metric: str) -> tuple[Any, Any, Any]:
    """``(mean, lo, hi)`` arrays of the comparison plot: ``mean ± ci95`` clipped to ``metric``'s
    declared range (:func:`metarec_runner.evaluate.stats.clip_to_range`); NaN bounds where a
    group has no interval."""
    from metarec_runner.evaluate.stats import clip_to_range

    mean = table["mean"].to_numpy(dtype=float)
    half = table["ci95"].to_numpy(dtype=float)
    lo, hi = clip_to_range(mean - half, mean + half, *_range_of(metric))
    return mean, lo, hi


def plot_comparison(table: pd.DataFrame, path: str | Path, metric: str,
                    label_columns: Sequence[str] | None = None,
                    lower_is_better: bool | None = None) -> Path:
    """Group means with 95% CIs as a point plot, best at the top (e.g. one row per algorithm).

    The bars are the table's intervals (``mean ± ci95``; for
    :func:`metarec_runner.report.compare.compare_table` the Student's t-interval over distinct
    seeds, :mod:`metarec_runner.evaluate.stats`), clipped to the metric's declared range
    (``MetricSpec.lower_bound``/``upper_bound``: an RMSE bar never dips below 0). A group without
    an interval (one distinct seed, NaN ``ci95``) gets a bare point and says so in its label.

    Args:
        table: one row per group with ``mean`` and ``ci95`` (and ``n_runs``, ``n_seeds``), e.g.
            :func:`metarec_runner.report.compare.compare_table` output.
        path: the PNG to write.
        metric: the metric's name (axis label, and its range for clipping).
        label_columns: the columns naming a group (default: the table's ``group_by`` attribute,
            else every column before ``n_runs``).
        lower_is_better: for the title; default from the table's attributes.
    """
    import numpy as np

    if table.empty or not {"mean", "ci95"} <= set(table.columns):
        raise ValueError("the comparison plot needs rows with 'mean' and 'ci95'")
    keys = list(label_columns or table.attrs.get("group_by") or ())
    if not keys:
        cols = list(table.columns)
        keys = cols[:cols.index("n_runs")] if "n_runs" in cols else cols[:1]
    mean, lo, hi = comparison_bars(table, metric)
    has = ~np.isnan(lo)
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
    y = np.arange(len(labels))[::-1]  # first row (the best) at the top
    fig, axes = _figure(1, width=7.5, height=max(2.5, 0.45 * len(labels) + 1.2))
    ax = axes[0]
    ax.plot(mean[~has], y[~has], "o", color="C0")
    if has.any():
        err = np.vstack([mean[has] - lo[has], hi[has] - mean[has]])
        ax.errorbar(mean[has], y[has], xerr=err, fmt="o", color="C0", capsize=4)
    ax.set_yticks(list(y), labels, fontsize=8)
    lower = table.attrs.get("lower_is_better") if lower_is_better is None else lower_is_better
    direction = "" if lower is None else (" (lower is better)" if lower else " (higher is better)")
    over = " over seeds (Student's t)" if "n_seeds" in table.columns else ""
    ax.set_xlabel(f"test {metric}, mean ± 95% CI{over}{direction}")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_kshot_curve(table: pd.DataFrame, path: str | Path, metric: str,
                     title: str = "") -> Path:
    """The k-shot curve of a sweep: ``metric`` against the support size k (categorical: the
    evaluator's shots, then ``all``), one line per algo, with its 95% Student-t band over
    distinct seeds clipped to the metric's range (no band for a one-seed algo).

    Args:
        table: :func:`metarec_runner.report.compare.shots_table` output (columns ``k``,
            ``algo``, ``mean``, ``ci95``).
        path: the PNG to write.
        metric: the metric's column name (``ndcg_at_10``).
        title: the figure's title (default: the metric and the number of algos).
    """
    from metarec_runner.report.compare import _shot_order

    fig, (ax,) = _figure(1, width=8.0, height=5.0)
    ks = sorted(table["k"].astype(str).unique(), key=_shot_order)
    x = {k: i for i, k in enumerate(ks)}
    for algo, rows in table.groupby("algo", sort=False):
        rows = rows.assign(_x=rows["k"].astype(str).map(x)).sort_values("_x")
        mean, lo, hi = comparison_bars(rows, metric)
        line = ax.plot(rows["_x"], mean, marker="o", label=str(algo))[0]
        ax.fill_between(rows["_x"], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xticks(range(len(ks)), [f"k={k}" for k in ks])
    ax.set_xlabel("support ratings per test user (k; all = the whole support)")
    ax.set_ylabel(f"test {metric}, mean ± 95% CI over seeds (Student's t)")
    ax.set_title(title or f"{metric} by support size, {table['algo'].nunique()} algos")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def log_run_plots(tracker: Any, out_dir: str | Path, history: pd.DataFrame | None,
                  by_support: pd.DataFrame | None, adaptation: pd.DataFrame | None = None,
                  few_shot: pd.DataFrame | None = None,
                  metrics: Sequence[str] | None = None) -> list[Path]:
    """Draw a run's plots into ``out_dir/plots/`` and log them under the artifact path ``plots``.

    Draws ``learning_curves.png`` (``history``), ``support_size.png`` (``by_support``),
    ``few_shot_curve.png`` (``few_shot``) and ``adaptation_curve.png`` (``adaptation``); the
    last two are read from ``out_dir/few_shot.csv`` and ``out_dir/adaptation.csv`` when not
    given. Never raises: a plot that fails is skipped with a warning.

    Returns:
        The PNGs written.
    """
    out_dir = Path(out_dir)
    folder = out_dir / PLOTS_DIR
    frames = {"few_shot.csv": few_shot, "adaptation.csv": adaptation}
    for name, frame in frames.items():
        if frame is None and (out_dir / name).is_file():
            frames[name] = _read_csv(out_dir / name)
    jobs = [("learning_curves.png", plot_learning_curves, history),
            ("support_size.png", plot_few_shot_curve, by_support),
            ("few_shot_curve.png", plot_few_shot_curve, frames["few_shot.csv"]),
            ("adaptation_curve.png", plot_adaptation_curve, frames["adaptation.csv"])]
    written: list[Path] = []
    for name, draw, frame in jobs:
        if frame is None:
            continue
        try:
            written.append(draw(frame, folder / name, metrics))
        except Exception as err:  # noqa: BLE001 - a plot must never fail the run
            log.warning("plot %s skipped: %s", name, _one_line(err))
    if written:
        try:
            tracker.log_artifacts(folder, artifact_path=PLOTS_DIR)
        except Exception as err:  # noqa: BLE001
            log.warning("plots not logged to the tracker: %s", _one_line(err))
    return written


def _read_csv(path: Path) -> pd.DataFrame | None:
    import pandas as pd

    try:
        return pd.read_csv(path)
    except Exception as err:  # noqa: BLE001
        log.warning("%s not plotted: %s", path.name, _one_line(err))
        return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
