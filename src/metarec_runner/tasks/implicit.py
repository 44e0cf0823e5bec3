"""Implicit feedback on top of user cold start: labels 1/0 and seeded sampled negatives.

Ratings ``>= positive_threshold`` become label 1; the others are dropped (``others: drop``) or
kept as label 0 (``others: zero``). Users are filtered, split and their labelled interactions
shuffled into query and support exactly as in :class:`UserColdStart`. Then each task receives
``negatives_per_positive`` sampled negatives (label 0) per positive, in the support set for its
support positives and in the query set for its query positives. Negatives are items the user
never interacted with (at any rating, in the whole dataset), drawn without replacement per user
with the split's seeded ``numpy.random.Generator``, so no item is twice in a task and support
and query stay disjoint. Each support and query set is stored in a seeded random order, so
:meth:`TaskSet.with_support_size` keeps a random mix of positives and negatives.

Evaluate with labels as ratings: ``evaluator=query_only evaluator.relevance_threshold=1.0``
(relevant = label 1; the query already holds the sampled negatives), ranking metrics such as
``ndcg, recall, precision, hit, mrr, auc`` (rmse/mae then measure the error on 0/1 labels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError, require_choice, require_non_negative
from metarec_runner.tasks.splitters import UserColdStart, random_rank, taskset_by_key
from metarec_runner.tasks.taskset import TaskSplits

OTHERS = ("drop", "zero")
"""What happens to ratings below ``positive_threshold``: dropped, or kept with label 0."""


def sample_negatives(
    users: np.ndarray, need: np.ndarray, seen: np.ndarray, n_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``need[k]`` distinct items user ``users[k]`` never interacted with.

    Args:
        users: int array ``[U]`` of distinct user codes.
        need: int array ``[U]``, negatives per user (each at most the user's unseen items).
        seen: sorted int array of ``user * n_items + item`` codes of every interaction.
        n_items: number of items.
        rng: the split's generator (rejection sampling, then an exact draw for stragglers).

    Returns:
        ``(user codes [sum(need)], item codes [sum(need)])``, grouped by user in ``users`` order.
    """
    taken: list[np.ndarray] = []  # accepted pair codes
    left = need.astype(np.int64).copy()
    for _ in range(8):
        if not left.any():
            break
        who = np.repeat(users, 2 * left + 4)
        codes = who * n_items + rng.integers(0, n_items, len(who))
        ok = ~np.isin(codes, seen)
        if taken:
            ok &= ~np.isin(codes, np.concatenate(taken))
        codes, first = np.unique(codes[ok], return_index=True)
        codes = codes[np.argsort(first, kind="stable")]  # distinct, in draw order
        owner = codes // n_items
        order = np.argsort(owner, kind="stable")
        codes, owner = codes[order], owner[order]
        starts = np.searchsorted(owner, owner, side="left")
        pos = np.arange(len(codes)) - starts
        quota = np.zeros(users.max() + 1 if len(users) else 0, dtype=np.int64)
        quota[users] = left
        keep = pos < quota[owner]
        taken.append(codes[keep])
        left -= np.bincount(owner[keep], minlength=len(quota))[users]
    for u, m in zip(users[left > 0], left[left > 0], strict=True):  # exact draw where rejection was too slow
        used = np.concatenate([seen, *taken])
        unseen = np.setdiff1d(u * n_items + np.arange(n_items), used[(used // n_items) == u])
        taken.append(rng.choice(unseen, int(m), replace=False))
    codes = np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)
    slot = np.zeros(users.max() + 1 if len(users) else 0, dtype=np.int64)
    slot[users] = np.arange(len(users))
    order = np.argsort(slot[codes // n_items], kind="stable")
    codes = codes[order]
    return codes // n_items, codes % n_items


class ImplicitUserColdStart(UserColdStart):
    """User cold start on binary labels with ``negatives_per_positive`` sampled negatives per positive.

    Args:
        positive_threshold: ratings ``>=`` this are positives (label 1).
        others: ``drop`` (only positives are interactions) or ``zero`` (the rest get label 0).
        negatives_per_positive: sampled never-interacted items (label 0) per positive, in the
            positive's role (support or query); ``0`` = none. A user who left fewer items
            unrated gets all of them, query negatives first (``capped_users`` counts them).
        ratios, n_query, n_support, min_interactions, max_interactions, seed: as in
            :class:`UserColdStart`, counted over the labelled interactions (before negatives);
            the support holds ``n_support`` labelled rows plus their negatives.
    """

    def __init__(
        self,
        positive_threshold: float = 4.0,
        others: str = "drop",
        negatives_per_positive: int = 1,
        ratios: Sequence[float] = (0.7, 0.1, 0.2),
        n_query: int = 5,
        n_support: int | None = None,
        min_interactions: int = 10,
        max_interactions: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(ratios, n_query, n_support, min_interactions, max_interactions, seed)
        require_choice("splitter.others", others, OTHERS)
        require_non_negative("splitter.negatives_per_positive", negatives_per_positive)
        self.positive_threshold = float(positive_threshold)
        self.others = others
        self.negatives_per_positive = int(negatives_per_positive)

    def labelled(self, data: Interactions) -> pd.DataFrame:
        """``user, item, rating (0/1 label), timestamp`` rows kept under ``others``."""
        r = data.ratings
        label = (r["rating"].to_numpy() >= self.positive_threshold).astype(np.float32)
        keep = label > 0 if self.others == "drop" else np.ones(len(r), dtype=bool)
        if not (label > 0).any():
            raise ConfigError("splitter.positive_threshold", f"{self.positive_threshold} leaves no positive "
                              f"in dataset {data.name!r} (ratings {r['rating'].min()}..{r['rating'].max()}); "
                              f"lower splitter.positive_threshold")
        return pd.DataFrame({"user": r["user"].to_numpy(np.int64)[keep], "item": r["item"].to_numpy(np.int64)[keep],
                             "rating": label[keep], "timestamp": r["timestamp"].to_numpy(np.int64)[keep]})

    def __call__(self, data: Interactions) -> TaskSplits:
        """Split ``data`` into implicit-feedback tasks. Deterministic in ``seed`` and the data."""
        lab = self.labelled(data)
        users = lab["user"].to_numpy(np.int64)
        counts = np.bincount(users, minlength=data.n_users)
        rng = np.random.default_rng(self.seed)
        groups = self._split_keys(self._eligible(counts, data.name), rng, data.name)
        rank = random_rank(users, rng)
        is_query = rank < self.n_query
        is_support = rank >= self.n_query
        if self.n_support is not None:
            is_support &= rank < self.n_query + self.n_support
        # negatives: k per positive, support ones first then query ones, per task user
        k = self.negatives_per_positive
        in_task = np.zeros(data.n_users, dtype=bool)
        for g in groups:
            in_task[g] = True
        pos = (lab["rating"].to_numpy() > 0) & in_task[users]
        n_sup = k * np.bincount(users[pos & is_support], minlength=data.n_users)
        n_qry = k * np.bincount(users[pos & is_query], minlength=data.n_users)
        all_users = data.ratings["user"].to_numpy(np.int64)
        seen = np.unique(all_users * data.n_items + data.ratings["item"].to_numpy(np.int64))
        unseen = data.n_items - np.bincount(seen // data.n_items, minlength=data.n_users)
        # a user with fewer unrated items than needed gets all of them, query negatives first
        n_qry = np.minimum(n_qry, unseen)
        n_sup = np.minimum(n_sup, unseen - n_qry)
        self.capped_users = int(((n_sup + n_qry) < k * np.bincount(users[pos], minlength=data.n_users)).sum())
        task_users = np.flatnonzero(n_sup + n_qry > 0)
        neg_user, neg_item = sample_negatives(task_users, (n_sup + n_qry)[task_users], seen, data.n_items, rng)
        starts = np.concatenate([[0], np.cumsum((n_sup + n_qry)[task_users])[:-1]])
        neg_pos = np.arange(len(neg_user)) - np.repeat(starts, (n_sup + n_qry)[task_users])
        neg_support = neg_pos < n_sup[neg_user]
        frame = pd.concat([lab, pd.DataFrame({"user": neg_user, "item": neg_item,
                                              "rating": np.zeros(len(neg_user), np.float32),
                                              "timestamp": np.zeros(len(neg_user), np.int64)})],
                          ignore_index=True)
        aug = dataclasses.replace(data, ratings=frame)
        is_support = np.concatenate([is_support, neg_support])
        is_query = np.concatenate([is_query, ~neg_support])
        order = rng.random(len(frame))  # seeded order of rows inside each support / query set
        key_col = frame["user"].to_numpy(np.int64)
        parts = [taskset_by_key(aug, key_col, data.n_users, g, order, is_support, is_query) for g in groups]
        return TaskSplits(*parts)
