"""The losses and episodes of :mod:`metarec_runner.algos.set_ranker`, batched over tasks.

- :func:`catalog_softmax_loss`: each positive against every item of the catalog except the
  task's excluded ones (the positive itself always stays in its own denominator).
- :func:`sampled_softmax_loss`: the same with the catalog replaced by a shared sample of items,
  logQ-corrected (S. Jean et al. ACL 2015; X. Yi et al. RecSys 2019), accidental hits removed.
- :func:`subsample_support`: random-k episodes, ``k ~ Uniform{k_min..k_max}`` rows per task.
- :func:`task_weights`: how much each task's loss weighs in a batch's mean.

A task without a positive costs 0 and is flagged, so a batch averages over the tasks that have one.
Masked logits are the dtype's finite minimum, never ``-inf``: a task whose every item is excluded
gets no NaN gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metarec_runner.algos.ranking_loss import ranking_loss


def _in_set(items: Tensor, pool: Tensor, pool_mask: Tensor) -> Tensor:
    """Bool ``[B, L]``: whether ``items [B, L]`` is among task ``b``'s real ``pool [B, E]`` items."""
    return ((items.unsqueeze(-1) == pool.unsqueeze(-2)) & pool_mask.unsqueeze(-2)).any(-1)


def _task_mean(per_positive: Tensor, pos_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task mean over real positives ``[B]`` (0 without one) and whether a task has one."""
    m = pos_mask.to(per_positive.dtype)
    n = m.sum(-1)
    return (per_positive * m).sum(-1) / n.clamp_min(1.0), n > 0


def catalog_softmax_loss(scores: Tensor, pos_items: Tensor, pos_mask: Tensor,
                         excluded: Tensor) -> tuple[Tensor, Tensor]:
    """Full-catalog softmax loss of each task's positives, excluded items left out.

    Args:
        scores: ``[B, N]`` every item's score.
        pos_items: ``[B, P]`` positive item codes (with ``pos_mask [B, P]``).
        excluded: Bool ``[B, N]``: items removed from the denominator (a positive keeps itself).

    Returns:
        ``(loss [B], has_positive [B])``: per task, the mean over its positives ``q`` of
        ``-s_q + logsumexp_{i not excluded, or i = q} s_i`` (0 for a task without positives).
    """
    floor = torch.finfo(scores.dtype).min  # finite: a task excluding everything gets no NaN
    lse = torch.logsumexp(scores.masked_fill(excluded, floor), -1, keepdim=True)  # [B, 1]
    s = scores.gather(-1, pos_items)
    own = excluded.gather(-1, pos_items)  # the positive is excluded: add it back, once
    denom = torch.where(own, torch.logaddexp(lse, s), lse)
    return _task_mean(denom - s, pos_mask)


def sampled_softmax_loss(user: Tensor, out: Tensor, offset: Tensor, pos_items: Tensor,
                         pos_mask: Tensor, excl_items: Tensor, excl_mask: Tensor,
                         negatives: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`catalog_softmax_loss` with the catalog replaced by ``negatives [M]`` shared items.

    Each positive is one softmax of :func:`~metarec_runner.algos.ranking_loss.ranking_loss`
    (``kind="softmax"``) against the negatives, with logits ``s_i - log(M q_i)`` (``log_q
    [n_items]``: log sampling probabilities); a sampled item that is one of the task's excluded
    items (``excl_items [B, E]``) or the positive itself (an accidental hit) is masked out for
    that positive. ``user [B, d]``, ``out [n_items, d]``, ``offset [n_items]``.
    """
    b, p = pos_items.shape
    log_mq = log_q + math.log(negatives.shape[0])  # [n_items]: log(M q_i)

    def scores(items: Tensor) -> Tensor:  # [B, L] scores of items [B, L]
        return (user.unsqueeze(-2) * out[items]).sum(-1) + offset[items]

    neg_items = negatives.unsqueeze(0).expand(b, -1)  # [B, M]
    keep = ~_in_set(neg_items, excl_items, excl_mask).unsqueeze(1)  # [B, 1, M]
    keep = keep & (negatives.view(1, 1, -1) != pos_items.unsqueeze(-1))  # [B, P, M]
    neg = scores(neg_items).unsqueeze(1).expand(-1, p, -1)  # [B, P, M]
    per_positive = ranking_loss(
        scores(pos_items).reshape(-1, 1), torch.ones(b * p, 1, dtype=torch.bool, device=user.device),
        neg.reshape(b * p, -1), "softmax", keep.reshape(b * p, -1),
        log_mq[pos_items].reshape(-1, 1), log_mq[negatives].expand(b * p, -1))
    return _task_mean(per_positive.view(b, p), pos_mask)


WEIGHTINGS = ("task", "positive")
"""A batch's loss: the mean over its tasks with a positive, or over all of its positives."""


def task_weights(pos_mask: Tensor, has: Tensor, weighting: str, dtype: torch.dtype) -> Tensor:
    """Weights ``[B]`` of the tasks' losses in a batch's weighted mean: ``has [B]`` (``task``: every
    task with a positive alike) or the number of positives of ``pos_mask [B, P]`` (``positive``:
    every positive alike, so a heavy user weighs as much as their ratings, as popularity counts
    do). A task without a positive weighs 0 either way."""
    return (has if weighting == "task" else pos_mask.sum(-1)).to(dtype)


def subsample_support(mask: Tensor, generator: torch.Generator, k_min: int = 0,
                      k_max: int | None = None) -> Tensor:
    """Keep ``k ~ Uniform{min(k_min, n)..min(k_max, n)}`` random real rows of each task's support.

    Args:
        mask: Bool ``[B, S]`` real support rows (``n`` per task).
        generator: CPU generator (the draws do not depend on the device).

    Returns:
        Bool ``[B, S]`` rows kept, a subset of ``mask``: padding is never kept.
    """
    n = mask.sum(-1).cpu()
    hi = n if k_max is None else n.clamp_max(int(k_max))
    lo = n.clamp_max(int(k_min)).minimum(hi)
    u = torch.rand(n.shape, generator=generator, dtype=torch.float64)
    k = (lo + (u * (hi - lo + 1)).floor().long()).minimum(hi)  # [B]
    keys = torch.rand(mask.shape, generator=generator).masked_fill(~mask.cpu(), 2.0)
    rank = keys.argsort(-1).argsort(-1)  # real rows first, in random order
    return (mask.cpu() & (rank < k.unsqueeze(-1))).to(mask.device)
