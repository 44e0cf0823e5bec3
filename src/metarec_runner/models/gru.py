"""A GRU sequence model: the user state is a GRU over the user's support items, in order.

Reference: B. Hidasi, A. Karatzoglou, L. Baltrunas, D. Tikk. "Session-based Recommendations
with Recurrent Neural Networks." ICLR 2016; read as a black-box meta-learner (the support set
is the sequence the network reads, no inner gradient steps), as in A. Santoro et al.
"Meta-Learning with Memory-Augmented Neural Networks." ICML 2016.

**How the model gets the support set.** A row-wise model scores ``x`` alone; this one needs the
user's support sequence, so it implements the *sequence* protocol (``algos.compat``)::

    state = model.encode_support(support_x [B, S, F], support_y [B, S], support_mask [B, S])  # [B, H]
    score = model.score(state [B, H], x [B, L, F])                                            # [B, L]

An algorithm that hands it the support set (``algo=protonet``: the GRU's state is the
prototype) calls these two. The GRU reads the support rows in their stored order: chronological
under ``splitter=temporal``, a seeded random order under ``user_cold_start``. Each step's input
is the item embedding and the centred rating ``y - rating_mean``; padded steps leave the state
unchanged, so the batched state equals each task's unpadded recursion exactly. The loop runs over
time steps (``S``), never over tasks. ``forward(x)`` scores with the learned initial state
``h0`` (a user with no history). Gradient-based algorithms (MAML, Reptile, finetune, global)
only call ``forward``/``body``/``head`` on rows and never pass the support set, so the
compatibility check refuses them with this model.

``score(state, x) = <P state, e(x)> + b(x) + c``: ``e``/``b`` are item embedding and bias over
``item_fields``, ``P`` a learned ``H -> d`` projection, ``c`` a global bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import require_positive
from metarec_runner.models.fields import FieldEmbedding, resolve_item_fields


class GRUSequenceModel(nn.Module):
    """GRU over (item embedding, centred rating) of the support sequence -> user state -> scores.

    Args:
        schema: the dataset's feature schema.
        embedding_dim: item embedding size ``d``.
        hidden_dim: GRU state size ``H``.
        item_fields: fields whose embeddings sum to the item embedding (``None`` = every field except
            ``user_id``; ``[item_id]`` = ids only).
        rating_mean: global bias and the centre of the ratings fed to the GRU.
    """

    #: capabilities (``algos.compat``): item embeddings, reads the support sequence; not rowwise
    provides: ClassVar[frozenset[str]] = frozenset({"item_embedding", "sequence"})

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 32,
        hidden_dim: int = 32,
        item_fields: Sequence[str] | None = None,
        rating_mean: float = 0.0,
    ) -> None:
        super().__init__()
        require_positive("embedding_dim", embedding_dim)
        require_positive("hidden_dim", hidden_dim)
        fields = resolve_item_fields(schema, item_fields)
        self.item = FieldEmbedding(schema, fields, embedding_dim)
        self.item_bias = FieldEmbedding(schema, fields, 1, init_std=0.0)
        self.cell = nn.GRUCell(embedding_dim + 1, hidden_dim)
        self.h0 = nn.Parameter(torch.zeros(hidden_dim))
        self.project = nn.Linear(hidden_dim, embedding_dim)
        self.bias = nn.Parameter(torch.full((1,), float(rating_mean)))
        self.rating_mean = float(rating_mean)

    @property
    def item_embedding_dim(self) -> int:
        return self.item.dim

    def item_embedding(self, x: Tensor) -> Tensor:
        """Item embeddings ``[..., d]`` of rows ``x [..., F_all]``."""
        return self.item.pooled(x)

    def encode_support(self, support_x: Tensor, support_y: Tensor, support_mask: Tensor) -> Tensor:
        """User states ``[B, H]`` after reading each task's support rows in order.

        Args:
            support_x: ``[B, S, F_all]``; support_y ``[B, S]``; support_mask ``[B, S]`` (padding
                steps keep the state).
        """
        emb = self.item_embedding(support_x)  # [B, S, d]
        inp = torch.cat([emb, (support_y - self.rating_mean).unsqueeze(-1).to(emb.dtype)], -1)
        state = self.h0.expand(support_x.shape[0], -1)
        for t in range(support_x.shape[1]):  # over time steps; every task advances at once
            new = self.cell(inp[:, t], state)
            state = torch.where(support_mask[:, t, None], new, state)
        return state

    def score(self, state: Tensor, x: Tensor) -> Tensor:
        """States ``[B, H]`` (or ``[H]`` for every row) and rows ``x [B, L, F_all]`` -> ``[B, L]``."""
        user = self.project(state)  # [B, d]
        if user.dim() == 2:
            user = user.unsqueeze(-2)  # [B, 1, d]
        e = self.item_embedding(x)
        return (e * user).sum(-1) + self.item_bias.pooled(x).squeeze(-1) + self.bias

    def forward_with_support(self, support_x: Tensor, support_y: Tensor, support_mask: Tensor,
                             x: Tensor) -> Tensor:
        """Scores ``[B, L]`` of rows ``x [B, L, F_all]`` given each task's support sequence."""
        return self.score(self.encode_support(support_x, support_y, support_mask), x)

    def forward(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> scores ``[...]`` of a user with no history (state ``h0``)."""
        return self.score(self.h0, x)
