"""MeLU's four cold-start states (Lee et al., KDD 2019) as one splitter.

Users and items are *existing* or *new* by when they first appear: a user is existing if their
first rating is before ``user_cut``, an item if its first rating is before ``item_cut``. The cut
points are timestamps (``cut: time``) or quantiles of all rating timestamps (``cut: quantile``,
e.g. 0.8 = the time by which 80% of the ratings were made). Validation and test tasks are drawn
from one state:

=================  ===============  ==============
state              task users       task items
=================  ===============  ==============
``warm``           existing         existing
``user_cold``      new              existing
``item_cold``      existing         new
``user_item_cold`` new              new
=================  ===============  ==============

Meta-train tasks are always existing users on existing items. A task holds one user's ratings
of the state's items (all of them, whenever they were made), shuffled once with ``seed`` into
a query set and a support set as in :class:`UserColdStart`. Train, validation and test users
are disjoint in every state, so no rating of a validation or test task is ever trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError, DataError, require_choice
from metarec_runner.tasks.splitters import UserColdStart, random_rank, taskset_by_key
from metarec_runner.tasks.taskset import TaskSplits

STATES = ("warm", "user_cold", "item_cold", "user_item_cold")
"""Evaluation states: which users (existing/new) rate which items (existing/new)."""

CUTS = ("time", "quantile")
"""How ``user_cut`` and ``item_cut`` are read: a timestamp, or a quantile of rating times."""


def first_seen(codes: np.ndarray, timestamps: np.ndarray, n: int) -> np.ndarray:
    """Earliest timestamp per code.

    Args:
        codes: int array ``[N]`` of user or item codes.
        timestamps: int array ``[N]``.
        n: number of codes.

    Returns:
        int64 array ``[n]``; codes without a rating get the int64 maximum (never existing).
    """
    out = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(out, codes, timestamps)
    return out


class FourStates(UserColdStart):
    """One of MeLU's four states for validation/test; meta-train = existing users x items.

    Users whose tasks are evaluated (the *state pool*: existing users for ``warm`` and
    ``item_cold``, new users otherwise) are filtered by their number of ratings of the state's
    items, shuffled with ``seed`` and cut by ``ratios``. For ``warm`` and ``item_cold`` the pool's
    first share would overlap meta-train users, so it is not evaluated and every existing user
    not used for validation or test becomes a meta-train task (if they have enough ratings of
    existing items). For ``user_cold`` and ``user_item_cold`` the new users are cut into
    validation and test in the proportion ``ratios[1] : ratios[2]`` and every eligible existing
    user is a meta-train task.

    Args:
        state: ``warm | user_cold | item_cold | user_item_cold`` for validation and test tasks.
        cut: ``time`` (cuts are unix timestamps) or ``quantile`` (cuts are fractions in (0, 1)
            of the rating timestamps).
        user_cut: users whose first rating is before this are existing.
        item_cut: items whose first rating is before this are existing; ``None`` = ``user_cut``.
        ratios: (train, val, test) fractions of the state pool (see above).
        n_query, n_support, min_interactions, max_interactions, seed: as in
            :class:`UserColdStart`; counts are ratings of the task's item class.
    """

    def __init__(
        self,
        state: str = "user_cold",
        cut: str = "quantile",
        user_cut: float = 0.5,
        item_cut: float | None = None,
        ratios: Sequence[float] = (0.7, 0.1, 0.2),
        n_query: int = 10,
        n_support: int | None = None,
        min_interactions: int = 13,
        max_interactions: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(ratios, n_query, n_support, min_interactions, max_interactions, seed)
        require_choice("splitter.state", state, STATES)
        require_choice("splitter.cut", cut, CUTS)
        item_cut = user_cut if item_cut is None else item_cut
        if cut == "quantile":
            for key, value in (("splitter.user_cut", user_cut), ("splitter.item_cut", item_cut)):
                if not 0.0 < float(value) < 1.0:
                    raise ConfigError(key, f"cut=quantile needs a fraction in (0, 1), got {value!r}; "
                                      f"e.g. {key}=0.8, or set splitter.cut=time for a timestamp")
        self.state = state
        self.cut = cut
        self.user_cut = float(user_cut)
        self.item_cut = float(item_cut)

    def cut_times(self, data: Interactions) -> tuple[int, int]:
        """``(user_cut, item_cut)`` as timestamps for ``data``."""
        if self.cut == "time":
            return int(self.user_cut), int(self.item_cut)
        ts = data.ratings["timestamp"].to_numpy(np.int64)
        if ts.min() == ts.max():
            raise DataError(f"splitter FourStates: dataset {data.name!r} has every timestamp equal, so "
                            f"nothing is before or after a cut; use splitter=user_cold_start there")
        q = np.quantile(ts, [self.user_cut, self.item_cut], method="higher")
        return int(q[0]), int(q[1])

    def existing(self, data: Interactions) -> tuple[np.ndarray, np.ndarray]:
        """Bool arrays ``([n_users], [n_items])``: True for existing users / items."""
        users = data.ratings["user"].to_numpy(np.int64)
        items = data.ratings["item"].to_numpy(np.int64)
        ts = data.ratings["timestamp"].to_numpy(np.int64)
        user_cut, item_cut = self.cut_times(data)
        return (first_seen(users, ts, data.n_users) < user_cut,
                first_seen(items, ts, data.n_items) < item_cut)

    def _pool(self, counts: np.ndarray, members: np.ndarray, what: str, key: str, name: str) -> np.ndarray:
        """Eligible user codes among ``members`` (bool ``[n_users]``) by ``counts`` (``[n_users]``)."""
        if not members.any():
            move = "lower" if what.startswith("new") else "raise"
            raise DataError(f"splitter FourStates: dataset {name!r} has no {what} at "
                            f"splitter.{key}={getattr(self, key)} (cut={self.cut}); {move} splitter.{key}")
        masked = np.where(members, counts, 0)
        if not (masked >= self.min_interactions).any():
            raise DataError(
                f"splitter FourStates: no {what} in dataset {name!r} has splitter.min_interactions="
                f"{self.min_interactions} ratings (most: {masked.max()}); lower splitter.min_interactions "
                f"or move splitter.user_cut/splitter.item_cut")
        return np.intersect1d(self._eligible(masked, name), np.flatnonzero(members))

    def __call__(self, data: Interactions) -> TaskSplits:
        """Split ``data`` into train/val/test tasks of the configured state. Deterministic in ``seed``."""
        users = data.ratings["user"].to_numpy(np.int64)
        items = data.ratings["item"].to_numpy(np.int64)
        old_user, old_item = self.existing(data)
        state_users_new = self.state in ("user_cold", "user_item_cold")
        state_items_new = self.state in ("item_cold", "user_item_cold")
        state_item = ~old_item if state_items_new else old_item
        # ratings per user of existing items (meta-train) and of the state's items (val/test)
        train_counts = np.bincount(users[old_item[items]], minlength=data.n_users)
        state_counts = np.bincount(users[state_item[items]], minlength=data.n_users)
        user_what = "new users" if state_users_new else "existing users"
        item_what = "new items" if state_items_new else "existing items"
        if not state_item.any():
            raise DataError(f"splitter FourStates: dataset {data.name!r} has no {item_what} at "
                            f"splitter.item_cut={self.item_cut} (cut={self.cut}); "
                            f"{'lower' if state_items_new else 'raise'} splitter.item_cut")
        members = ~old_user if state_users_new else old_user
        pool = self._pool(state_counts, members, f"{user_what} rating {item_what}", "user_cut", data.name)
        rng = np.random.default_rng(self.seed)
        if state_users_new:
            pool = pool[rng.permutation(len(pool))]
            n_val = round(self.ratios[1] / (self.ratios[1] + self.ratios[2]) * len(pool))
            val, test = pool[:n_val], pool[n_val:]
            if len(val) == 0 or len(test) == 0:
                raise DataError(f"splitter FourStates: {len(pool)} eligible {user_what} are too few for "
                                f"validation and test; move splitter.user_cut earlier or lower "
                                f"splitter.min_interactions")
            train_pool = old_user
        else:
            try:
                _, val, test = self._split_keys(pool, rng, data.name)
            except DataError:
                raise DataError(
                    f"splitter FourStates: only {len(pool)} {user_what} have splitter.min_interactions="
                    f"{self.min_interactions} ratings of {item_what}, too few for splitter.ratios="
                    f"{list(self.ratios)}; lower splitter.min_interactions or move splitter.item_cut "
                    f"(state={self.state})") from None
            train_pool = old_user.copy()
            train_pool[val] = train_pool[test] = False
        train = self._pool(train_counts, train_pool, "existing users rating existing items", "user_cut",
                           data.name)
        train = train[rng.permutation(len(train))]
        # a row belongs to its user's task if its item is in the class that user's split uses
        in_train = np.zeros(data.n_users, dtype=bool)
        in_train[train] = True
        select = np.where(in_train[users], old_item[items], state_item[items])
        rank = random_rank(users, rng, select)
        is_query = (rank >= 0) & (rank < self.n_query)
        is_support = rank >= self.n_query
        if self.n_support is not None:
            is_support &= rank < self.n_query + self.n_support
        parts = [taskset_by_key(data, users, data.n_users, g, rank, is_support, is_query)
                 for g in (train, val, test)]
        return TaskSplits(*parts)
