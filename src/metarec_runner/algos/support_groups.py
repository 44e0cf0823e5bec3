"""Meta-batches cut into groups of tasks with similar support sizes (less padding, same results).

Re-exported by :mod:`metarec_runner.algos.base`, where the algorithms use them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metarec_runner.tasks.taskset import TaskBatch


def _min_padding_cuts(sizes: Tensor, groups: int) -> list[int]:
    """Cut ascending ``sizes [B]`` into ``groups`` contiguous runs with the fewest padded rows.

    A run costs ``len(run) * max(run)``; cuts fall only between distinct sizes. Dynamic
    programming over the ``m`` distinct sizes (``O(groups m^2)``, vectorised).

    Returns:
        End positions of the runs (the last is ``B``); fewer runs if ``sizes`` has fewer than
        ``groups`` distinct values.
    """
    values, counts = torch.unique_consecutive(sizes.cpu(), return_counts=True)  # tiny: plan on CPU
    m = values.shape[0]
    groups = max(1, min(groups, m))
    pos = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).double()  # boundaries [m + 1]
    # span[i, j]: cost of one run from boundary i to boundary j + 1 (inf unless i <= j)
    span = (pos[None, 1:] - pos[:-1, None]) * values.double()[None, :]
    span = span.masked_fill(torch.ones(m, m, dtype=torch.bool).tril(-1), float("inf"))
    cost = torch.full((m + 1,), float("inf"), dtype=torch.float64)
    cost[0] = 0.0  # cost[j]: fewest padded rows for the sizes before boundary j
    back = []
    for _ in range(groups):
        best, arg = (cost[:-1, None] + span).min(0)
        cost = torch.cat([cost.new_full((1,), float("inf")), best])
        back.append(arg)
    cuts, j = [], m
    for arg in reversed(back):
        cuts.append(int(pos[j]))
        j = int(arg[j - 1])
    return cuts[::-1]


def split_by_support_size(batch: TaskBatch, chunks: int) -> list[TaskBatch]:
    """Split a meta-batch into groups of tasks with similar support sizes.

    Tasks are sorted by support size and cut into ``min(chunks, distinct sizes)`` runs that
    minimise the padded support rows; each group is padded only to its own longest support
    and query set, so batched work on the groups wastes less on padding than on the whole
    batch. Per-task results are unchanged.

    Args:
        batch: ``B`` padded tasks.
        chunks: the largest number of groups; 1 returns ``[batch]``.

    Returns:
        Sub-batches (shorter ``S`` and ``Q``) whose tasks together are ``batch``'s, in
        ascending support size.
    """
    if chunks <= 1 or batch.size <= 1:
        return [batch]
    support_n = batch.support_mask.sum(1)
    order = torch.argsort(support_n, stable=True)
    cuts = _min_padding_cuts(support_n[order], chunks)
    if len(cuts) == 1:
        return [batch]
    query_n = batch.query_mask.sum(1)
    out, start = [], 0
    for end in cuts:
        idx = order[start:end]
        s, q = int(support_n[idx].max()), int(query_n[idx].max())
        out.append(TaskBatch(
            batch.support_x[idx, :s], batch.support_y[idx, :s], batch.support_mask[idx, :s],
            batch.query_x[idx, :q], batch.query_y[idx, :q], batch.query_mask[idx, :q],
            batch.task_index[idx],
        ))
        start = end
    return out
