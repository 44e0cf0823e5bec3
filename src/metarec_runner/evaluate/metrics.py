"""Per-task metrics over padded query sets, vectorized over tasks.

Every function takes padded ``[B, Q]`` tensors with a ``mask`` and returns one value per task
``[B]``. Ranking metrics rank a task's query items by predicted score, ties in the *predictions*
broken by query position (stable sort; the query order is a seeded random shuffle, so this equals
a seeded random tie-break).

Binary relevance comes from one function, :func:`relevance`, with two rules:

* ``threshold``: ``rating >= threshold`` (the default, and the behaviour of the positional
  ``threshold`` argument of every binary metric);
* ``top_n``: the ``n`` highest true ratings of the task's query set (the RecBole-MetaRec peer
  protocol: 10 query items, n = 5). Ties among true ratings at the cut are broken by
  ``tie="position"`` (earlier query position first: a stable sort), ``"random"`` (a seeded random
  order, from ``generator``), or ``"topk"`` (literally ``torch.topk`` on the true ratings, as the
  peer's code does). ``torch.topk`` does *not* guarantee position order among ties: on CPU it
  follows its selection algorithm (e.g. top-5 of ``[3,5,3,3,1,3,2,3,3,4]`` picks the 3s at
  positions 8, 7, 3), so ``topk`` reproduces the peer only on the same backend and torch version;
  ``position`` is the well-defined rule the peer's protocol text describes.

Graded relevance (the ratings themselves) is used only by :func:`graded_ndcg_at_k`.

A task with no relevant item gets NaN for every binary ranking metric (NDCG, recall, precision,
hit rate, MRR, AUC), so all ranking means run over the same tasks; summaries skip and count NaNs.
AUC is also NaN when a task has no irrelevant item.

:class:`MetricSet` is the evaluator's choice of metrics (``evaluator.metrics``, ``ks``,
``graded_gain``): it names the columns and computes them all per task from one set of scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.evaluate.metric_specs import METRIC_SPECS, metric_columns

RELEVANCE_RULES = ("threshold", "top_n")
TIE_BREAKS = ("position", "random", "topk")
GAINS = ("exp", "linear")


def rmse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Root mean squared error per task ``[B]``."""
    m = mask.to(pred.dtype)
    return (((pred - target) ** 2 * m).sum(-1) / m.sum(-1)).sqrt()


def mae(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error per task ``[B]``."""
    m = mask.to(pred.dtype)
    return ((pred - target).abs() * m).sum(-1) / m.sum(-1)


def relevance(
    target: Tensor,
    mask: Tensor,
    rule: str = "threshold",
    threshold: float = 4.0,
    top_n: int = 5,
    tie: str = "position",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Binary relevance ``Bool[B, Q]`` of each query item (padding is never relevant).

    Args:
        target: true ratings ``[B, Q]``.
        mask: valid query items ``Bool[B, Q]``.
        rule: ``"threshold"`` (``target >= threshold``) or ``"top_n"`` (the ``top_n`` highest
            true ratings of each task; all valid items when a task has fewer).
        threshold: the cut for ``rule="threshold"``.
        top_n: how many items are relevant for ``rule="top_n"``.
        tie: for ``top_n``, how equal true ratings at the cut are ordered: ``"position"``
            (earlier query position wins), ``"random"`` (seeded by ``generator``) or ``"topk"``
            (whatever ``torch.topk`` returns; backend-dependent, see the module doc).
        generator: random source for ``tie="random"``; ``None`` uses the global RNG.
    """
    if rule == "threshold":
        return (target >= threshold) & mask
    if rule != "top_n":
        raise ValueError(f"relevance rule must be one of {RELEVANCE_RULES}, got {rule!r}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if tie not in TIE_BREAKS:
        raise ValueError(f"tie must be one of {TIE_BREAKS}, got {tie!r}")
    n = min(int(top_n), target.shape[-1])
    scores = target.masked_fill(~mask, float("-inf"))
    if tie == "topk":
        chosen = torch.topk(scores, n, dim=-1).indices
    elif tie == "position":
        chosen = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :n]
    else:
        device = generator.device if generator is not None else scores.device
        keys = torch.rand(scores.shape, generator=generator, device=device).to(scores.device)
        perm = keys.argsort(dim=-1)  # a random order of query positions per task
        in_perm = torch.sort(scores.gather(-1, perm), dim=-1, descending=True, stable=True).indices
        chosen = perm.gather(-1, in_perm[:, :n])
    out = torch.zeros_like(mask).scatter(-1, chosen, True)
    return out & mask


def _relevant(target: Tensor, mask: Tensor, threshold: float | None, relevant: Tensor | None) -> Tensor:
    """The given relevance, or ``relevance(rule="threshold")``, restricted to valid items."""
    if relevant is not None:
        return relevant.bool() & mask
    if threshold is None:
        raise ValueError("pass either threshold or relevant")
    return relevance(target, mask, "threshold", threshold=threshold)


def _ranked_relevance(pred: Tensor, relevant: Tensor, mask: Tensor) -> Tensor:
    """Relevance ``[B, Q]`` (float 0/1) in ranked order; padding ranks last and is 0."""
    return _ranked(pred, (relevant & mask).to(pred.dtype), mask)


def _ranked(pred: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """``values`` reordered by descending ``pred`` (stable: ties by query position; padding last)."""
    scores = pred.masked_fill(~mask, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return values.masked_fill(~mask, 0).gather(-1, order)


def _discounts(n: int, like: Tensor) -> Tensor:
    """``1 / log2(rank + 1)`` for ranks ``1..n``."""
    return 1.0 / torch.log2(torch.arange(2, n + 2, dtype=like.dtype, device=like.device))


def _nan_unless(cond: Tensor, value: Tensor) -> Tensor:
    return torch.where(cond, value, torch.full_like(value, float("nan")))


def ndcg_at_k(
    pred: Tensor, target: Tensor, mask: Tensor, k: int, threshold: float | None = None, *,
    relevant: Tensor | None = None,
) -> Tensor:
    """Binary-relevance NDCG@k per task ``[B]``; NaN where a task has no relevant item.

    DCG = sum over the top k of ``rel / log2(rank + 1)``; IDCG puts ``min(k, n_rel)`` relevant
    items first. Relevance: ``target >= threshold``, or the precomputed ``relevant`` mask.
    """
    relevant = _relevant(target, mask, threshold, relevant)
    ranked = _ranked_relevance(pred, relevant, mask)[:, :k]
    disc = _discounts(ranked.shape[-1], pred)
    dcg = (ranked * disc).sum(-1)
    n_rel = relevant.sum(-1)
    ideal_hits = n_rel.clamp(max=k)
    cum = torch.cat([torch.zeros(1, dtype=pred.dtype, device=pred.device), disc.cumsum(0)])
    idcg = cum[ideal_hits.clamp(max=disc.shape[0])]
    return _nan_unless(n_rel > 0, dcg / idcg.clamp_min(1e-12))


def recall_at_k(
    pred: Tensor, target: Tensor, mask: Tensor, k: int, threshold: float | None = None, *,
    relevant: Tensor | None = None,
) -> Tensor:
    """Recall@k per task ``[B]``: relevant items in the top k / all relevant; NaN if none."""
    relevant = _relevant(target, mask, threshold, relevant)
    hits = _ranked_relevance(pred, relevant, mask)[:, :k].sum(-1)
    n_rel = relevant.sum(-1).to(pred.dtype)
    return _nan_unless(n_rel > 0, hits / n_rel.clamp_min(1.0))


def precision_at_k(
    pred: Tensor, target: Tensor, mask: Tensor, k: int, threshold: float | None = None, *,
    relevant: Tensor | None = None,
) -> Tensor:
    """Precision@k per task ``[B]``: relevant items in the top k / k; NaN if no relevant item.

    The denominator is k even when a task has fewer than k query items (the evaluator refuses
    such cut-offs).
    """
    relevant = _relevant(target, mask, threshold, relevant)
    hits = _ranked_relevance(pred, relevant, mask)[:, :k].sum(-1)
    return _nan_unless(relevant.any(-1), hits / float(k))


def hit_rate_at_k(
    pred: Tensor, target: Tensor, mask: Tensor, k: int, threshold: float | None = None, *,
    relevant: Tensor | None = None,
) -> Tensor:
    """HR@k per task ``[B]``: 1 if any relevant item is in the top k, else 0; NaN if none exists."""
    relevant = _relevant(target, mask, threshold, relevant)
    hit = (_ranked_relevance(pred, relevant, mask)[:, :k].sum(-1) > 0).to(pred.dtype)
    return _nan_unless(relevant.any(-1), hit)


def mrr_at_k(
    pred: Tensor, target: Tensor, mask: Tensor, k: int, threshold: float | None = None, *,
    relevant: Tensor | None = None,
) -> Tensor:
    """MRR@k per task ``[B]``: 1 / rank of the first relevant item in the top k (0 if none there);
    NaN if the task has no relevant item."""
    relevant = _relevant(target, mask, threshold, relevant)
    ranked = _ranked_relevance(pred, relevant, mask)[:, :k]
    ranks = torch.arange(1, ranked.shape[-1] + 1, dtype=pred.dtype, device=pred.device)
    # first relevant rank: the smallest rank among relevant positions (inf where none)
    first = torch.where(ranked > 0, ranks, torch.full_like(ranked, float("inf"))).min(-1).values
    return _nan_unless(relevant.any(-1), 1.0 / first)


def auc(
    pred: Tensor, target: Tensor, mask: Tensor, threshold: float | None = None, *,
    relevant: Tensor | None = None,
) -> Tensor:
    """ROC AUC per task ``[B]``: P(a random relevant item outscores a random irrelevant one),
    score ties counting 1/2. NaN where a task has no relevant or no irrelevant item.

    Computed as the Mann-Whitney U statistic from mid-ranks (O(Q log Q) per task).
    """
    relevant = _relevant(target, mask, threshold, relevant)
    dt = torch.float64
    s = pred.to(dt)
    padded = s.masked_fill(~mask, float("inf"))
    srt = torch.sort(padded, dim=-1).values
    # among valid items: #strictly lower and #lower-or-equal (padding is +inf, after every
    # finite score; scores are checked finite by the evaluator)
    below = torch.searchsorted(srt, s.masked_fill(~mask, 0.0).contiguous(), right=False).to(dt)
    upto = torch.searchsorted(srt, s.masked_fill(~mask, 0.0).contiguous(), right=True).to(dt)
    mid_rank = below + (upto - below + 1) / 2  # 1-based mid-rank
    n_pos = relevant.sum(-1).to(dt)
    n_neg = mask.sum(-1).to(dt) - n_pos
    rank_sum = (mid_rank * relevant.to(dt)).sum(-1)
    u = rank_sum - n_pos * (n_pos + 1) / 2
    value = (u / (n_pos * n_neg).clamp_min(1.0)).to(pred.dtype)
    return _nan_unless((n_pos > 0) & (n_neg > 0), value)


def graded_gain(target: Tensor, gain: str = "exp") -> Tensor:
    """Graded gain of a rating: ``2**rating - 1`` (``"exp"``, the Burges et al. form that
    rewards the top ratings most) or the rating itself (``"linear"``, Järvelin-Kekäläinen)."""
    if gain == "exp":
        return torch.pow(2.0, target) - 1.0
    if gain == "linear":
        return target
    raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")


def graded_ndcg_at_k(pred: Tensor, target: Tensor, mask: Tensor, k: int, gain: str = "exp") -> Tensor:
    """Graded NDCG@k per task ``[B]`` with gains from :func:`graded_gain`.

    DCG = sum over the top k by prediction of ``gain / log2(rank + 1)``; IDCG = the same sum with
    the items sorted by true rating (the best possible ordering). NaN where IDCG is 0 (every
    gain zero, e.g. all ratings 0). Ratings should be non-negative.
    """
    g = graded_gain(target.to(pred.dtype), gain).masked_fill(~mask, 0.0)
    ranked = _ranked(pred, g, mask)[:, :k]
    disc = _discounts(ranked.shape[-1], pred)
    dcg = (ranked * disc).sum(-1)
    ideal = torch.sort(g.masked_fill(~mask, float("-inf")), dim=-1, descending=True).values[:, :k]
    idcg = (ideal.masked_fill(torch.isinf(ideal), 0.0) * disc).sum(-1)
    return _nan_unless(idcg > 0, dcg / idcg.where(idcg > 0, torch.ones_like(idcg)))


BINARY_AT_K = {
    "ndcg": ndcg_at_k,
    "recall": recall_at_k,
    "precision": precision_at_k,
    "hit": hit_rate_at_k,
    "mrr": mrr_at_k,
}
"""The cut-off metrics of binary relevance, by base name."""
_RATING = {"rmse": rmse, "mae": mae}


def check_finite(pred: Tensor, mask: Tensor) -> None:
    """Raise :class:`~metarec_runner.errors.TrainingError` if a valid score is NaN or infinite."""
    if not torch.isfinite(pred[mask]).all():
        raise TrainingError(
            "the model produced NaN or infinite scores; the run is invalid "
            "(lower the learning rates, e.g. algo.inner_lr or algo.meta_optimizer.lr)"
        )


@dataclass(frozen=True)
class MetricSet:
    """The metrics an evaluation reports (``evaluator.metrics``, ``ks``, ``graded_gain``).

    Attributes:
        names: base names from :data:`~metarec_runner.evaluate.metric_specs.METRIC_SPECS`.
        ks: cut-offs of the ``*_at_k`` metrics (columns ``<name>_at_<k>``: MLflow rejects '@').
        graded_gain: gains of ``graded_ndcg``: ``"exp"`` (``2**rating - 1``) or ``"linear"``.
    """

    names: tuple[str, ...] = ("rmse", "mae", "ndcg", "recall")
    ks: tuple[int, ...] = (3, 5)
    graded_gain: str = "exp"

    def __post_init__(self) -> None:
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise ConfigError("ks", f"must be a non-empty list of positive cut-offs, got {list(self.ks)}")
        names = [str(m) for m in self.names]
        unknown = [m for m in names if m not in METRIC_SPECS]
        if not names or unknown or len(set(names)) != len(names):
            raise ConfigError("evaluator.metrics", "must be a non-empty list of distinct names from "
                              f"{list(METRIC_SPECS)}, got {names}")
        if self.graded_gain not in GAINS:
            raise ConfigError("evaluator.graded_gain",
                              f"must be one of {list(GAINS)}, got {self.graded_gain!r}")
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))

    @classmethod
    def of(cls, names: Sequence[str], ks: Sequence[int], graded_gain: str = "exp") -> MetricSet:
        """From config lists."""
        return cls(tuple(names), tuple(ks), graded_gain)

    def rating(self, pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """RMSE and MAE ``[B]`` (those of :attr:`names`) of rating predictions ``pred``."""
        return {m: _RATING[m](pred, target, mask) for m in self.names if m in _RATING}

    @property
    def columns(self) -> list[str]:
        """The per-task columns, in order (``rmse``, ``ndcg_at_5``, ...)."""
        return metric_columns(self.names, self.ks)

    def per_task(self, pred: Tensor, target: Tensor, mask: Tensor, relevant: Tensor,
                 rating: bool = True) -> dict[str, Tensor]:
        """Every metric per task (``[B]`` each) of padded scores ``pred [B, C]``.

        Args:
            pred, target, mask: scores, true ratings (0 where unknown) and valid candidates.
            relevant: ``Bool[B, C]`` binary relevance of the candidates.
            rating: also compute RMSE and MAE (meaningful only when the candidates are the
                query items).
        """
        check_finite(pred, mask)
        out: dict[str, Tensor] = {}
        for m in self.names:
            if m in _RATING:
                if rating:
                    out[m] = _RATING[m](pred, target, mask)
            elif m == "auc":
                out["auc"] = auc(pred, target, mask, relevant=relevant)
            elif m == "graded_ndcg":
                for k in self.ks:
                    out[f"graded_ndcg_at_{k}"] = graded_ndcg_at_k(pred, target, mask, k,
                                                                  gain=self.graded_gain)
            else:
                for k in self.ks:
                    out[f"{m}_at_{k}"] = BINARY_AT_K[m](pred, target, mask, k, relevant=relevant)
        return out
