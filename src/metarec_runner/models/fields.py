"""Shared building blocks of the model zoo: field embeddings over feature rows and a user-vector head.

Every feature row is ``[user fields..., item fields..., user_id, item_id]`` (see
:class:`~metarec_runner.data.interactions.FeatureSchema`); a bag field spans several columns
padded with ``-1``. :class:`FieldEmbedding` embeds a chosen set of fields from one table, with a
per-column *value* (1 for a single token, ``1/n`` for each of a bag's ``n`` tokens, i.e. the
bag's mean), and can look rows up in per-task copies of its table (``[B, V, d]``) so that
``adapt: all`` runs every task's own weights in one batched gather.

The schema does not say which fields describe the item and which the user, so the models that
need an item representation take ``item_fields``: ``None`` = every field except ``user_id`` (the
item id and every side feature, as in SVDFeature-style MF with side information; the user's own
side features are one constant within a user task), ``[item_id]`` for pure ids, or any list.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class FieldEmbedding(nn.Module):
    """One embedding table for several categorical fields of a feature row.

    Args:
        schema: the dataset's feature schema.
        fields: field names to embed (each field gets its own block of rows in the table).
        dim: embedding size ``d``.
        init_std: std of the normal initialisation (0 = zeros).

    Per row, column ``c`` of the selected fields carries the token embedding ``E[code_c]`` and a
    value ``v_c``: 1 for a single-token field, ``1/n`` for each present token of a bag of ``n``
    (0 for its ``-1`` padding), so a bag contributes the mean of its tokens.
    """

    def __init__(self, schema: FeatureSchema, fields: Sequence[str], dim: int, init_std: float = 0.1) -> None:
        super().__init__()
        self.fields = tuple(fields)
        idx = [schema.index(f) for f in self.fields]
        cards = torch.tensor([schema.cardinalities[i] for i in idx])
        offsets = torch.zeros(len(idx), dtype=torch.long)
        offsets[1:] = torch.cumsum(cards, 0)[:-1]
        columns, column_field = [], []
        for j, f in enumerate(self.fields):
            cols = list(schema.columns(f))
            columns += cols
            column_field += [j] * len(cols)
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
        count = torch.matmul(present, self.field_of.to(dtype).T)  # [..., F] tokens per field
        per_column = torch.matmul(count.clamp_min(1.0), self.field_of.to(dtype))  # [..., C]
        return raw.clamp_min(0) + self.offset, present / per_column

    def lookup(self, x: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Column embeddings and values of rows ``x``.

        Args:
            x: ``[..., F_all]`` feature rows; with a per-task ``weight`` it must be ``[B, L, F_all]``.
            weight: ``None`` = the module's table; or per-task tables ``[B, V, d]``.

        Returns:
            ``(embeddings [..., C, d], values [..., C])``.
        """
        codes, values = self.codes(x)
        if weight is None:
            return nn.functional.embedding(codes, self.weight), values
        task = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
        return weight[task, codes], values

    def column_mask(self, fields: Sequence[str]) -> Tensor:
        """``[C]`` 1.0 on the columns of ``fields`` (a subset of :attr:`fields`), else 0.0."""
        missing = [f for f in fields if f not in self.fields]
        if missing:
            raise ConfigError("item_fields", f"{missing} are not among the model's fields "
                              f"{list(self.fields)}; add them to fields or drop them from item_fields")
        chosen = torch.tensor([float(f in fields) for f in self.fields])
        return chosen @ self.field_of.cpu()

    def pooled(self, x: Tensor, weight: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Value-weighted sum over the selected columns (``mask [C]``: only those columns):
        ``[..., d]`` (a bag-of-features vector)."""
        emb, values = self.lookup(x, weight)
        if mask is not None:
            values = values * mask.to(values.dtype)
        return (emb * values.unsqueeze(-1)).sum(-2)

    def per_field(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """One vector per field (bags averaged): ``[..., F, d]``."""
        emb, values = self.lookup(x, weight)
        return torch.matmul(self.field_of.to(emb.dtype), emb * values.unsqueeze(-1))


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
