"""Item cold start: one task per ITEM; train, validation and test items are disjoint.

A task holds the ratings of one item by several users. Rows are the usual (user, item)
feature rows from :meth:`Interactions.feature_rows`, so every model works unchanged: it now
adapts to a new item from a few users' ratings and predicts the item's other ratings.
Because each rating belongs to exactly one item, a test item's ratings never appear in any
meta-train or validation task.
"""

from __future__ import annotations

import numpy as np
import torch

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError, DataError
from metarec_runner.tasks.splitters import UserColdStart
from metarec_runner.tasks.taskset import TaskSet, TaskSplits


def taskset_by_key(
    data: Interactions,
    key_col: np.ndarray,
    n_keys: int,
    group: np.ndarray,
    rank: np.ndarray,
    is_support: np.ndarray,
    is_query: np.ndarray,
) -> TaskSet:
    """Flat CSR TaskSet with one task per key in ``group`` (in that order).

    Args:
        data: the interactions.
        key_col: int array ``[N]``, the task key of each rating row (user or item code).
        n_keys: number of distinct keys (``n_users`` or ``n_items``).
        group: key codes of this split's tasks; they become ``task_ids``.
        rank: int array ``[N]``; rows are stored in this order within a task.
        is_support, is_query: bool arrays ``[N]`` selecting support and query rows.
    """
    position = np.full(n_keys, -1, dtype=np.int64)
    position[group] = np.arange(len(group))
    task_of_row = position[key_col]

    def rows(select: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        idx = np.flatnonzero(select & (task_of_row >= 0))
        idx = idx[np.lexsort((rank[idx], task_of_row[idx]))]
        sizes = np.bincount(task_of_row[idx], minlength=len(group))
        offsets = torch.zeros(len(group) + 1, dtype=torch.long)
        offsets[1:] = torch.from_numpy(np.cumsum(sizes))
        return idx, offsets

    s_idx, s_off = rows(is_support)
    q_idx, q_off = rows(is_query)
    users_col = data.ratings["user"].to_numpy(np.int64)
    items_col = data.ratings["item"].to_numpy(np.int64)
    ratings = data.ratings["rating"].to_numpy(np.float32)
    expected = None
    if "expected_rating" in data.ratings.columns:
        expected = torch.from_numpy(
            data.ratings["expected_rating"].to_numpy(np.float32)[q_idx].copy()
        )
    return TaskSet(
        task_ids=torch.from_numpy(np.asarray(group, dtype=np.int64).copy()),
        support_x=data.feature_rows(users_col[s_idx], items_col[s_idx]),
        support_y=torch.from_numpy(ratings[s_idx].copy()),
        support_offsets=s_off,
        query_x=data.feature_rows(users_col[q_idx], items_col[q_idx]),
        query_y=torch.from_numpy(ratings[q_idx].copy()),
        query_offsets=q_off,
        query_expected=expected,
    )


class ItemColdStart(UserColdStart):
    """Item cold start: one task per item; train, validation and test items are disjoint.

    Items with between ``min_interactions`` and ``max_interactions`` ratings are shuffled with
    ``seed`` and split by ``ratios``. Each item's ratings are shuffled once with ``seed``; the
    first ``n_query`` form the query set and the rest (or the next ``n_support``) the support
    set. ``task_ids`` are item codes.

    Args:
        ratios: fractions of eligible items for (train, val, test).
        n_query: query ratings per item.
        n_support: support ratings per item; ``None`` = all but the query.
        min_interactions: keep items with at least this many ratings.
        max_interactions: keep items with at most this many (``None`` = no limit).
        seed: the split seed.
    """

    def _eligible_items(self, counts: np.ndarray, name: str) -> np.ndarray:
        """Item codes that pass the rating-count filter and can hold the task."""
        keep = counts >= self.min_interactions
        if self.max_interactions is not None:
            keep &= counts <= self.max_interactions
        items = np.flatnonzero(keep)
        if len(items) == 0:
            raise DataError(
                f"dataset {name!r}: no item has between splitter.min_interactions="
                f"{self.min_interactions} and splitter.max_interactions={self.max_interactions} "
                f"ratings (counts range {counts.min()}..{counts.max()}); widen the filter"
            )
        need = self.n_query + (self.n_support or 1)
        short = items[counts[items] < need]
        if len(short):
            what = "support" if self.n_support is None else f"{self.n_support} support ratings"
            raise ConfigError(
                "splitter.n_query",
                f"n_query={self.n_query} leaves no room for {what} for {len(short)} items with "
                f"fewer than {need} ratings (smallest: {counts[short].min()}); lower "
                f"splitter.n_query or raise splitter.min_interactions to {need}",
            )
        return items

    def __call__(self, data: Interactions) -> TaskSplits:
        """Split ``data`` into item tasks. Deterministic in ``seed`` and the data."""
        items_col = data.ratings["item"].to_numpy(np.int64)
        counts = np.bincount(items_col, minlength=data.n_items)
        items = self._eligible_items(counts, data.name)
        rng = np.random.default_rng(self.seed)
        items = items[rng.permutation(len(items))]
        n_train = round(self.ratios[0] * len(items))
        n_val = round(self.ratios[1] * len(items))
        groups = (items[:n_train], items[n_train:n_train + n_val], items[n_train + n_val:])
        if min(len(g) for g in groups) == 0:
            raise DataError(
                f"dataset {data.name!r}: {len(items)} eligible items are too few for "
                f"splitter.ratios={list(self.ratios)}; use more items or other ratios"
            )
        # rank of each rating within its item, in a seeded random order
        key = rng.random(len(items_col))
        order = np.lexsort((key, items_col))
        rank = np.empty(len(items_col), dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank[order] = np.arange(len(items_col)) - starts[items_col[order]]
        is_query = rank < self.n_query
        is_support = ~is_query
        if self.n_support is not None:
            is_support &= rank < self.n_query + self.n_support
        parts = [
            taskset_by_key(data, items_col, data.n_items, g, rank, is_support, is_query)
            for g in groups
        ]
        return TaskSplits(*parts)
