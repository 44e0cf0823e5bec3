"""Shared building blocks of the model zoo: field embeddings over feature rows and a user-vector head.

Every feature row is ``[user fields..., item fields..., user_id, item_id]`` (see
:class:`~metarec_runner.data.interactions.FeatureSchema`); a bag field spans several columns
padded with ``-1``. :class:`FieldEmbedding` embeds a chosen set of fields from one table, with a
per-column *value* (1 for a single token; for each of a bag's ``n`` tokens ``1/n``, the bag's
mean, or 1 with ``bag="sum"``), and looks rows up in per-task fast weights of its table, so that
``adapt: all`` runs every task's own weights in one batched gather: dense per-task tables
``[B, V, d]``, or a :class:`RowSparseTable` that holds only the rows each task's support set
touched (``algos.touched``; the same numbers, memory ``O(rows touched)`` instead of ``O(B V d)``).
Every model that embeds through this layer gets touched-row adaptation.

The schema does not say which fields describe the item and which the user, so the models that
need an item representation take ``item_fields``: ``None`` = every field except ``user_id`` (the
item id and every side feature, as in SVDFeature-style MF with side information; the user's own
side features are one constant within a user task), ``[item_id]`` for pure ids, or any list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import ConfigError


def resolve_fields(schema: FeatureSchema, fields: Sequence[str] | None, key: str = "fields") -> tuple[str, ...]:
    """``fields`` checked against the schema; ``None`` = every field except ``user_id`` (a
    cold-start user's id is never seen in training)."""
    if fields is None:
        fields = [n for n in schema.names if n != "user_id"]
    fields = list(fields)
    unknown = [f for f in fields if f not in schema.names]
    if unknown or not fields or len(set(fields)) != len(fields):
        raise ConfigError(key, f"unknown, repeated or empty field list {fields}; choose from "
                          f"{', '.join(schema.names)}")
    return tuple(fields)


def resolve_item_fields(schema: FeatureSchema, item_fields: Sequence[str] | None) -> tuple[str, ...]:
    """``item_fields`` checked against the schema; ``None`` = every field except ``user_id``."""
    return resolve_fields(schema, item_fields, "item_fields")


# -- row-sparse per-task tables -----------------------------------------------------------------


def touched_rows(codes: Tensor, keep: Tensor, n_rows: int) -> Tensor:
    """Sorted distinct table rows each task reads, padded with ``n_rows``; no loop over tasks.

    Args:
        codes: ``[B, L, C]`` table rows read by every column of every row.
        keep: ``[B, L, C]`` bool; False entries (padding rows, empty bag slots) are not counted.
        n_rows: the table's row count ``V`` (the padding value, above every real row).

    Returns:
        ``rows [B, U]``: task ``b``'s distinct rows ascending, then ``V``; ``U >= 1``.
    """
    batch = codes.shape[0]
    flat = codes.reshape(batch, -1).masked_fill(~keep.reshape(batch, -1), n_rows)
    ordered = flat.sort(-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered < n_rows
    width = max(int(first.sum(1).max()), 1) if batch else 1
    slot = torch.where(first, first.cumsum(1) - 1, width)  # non-first entries go to a spare slot
    rows = ordered.new_full((batch, width + 1), n_rows)
    rows.scatter_(1, slot, ordered)
    rows[:, width] = n_rows
    return rows[:, :width].contiguous()


def locate(rows: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of ``codes [B, L, C]`` in each task's sorted ``rows [B, U]``.

    Returns:
        ``(pos [B, L, C], hit [B, L, C])``: ``rows[b, pos] == codes`` where ``hit``; ``pos`` is
        a valid index (meaningless) where not.
    """
    batch = codes.shape[0]
    flat = codes.reshape(batch, -1)
    pos = torch.searchsorted(rows, flat).clamp_max(rows.shape[1] - 1)
    hit = rows.gather(1, pos) == flat
    return pos.view_as(codes), hit.view_as(codes)


class RowSparseTable:
    """Per-task fast weights of one ``[V, d]`` table, kept as the rows each task touched.

    Task ``b``'s table is ``base`` with rows ``rows[b]`` replaced by ``values[b]``; rows it did
    not touch are the shared ones. Built by :meth:`gather` from the support rows; the inner loop
    replaces ``values`` each step (:meth:`with_values`).

    Attributes:
        base: ``[V, d]`` the shared table.
        rows: ``[B, U]`` each task's touched rows, ascending, padded with ``V`` (see
            :func:`touched_rows`).
        values: ``[B, U, d]`` their per-task values (padding slots hold unused numbers).
        support: the feature rows the table was gathered for, or None.
        local: ``[B, L, C]`` flat positions of ``support``'s columns in the ``[B * (U + 1), d]``
            stack of the per-task tables each extended by a zero row (columns not kept read
            the zero row): lookups of ``support`` need no search. None without ``support``.
        weights: ``[B, L, C]`` the column values of ``support`` (see ``FieldEmbedding.codes``),
            or None.
    """

    def __init__(self, base: Tensor, rows: Tensor, values: Tensor, support: Tensor | None = None,
                 local: Tensor | None = None, weights: Tensor | None = None) -> None:
        self.base, self.rows, self.values = base, rows, values
        self.support, self.local, self.weights = support, local, weights

    @classmethod
    def gather(cls, base: Tensor, codes: Tensor, keep: Tensor, support: Tensor,
               weights: Tensor | None = None) -> RowSparseTable:
        """The rows of ``base [V, d]`` that columns ``codes [B, S, C]`` read where ``keep``,
        gathered per task (differentiable w.r.t. ``base``); ``support`` is the feature rows
        ``codes`` came from (its lookups are precomputed) and ``weights`` their column values."""
        n_rows = base.shape[0]
        rows = touched_rows(codes, keep, n_rows)
        pos, hit = locate(rows, codes)
        task = torch.arange(codes.shape[0], device=codes.device).view(-1, 1, 1)
        local = task * (rows.shape[1] + 1) + torch.where(keep & hit, pos, rows.shape[1])
        return cls(base, rows, base[rows.clamp_max(n_rows - 1)], support, local, weights)

    def with_values(self, values: Tensor, keep_support: bool = True) -> RowSparseTable:
        """The same rows with new ``values [B, U, d]`` (``keep_support``: keep the precomputed
        lookups of the support rows)."""
        if keep_support:
            return RowSparseTable(self.base, self.rows, values, self.support, self.local, self.weights)
        return RowSparseTable(self.base, self.rows, values)

    def embed(self, x: Tensor, codes: Tensor | None) -> Tensor:
        """Embeddings ``[B, L, C, d]`` of columns ``codes [B, L, C]`` of feature rows ``x``
        (``codes`` may be None for the support rows)."""
        if self.local is not None and x is self.support:
            batch, _, dim = self.values.shape
            table = torch.cat([self.values, self.values.new_zeros(batch, 1, dim)], 1).reshape(-1, dim)
            return table.index_select(0, self.local.reshape(-1)).view(*self.local.shape, dim)
        pos, hit = locate(self.rows, codes)
        task = torch.arange(codes.shape[0], device=codes.device).view(-1, 1, 1)
        return torch.where(hit.unsqueeze(-1), self.values[task, pos], self.base[codes])

    def dense(self) -> Tensor:
        """Every task's full table ``[B, V, d]`` (inspection and tests only)."""
        batch, n_rows = self.rows.shape[0], self.base.shape[0]
        full = torch.cat([self.base, self.base[:1]]).expand(batch, n_rows + 1, -1).clone()
        index = self.rows.unsqueeze(-1).expand_as(self.values)  # padding slots write row V
        return full.scatter(1, index, self.values)[:, :n_rows]

    def task_mean(self) -> Tensor:
        """The mean over tasks of the per-task tables ``[V, d]``, without forming them."""
        n_rows = self.base.shape[0]
        valid = self.rows < n_rows
        delta = (self.values - self.base[self.rows.clamp_max(n_rows - 1)])[valid]
        total = torch.zeros_like(self.base).index_add_(0, self.rows[valid], delta)
        return self.base + total / self.rows.shape[0]

    def detach(self) -> RowSparseTable:
        """No graph; the shared table copied once (not per task), so later in-place updates of
        the model do not change these weights; no precomputed support lookups."""
        return RowSparseTable(self.base.detach().clone(), self.rows, self.values.detach())


# -- the layers ---------------------------------------------------------------------------------


class FieldEmbedding(nn.Module):
    """One embedding table for several categorical fields of a feature row.

    Args:
        schema: the dataset's feature schema.
        fields: field names to embed (each field gets its own block of rows in the table).
        dim: embedding size ``d``.
        init_std: std of the normal initialisation (0 = zeros).
        bag: ``mean`` (a bag's ``n`` tokens have value ``1/n`` each) or ``sum`` (value 1).

    Per row, column ``c`` of the selected fields carries the token embedding ``E[code_c]`` and a
    value ``v_c``: 1 for a single-token field, ``1/n`` (or 1) for each present token of a bag of
    ``n`` and 0 for its ``-1`` padding. Every lookup goes through :meth:`lookup`, which also
    takes per-task fast weights of :attr:`weight`: the per-task lookups are this layer's own
    code, so they stay exact in subclasses (``algos.functional.has_exact_fast_path``).
    """

    #: the parameter whose per-task fast weights may be a :class:`RowSparseTable` (``algos.touched``)
    row_sparse: ClassVar[str] = "weight"

    def __init__(self, schema: FeatureSchema, fields: Sequence[str], dim: int, init_std: float = 0.1,
                 bag: str = "mean") -> None:
        super().__init__()
        if bag not in ("mean", "sum"):
            raise ValueError(f"bag must be 'mean' or 'sum', got {bag!r}")
        self.fields, self.bag = tuple(fields), bag
        idx = [schema.index(f) for f in self.fields]
        cards = torch.tensor([schema.cardinalities[i] for i in idx])
        offsets = torch.zeros(len(idx), dtype=torch.long)
        offsets[1:] = torch.cumsum(cards, 0)[:-1]
        columns, column_field = [], []
        for j, f in enumerate(self.fields):
            cols = list(schema.columns(f))
            columns += cols
            column_field += [j] * len(cols)
        self.column_field = tuple(column_field)
        self.has_bags = len(columns) > len(self.fields)
        self.register_buffer("column", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.register_buffer("offset", offsets[column_field], persistent=False)
        field_of = torch.zeros(len(self.fields), len(columns))
        field_of[column_field, torch.arange(len(columns))] = 1.0
        self.register_buffer("field_of", field_of, persistent=False)  # [F, C]
        self.weight = nn.Parameter(torch.empty(int(cards.sum()), dim))
        if init_std > 0:
            nn.init.normal_(self.weight, std=init_std)
        else:
            nn.init.zeros_(self.weight)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Table rows ``[..., C]`` and column values ``[..., C]`` (float) of rows ``x [..., F_all]``."""
        raw = x.index_select(-1, self.column)
        dtype = self.weight.dtype
        if not self.has_bags:
            return raw + self.offset, torch.ones(raw.shape, dtype=dtype, device=raw.device)
        present = (raw >= 0).to(dtype)
        if self.bag == "sum":
            return raw.clamp_min(0) + self.offset, present
        count = torch.matmul(present, self.field_of.to(dtype).T)  # [..., F] tokens per field
        per_column = torch.matmul(count.clamp_min(1.0), self.field_of.to(dtype))  # [..., C]
        return raw.clamp_min(0) + self.offset, present / per_column

    def lookup(self, x: Tensor, weight: Tensor | RowSparseTable | None = None) -> tuple[Tensor, Tensor]:
        """Column embeddings and values of rows ``x``.

        Args:
            x: ``[..., F_all]`` feature rows; with per-task weights it must be ``[B, L, F_all]``.
            weight: ``None`` = the module's table; or per-task tables ``[B, V, d]``; or a
                :class:`RowSparseTable` (per-task touched rows over the shared table).

        Returns:
            ``(embeddings [..., C, d], values [..., C])``.
        """
        if isinstance(weight, RowSparseTable) and weight.weights is not None and x is weight.support:
            return weight.embed(x, None), weight.weights  # the support rows: precomputed
        codes, values = self.codes(x)
        if weight is None:
            return nn.functional.embedding(codes, self.weight), values
        if isinstance(weight, RowSparseTable):
            return weight.embed(x, codes), values
        task = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
        return weight[task, codes], values

    def weighted(self, x: Tensor, weight: Tensor | RowSparseTable | None = None,
                 mask: Tensor | None = None) -> Tensor:
        """Column embeddings times their values, ``[..., C, d]`` (``weight`` as in
        :meth:`lookup`; ``mask [C]``: only those columns). Skips the product where every value
        is 1 (no bags) or where a row-sparse lookup of the support rows already reads zeros
        for the absent bag slots (``bag="sum"``)."""
        emb, values = self.lookup(x, weight)
        exact = not self.has_bags or (
            self.bag == "sum" and isinstance(weight, RowSparseTable) and x is weight.support
            and weight.local is not None)
        if mask is not None:
            return emb * (values * mask.to(values.dtype)).unsqueeze(-1)
        return emb if exact else emb * values.unsqueeze(-1)

    def gather_rows(self, x: Tensor, mask: Tensor, base: Tensor) -> RowSparseTable:
        """Per-task fast weights of :attr:`weight` over the rows that feature rows
        ``x [B, S, F_all]`` read on their real rows (``mask [B, S]``), starting from
        ``base [V, d]`` (the table, or a detached copy)."""
        codes, values = self.codes(x)
        return RowSparseTable.gather(base, codes, mask.unsqueeze(-1) & (values != 0), x, values)

    def column_mask(self, fields: Sequence[str]) -> Tensor:
        """``[C]`` 1.0 on the columns of ``fields`` (a subset of :attr:`fields`), else 0.0."""
        missing = [f for f in fields if f not in self.fields]
        if missing:
            raise ConfigError("item_fields", f"{missing} are not among the model's fields "
                              f"{list(self.fields)}; add them to fields or drop them from item_fields")
        chosen = torch.tensor([float(f in fields) for f in self.fields])
        return chosen @ self.field_of.cpu()

    def pooled(self, x: Tensor, weight: Tensor | RowSparseTable | None = None,
               mask: Tensor | None = None) -> Tensor:
        """Value-weighted sum over the selected columns (``mask [C]``: only those columns):
        ``[..., d]`` (a bag-of-features vector)."""
        return self.weighted(x, weight, mask).sum(-2)

    def per_field(self, x: Tensor, weight: Tensor | RowSparseTable | None = None) -> Tensor:
        """One vector per field (bags pooled): ``[..., F, d]``."""
        emb = self.weighted(x, weight)
        return torch.matmul(self.field_of.to(emb.dtype), emb)


class UserVectorHead(nn.Module):
    """The new user's own parameters: a vector ``user [k]`` and a bias ``bias [1]``.

    ``h [..., k + 1]`` (an item-side vector and an offset) -> ``h[..., :k] . user + h[..., k] + bias``.
    It is what ``adapt: head`` adapts in :mod:`~metarec_runner.models.mf` and
    :mod:`~metarec_runner.models.fm`: the cold-start user starts from the meta-learned
    ``user``/``bias`` (never from a user-id table) and moves by SGD on its support set.

    Args:
        dim: ``k``.
        bias: initial bias (the training ratings' mean).
        init_std: std of the initial user vector.
    """

    def __init__(self, dim: int, bias: float = 0.0, init_std: float = 0.1) -> None:
        super().__init__()
        self.user = nn.Parameter(torch.randn(dim) * init_std)
        self.bias = nn.Parameter(torch.full((1,), float(bias)))

    def forward(self, h: Tensor) -> Tensor:
        """``h [..., k + 1]`` -> scores ``[...]``."""
        k = self.user.shape[0]
        return (h[..., :k] * self.user).sum(-1) + h[..., k] + self.bias

    def forward_batched(self, params: dict[str, Tensor], h: Tensor, prefix: str = "") -> Tensor:
        """Per-task ``params[prefix + name] [B, *shape]``, ``h [B, L, k + 1]`` -> ``[B, L]``."""
        user, bias = params[f"{prefix}user"], params[f"{prefix}bias"]
        k = user.shape[1]
        return (h[..., :k] * user.unsqueeze(1)).sum(-1) + h[..., k] + bias


def sub_params(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``params`` under ``prefix`` (``"item."``), with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}
