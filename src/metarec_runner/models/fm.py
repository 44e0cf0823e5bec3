"""Factorization machine over ids and side features, with the new user as one more feature.

Reference: S. Rendle. "Factorization Machines." ICDM 2010 (the O(kn) pairwise term).

Every token of the chosen fields is a feature with value 1 (each of a bag's ``n`` tokens:
``1/n``); ``fm(x) = w0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j``, the pairwise sum computed
as ``0.5 * sum_f ((sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2)`` in ``O(k n)``. The cold-start user is
one more feature whose id was never trained: its weight ``w_u`` and factor ``v_u`` start from
meta-learned values (a :class:`~metarec_runner.models.fields.UserVectorHead`), so
``score(x) = fm(x) + w_u + <v_u, sum_i v_i x_i>``; ``adapt: head`` adapts ``v_u`` and ``w_u`` (with
``w0`` folded into its bias), ``adapt: all`` every weight (the factor and weight tables on the
rows each support set reads with ``algo.touched_rows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import require_positive
from metarec_runner.models.fields import (
    FieldEmbedding,
    UserVectorHead,
    resolve_fields,
    resolve_item_fields,
)


class FactorizationMachine(nn.Module):
    """Second-order FM with a meta-learned cold-start user feature.

    Args:
        schema: the dataset's feature schema.
        embedding_dim: factor size ``k``.
        fields: feature fields (``None`` = every field except ``user_id``).
        item_fields: fields whose factors sum to the item embedding used by metric algorithms
            (``None`` = all of ``fields``; a list must be among ``fields``).
        rating_mean: initial global bias.
        init_std: std of the initial factors.
    """

    #: capabilities (``algos.compat``): scores rows, body/head split, item embeddings
    provides: ClassVar[frozenset[str]] = frozenset({"rowwise", "head", "item_embedding"})

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 16,
        fields: Sequence[str] | None = None,
        item_fields: Sequence[str] | None = None,
        rating_mean: float = 0.0,
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        require_positive("embedding_dim", embedding_dim)
        chosen = resolve_fields(schema, fields)
        self.factors = FieldEmbedding(schema, chosen, embedding_dim, init_std)
        self.linear = FieldEmbedding(schema, chosen, 1, init_std=0.0)
        items = chosen if item_fields is None else resolve_item_fields(schema, item_fields)
        self.register_buffer("item_columns", self.factors.column_mask(items), persistent=False)
        self.head = UserVectorHead(embedding_dim, bias=rating_mean, init_std=init_std)

    @property
    def item_embedding_dim(self) -> int:
        return self.factors.dim

    def item_embedding(self, x: Tensor) -> Tensor:
        """Value-weighted sum of the item fields' factors ``[..., k]``."""
        return self.factors.pooled(x, mask=self.item_columns)

    def _fm(self, x: Tensor, factors: Tensor | None, linear: Tensor | None) -> Tensor:
        """``[..., k + 1]``: ``sum_i v_i x_i`` and the FM score without ``w0``."""
        weighted = self.factors.weighted(x, factors)  # [..., C, k]: v_i x_i
        total = weighted.sum(-2)  # [..., k]
        pair = 0.5 * (total.square() - weighted.square().sum(-2)).sum(-1)
        lin = self.linear.pooled(x, linear).squeeze(-1)
        return torch.cat([total, (pair + lin).unsqueeze(-1)], -1)

    def body(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> ``[..., k + 1]`` (feature-factor sum, FM score without bias)."""
        return self._fm(x, None, None)

    def forward(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> scores ``[...]``."""
        return self.head(self.body(x))

    def forward_batched(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Per-task weights ``params[name] [B, *shape]``, rows ``x [B, L, F_all]`` -> ``[B, L]``."""
        h = self._fm(x, params["factors.weight"], params["linear.weight"])
        return self.head.forward_batched(params, h, prefix="head.")
