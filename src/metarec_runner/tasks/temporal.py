"""Temporal user cold start: disjoint users as in :class:`UserColdStart`, but each user's query
set is their LATEST interactions and the support set the history that precedes it.

This mimics deployment: a new user's first ratings are known (support) and the model must
predict what they rate next (query), so no query rating ever precedes a support rating.
"""

from __future__ import annotations

import numpy as np

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import DataError
from metarec_runner.tasks.splitters import UserColdStart, taskset_by_key
from metarec_runner.tasks.taskset import TaskSplits


class TemporalUserColdStart(UserColdStart):
    """User cold start with a per-user time split: support = earlier ratings, query = later ones.

    Users are filtered, shuffled with ``seed`` and split by ``ratios`` into disjoint
    train / validation / test users exactly as in :class:`UserColdStart`. Within a user the
    interactions are ordered by ``(timestamp, item code, row position)``; ties in timestamp are
    thus broken deterministically (and independently of ``seed``, which only assigns users).

    * query = the user's last ``n_query`` interactions in that order, stored chronologically;
    * support = the ``n_support`` interactions immediately before the query period (the most
      recent history), or all earlier ones when ``n_support`` is ``None``. Support rows are
      stored most recent first, so :meth:`TaskSet.with_support_size` (``k`` first rows) keeps
      the ``k`` latest ones, consistent with ``n_support``.

    Args:
        ratios: fractions of eligible users for (train, val, test).
        n_query: latest interactions per user used as the query.
        n_support: support interactions per user, taken just before the query period;
            ``None`` = all earlier interactions.
        min_interactions: keep users with at least this many interactions.
        max_interactions: keep users with at most this many (``None`` = no limit).
        seed: the split seed (assigns users to splits; the time split itself is deterministic).

    Raises:
        DataError: when every timestamp in the data is equal (no time order, e.g. a dataset
            without timestamps); use ``splitter=user_cold_start`` there.
    """

    def __call__(self, data: Interactions) -> TaskSplits:
        """Split ``data`` into tasks. Deterministic in ``seed`` and the data."""
        timestamps = data.ratings["timestamp"].to_numpy(np.int64)
        if timestamps.min() == timestamps.max():
            raise DataError(
                f"splitter TemporalUserColdStart: dataset {data.name!r} has every timestamp equal "
                f"({int(timestamps[0])}), so there is no time order to split on; use "
                f"splitter=user_cold_start for data without timestamps"
            )
        users_col = data.ratings["user"].to_numpy(np.int64)
        items_col = data.ratings["item"].to_numpy(np.int64)
        counts = np.bincount(users_col, minlength=data.n_users)
        rng = np.random.default_rng(self.seed)
        groups = self._split_keys(self._eligible(counts, data.name), rng, data.name)
        # chronological position of each interaction within its user (ties: item code, then row)
        n = len(users_col)
        order = np.lexsort((np.arange(n), items_col, timestamps, users_col))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n) - starts[users_col[order]]
        first_query = counts[users_col] - self.n_query  # position where the query period starts
        is_query = position >= first_query
        # query rows: chronological; support rows: most recent first (0 = just before the query)
        rank = np.where(is_query, position - first_query, first_query - 1 - position)
        is_support = ~is_query
        if self.n_support is not None:
            is_support &= rank < self.n_support
        parts = [taskset_by_key(data, users_col, data.n_users, g, rank, is_support, is_query)
                 for g in groups]
        return TaskSplits(*parts)
