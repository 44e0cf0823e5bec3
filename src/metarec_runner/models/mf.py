"""Matrix factorization for cold-start users: a meta-learned initial user vector, shared item factors.

Reference: Y. Koren, R. Bell, C. Volinsky. "Matrix Factorization Techniques for Recommender
Systems." IEEE Computer 2009 (biased MF); the cold-start user vector is meta-learned as in
MAML (Finn et al., ICML 2017) instead of being looked up in a user-id table.

``score(x) = q(x) . u + b(x) + b_u``: the item factor ``q`` and item bias ``b`` are sums of the
embeddings of ``item_fields`` (default: the item id and every side feature, MF with side
information as in SVDFeature, Chen et al. JMLR 2012; ``[item_id]`` = classic MF); ``u [k]`` and
``b_u`` belong to the user. There is no
user-id table: a new user's id was never trained, so every user starts from the same
meta-learned ``u`` and ``b_u`` (the :class:`~metarec_runner.models.fields.UserVectorHead`) and
``adapt: head`` moves exactly those by SGD on its support set; item factors stay shared.
``adapt: all`` also adapts the item tables per task: on the rows each support set reads
(``algo.touched_rows``, the default: ``models.fields.RowSparseTable``), or full per-task copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import require_positive
from metarec_runner.models.fields import FieldEmbedding, UserVectorHead, resolve_item_fields


class MatrixFactorization(nn.Module):
    """Biased MF with a meta-learned user vector.

    Args:
        schema: the dataset's feature schema.
        embedding_dim: number of factors ``k``.
        item_fields: fields whose embeddings sum to the item factor (``None`` = every field except
            ``user_id``; ``[item_id]`` = classic MF on ids).
        rating_mean: initial user bias (the training ratings' mean).
        init_std: std of the initial factors.
    """

    #: capabilities (``algos.compat``): scores rows, body/head split, item embeddings
    provides: ClassVar[frozenset[str]] = frozenset({"rowwise", "head", "item_embedding"})

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 32,
        item_fields: Sequence[str] | None = None,
        rating_mean: float = 0.0,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        require_positive("embedding_dim", embedding_dim)
        fields = resolve_item_fields(schema, item_fields)
        self.item = FieldEmbedding(schema, fields, embedding_dim, init_std)
        self.item_bias = FieldEmbedding(schema, fields, 1, init_std=0.0)
        self.head = UserVectorHead(embedding_dim, bias=rating_mean, init_std=init_std)

    @property
    def item_embedding_dim(self) -> int:
        return self.item.dim

    def item_embedding(self, x: Tensor) -> Tensor:
        """Item factors ``[..., k]`` of rows ``x [..., F_all]``."""
        return self.item.pooled(x)

    def body(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> ``[..., k + 1]``: item factor and item bias."""
        return torch.cat([self.item.pooled(x), self.item_bias.pooled(x)], -1)

    def forward(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> scores ``[...]``."""
        return self.head(self.body(x))

    def forward_batched(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Per-task weights of every parameter ``params[name] [B, *shape]``, rows ``x [B, L, F_all]``
        -> ``[B, L]`` (each task gathers from its own item tables)."""
        h = torch.cat([self.item.pooled(x, params["item.weight"]),
                       self.item_bias.pooled(x, params["item_bias.weight"])], -1)
        return self.head.forward_batched(params, h, prefix="head.")
