"""PNG plots of a run and of a sweep, from plain data frames, for MLflow artifacts.

Every function takes plain data (pandas frames) and a path, draws with matplotlib's
object-oriented API on an Agg canvas (headless: no display, no pyplot global state, safe in
parallel jobs) and returns the path it wrote. :func:`log_run_plots` draws a run's plots and logs
them; a plot that fails is skipped with a warning and never fails the run.

Every figure is titled with what it shows and the run (algo, model, dataset, seed) or the sweep
(and dataset); y axes name the metric, its unit and its direction; 95% CI bands are clipped to
the metric's declared range (:mod:`metarec_runner.evaluate.metric_specs`). The shared pieces are
in :mod:`metarec_runner.report.plots_common`, the sweep plots in
:mod:`metarec_runner.report.plots_sweep` (re-exported here).

``matplotlib`` is imported inside the functions (it takes a moment), so importing
``metarec_runner.report.plots`` stays light.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metarec_runner.report import plots_common as common
from metarec_runner.report.plots_common import run_title as run_title  # re-exported
from metarec_runner.report.plots_sweep import comparison_bars as comparison_bars  # re-exported
from metarec_runner.report.plots_sweep import plot_comparison as plot_comparison  # re-exported
from metarec_runner.report.plots_sweep import plot_kshot_curve as plot_kshot_curve  # re-exported

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"  # the artifact folder of a run's plots
OBSERVATIONAL = "(observational, not controlled)"


def best_epoch_of(history: pd.DataFrame, monitor: str | None) -> int | None:
    """The epoch where ``monitor`` (``val/rmse``...) is best by its declared direction, or None
    when the column is absent or empty."""
    from metarec_runner.evaluate.metric_specs import UnknownMetric, higher_is_better

    if not monitor or monitor not in history.columns or history[monitor].notna().sum() == 0:
        return None
    try:
        high = higher_is_better(monitor)
    except UnknownMetric:
        return None
    values = history[monitor].astype(float)
    row = values.idxmax() if high else values.idxmin()
    return int(history.loc[row, "epoch"])


def plot_learning_curves(history: pd.DataFrame, path: str | Path,
                         metrics: Sequence[str] | None = None, *, title: str = "",
                         best_epoch: int | None = None, monitor: str | None = None,
                         floor_rmse: float | None = None,
                         popularity: Mapping[str, float] | None = None) -> Path:
    """Train loss and every validation metric per epoch (validation with its 95% CI band).

    Args:
        history: one row per epoch: ``epoch``, ``train/loss`` (and ``train/inner_loss``),
            ``val/<metric>`` and ``val/<metric>_ci95``.
        path: the PNG to write.
        metrics: validation metric names (``rmse``, ``ndcg_at_5``...); default: every ``val/``
            column.
        title: the run (:func:`run_title`), appended to the figure's title.
        best_epoch: marked on every panel; default: the best epoch of ``monitor``.
        monitor: the selection column (``val/rmse``), to find the best epoch.
        floor_rmse: the noise floor, a line on RMSE panels (default: the history's
            ``val/floor_rmse``, which is drawn as that line, not as a panel of its own).
        popularity: ``{metric: value}`` of the popularity scorer, a line on ranking panels.

    The loss panel is on a log scale when the loss spans more than 30x; epoch ticks are whole.
    """
    if history.empty or "epoch" not in history.columns:
        raise ValueError("learning curves need a history frame with an 'epoch' column and rows")
    epochs = history["epoch"].to_numpy()
    val_cols = ([f"val/{m}" for m in metrics if f"val/{m}" in history.columns] if metrics
                else common.value_columns(history, "val/"))
    val_cols = [c for c in val_cols if not c.startswith(("val/floor_", "val/ref/"))]
    if floor_rmse is None and "val/floor_rmse" in history.columns:  # the data's own noise floor
        floor = history["val/floor_rmse"].dropna()
        floor_rmse = float(floor.iloc[-1]) if len(floor) else None
    train_cols = [c for c in ("train/loss", "train/inner_loss") if c in history.columns]
    best = best_epoch if best_epoch is not None else best_epoch_of(history, monitor)
    fig, axes = common.figure(1 + len(val_cols))
    common.suptitle(fig, "learning curves", title)
    for col in train_cols:
        axes[0].plot(epochs, history[col].to_numpy(dtype=float), marker="o", ms=3, label=col)
    common.log_scale_if_wide(axes[0], history[train_cols].to_numpy(dtype=float).ravel())
    axes[0].set_title("training loss")
    axes[0].set_ylabel(common.metric_ylabel("train/loss"))
    for ax, col in zip(axes[1:], val_cols, strict=True):
        y = history[col].to_numpy(dtype=float)
        ax.plot(epochs, y, marker="o", ms=3, color="tab:green", label=col)
        common.band(ax, epochs, col, y, common.ci_of(history, col), color="tab:green")
        common.reference_lines(ax, col, floor_rmse=floor_rmse, popularity=popularity)
        if best is not None and col == monitor and (epochs == best).any():
            ax.plot([best], y[epochs == best][:1], marker="*", ms=12, color="k", ls="")
        ax.set_title(f"validation {common.metric_label(col)}")
        ax.set_ylabel(common.metric_ylabel(col))
    for ax in axes:
        if best is not None:
            ax.axvline(best, color="k", ls=":", lw=1, label=f"best epoch {best}")
        ax.set_xlabel("epoch")
        common.integer_ticks(ax)
        common.legend_if_any(ax)
    return common.save(fig, path)


def plot_few_shot_curve(frame: pd.DataFrame, path: str | Path,
                        metrics: Sequence[str] | None = None, *, title: str = "",
                        floor_rmse: float | None = None,
                        popularity: Mapping[str, float] | None = None,
                        full_support: Mapping[str, float] | None = None,
                        no_adaptation: Mapping[str, float] | None = None) -> Path:
    """Test metric against the support-set size, with 95% CIs clipped to the metric's range.

    Args:
        frame: either the few-shot curve in long format (columns ``shots``, ``metric``,
            ``mean``, ``ci95``: every test user cut to k support ratings; a controlled
            experiment, k on a categorical axis), or the ``by_support_size`` table (one row per
            bucket: ``support_size`` label, ``tasks``, ``<metric>``, ``<metric>_ci95``: users
            grouped by their own support size, so the plot is titled observational).
        path: the PNG to write.
        metrics: metric names; default: every metric.
        title: the run (:func:`run_title`), appended to the figure's title.
        floor_rmse, popularity: reference lines (noise floor on RMSE, popularity on ranking).
        full_support, no_adaptation: ``{metric: value}`` of the model with the whole support
            set and without adaptation: reference lines on the few-shot curve.
    """
    refs = {"full support": full_support, "no adaptation": no_adaptation}
    if "shots" in frame.columns:
        return _plot_long(frame, path, "shots", "test {} vs support size k",
                          "support ratings per user (k)", metrics, title=title, categorical=True,
                          floor_rmse=floor_rmse, popularity=popularity, refs=refs)
    if frame.empty or "support_size" not in frame.columns:
        raise ValueError("the few-shot curve needs a frame with rows and a 'shots' or "
                         "'support_size' column")
    cols = [m for m in metrics if m in frame.columns] if metrics else \
        [c for c in common.value_columns(frame) if c != "tasks" and not c.startswith(("floor_", "ref/"))]
    labels = [str(s) for s in frame["support_size"]]
    if "tasks" in frame.columns:
        labels = [f"{s}\n(n={int(n)})" for s, n in zip(labels, frame["tasks"], strict=True)]
    x = list(range(len(labels)))
    fig, axes = common.figure(len(cols))
    common.suptitle(fig, f"test metrics by support size {OBSERVATIONAL}", title)
    for ax, col in zip(axes, cols, strict=True):
        mean = frame[col].to_numpy(dtype=float)
        half = common.ci_of(frame, col)
        yerr = None
        if half is not None:
            lo, hi = common.clipped_band(col, mean, half)
            yerr = [mean - lo, hi - mean]
        ax.errorbar(x, mean, yerr=yerr, marker="o", capsize=4, label="mean, 95% CI")
        common.reference_lines(ax, col, floor_rmse=floor_rmse, popularity=popularity)
        if col == "rmse" and "floor_rmse" in frame.columns:  # each bucket's own noise floor
            ax.plot(x, frame["floor_rmse"].to_numpy(dtype=float), color="0.35", ls="--", marker="_",
                    label="noise floor (these users)")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"test {common.metric_label(col)} by support size (observational)")
        ax.set_xlabel("users' own support-set size (ratings)")
        ax.set_ylabel(common.metric_ylabel(col))
        common.legend_if_any(ax)
    return common.save(fig, path)


def plot_adaptation_curve(frame: pd.DataFrame, path: str | Path,
                          metrics: Sequence[str] | None = None, *, title: str = "",
                          floor_rmse: float | None = None,
                          popularity: Mapping[str, float] | None = None) -> Path:
    """Query metric after 0..K inner steps, one panel per metric, with clipped 95% CI bands.

    Args:
        frame: long format, columns ``steps``, ``metric``, ``mean``, ``ci95``.
        path: the PNG to write.
        metrics: metric names; default: every metric in ``frame``.
        title: the run (:func:`run_title`), appended to the figure's title.
        floor_rmse, popularity: reference lines (noise floor on RMSE, popularity on ranking).
    """
    return _plot_long(frame, path, "steps", "query {} vs inner steps",
                      "inner SGD steps on the support set", metrics, title=title,
                      floor_rmse=floor_rmse, popularity=popularity)


def _plot_long(frame: pd.DataFrame, path: str | Path, x: str, panel_title: str, xlabel: str,
               metrics: Sequence[str] | None, *, title: str, categorical: bool = False,
               floor_rmse: float | None = None, popularity: Mapping[str, float] | None = None,
               refs: Mapping[str, Mapping[str, float] | None] | None = None) -> Path:
    """One panel per ``metric``: ``mean`` against ``x`` with a clipped ``ci95`` band."""
    missing = {x, "metric", "mean", "ci95"} - set(frame.columns)
    if frame.empty or missing:
        raise ValueError(f"the curve needs rows with columns {x}, metric, mean, ci95 "
                         f"(missing: {', '.join(sorted(missing)) or 'rows'})")
    names = [m for m in dict.fromkeys(frame["metric"]) if (not metrics or m in metrics)
             and not str(m).startswith(("floor_", "ref/"))]
    values = sorted(frame[x].unique(), key=float)
    position = {v: i for i, v in enumerate(values)}
    fig, axes = common.figure(len(names))
    common.suptitle(fig, panel_title.format("metrics"), title)
    for ax, name in zip(axes, names, strict=True):
        part = frame[frame["metric"] == name].sort_values(x)
        xs = part[x].map(position).to_numpy(dtype=float) if categorical else \
            part[x].to_numpy(dtype=float)
        mean = part["mean"].to_numpy(dtype=float)
        ax.plot(xs, mean, marker="o", ms=3, label=name)
        common.band(ax, xs, name, mean, part["ci95"].fillna(0.0).to_numpy(dtype=float))
        common.reference_lines(ax, name, floor_rmse=floor_rmse, popularity=popularity, extra=refs)
        if categorical:
            ax.set_xticks(range(len(values)), [f"k={_num(v)}" for v in values])
        else:
            common.integer_ticks(ax)
        ax.set_title(panel_title.format(common.metric_label(name)))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(common.metric_ylabel(name))
        common.legend_if_any(ax)
    return common.save(fig, path)


def _num(value: Any) -> str:
    """``3.0`` -> ``3``; anything else as ``str``."""
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def log_run_plots(tracker: Any, out_dir: str | Path, history: pd.DataFrame | None,
                  by_support: pd.DataFrame | None, adaptation: pd.DataFrame | None = None,
                  few_shot: pd.DataFrame | None = None,
                  metrics: Sequence[str] | None = None, *, algo: str | None = None,
                  model: str | None = None, dataset: str | None = None,
                  seed: int | str | None = None, best_epoch: int | None = None,
                  monitor: str | None = None, summary: Mapping[str, float] | None = None,
                  popularity: Mapping[str, float] | None = None) -> list[Path]:
    """Draw a run's plots into ``out_dir/plots/`` and log them under the artifact path ``plots``.

    Draws ``learning_curves.png`` (``history``), ``support_size.png`` (``by_support``),
    ``few_shot_curve.png`` (``few_shot``) and ``adaptation_curve.png`` (``adaptation``); the
    last two are read from ``out_dir/few_shot.csv`` and ``out_dir/adaptation.csv`` when not
    given. Never raises: a plot that fails is skipped with a warning.

    Args:
        algo, model, dataset, seed: the run, named in every title.
        best_epoch, monitor: the selected epoch (or the column to find it), marked on the
            learning curves.
        summary: the test summary (``test/<metric>``, ``test/floor_rmse``...): the noise floor
            on RMSE panels, and the full-support values on the few-shot curve.
        popularity: ``{metric: value}`` of the popularity scorer on the same test users, a line
            on ranking panels (default: ``test/ref/popularity/<metric>`` of ``summary``).

    The few-shot curve's "no adaptation" line is the adaptation curve at 0 steps, when there is
    one.

    Returns:
        The PNGs written.
    """
    out_dir = Path(out_dir)
    folder = out_dir / PLOTS_DIR
    frames = {"few_shot.csv": few_shot, "adaptation.csv": adaptation}
    for name, frame in frames.items():
        if frame is None and (out_dir / name).is_file():
            frames[name] = _read_csv(out_dir / name)
    summary = dict(summary or {})
    floor = summary.get("test/floor_rmse", summary.get("floor_rmse"))
    popularity = dict(popularity) if popularity is not None else _prefixed(summary, "test/ref/popularity/")
    refs = {"title": run_title(algo, model, dataset, seed), "floor_rmse": floor,
            "popularity": popularity or None}
    curves = {"full_support": _prefixed(summary, "test/") or None,
              "no_adaptation": _at_zero_steps(frames["adaptation.csv"])}
    jobs = [("learning_curves.png", plot_learning_curves, history,
             {"best_epoch": best_epoch, "monitor": monitor}),
            ("support_size.png", plot_few_shot_curve, by_support, {}),
            ("few_shot_curve.png", plot_few_shot_curve, frames["few_shot.csv"], curves),
            ("adaptation_curve.png", plot_adaptation_curve, frames["adaptation.csv"], {})]
    written: list[Path] = []
    for name, draw, frame, extra in jobs:
        if frame is None:
            continue
        try:
            written.append(draw(frame, folder / name, metrics, **refs, **extra))
        except Exception as err:  # noqa: BLE001 - a plot must never fail the run
            log.warning("plot %s skipped: %s", name, _one_line(err))
    if written:
        try:
            tracker.log_artifacts(folder, artifact_path=PLOTS_DIR)
        except Exception as err:  # noqa: BLE001
            log.warning("plots not logged to the tracker: %s", _one_line(err))
    return written


def _prefixed(summary: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{name: value}`` of the plain numeric ``<prefix><name>`` entries (no ``/`` in name)."""
    out = {}
    for key, value in summary.items():
        name = key[len(prefix):] if key.startswith(prefix) else ""
        if name and "/" not in name and isinstance(value, numbers.Real) and math.isfinite(value):
            out[name] = float(value)
    return out


def _at_zero_steps(frame: pd.DataFrame | None) -> dict[str, float] | None:
    """``{metric: mean}`` of the adaptation curve at 0 inner steps (no adaptation), or None."""
    if frame is None or not {"steps", "metric", "mean"} <= set(frame.columns):
        return None
    zero = frame[frame["steps"] == 0]
    return {str(m): float(v) for m, v in zip(zero["metric"], zero["mean"], strict=True)} or None


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
