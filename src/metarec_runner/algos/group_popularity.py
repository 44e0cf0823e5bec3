"""Popularity within the user's feature group (e.g. age x gender), blended with global popularity.

A group is one combination of the chosen user fields' tokens. From the binary meta-train
interaction matrix (every support and query row of every meta-train task, one task per user;
see :func:`~metarec_runner.algos.baselines_ranking.interaction_matrix`) it keeps, per item,

- ``share_g[i]``: the fraction of the group's meta-train users who interacted with item ``i``;
- ``share[i]``: the fraction of all meta-train users who did;

and scores ``blend * share_g[i] + (1 - blend) * share[i]`` for a user of group ``g``. A group no
meta-train user belongs to (an unseen token combination) scores ``share[i]`` (global
popularity); so does ``blend = 0``. The user's group is read from the feature rows being scored
(user fields are columns of every row), so the support is never needed and ``k = 0`` is served
like any other support size.

Fields are grouped by their raw tokens unless ``bins`` cuts a field into equal-frequency ranges
of its token codes over the meta-train users. Codes follow the tokens' natural order (numbers by
value, :func:`~metarec_runner.data.encode.natural_order`), so on ML-100K, whose ``age`` is the raw
age (61 distinct values), ``bins: {age: 6}`` makes six age ranges (ML-1M's ages are already 7
buckets). Items beyond the fitted catalog score 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from metarec_runner.algos.baselines_ranking import catalog_size, check_threshold, interaction_matrix
from metarec_runner.algos.scorers import ReferenceScorer, _dtype, _item_ids
from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.models.fields import FieldEmbedding
from metarec_runner.tasks.taskset import TaskSet


def field_columns(model: nn.Module, fields: Sequence[str]) -> list[int]:
    """Row columns of ``fields``: from ``model.schema`` if the model keeps one, else from a
    :class:`~metarec_runner.models.fields.FieldEmbedding` of the model that embeds all of them
    (every zoo model embeds the side features through one)."""
    schema = getattr(model, "schema", None)
    if schema is not None:
        unknown = [f for f in fields if f not in schema.names]
        if unknown:
            raise ConfigError("fields", f"unknown fields {unknown}; the dataset has "
                              f"{', '.join(schema.names)}")
        return [c for f in fields for c in schema.columns(f)]
    known: list[str] = []
    for m in model.modules():
        if not isinstance(m, FieldEmbedding):
            continue
        known += [n for n in m.fields if n not in known]
        if all(f in m.fields for f in fields):
            column = m.column.cpu()
            return [int(c) for f in fields for c in column[m.field_of[m.fields.index(f)].cpu() > 0]]
    raise ConfigError("fields", f"cannot find the columns of {list(fields)}: the model keeps no schema "
                      f"and embeds {', '.join(known) or 'no named fields'}; choose among those or set "
                      "fields=null (every user field)")


def constant_columns(train: TaskSet) -> list[int]:
    """Feature columns (before the ``user_id, item_id`` pair) constant within every meta-train
    task: the user fields of user tasks."""
    x = torch.cat([train.support_x, train.query_x])
    offsets = (train.support_offsets, train.query_offsets)
    task = torch.cat([torch.repeat_interleave(torch.arange(len(train)), o[1:] - o[:-1]) for o in offsets])
    cols = x[:, :-2]
    lo = torch.full((len(train), cols.shape[1]), torch.iinfo(torch.long).max)
    hi = torch.full((len(train), cols.shape[1]), torch.iinfo(torch.long).min)
    idx = task[:, None].expand_as(cols)
    lo = lo.scatter_reduce(0, idx, cols, "amin")
    hi = hi.scatter_reduce(0, idx, cols, "amax")
    seen = torch.zeros(len(train), dtype=torch.bool).index_fill_(0, task, True)
    return torch.nonzero((lo == hi)[seen].all(0)).flatten().tolist()


class GroupPopularity(ReferenceScorer):
    """Popularity within the user's group of ``fields``, blended with global popularity.

    Args:
        model: kept for the runner (dtype); its schema or field embedding locates ``fields``.
        fields: user fields whose token combination is the group, e.g. ``[age, gender]``;
            ``null`` = every user field (the columns constant within every meta-train task).
        blend: weight of the group's popularity, in ``[0, 1]`` (0 = global popularity).
        bins: ``{field: n}``: group a single-token field by ``n`` equal-frequency ranges of its
            codes instead of its raw tokens (needs ``fields``); null = raw tokens.
        positive_threshold: only ratings ``>=`` this count as interactions (null = all).
    """

    def __init__(self, model: nn.Module, fields: Sequence[str] | None = None, blend: float = 0.5,
                 bins: Mapping[str, int] | None = None,
                 positive_threshold: float | None = None) -> None:
        super().__init__(model)
        try:
            blend = float(blend)
        except (TypeError, ValueError):
            raise ConfigError("blend", f"must be a number in [0, 1], got {blend!r}") from None
        if not 0.0 <= blend <= 1.0:
            raise ConfigError("blend", f"must be in [0, 1], got {blend!r}")
        self.blend = blend
        self.positive_threshold = check_threshold(positive_threshold)
        if fields is not None and (isinstance(fields, str) or not len(fields)):
            raise ConfigError("fields", f"must be a non-empty list of field names or null, got {fields!r}")
        self.fields = None if fields is None else [str(f) for f in fields]
        self.given_columns = None if fields is None else field_columns(model, self.fields)
        bins = dict(bins or {})
        if bins and (self.fields is None or any(f not in self.fields for f in bins)):
            raise ConfigError("bins", f"bins {sorted(bins)} must name fields among fields={self.fields}")
        if any(len(field_columns(model, [f])) != 1 for f in bins):
            raise ConfigError("bins", "only single-token fields can be binned (not token bags)")
        if any(not isinstance(n, int) or n < 2 for n in bins.values()):
            raise ConfigError("bins", f"bin counts must be integers >= 2, got {bins}")
        self.bins = [int(bins.get(f, 0)) for f in self.fields or ()  # per column (0 = raw tokens)
                     for _ in field_columns(model, [f])]
        self.reset()

    def reset(self) -> None:
        self.columns = torch.zeros(0, dtype=torch.long)  # [C] row columns of the group fields
        self.edges = torch.zeros(0, 0, dtype=torch.long)  # [C, n] bin edges (huge = none)
        self.radix = torch.zeros(0, dtype=torch.long)  # [C] codes per column (+1 for -1 padding)
        self.group_keys = torch.zeros(0, dtype=torch.long)  # [G] sorted group keys
        self.group_share = torch.zeros(0, 0)  # [G, n_items]
        self.share = torch.zeros(0)  # [n_items]

    def fit(self, train: TaskSet) -> None:
        cols = self.given_columns if self.given_columns is not None else constant_columns(train)
        if not cols:
            raise ConfigError("fields", "the tasks have no user field (no feature column is constant "
                              "within every meta-train task); use algo=popularity")
        x = interaction_matrix(train, self.positive_threshold, catalog_size(self.model))
        every = torch.cat([train.support_x, train.query_x])  # a task's first row: its user fields
        first = torch.where(train.support_sizes > 0, train.support_offsets[:-1],
                            len(train.support_x) + train.query_offsets[:-1])
        self.columns = torch.tensor(cols, dtype=torch.long)
        raw = every[first.clamp(max=len(every) - 1)][:, cols]
        big = torch.iinfo(torch.long).max
        self.edges = torch.full((len(cols), max([*self.bins, 1]) - 1 or 1), big, dtype=torch.long)
        for c, n in enumerate(self.bins if self.given_columns is not None else ()):
            if n:  # equal-frequency edges of the meta-train users' codes
                cut = torch.quantile(raw[:, c].double(), torch.arange(1, n, dtype=torch.double) / n)
                e = torch.unique(cut.ceil().long())
                self.edges[c, :len(e)] = e
        codes = self._codes(raw)
        self.radix = codes.amax(0) + 1
        if float(np.prod(self.radix.double().numpy())) >= 2.0**62:
            raise ConfigError("fields", "too many token combinations to index; choose fewer fields")
        keys, group = torch.unique(self._keys(codes), return_inverse=True)
        member = sp.csr_matrix((np.ones(len(train)), (group.numpy(), np.arange(len(train)))),
                               shape=(len(keys), len(train)))
        size = np.asarray(member.sum(1)).ravel()
        self.group_keys = keys
        self.group_share = torch.from_numpy((member @ x).toarray() / size[:, None]).float()
        self.share = torch.from_numpy(np.asarray(x.sum(0)).ravel() / len(train)).float()

    def _codes(self, raw: Tensor) -> Tensor:
        """Group codes ``[..., C]`` of raw column tokens: the bin index of a binned column, else
        the token + 1 (bag padding -1 -> 0)."""
        edges = self.edges.to(raw.device)
        binned = edges[:, 0] < torch.iinfo(torch.long).max
        bucket = (raw[..., None] >= edges).sum(-1)
        return torch.where(binned, bucket, raw + 1)

    def _keys(self, codes: Tensor) -> Tensor:
        """Mixed-radix key ``[...]`` of token codes ``[..., C]`` (shifted by +1)."""
        mult = torch.cumprod(torch.cat([self.radix.new_ones(1), self.radix[:-1]]), 0)
        return (codes * mult.to(codes.device)).sum(-1)

    def predict(self, params, x: Tensor) -> Tensor:
        """Scores ``[B, L]`` of rows ``x [B, L, F]``, each row's group read from its own columns."""
        if not self.share.numel():
            raise TrainingError("GroupPopularity is not fitted: call fit(train) first")
        dev = x.device
        codes = self._codes(x[..., self.columns.to(dev)])
        keys = self.group_keys.to(dev)
        key = self._keys(codes)
        pos = torch.searchsorted(keys, key.contiguous()).clamp(max=len(keys) - 1)
        found = (codes < self.radix.to(dev)).all(-1) & (keys[pos] == key)  # a fitted group
        items = _item_ids(x)
        in_catalog = items < self.share.shape[0]
        item = torch.where(in_catalog, items, torch.zeros_like(items))
        glob = self.share.to(dev)[item]
        score = torch.where(found, self.blend * self.group_share.to(dev)[pos, item]
                            + (1 - self.blend) * glob, glob)
        return torch.where(in_catalog, score, torch.zeros_like(score)).to(_dtype(self.model))

    def state_dict(self) -> dict:
        return {n: getattr(self, n).clone() for n in _STATE}

    def load_state_dict(self, state: dict) -> None:
        for n in _STATE:
            setattr(self, n, state[n].clone())


_STATE = ("columns", "edges", "radix", "group_keys", "group_share", "share")
