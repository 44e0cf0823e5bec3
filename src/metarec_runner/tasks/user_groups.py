"""User-group tasks: one task = one group of users (a shared feature value, or a k-means cluster).

A group's interactions are pooled, shuffled once with ``seed`` and cut into a query set and a
support set, so the model adapts to a *segment* (e.g. all students, or a cluster of users with
similar ratings) rather than to one person. Groups partition the users and are split into
disjoint train / validation / test groups, so no user appears in two splits.
``TaskSet.task_kind`` is ``"group"``; ``task_ids`` are the group codes (the feature's token code,
or the cluster number).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError, DataError, require_choice, require_positive
from metarec_runner.tasks.splitters import UserColdStart, random_rank, taskset_by_key
from metarec_runner.tasks.taskset import TaskSplits

KMEANS_INPUTS = ("features", "ratings")
"""What k-means clusters: one-hot user features, or L2-normalised rating vectors."""


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared distances ``[N, K]`` between rows of ``x`` ``[N, D]`` (dense or sparse) and ``c`` ``[K, D]``."""
    if x.is_sparse:
        x_sq = torch.sparse.sum(x * x, dim=1).to_dense()
        cross = torch.sparse.mm(x, c.T)
    else:
        x_sq = (x * x).sum(1)
        cross = x @ c.T
    return (x_sq[:, None] - 2 * cross + (c * c).sum(1)[None, :]).clamp_min(0)


def _row(x: Tensor, i: Tensor) -> Tensor:
    """Dense row ``i`` (LongTensor ``[1]``) of ``x`` as ``[D]``."""
    return (x.index_select(0, i).to_dense() if x.is_sparse else x[i]).reshape(-1).clone()


def kmeans(x: Tensor, k: int, seed: int, iters: int = 50) -> Tensor:
    """Seeded k-means: k-means++ initialisation, then Lloyd iterations.

    Args:
        x: FloatTensor ``[N, D]`` (dense or sparse COO; float64 recommended), one row per point.
        k: clusters (``1 <= k <= N``).
        seed: seeds the k-means++ draws (a private ``torch.Generator``; global RNGs untouched).
        iters: at most this many Lloyd iterations (stops early when assignments settle).

    Returns:
        LongTensor ``[N]``: the cluster of each row in ``0..k-1`` (a cluster may end up empty).
    """
    n = x.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    centers = [_row(x, torch.randint(n, (1,), generator=gen))]
    d2 = _sq_dist(x, centers[0][None]).squeeze(1)
    for _ in range(1, k):
        total = d2.sum()
        p = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        centers.append(_row(x, torch.multinomial(p, 1, generator=gen)))
        d2 = torch.minimum(d2, _sq_dist(x, centers[-1][None]).squeeze(1))
    c = torch.stack(centers)
    assign = _sq_dist(x, c).argmin(1)
    xt = x.t().coalesce() if x.is_sparse else x.t()
    for _ in range(iters):
        onehot = torch.zeros(n, k, dtype=c.dtype)
        onehot[torch.arange(n), assign] = 1
        sums = (torch.sparse.mm(xt, onehot) if x.is_sparse else xt @ onehot).t()
        sizes = onehot.sum(0)
        c = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], c)
        new = _sq_dist(x, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def user_feature_matrix(data: Interactions) -> Tensor:
    """One-hot user features (bags multi-hot), DoubleTensor ``[n_users, sum of cardinalities]``."""
    blocks = []
    for col in data.user_features.columns:
        codes = torch.from_numpy(data.user_features[col].to_numpy(np.int64).copy())
        blocks.append(torch.nn.functional.one_hot(codes, data.cardinalities[col]).double())
    for name, bag in data.user_bags.items():
        hot = torch.zeros(data.n_users, data.cardinalities[name] + 1, dtype=torch.float64)
        hot.scatter_(1, torch.from_numpy(np.where(bag < 0, data.cardinalities[name], bag).astype(np.int64)), 1.0)
        blocks.append(hot[:, :-1])
    if not blocks:
        raise DataError(f"dataset {data.name!r} has no user features to cluster; set "
                        f"splitter.kmeans_on=ratings")
    return torch.cat(blocks, 1)


DENSE_LIMIT = 1 << 25
"""Rating matrices with at most this many cells are clustered dense (float32), larger ones sparse."""


def rating_matrix(data: Interactions) -> Tensor:
    """``[n_users, n_items]`` ratings, each user's row scaled to unit L2 norm.

    Dense float32 up to :data:`DENSE_LIMIT` cells, else a sparse COO float64 tensor.
    """
    users = data.ratings["user"].to_numpy(np.int64)
    items = data.ratings["item"].to_numpy(np.int64)
    r = data.ratings["rating"].to_numpy(np.float64)
    norm = np.sqrt(np.bincount(users, weights=r * r, minlength=data.n_users))
    vals = r / np.where(norm[users] > 0, norm[users], 1.0)
    if data.n_users * data.n_items <= DENSE_LIMIT:
        dense = torch.zeros(data.n_users, data.n_items, dtype=torch.float32)
        rows, cols = torch.from_numpy(users.copy()), torch.from_numpy(items.copy())
        dense[rows, cols] = torch.from_numpy(vals.astype(np.float32))
        return dense
    idx = torch.from_numpy(np.stack([users, items]))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(vals), (data.n_users, data.n_items),
                                   check_invariants=True).coalesce()


class UserGroups(UserColdStart):
    """One task per group of users; groups are disjoint across train / validation / test.

    Groups with between ``min_interactions`` and ``max_interactions`` pooled ratings are
    shuffled with ``seed`` and cut by ``ratios``. Each group's ratings are shuffled once with
    ``seed``; the first ``n_query`` form the query set, the next ``n_support`` (``None`` = all
    the rest) the support set.

    Args:
        group_by: a single-token user feature field (e.g. ``occupation``, ``age``), or
            ``kmeans`` to cluster users into ``n_groups`` seeded k-means clusters.
        kmeans_on: ``features`` (one-hot user features) or ``ratings`` (unit-norm rating rows).
        n_groups: clusters when ``group_by=kmeans``.
        kmeans_iters: at most this many Lloyd iterations.
        ratios, n_query, n_support, min_interactions, max_interactions, seed: as in
            :class:`UserColdStart`, counted per group.
    """

    task_key = "group"

    def __init__(
        self,
        group_by: str = "kmeans",
        kmeans_on: str = "features",
        n_groups: int = 40,
        kmeans_iters: int = 50,
        ratios: Sequence[float] = (0.7, 0.1, 0.2),
        n_query: int = 20,
        n_support: int | None = 50,
        min_interactions: int = 70,
        max_interactions: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(ratios, n_query, n_support, min_interactions, max_interactions, seed)
        require_choice("splitter.kmeans_on", kmeans_on, KMEANS_INPUTS)
        require_positive("splitter.n_groups", n_groups)
        require_positive("splitter.kmeans_iters", kmeans_iters)
        self.group_by = str(group_by)
        self.kmeans_on = kmeans_on
        self.n_groups = int(n_groups)
        self.kmeans_iters = int(kmeans_iters)

    def user_groups(self, data: Interactions) -> tuple[np.ndarray, int]:
        """``(group code per user [n_users], number of group codes)``."""
        if self.group_by == "kmeans":
            if self.n_groups > data.n_users:
                raise ConfigError("splitter.n_groups", f"{self.n_groups} clusters for {data.n_users} "
                                  f"users; lower splitter.n_groups")
            x = user_feature_matrix(data) if self.kmeans_on == "features" else rating_matrix(data)
            return kmeans(x, self.n_groups, self.seed, self.kmeans_iters).numpy(), self.n_groups
        if self.group_by not in data.user_features.columns:
            raise ConfigError("splitter.group_by", f"{self.group_by!r} is not a single-token user feature "
                              f"of dataset {data.name!r}; choose kmeans or one of "
                              f"{', '.join(map(str, data.user_features.columns)) or '(none)'}")
        return data.user_features[self.group_by].to_numpy(np.int64), data.cardinalities[self.group_by]

    def __call__(self, data: Interactions) -> TaskSplits:
        """Split ``data`` into group tasks. Deterministic in ``seed`` and the data."""
        group_of_user, n_keys = self.user_groups(data)
        key_col = group_of_user[data.ratings["user"].to_numpy(np.int64)]
        counts = np.bincount(key_col, minlength=n_keys)
        rng = np.random.default_rng(self.seed)
        groups = self._split_keys(self._eligible(counts, data.name), rng, data.name)
        rank = random_rank(key_col, rng)
        is_query = rank < self.n_query
        is_support = rank >= self.n_query
        if self.n_support is not None:
            is_support &= rank < self.n_query + self.n_support
        parts = [taskset_by_key(data, key_col, n_keys, g, rank, is_support, is_query, "group")
                 for g in groups]
        return TaskSplits(*parts)
