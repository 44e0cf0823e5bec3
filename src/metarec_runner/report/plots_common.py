"""What every metarec plot shares: the headless figure, titles, axis labels with units, CI bands
clipped to the metric's declared range, and the reference lines (noise floor, popularity, best
epoch, full support, no adaptation).

``matplotlib`` is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CI_SUFFIXES = ("_ci95", "_ci_lo", "_ci_hi")
LOG_SCALE_SPAN = 30.0  # a loss whose max/min exceeds this is drawn on a log scale
MIN_WIDTH = 6.5  # inches: room for a figure title that names the run


def figure(n_panels: int, width: float = 4.2, height: float = 3.2, cols: int = 3,
           ) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_panels`` axes in rows of at most ``cols`` (Agg canvas attached)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(cols, max(1, n_panels))
    rows = math.ceil(max(1, n_panels) / cols)
    fig = Figure(figsize=(max(MIN_WIDTH, width * cols), height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(max(1, n_panels))]
    return fig, axes


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def run_title(algo: str | None = None, model: str | None = None, dataset: str | None = None,
              seed: int | str | None = None) -> str:
    """``"algo maml, model melu, data ml-100k, seed 0"`` (the parts that are known)."""
    parts = [f"{k} {v}" for k, v in (("algo", algo), ("model", model), ("data", dataset),
                                    ("seed", seed)) if v is not None and str(v) != ""]
    return ", ".join(parts)


def sweep_title(sweep: str | None = None, dataset: str | None = None) -> str:
    """``"sweep <name>, data ml-100k"`` (the parts that are known)."""
    parts = [f"{k} {v}" for k, v in (("sweep", sweep), ("data", dataset)) if v]
    return ", ".join(parts)


def with_context(what: str, context: str, sep: str = ": ") -> str:
    """``"what: context"`` (``sep`` between them), or ``what`` alone when there is no context."""
    return f"{what}{sep}{context}" if context else what


def suptitle(fig: Figure, what: str, context: str) -> None:
    """The figure's title: ``what`` and, on a second line, the run or sweep."""
    fig.suptitle(with_context(what, context, "\n"), fontsize=11)


def _spec(metric: str) -> Any:
    from metarec_runner.evaluate.metric_specs import UnknownMetric, spec_of

    try:
        return spec_of(metric)
    except UnknownMetric:
        return None


def metric_label(metric: str) -> str:
    """``ndcg_at_5`` -> ``NDCG@5``, ``val/rmse`` -> ``RMSE``; an undeclared name as it is."""
    from metarec_runner.evaluate.metric_specs import base_name

    spec = _spec(metric)
    if spec is None:
        return metric.rsplit("/", 1)[-1]
    name = metric.rsplit("/", 1)[-1]
    k = name.rsplit("_at_", 1)[-1] if spec.at_k and "_at_" in name else None
    return (spec.label or base_name(metric)) + (f"@{k}" if k else "")


def metric_ylabel(metric: str, prefix: str = "") -> str:
    """A y label with the metric's unit and direction: ``RMSE (rating points, lower is
    better)``, ``NDCG@5 (0 to 1, higher is better)``; losses are ``loss (per rating, ...)``."""
    spec = _spec(metric)
    name = metric.rsplit("/", 1)[-1]
    if spec is None:
        unit = "per rating, lower is better" if name.endswith(("loss", "mse")) else ""
        return f"{prefix}{name}" + (f" ({unit})" if unit else "")
    lo, hi = spec.lower_bound, spec.upper_bound
    unit = "rating points" if spec.needs_ratings else (
        f"{lo:g} to {hi:g}" if hi is not None else f">= {lo:g}")
    better = "higher is better" if spec.higher_is_better else "lower is better"
    return f"{prefix}{metric_label(metric)} ({unit}, {better})"


def metric_range(metric: str) -> tuple[float | None, float | None]:
    """A metric's declared range ``(lower, upper)`` (``(None, None)`` when it is not declared)."""
    spec = _spec(metric)
    return (None, None) if spec is None else (spec.lower_bound, spec.upper_bound)


def is_rating_metric(metric: str) -> bool:
    """RMSE or MAE (a rating-prediction metric)."""
    spec = _spec(metric)
    return bool(spec is not None and spec.needs_ratings)


def is_ranking_metric(metric: str) -> bool:
    """A declared metric that ranks (NDCG, recall, ...), not a rating metric."""
    spec = _spec(metric)
    return bool(spec is not None and not spec.needs_ratings)


def clipped_band(metric: str, mean: Any, half: Any) -> tuple[np.ndarray, np.ndarray]:
    """``mean ± half`` clipped to ``metric``'s declared range
    (:func:`metarec_runner.evaluate.stats.clip_to_range`); NaN half-widths give NaN bounds."""
    import numpy as np

    from metarec_runner.evaluate.stats import clip_to_range

    mean = np.asarray(mean, dtype=float)
    half = np.asarray(half, dtype=float)
    return clip_to_range(mean - half, mean + half, *metric_range(metric))


def band(ax: Axes, x: Any, metric: str, mean: Any, half: Any | None, color: Any = None,
         label: str = "95% CI") -> None:
    """A clipped 95% CI band around ``mean`` (nothing when ``half`` is None)."""
    if half is None:
        return
    lo, hi = clipped_band(metric, mean, half)
    ax.fill_between(x, lo, hi, alpha=0.2, color=color, linewidth=0, label=label)


def reference_lines(ax: Axes, metric: str, *, floor_rmse: float | None = None,
                    popularity: Mapping[str, float] | None = None,
                    extra: Mapping[str, Mapping[str, float] | None] | None = None) -> None:
    """Horizontal reference lines on a panel of ``metric``: the noise floor on RMSE, the
    popularity scorer's value on ranking metrics, and ``extra`` (``{label: {metric: value}}``,
    e.g. full support, no adaptation) where they hold ``metric``."""
    from metarec_runner.evaluate.metric_specs import base_name

    name = metric.rsplit("/", 1)[-1]
    if floor_rmse is not None and math.isfinite(floor_rmse) and base_name(metric) == "rmse":
        ax.axhline(floor_rmse, color="0.35", ls="--", lw=1, label=f"noise floor {floor_rmse:.3g}")
    value = (popularity or {}).get(name)
    if value is not None and math.isfinite(value) and is_ranking_metric(metric):
        ax.axhline(value, color="tab:orange", ls="-.", lw=1, label=f"popularity {value:.3g}")
    styles = iter([("tab:purple", ":"), ("tab:red", "--"), ("tab:brown", "-.")])
    for label, values in (extra or {}).items():
        color, ls = next(styles, ("0.5", ":"))
        value = (values or {}).get(name)
        if value is not None and math.isfinite(value):
            ax.axhline(value, color=color, ls=ls, lw=1, label=f"{label} {value:.3g}")


def integer_ticks(ax: Axes) -> None:
    """Only whole numbers on the x axis (epochs, inner steps)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def log_scale_if_wide(ax: Axes, values: Any) -> bool:
    """A log y scale when the positive ``values`` span more than :data:`LOG_SCALE_SPAN` times
    (all must be > 0); returns whether it was set."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and v.min() > 0 and v.max() / v.min() > LOG_SCALE_SPAN:
        ax.set_yscale("log")
        return True
    return False


def legend_if_any(ax: Axes) -> None:
    """A small legend when the panel has labelled artists."""
    handles, labels = ax.get_legend_handles_labels()
    if any(not label.startswith("_") for label in labels):
        ax.legend(fontsize=7)


def value_columns(frame: Any, prefix: str = "") -> list[str]:
    """Metric columns (``prefix``-ed, numeric) without their CI companions or ``best_*``."""
    out = []
    for col in frame.columns:
        name = col[len(prefix):] if col.startswith(prefix) else None
        if not name or name.endswith(CI_SUFFIXES) or name.startswith("best_"):
            continue
        if frame[col].dtype.kind in "fiu" and frame[col].notna().any():
            out.append(col)
    return out


def ci_of(frame: Any, col: str) -> Any:
    """The ``<col>_ci95`` half-widths (missing = 0), or None."""
    ci = f"{col}_ci95"
    return frame[ci].fillna(0.0).to_numpy(dtype=float) if ci in frame.columns else None
