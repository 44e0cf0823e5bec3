"""What each metric is: its direction, whether it has a cut-off, whether it needs rating predictions.

This is the one source every "best" is chosen from: the trainer's model selection and early
stopping (:func:`monitor_mode`), the Optuna sweeper's direction (:func:`sweeper_direction`,
registered as the ``metarec.direction`` OmegaConf resolver), and the ranking in ``metarec
compare`` and the sweep plot (:func:`higher_is_better`). Like RecBole's ``metric.smaller``, the
direction is declared on the metric, never guessed at the call site.

The module imports nothing heavy (no torch), so the config checks that run before any data or
model is built can use it.

Column names are parsed leniently: ``val/ndcg_at_10``, ``test_k5/recall_at_20``,
``test/ref/constant/rmse``, ``floor_rmse`` and ``ndcg_at_10_ci95`` all resolve to their base
metric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    """One metric's declaration.

    Attributes:
        name: the base name (``ndcg``; columns add ``_at_<k>``).
        higher_is_better: the direction of "better" (RecBole's ``smaller`` negated).
        at_k: computed at every cut-off of ``evaluator.ks`` (columns ``<name>_at_<k>``).
        needs_ratings: a rating-prediction metric (RMSE, MAE): defined only for scorers that
            predict ratings, and always computed on the query items.
        lower_bound, upper_bound: the metric's range (intervals are clipped to it in plots).
        label: how tables and plots name it.
    """

    name: str
    higher_is_better: bool
    at_k: bool
    needs_ratings: bool = False
    lower_bound: float = 0.0
    upper_bound: float | None = 1.0
    label: str = ""


METRIC_SPECS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("rmse", higher_is_better=False, at_k=False, needs_ratings=True, upper_bound=None,
                   label="RMSE"),
        MetricSpec("mae", higher_is_better=False, at_k=False, needs_ratings=True, upper_bound=None,
                   label="MAE"),
        MetricSpec("ndcg", higher_is_better=True, at_k=True, label="NDCG"),
        MetricSpec("graded_ndcg", higher_is_better=True, at_k=True, label="graded NDCG"),
        MetricSpec("recall", higher_is_better=True, at_k=True, label="Recall"),
        MetricSpec("precision", higher_is_better=True, at_k=True, label="Precision"),
        MetricSpec("hit", higher_is_better=True, at_k=True, label="HR"),
        MetricSpec("mrr", higher_is_better=True, at_k=True, label="MRR"),
        MetricSpec("auc", higher_is_better=True, at_k=False, label="AUC"),
    )
}
"""Every metric the evaluator computes, by base name (``evaluator.metrics`` picks from these)."""

_LOSS_LIKE = ("loss", "mse")
"""Training diagnostics (``train/loss``, ``train/inner_loss``...): lower is better."""

_SUFFIXES = ("_ci95", "_ci_lo", "_ci_hi")
_AT_K = re.compile(r"^(?P<base>.+)_at_(?P<k>\d+)$")


class UnknownMetric(ValueError):
    """A column that names no declared metric (the message lists the ones that exist)."""


def base_name(column: str) -> str:
    """The metric a column reports: ``test_k5/ref/oracle/ndcg_at_10_ci95`` -> ``ndcg``;
    ``floor_rmse`` -> ``rmse``; ``train/loss`` -> ``loss``."""
    name = column.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    match = _AT_K.match(name)
    if match:
        name = match["base"]
    if name.startswith("best_"):
        name = name[len("best_"):]
    if name.startswith("floor_"):
        name = name[len("floor_"):]
    return name


def spec_of(column: str) -> MetricSpec:
    """The :class:`MetricSpec` of a metric column; raises :class:`UnknownMetric`."""
    name = base_name(column)
    if name in METRIC_SPECS:
        return METRIC_SPECS[name]
    raise UnknownMetric(f"{column!r} is not a metric metarec computes; metrics: "
                        f"{', '.join(METRIC_SPECS)} (cut-off metrics as <name>_at_<k>)")


def higher_is_better(column: str) -> bool:
    """Whether larger values of ``column`` are better. Loss-like diagnostics are lower-better;
    anything else that names no declared metric raises :class:`UnknownMetric`."""
    name = base_name(column)
    if name.endswith(_LOSS_LIKE):
        return False
    return spec_of(column).higher_is_better


def lower_is_better(column: str) -> bool:
    """``not higher_is_better(column)``."""
    return not higher_is_better(column)


def monitor_mode(column: str) -> str:
    """``"max"`` or ``"min"``: how the trainer compares values of the monitored column."""
    return "max" if higher_is_better(column) else "min"


def sweeper_direction(column: str) -> str:
    """``"maximize"`` or ``"minimize"``: the Optuna sweeper's direction for ``column``."""
    return "maximize" if higher_is_better(column) else "minimize"


def metric_columns(metrics: list[str] | tuple[str, ...], ks: list[int] | tuple[int, ...]) -> list[str]:
    """The columns the evaluator reports for ``metrics`` at cut-offs ``ks``, in order."""
    return [
        column for m in metrics
        for column in ([f"{m}_at_{k}" for k in ks] if METRIC_SPECS[m].at_k else [m])
    ]


def needs_ratings(column: str) -> bool:
    """Whether ``column`` is a rating metric (undefined for scorers that do not predict ratings)."""
    try:
        return spec_of(column).needs_ratings
    except UnknownMetric:
        return False
