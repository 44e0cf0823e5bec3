"""Candidate sets of the evaluation protocols: which items a user's adapted model must rank.

Three protocols (``evaluator.protocol``):

* ``query_only``: the task's own query items (older papers; the RecBole-MetaRec peer). With few,
  heavily tied candidates the ranking floor is high, so reference scorers are reported beside it.
* ``all_unseen`` (the realistic default): every catalog item except those the user rated outside
  the query set and the support items, i.e. the support items and any rated item held out of
  both sets. Items the user
  never rated are candidates with unknown rating: they count as not relevant.
* ``sampled``: the query items plus ``n_negatives`` items the user never rated, drawn uniformly
  without replacement per task with a seeded generator.

Relevance is decided on the query items only (a rating threshold or the top-n of the query
ratings, :func:`metarec_runner.evaluate.metrics.relevance`) and then placed at the candidates'
positions; every other candidate is irrelevant. Full-ranking protocols need user tasks
(``TaskSet.task_kind == "user"``): the user's features and rated items define the candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metarec_runner.errors import ConfigError

PROTOCOLS = ("all_unseen", "sampled", "query_only")


@dataclass(frozen=True)
class Catalog:
    """The items a user can be recommended, and what each user already rated.

    Attributes:
        n_items: catalog size; item codes are ``0..n_items-1``.
        rated_offsets: ``[n_users + 1]`` CSR offsets into ``rated_items``.
        rated_items: ``[n_ratings]`` item codes each user rated (any split, support or query).
        feature_rows: ``(users [N], items [N]) -> LongTensor [N, F]``, the dataset's feature rows.
    """

    n_items: int
    rated_offsets: Tensor
    rated_items: Tensor
    feature_rows: Callable[[np.ndarray, np.ndarray], Tensor]

    @classmethod
    def from_interactions(cls, data) -> Catalog:
        """Catalog of an :class:`~metarec_runner.data.interactions.Interactions`."""
        users = data.ratings["user"].to_numpy(np.int64)
        items = data.ratings["item"].to_numpy(np.int64)
        order = np.argsort(users, kind="stable")
        counts = np.bincount(users, minlength=data.n_users)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return cls(data.n_items, torch.from_numpy(offsets), torch.from_numpy(items[order].copy()),
                   data.feature_rows)

    def rated_counts(self, users: Tensor) -> Tensor:
        """``[B]`` number of items each user rated."""
        return self.rated_offsets[users + 1] - self.rated_offsets[users]

    def rated_mask(self, users: Tensor) -> Tensor:
        """``Bool[B, n_items]``: True where user ``users[b]`` rated the item."""
        starts, ends = self.rated_offsets[users], self.rated_offsets[users + 1]
        lengths = ends - starts
        row = torch.repeat_interleave(torch.arange(len(users)), lengths)
        pos = _segment_positions(starts, lengths)
        out = torch.zeros(len(users), self.n_items, dtype=torch.bool)
        out[row, self.rated_items[pos]] = True
        return out


def _segment_positions(starts: Tensor, lengths: Tensor) -> Tensor:
    """Flat indices ``starts[b] + 0..lengths[b]-1`` for every segment, concatenated."""
    total = int(lengths.sum())
    seg_start_in_flat = torch.cumsum(lengths, 0) - lengths
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return starts[seg] + torch.arange(total) - seg_start_in_flat[seg]


@dataclass(frozen=True)
class Candidates:
    """The items to rank for ``B`` tasks, padded to ``C`` candidates.

    Attributes:
        items: LongTensor ``[B, C]`` item codes (any value where ``mask`` is False).
        mask: Bool ``[B, C]``, True on real candidates.
        target: ``[B, C]`` true ratings of the query items, 0 elsewhere.
        relevant: Bool ``[B, C]``, the query items that are relevant under the relevance rule.
        is_query: Bool ``[B, C]``, True on the task's query items.
        users: LongTensor ``[B]`` the tasks' user codes.
    """

    items: Tensor
    mask: Tensor
    target: Tensor
    relevant: Tensor
    is_query: Tensor
    users: Tensor

    def rows(self, catalog: Catalog, start: int, stop: int) -> Tensor:
        """Feature rows ``[B, stop - start, F]`` of candidate columns ``start:stop``."""
        b, width = self.items.shape[0], stop - start
        users = self.users[:, None].expand(b, width).reshape(-1).numpy()
        items = self.items[:, start:stop].reshape(-1).numpy()
        return catalog.feature_rows(users, items).view(b, width, -1)


def build_candidates(
    protocol: str,
    catalog: Catalog,
    users: Tensor,
    query_items: Tensor,
    query_y: Tensor,
    query_mask: Tensor,
    query_relevant: Tensor,
    n_negatives: int = 100,
    generator: torch.Generator | None = None,
    support_items: Tensor | None = None,
    support_mask: Tensor | None = None,
) -> Candidates:
    """Candidates of ``B`` user tasks for a full-ranking protocol (CPU tensors).

    Args:
        protocol: ``"all_unseen"`` or ``"sampled"``.
        catalog: items and what every user rated.
        users: ``[B]`` user codes of the tasks.
        query_items: ``[B, Q]`` item codes of the padded query sets.
        query_y: ``[B, Q]`` query ratings; query_mask: ``Bool[B, Q]``.
        query_relevant: ``Bool[B, Q]`` relevance of each query item.
        n_negatives: ``sampled``: never-rated items drawn per task.
        generator: ``sampled``: the seeded random source.
        support_items: ``[B, S]`` item codes of the support sets (with ``support_mask``): never
            candidates, even when the data does not hold them as ratings (e.g. sampled
            negatives of implicit feedback, which the model saw with label 0).
    """
    b = len(users)
    rated = catalog.rated_mask(users)
    if support_items is not None:
        row = torch.arange(b)[:, None].expand_as(support_items)[support_mask]
        rated[row, support_items[support_mask]] = True
    if protocol == "all_unseen":
        row = torch.arange(b)[:, None].expand_as(query_items)[query_mask]
        col = query_items[query_mask]
        is_query = torch.zeros(b, catalog.n_items, dtype=torch.bool)
        is_query[row, col] = True
        target = torch.zeros(b, catalog.n_items, dtype=query_y.dtype)
        target[row, col] = query_y[query_mask]
        relevant = torch.zeros_like(is_query)
        relevant[row, col] = query_relevant[query_mask]
        mask = ~rated | is_query
        items = torch.arange(catalog.n_items)[None, :].expand(b, -1)
        return Candidates(items, mask, target, relevant, is_query, users)
    if protocol != "sampled":
        raise ValueError(f"build_candidates handles all_unseen and sampled, got {protocol!r}")
    taken = rated.clone()
    taken[torch.arange(b)[:, None].expand_as(query_items)[query_mask], query_items[query_mask]] = True
    unrated = catalog.n_items - taken.sum(-1)
    if int(unrated.min()) < n_negatives:
        worst = int(unrated.argmin())
        raise ConfigError(
            "evaluator.n_negatives",
            f"{n_negatives} negatives per task, but user {int(users[worst])} left only "
            f"{int(unrated[worst])} unrated items of {catalog.n_items}; lower evaluator.n_negatives",
        )
    keys = torch.rand(b, catalog.n_items, generator=generator)
    keys = keys.masked_fill(rated, 2.0)  # rated and support items are never drawn
    q_row = torch.arange(b)[:, None].expand_as(query_items)[query_mask]
    keys[q_row, query_items[query_mask]] = 2.0  # nor query items (unrated ones: implicit negatives)
    negatives = torch.topk(keys, n_negatives, dim=-1, largest=False).indices  # uniform, no replacement
    items = torch.cat([query_items, negatives], 1)
    ones = torch.ones(b, n_negatives, dtype=torch.bool)
    mask = torch.cat([query_mask, ones], 1)
    target = torch.cat([query_y * query_mask, torch.zeros(b, n_negatives, dtype=query_y.dtype)], 1)
    relevant = torch.cat([query_relevant & query_mask, ~ones], 1)
    is_query = torch.cat([query_mask, ~ones], 1)
    return Candidates(items, mask, target, relevant, is_query, users)


def check_protocol(protocol: str, n_negatives: int) -> None:
    """Refuse unknown protocols and impossible negative counts (one-line ConfigErrors)."""
    if protocol not in PROTOCOLS:
        raise ConfigError("evaluator.protocol", f"must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if protocol == "sampled" and int(n_negatives) < 1:
        raise ConfigError("evaluator.n_negatives", f"must be >= 1 for protocol=sampled, got {n_negatives}")
