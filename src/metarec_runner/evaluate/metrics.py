"""Per-task metrics over padded query sets, vectorized over tasks.

Every function takes padded ``[B, Q]`` tensors with a ``mask`` and returns one value per task
``[B]``. Ranking metrics rank a task's query items by predicted score, ties broken by query
position (the query order is a seeded random shuffle, so this equals a seeded random tie-break).
Relevance is binary: ``rating >= threshold``. A task with no relevant item has NaN NDCG and
recall (undefined), which summaries skip and count.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rmse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Root mean squared error per task ``[B]``."""
    m = mask.to(pred.dtype)
    return (((pred - target) ** 2 * m).sum(-1) / m.sum(-1)).sqrt()


def mae(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error per task ``[B]``."""
    m = mask.to(pred.dtype)
    return ((pred - target).abs() * m).sum(-1) / m.sum(-1)


def _ranked_relevance(pred: Tensor, relevant: Tensor, mask: Tensor) -> Tensor:
    """Relevance ``[B, Q]`` (float 0/1) in ranked order; padding ranks last and is 0."""
    scores = pred.masked_fill(~mask, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return (relevant & mask).gather(-1, order).to(pred.dtype)


def _discounts(n: int, like: Tensor) -> Tensor:
    """``1 / log2(rank + 1)`` for ranks ``1..n``."""
    return 1.0 / torch.log2(torch.arange(2, n + 2, dtype=like.dtype, device=like.device))


def ndcg_at_k(pred: Tensor, target: Tensor, mask: Tensor, k: int, threshold: float) -> Tensor:
    """Binary-relevance NDCG@k per task ``[B]``; NaN where a task has no relevant item.

    DCG = sum over the top k of ``rel / log2(rank + 1)``; IDCG puts ``min(k, n_rel)`` relevant
    items first.
    """
    relevant = target >= threshold
    ranked = _ranked_relevance(pred, relevant, mask)[:, :k]
    disc = _discounts(ranked.shape[-1], pred)
    dcg = (ranked * disc).sum(-1)
    n_rel = (relevant & mask).sum(-1)
    ideal_hits = n_rel.clamp(max=k)
    cum = torch.cat([torch.zeros(1, dtype=pred.dtype, device=pred.device), disc.cumsum(0)])
    idcg = cum[ideal_hits.clamp(max=disc.shape[0])]
    return torch.where(n_rel > 0, dcg / idcg.clamp_min(1e-12), torch.full_like(dcg, float("nan")))


def recall_at_k(pred: Tensor, target: Tensor, mask: Tensor, k: int, threshold: float) -> Tensor:
    """Recall@k per task ``[B]``: relevant items in the top k / all relevant; NaN if none."""
    relevant = target >= threshold
    hits = _ranked_relevance(pred, relevant, mask)[:, :k].sum(-1)
    n_rel = (relevant & mask).sum(-1).to(pred.dtype)
    return torch.where(n_rel > 0, hits / n_rel.clamp_min(1.0), torch.full_like(hits, float("nan")))
