"""An MLP recommender over a bag of feature embeddings with a per-user gate.

References: P. Covington, J. Adams, E. Sargin. "Deep Neural Networks for YouTube
Recommendations." RecSys 2016 (averaged/summed embeddings into an MLP); X. He et al. "Neural
Collaborative Filtering." WWW 2017 (an element-wise user vector, GMF, in front of the MLP).

How it differs from MeLU (``models.preference``): MeLU *concatenates* one embedding per field
(its MLP sees ``F * d`` inputs and which field said what); this model embeds every token of
every chosen field (ids and side features) into one shared ``d``-space and *sums* them (bags
averaged) into a single ``d``-vector, which a per-user gate ``g [d]`` scales element-wise before
the MLP: ``score(x) = MLP(g * sum_i e_i x_i)``. The gate is the user's own vector (meta-learned
start, no user-id table); ``adapt: head`` adapts the gate and the MLP, ``adapt: all`` also the
embedding table (on the rows each support set reads, with ``algo.touched_rows``). The input
width does not grow with the number of fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import require_positive
from metarec_runner.models.fields import FieldEmbedding, resolve_fields, resolve_item_fields
from metarec_runner.models.preference import MLPHead


class GatedMLPHead(nn.Module):
    """``h [..., d]`` -> ``MLP(user * h)`` ``[...]``; ``user [d]`` starts at ones."""

    def __init__(self, dim: int, hidden: Sequence[int], output_bias: float) -> None:
        super().__init__()
        self.user = nn.Parameter(torch.ones(dim))
        self.mlp = MLPHead(dim, list(hidden), output_bias=output_bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.mlp(h * self.user)

    def forward_batched(self, params: dict[str, Tensor], h: Tensor, prefix: str = "") -> Tensor:
        """Per-task ``params[prefix + name] [B, *shape]``, ``h [B, L, d]`` -> ``[B, L]``."""
        gated = h * params[f"{prefix}user"].unsqueeze(1)
        return self.mlp.forward_batched(params, gated, prefix=f"{prefix}mlp.")


class MLPRecommender(nn.Module):
    """Summed token embeddings -> per-user gate -> MLP -> score.

    Args:
        schema: the dataset's feature schema.
        embedding_dim: ``d``.
        hidden: hidden widths of the MLP.
        fields: fields to embed (``None`` = every field except ``user_id``).
        item_fields: fields whose embeddings sum to the item embedding used by metric
            algorithms (``None`` = all of ``fields``; a list must be among ``fields``).
        rating_mean: initial output bias.
    """

    #: capabilities (``algos.compat``): scores rows, body/head split, item embeddings
    provides: ClassVar[frozenset[str]] = frozenset({"rowwise", "head", "item_embedding"})

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 32,
        hidden: Sequence[int] = (64, 64),
        fields: Sequence[str] | None = None,
        item_fields: Sequence[str] | None = None,
        rating_mean: float = 0.0,
    ) -> None:
        super().__init__()
        require_positive("embedding_dim", embedding_dim)
        for h in hidden:
            require_positive("hidden", h)
        chosen = resolve_fields(schema, fields)
        self.embedding = FieldEmbedding(schema, chosen, embedding_dim)
        self.register_buffer(
            "item_columns",
            self.embedding.column_mask(chosen if item_fields is None else resolve_item_fields(schema, item_fields)),
            persistent=False,
        )
        self.head = GatedMLPHead(embedding_dim, hidden, rating_mean)

    @property
    def item_embedding_dim(self) -> int:
        return self.embedding.dim

    def item_embedding(self, x: Tensor) -> Tensor:
        """Sum of the item fields' embeddings ``[..., d]``."""
        return self.embedding.pooled(x, mask=self.item_columns)

    def body(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> summed token embeddings ``[..., d]``."""
        return self.embedding.pooled(x)

    def forward(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> scores ``[...]``."""
        return self.head(self.body(x))

    def forward_batched(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Per-task weights ``params[name] [B, *shape]``, rows ``x [B, L, F_all]`` -> ``[B, L]``."""
        h = self.embedding.pooled(x, params["embedding.weight"])
        return self.head.forward_batched(params, h, prefix="head.")
