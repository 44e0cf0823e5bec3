"""Linear (or, with a BCE loss, logistic) regression over one-hot features.

Reference: the per-user linear model of content-based recommendation (e.g. M. Pazzani,
D. Billsus, "Content-Based Recommendation Systems", The Adaptive Web, 2007), meta-learned:
every user starts from the same meta-learned weights and adapts them all on its support set.

``score(x) = b + sum_i w_i x_i`` over the tokens of the chosen fields (one-hot; each of a bag's
``n`` tokens has value ``1/n``). A linear model has no representation to share, so its ``body`` is
the identity on the feature rows and its ``head`` is the whole model: ``adapt: head`` and
``adapt: all`` adapt the same weights (per task only the token weights its support set reads,
with ``algo.touched_rows``). It has no item embeddings (its per-token weights are
scalars), so metric algorithms refuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.models.fields import FieldEmbedding, resolve_fields


class LinearScorer(nn.Module):
    """``b + sum_i w_i x_i``: ``weights.weight [V, 1]`` per token, ``bias [1]``."""

    def __init__(self, schema: FeatureSchema, fields: Sequence[str], bias: float) -> None:
        super().__init__()
        self.weights = FieldEmbedding(schema, fields, 1, init_std=0.0)
        self.bias = nn.Parameter(torch.full((1,), float(bias)))

    def forward(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> ``[...]``."""
        return self.weights.pooled(x).squeeze(-1) + self.bias

    def forward_batched(self, params: dict[str, Tensor], x: Tensor, prefix: str = "") -> Tensor:
        """Per-task ``params[prefix + name] [B, *shape]``, rows ``x [B, L, F_all]`` -> ``[B, L]``."""
        w = self.weights.pooled(x, params[f"{prefix}weights.weight"]).squeeze(-1)
        return w + params[f"{prefix}bias"]


class LinearModel(nn.Module):
    """Linear regression over one-hot tokens of ``fields``.

    Args:
        schema: the dataset's feature schema.
        fields: feature fields (``None`` = every field except ``user_id``).
        rating_mean: initial bias.
    """

    #: capabilities (``algos.compat``): scores rows, body/head split; no item embeddings
    provides: ClassVar[frozenset[str]] = frozenset({"rowwise", "head"})

    def __init__(self, schema: FeatureSchema, fields: Sequence[str] | None = None,
                 rating_mean: float = 0.0) -> None:
        super().__init__()
        self.head = LinearScorer(schema, resolve_fields(schema, fields), rating_mean)

    def body(self, x: Tensor) -> Tensor:
        """The identity: the head reads the feature rows ``[..., F_all]`` themselves."""
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> scores ``[...]``."""
        return self.head(x)

    def forward_batched(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Per-task weights ``params[name] [B, *shape]``, rows ``x [B, L, F_all]`` -> ``[B, L]``."""
        return self.head.forward_batched(params, x, prefix="head.")
