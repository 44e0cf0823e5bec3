"""Splitters: Interactions -> TaskSplits (meta-train / validation / test tasks).

Tasks depend only on the splitter's ``seed`` (``split_seed`` in the top-level config), never on
the training seed, so a seed sweep compares models on identical tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError, DataError, require_positive
from metarec_runner.tasks.taskset import TaskSet, TaskSplits


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(
            "ratios", f"must be three non-negative fractions summing to 1 (train, val, test), "
            f"got {list(ratios)}; e.g. ratios=[0.8,0.1,0.1]"
        )
    if min(ratios) == 0:
        raise ConfigError("ratios", f"train, validation and test fractions must all be > 0 (validation "
                          f"selects the epoch), got {list(ratios)}")
    return float(ratios[0]), float(ratios[1]), float(ratios[2])


FILTERED_USERS = ("train", "drop")


class UserColdStart:
    """User cold start: one task per user; train, validation and test users are disjoint.

    Each user's interactions are shuffled once with ``seed``; the first ``n_query`` form the
    query set and the rest (or the next ``n_support``) the support set.

    Args:
        ratios: fractions of eligible users for (train, val, test).
        n_query: query interactions per user.
        n_support: support interactions per user; ``None`` = all but the query.
        min_interactions: users with at least this many interactions can be validation and
            test tasks.
        max_interactions: ... and at most this many (``None`` = no limit).
        seed: the split seed.
        filtered_users: what happens to the users the two filters leave out: ``"train"`` (the
            default: they become extra meta-train tasks, so their interactions still count for
            the item side, popularity and the baselines, as in a deployment; each keeps
            ``min(n_query, n // 2)`` query rows, and users with a single interaction are
            dropped) or ``"drop"`` (as older protocols do). The counts are logged with the
            split (``split.filtered_users``, ``split.filtered_interactions``,
            ``split.filtered_to_train_users``).
    """

    def __init__(
        self,
        ratios: Sequence[float] = (0.8, 0.1, 0.1),
        n_query: int = 10,
        n_support: int | None = None,
        min_interactions: int = 13,
        max_interactions: int | None = None,
        seed: int = 0,
        filtered_users: str = "train",
    ) -> None:
        self.ratios = _check_ratios(list(ratios))
        if filtered_users not in FILTERED_USERS:
            raise ConfigError("filtered_users", f"unknown value {filtered_users!r}; choose one of "
                              f"{', '.join(FILTERED_USERS)}")
        self.filtered_users = filtered_users
        require_positive("n_query", n_query)
        if n_support is not None:
            require_positive("n_support", n_support)
        require_positive("min_interactions", min_interactions)
        if max_interactions is not None and max_interactions < min_interactions:
            raise ConfigError(
                "max_interactions",
                f"{max_interactions} is below min_interactions={min_interactions}; raise it or set null",
            )
        self.n_query = int(n_query)
        self.n_support = None if n_support is None else int(n_support)
        self.min_interactions = int(min_interactions)
        self.max_interactions = None if max_interactions is None else int(max_interactions)
        self.seed = int(seed)

    #: the column whose values become tasks ("user": one task per user, "item": per item)
    task_key = "user"

    def _eligible(self, counts: np.ndarray, name: str) -> np.ndarray:
        """Task keys (user or item codes) that pass the count filter and can hold a task."""
        kind = self.task_key
        keep = counts >= self.min_interactions
        if self.max_interactions is not None:
            keep &= counts <= self.max_interactions
        keys = np.flatnonzero(keep)
        if len(keys) == 0:
            raise DataError(
                f"dataset {name!r}: no {kind} has between splitter.min_interactions="
                f"{self.min_interactions} and splitter.max_interactions={self.max_interactions} "
                f"interactions (counts range {counts.min()}..{counts.max()}); widen the filter"
            )
        need = self.n_query + (self.n_support or 1)
        short = keys[counts[keys] < need]
        if len(short):
            if self.n_support is None:
                raise ConfigError(
                    "splitter.n_query",
                    f"n_query={self.n_query} leaves no room for support for {len(short)} {kind}s with "
                    f"fewer than {need} interactions (smallest: {counts[short].min()}); lower "
                    f"splitter.n_query or raise splitter.min_interactions to {need}",
                )
            raise ConfigError(
                "splitter.n_support",
                f"n_support={self.n_support} with n_query={self.n_query} needs {need} interactions "
                f"per {kind}, but {len(short)} {kind}s have fewer (smallest: {counts[short].min()}); "
                f"lower splitter.n_support (or set it to null: all but the query) or raise "
                f"splitter.min_interactions to {need}",
            )
        return keys

    def _split_keys(self, keys: np.ndarray, rng: np.random.Generator, name: str) -> tuple[np.ndarray, ...]:
        """Shuffle ``keys`` and cut them into disjoint (train, val, test) groups by ``ratios``."""
        keys = keys[rng.permutation(len(keys))]
        n_train = int(round(self.ratios[0] * len(keys)))
        n_val = int(round(self.ratios[1] * len(keys)))
        groups = (keys[:n_train], keys[n_train:n_train + n_val], keys[n_train + n_val:])
        if min(len(g) for g in groups) == 0:
            raise DataError(
                f"dataset {name!r}: {len(keys)} eligible {self.task_key}s are too few for "
                f"splitter.ratios={list(self.ratios)}; use more {self.task_key}s or other ratios"
            )
        return groups

    def __call__(self, data: Interactions) -> TaskSplits:
        """Split ``data`` into tasks. Deterministic in ``seed`` and the data."""
        key_col = data.ratings[self.task_key].to_numpy(np.int64)
        n_keys = data.n_users if self.task_key == "user" else data.n_items
        counts = np.bincount(key_col, minlength=n_keys)
        rng = np.random.default_rng(self.seed)
        eligible = self._eligible(counts, data.name)
        groups = self._split_keys(eligible, rng, data.name)
        # rank of each interaction within its task, in a seeded random order
        rank = random_rank(key_col, rng)
        query_size = np.full(n_keys, self.n_query, dtype=np.int64)
        left_out = np.setdiff1d(np.flatnonzero(counts > 0), eligible)
        filtered = {"filtered_users": len(left_out),
                    "filtered_interactions": int(counts[left_out].sum()),
                    "filtered_to_train_users": 0}
        if self.filtered_users == "train" and len(left_out):
            extra = left_out[counts[left_out] >= 2]  # a task needs a support and a query row
            query_size[extra] = np.minimum(self.n_query, counts[extra] // 2)
            filtered["filtered_to_train_users"] = len(extra)
            groups = (np.concatenate([groups[0], extra]), *groups[1:])
        is_query = rank < query_size[key_col]
        is_support = ~is_query
        if self.n_support is not None:
            is_support &= rank < query_size[key_col] + self.n_support
        parts = [taskset_by_key(data, key_col, n_keys, g, rank, is_support, is_query, self.task_key)
                 for g in groups]
        return TaskSplits(*parts, filtered=filtered)


def random_rank(key_col: np.ndarray, rng: np.random.Generator, select: np.ndarray | None = None) -> np.ndarray:
    """Position of each row within its key (task) in a seeded random order.

    Draws ``rng.random(N)`` once (always N values, so the stream does not depend on ``select``).

    Args:
        key_col: int array ``[N]``, the task key of each row.
        rng: the split's generator.
        select: optional bool array ``[N]``; only these rows are ranked.

    Returns:
        int64 array ``[N]``: ``0..n_k-1`` over the selected rows of each key, ``-1`` elsewhere.
    """
    noise = rng.random(len(key_col))
    idx = np.arange(len(key_col)) if select is None else np.flatnonzero(select)
    order = idx[np.lexsort((noise[idx], key_col[idx]))]
    keys = key_col[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rank = np.full(len(key_col), -1, dtype=np.int64)
    rank[order] = np.arange(len(order)) - run_start
    return rank


def taskset_by_key(
    data: Interactions,
    key_col: np.ndarray,
    n_keys: int,
    group: np.ndarray,
    rank: np.ndarray,
    is_support: np.ndarray,
    is_query: np.ndarray,
    task_kind: str = "user",
) -> TaskSet:
    """Flat CSR TaskSet with one task per key in ``group`` (in that order).

    Args:
        data: the interactions.
        key_col: int array ``[N]``, the task key of each rating row (user or item code).
        n_keys: number of distinct keys (``n_users`` or ``n_items``).
        group: key codes of this split's tasks; they become ``task_ids``.
        rank: int array ``[N]``; rows are stored in this order within a task.
        is_support, is_query: bool arrays ``[N]`` selecting support and query rows.
        task_kind: what a task is (``TaskSet.task_kind``): ``"user"`` or ``"item"``.
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
        task_kind=task_kind,
    )
