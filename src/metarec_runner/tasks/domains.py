"""Cross-domain tasks: meta-train on some item domains, meta-test new users on held-out ones.

A *domain* is the set of items carrying a value of an item feature field (a single-token column
such as a category, or a bag such as MovieLens ``genres``), or a group of values (an item in
any of them). A task is one (user, domain) pair: the user's ratings of that domain's items,
shuffled once with ``seed`` into query and support as in :class:`UserColdStart`.

Users are split by ``ratios`` into disjoint train / validation / test users (among users with
at least one eligible task). Train users get tasks in ``train_domains``, test users in
``test_domains``. Validation users get tasks in ``val_domains``, or when that is ``None`` in the
train domains (selection on new users of the *training* domains; set ``val_domains`` to the
test domains' neighbours for selection on held-out domains). With ``exclusive_items`` every item
of a test (and validation) domain is removed from training tasks, so test-domain items are new
to the model (with bags an item can belong to several domains).

``task_kind`` is ``"domain"``; ``task_ids`` are ``user * n_domains + d`` with ``d`` the
domain's position in ``train_domains + val_domains + test_domains`` (:meth:`Domains.decode`).
A whole other dataset as a domain is not supported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError, DataError
from metarec_runner.tasks.splitters import UserColdStart, random_rank, taskset_by_key
from metarec_runner.tasks.taskset import TaskSplits

Domain = int | str | Sequence[int | str]
"""A domain in the config: one value (token code or vocabulary name) or a list of values."""


class Domains(UserColdStart):
    """(user, domain) tasks; test users are disjoint from train and validation users.

    Args:
        field: item feature field that defines domains; ``None`` = the first item bag field
            (``genres`` on MovieLens), else the first item feature column.
        train_domains: domains of meta-train tasks; ``None`` = ONE domain grouping every value
            that is not in a validation or test domain.
        test_domains: domains of test tasks (values as token codes or vocabulary names, or
            lists of them for a group of values).
        val_domains: domains of validation tasks; ``None`` = the train domains.
        exclusive_items: drop items of validation/test domains from train tasks.
        ratios: fractions of users with an eligible task for (train, val, test).
        n_query, n_support, min_interactions, max_interactions, seed: as in
            :class:`UserColdStart`, counted per (user, domain).
    """

    task_key = "user"

    def __init__(
        self,
        field: str | None = None,
        train_domains: Sequence[Domain] | None = None,
        test_domains: Sequence[Domain] = ((0, 1, 2, 3),),
        val_domains: Sequence[Domain] | None = None,
        exclusive_items: bool = True,
        ratios: Sequence[float] = (0.7, 0.1, 0.2),
        n_query: int = 10,
        n_support: int | None = None,
        min_interactions: int = 13,
        max_interactions: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(ratios, n_query, n_support, min_interactions, max_interactions, seed)
        if not test_domains:
            raise ConfigError("splitter.test_domains", "is empty; list at least one domain, e.g. "
                              "splitter.test_domains=[Horror] or [[Horror,Thriller]]")
        self.field = field
        self.train_domains = None if train_domains is None else [self._as_list(d) for d in train_domains]
        self.val_domains = None if val_domains is None else [self._as_list(d) for d in val_domains]
        self.test_domains = [self._as_list(d) for d in test_domains]
        self.exclusive_items = bool(exclusive_items)
        self.n_domains = 0

    @staticmethod
    def _as_list(domain: Domain) -> list[int | str]:
        if isinstance(domain, (int, str)):
            return [domain]
        return list(domain)

    def _field(self, data: Interactions) -> tuple[str, np.ndarray]:
        """``(field name, item x token membership bool [n_items, cardinality])``."""
        name = self.field
        if name is None:
            names = [*data.item_bags, *data.item_features.columns]
            if not names:
                raise DataError(f"dataset {data.name!r} has no item features to define domains")
            name = str(names[0])
        if name in data.item_bags:
            bag = data.item_bags[name]
        elif name in data.item_features.columns:
            bag = data.item_features[name].to_numpy(np.int64)[:, None]
        else:
            raise ConfigError("splitter.field", f"{name!r} is not an item feature of dataset {data.name!r}; "
                              f"choose one of {', '.join(map(str, [*data.item_bags, *data.item_features.columns]))}")
        card = data.cardinalities[name]
        member = np.zeros((data.n_items, card + 1), dtype=bool)
        member[np.arange(data.n_items)[:, None], np.where(bag < 0, card, bag)] = True
        return name, member[:, :card]

    def _codes(self, data: Interactions, name: str, card: int, values: list[int | str], key: str) -> list[int]:
        """Token codes of ``values`` (codes, or names in the dataset's vocabulary)."""
        vocab = [str(v) for v in data.metadata.get("vocab", {}).get(name, [])]
        out = []
        for v in values:
            if isinstance(v, str) and v in vocab:
                out.append(vocab.index(v))
            elif isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()):
                if not 0 <= int(v) < card:
                    raise ConfigError(key, f"value {v} is outside {name!r} codes 0..{card - 1}; fix {key}")
                out.append(int(v))
            else:
                hint = f"; known: {', '.join(vocab[:30])}" if vocab else f"; use codes 0..{card - 1}"
                raise ConfigError(key, f"{v!r} is not a value of item field {name!r}{hint}")
        return out

    def decode(self, task_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(user codes, domain positions)`` of domain task ids (after a call)."""
        return task_ids // self.n_domains, task_ids % self.n_domains

    def __call__(self, data: Interactions) -> TaskSplits:
        """Split ``data`` into (user, domain) tasks. Deterministic in ``seed`` and the data."""
        name, member = self._field(data)
        card = member.shape[1]
        test = [self._codes(data, name, card, d, "splitter.test_domains") for d in self.test_domains]
        val = [self._codes(data, name, card, d, "splitter.val_domains") for d in self.val_domains or []]
        held = sorted({c for d in test + val for c in d})
        if self.train_domains is None:
            rest = [c for c in range(card) if c not in held]
            if not rest:
                raise ConfigError("splitter.train_domains", "no value is left for training; list "
                                  "splitter.train_domains or shorten splitter.test_domains")
            train = [rest]
        else:
            train = [self._codes(data, name, card, d, "splitter.train_domains") for d in self.train_domains]
        overlap = sorted({c for d in train for c in d} & set(held))
        if overlap:
            raise ConfigError("splitter.train_domains", f"values {overlap} are also in validation/test "
                              f"domains; remove them from splitter.train_domains")
        domains = train + val + test
        self.n_domains = len(domains)
        in_dom = np.stack([member[:, d].any(1) for d in domains], 1)  # [n_items, D]
        if self.exclusive_items:
            in_dom[:, :len(train)] &= ~member[:, held].any(1, keepdims=True)
        # one row per (rating, domain of its item): a rating may serve several domains
        users = data.ratings["user"].to_numpy(np.int64)
        row, dom = np.nonzero(in_dom[data.ratings["item"].to_numpy(np.int64)])
        key_col = users[row] * self.n_domains + dom
        n_keys = data.n_users * self.n_domains
        counts = np.bincount(key_col, minlength=n_keys)
        keep = np.zeros(n_keys, dtype=bool)
        keep[self._eligible(counts, data.name)] = True  # also checks n_query against the counts
        rng = np.random.default_rng(self.seed)
        has_task = np.zeros(data.n_users, dtype=bool)
        has_task[np.flatnonzero(keep) // self.n_domains] = True
        user_groups = self._split_keys(np.flatnonzero(has_task), rng, data.name)
        ranges = [range(len(train)), range(len(train), len(train) + len(val)) if val else range(len(train)),
                  range(len(train) + len(val), len(domains))]
        frame = data.ratings.iloc[row].reset_index(drop=True)
        aug = dataclasses.replace(data, ratings=frame)
        rank = random_rank(key_col, rng)
        is_query = rank < self.n_query
        is_support = rank >= self.n_query
        if self.n_support is not None:
            is_support &= rank < self.n_query + self.n_support
        parts = []
        for split, g, dr in zip(("train", "val", "test"), user_groups, ranges, strict=True):
            keys = (np.sort(g)[:, None] * self.n_domains + np.array(list(dr))[None, :]).ravel()
            keys = keys[keep[keys]]
            if len(keys) == 0:
                raise DataError(f"splitter Domains: no {split} user has a {split} domain task with "
                                f"splitter.min_interactions={self.min_interactions} ratings; lower it or "
                                f"choose larger domains")
            keys = keys[rng.permutation(len(keys))]
            parts.append(taskset_by_key(aug, key_col, n_keys, keys, rank, is_support, is_query, "domain"))
        return TaskSplits(*parts)
