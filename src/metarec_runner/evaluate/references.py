"""The reference scorers every test report carries: random, constant, popularity and oracle
scores of the very candidates the model ranked (``test/ref/<scorer>/<metric>``).

Under query-only candidates these are the numbers a model must be read against: with few,
tied ratings a constant score can sit well above random. The scores are pure functions of the
candidates ``[B, C]``:

- :func:`random_scores`: i.i.d. uniform in ``[0, 1)`` from a seeded CPU generator (chance);
- :func:`constant_scores`: one value everywhere (the meta-train mean rating, so its RMSE/MAE
  are the "global mean" baseline). Its ties are broken by the evaluator's seeded random order
  of the candidates, so it scores the expectation of a random ranking, not the id order;
- popularity: each candidate's meta-train interaction count (the evaluator's ``item_counts``;
  left out when it has none): the bar every recommender must clear;
- :func:`oracle_scores`: the relevant items first (ties among true ratings exactly as the
  relevance rule broke them), then the other query items by true rating, then every other
  candidate: the ceiling. It knows the *relevance* the evaluator decided, which a scorer
  trained on ratings (``algo=oracle``, :class:`~metarec_runner.algos.scorers.OracleScorer`)
  cannot: that one ranks by true rating alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metarec_runner.evaluate.metrics import MetricSet

REFERENCES = ("random", "constant", "popularity", "oracle")
"""The reference scorers, in the order their columns are reported."""


def random_scores(shape: Sequence[int], generator: torch.Generator,
                  dtype: torch.dtype | None = None) -> Tensor:
    """I.i.d. uniform scores in ``[0, 1)`` of ``shape`` (e.g. ``[B, C]``), drawn on the CPU from
    ``generator`` in ``dtype`` (default float32), so a seed gives the same scores on every
    device; move them where they are needed."""
    return torch.rand(tuple(shape), generator=generator, dtype=dtype)


def constant_scores(shape: Sequence[int], value: float, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """``value`` everywhere, of ``shape``."""
    return torch.full(tuple(shape), float(value), dtype=dtype, device=device)


def unknown_score(ratings: Tensor, known: Tensor | None = None) -> Tensor:
    """One below the lowest known rating (``ratings`` where ``known``; all of them when
    ``known`` is None) and below 0: the score of an item whose rating nobody knows, below every
    rated one (a 0-d tensor; -1 when nothing is known)."""
    if known is not None:
        ratings = ratings.masked_fill(~known, float("inf"))
    if not ratings.numel():
        return ratings.new_full((), -1.0)
    return ratings.amin().clamp(max=0.0) - 1.0


def oracle_scores(target: Tensor, relevant: Tensor, is_query: Tensor) -> Tensor:
    """Scores ``[B, C]`` that rank each task's relevant candidates first, then its other query
    items by true rating ``target``, then the candidates that are not query items.

    Args:
        target: ``[B, C]`` true ratings of the query items (anything elsewhere).
        relevant: ``Bool[B, C]`` relevance of the candidates (the query items' own).
        is_query: ``Bool[B, C]``, True on the task's query items.
    """
    lowest = unknown_score(target, is_query)
    lift = target.abs().amax() - lowest + 1.0  # puts every relevant item above every other one
    return torch.where(is_query, target, lowest.expand_as(target)) + relevant.to(target.dtype) * lift


def reference_metrics(metrics: MetricSet, target: Tensor, mask: Tensor, relevant: Tensor,
                      is_query: Tensor, generator: torch.Generator,
                      constant: float = 0.0, popularity: Tensor | None = None) -> dict[str, Tensor]:
    """Ranking metrics ``[B]`` of the random, constant, popularity and oracle scores of the
    candidates, as ``ref/<scorer>/<metric>`` (the caller has already put the candidates in a
    random order, which breaks every scorer's ties).

    Args:
        metrics: what to compute (rating metrics are left out: see :func:`rating_metrics`).
        target, mask, relevant, is_query: the candidates ``[B, C]``.
        generator: the random scorer's draws.
        constant: the constant scorer's value.
        popularity: ``[B, C]`` the candidates' meta-train counts (``None``: no popularity scorer).
    """
    scores = {
        "random": random_scores(target.shape, generator).to(target),
        "constant": constant_scores(target.shape, constant, target.dtype, target.device),
        "oracle": oracle_scores(target, relevant, is_query),
    }
    if popularity is not None:
        scores["popularity"] = popularity.to(target.dtype)
    out: dict[str, Tensor] = {}
    for name in (r for r in REFERENCES if r in scores):
        for metric, v in metrics.per_task(scores[name], target, mask, relevant, rating=False).items():
            out[f"ref/{name}/{metric}"] = v
    return out


def rating_metrics(metrics: MetricSet, query_y: Tensor, query_mask: Tensor,
                   constant: float) -> dict[str, Tensor]:
    """RMSE and MAE ``[B]`` (those of ``metrics``) of the constant scorer on the query items, as
    ``ref/constant/<metric>``: the "global mean" rating baseline. The random and oracle scores
    are no rating predictions, so they have none."""
    pred = constant_scores(query_y.shape, constant, query_y.dtype, query_y.device)
    found = metrics.rating(pred, query_y, query_mask)
    return {f"ref/constant/{name}": v for name, v in found.items()}
