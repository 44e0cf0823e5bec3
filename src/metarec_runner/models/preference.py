"""MeLU-style preference estimator.

Reference: H. Lee, J. Im, S. Jang, H. Cho, S. Chung. "MeLU: Meta-Learned User Preference
Estimator for Cold-Start Recommendation." KDD 2019.

Every categorical field (user and item side features, optionally item/user ids) is embedded,
the embeddings are concatenated and an MLP maps them to a rating. ``body`` (the embeddings) and
``head`` (the MLP, MeLU's "decision layers") are separate so an algorithm can adapt the head
alone on precomputed body outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import ConfigError, require_positive
from metarec_runner.models.fields import FieldEmbedding

#: rows from which :meth:`PreferenceEstimator.body` pools bags with ``embedding_bag`` (measured
#: crossover on ML-100K rows with two bag fields, 1 CPU thread: about 100 rows)
FUSED_BAG_MIN_ROWS = 128


class MLPHead(nn.Module):
    """``Linear -> ReLU -> ... -> Linear(1)``; maps ``[..., D]`` to scores ``[...]``.

    Per-task weights run through :meth:`forward_batched`; :attr:`first_linear_name` and
    :meth:`forward_rest` let the batched core keep the first layer in kernel form while only
    the head adapts (``algos.functional.fixed_input_inner_loop``).
    """

    #: the first Linear layer, applied to the head's input
    first_linear_name = "net.0"

    def __init__(self, in_dim: int, hidden: Sequence[int], output_bias: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        out = nn.Linear(width, 1)
        nn.init.constant_(out.bias, output_bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        """``h [..., D]`` -> scores ``[...]``."""
        return self.net(h).squeeze(-1)

    def forward_batched(self, params: dict[str, Tensor], h: Tensor, prefix: str = "") -> Tensor:
        """Per-task weights, hand-batched: ``params[name] [B, *shape]``, ``h [B, L, D]`` -> ``[B, L]``.

        Equal to running :meth:`forward` once per task with that task's weights; ``baddbmm``
        does all tasks in one call (faster than ``vmap`` on CPU, see ARCHITECTURE.md section 4).
        """
        first = f"{prefix}{self.first_linear_name}"
        w, b = params[f"{first}.weight"], params[f"{first}.bias"]
        z = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        return self.forward_rest(params, z, prefix)

    def forward_rest(self, params: dict[str, Tensor], z: Tensor, prefix: str = "") -> Tensor:
        """The layers after the first Linear, with per-task weights.

        Args:
            params: ``{name: [B, *shape]}`` per-task weights of those layers (other entries are
                ignored).
            z: ``[B, L, H]`` outputs of the first Linear layer (pre-activation).

        Returns:
            ``[B, L]`` scores.
        """
        for i, layer in enumerate(self.net):
            if i == 0:
                continue
            if isinstance(layer, nn.Linear):
                w, b = params[f"{prefix}net.{i}.weight"], params[f"{prefix}net.{i}.bias"]
                if layer.out_features == 1:
                    # a batched matrix-vector product: elementwise ops here (and in the backward
                    # passes) beat a bmm whose gradients are outer products with inner size 1
                    z = (z * w).sum(-1, keepdim=True) + b.unsqueeze(1)
                else:
                    z = torch.baddbmm(b.unsqueeze(1), z, w.transpose(1, 2))
            else:
                z = layer(z)
        return z.squeeze(-1)


class PreferenceEstimator(nn.Module):
    """Embeddings of categorical fields -> MLP -> predicted rating.

    Args:
        schema: the dataset's feature schema (field names and cardinalities).
        embedding_dim: size of each field's embedding.
        hidden: widths of the MLP's hidden layers.
        fields: fields to use; ``None`` = every side feature plus ``item_id`` (user ids are
            useless for new users, so they are left out by default).
        rating_mean: initial output bias (the training ratings' mean speeds up training).

    The table is a :class:`~metarec_runner.models.fields.FieldEmbedding` (bags summed), so
    ``adapt: all`` can adapt each task's touched rows only (``algos.touched``).
    """

    #: capabilities (``algos.compat``): scores rows, body/head split, item embeddings (its body)
    provides: ClassVar[frozenset[str]] = frozenset({"rowwise", "head", "item_embedding"})

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 32,
        hidden: Sequence[int] = (64, 64),
        fields: Sequence[str] | None = None,
        rating_mean: float = 0.0,
    ) -> None:
        super().__init__()
        require_positive("embedding_dim", embedding_dim)
        for h in hidden:
            require_positive("hidden", h)
        if fields is None:
            fields = [n for n in schema.names if n != "user_id"]
        unknown = [f for f in fields if f not in schema.names]
        if unknown or not fields:
            raise ConfigError(
                "fields", f"unknown or empty field list {list(fields)}; choose from {', '.join(schema.names)}"
            )
        self.fields = tuple(fields)
        # one table for all fields; a bag field spans several row columns (padded with -1).
        # init_std=1 then std 0.1: the random draws of nn.Embedding's init followed by normal_
        self.embedding = FieldEmbedding(schema, self.fields, embedding_dim, init_std=1.0, bag="sum")
        nn.init.normal_(self.embedding.weight, std=0.1)
        column_field = self.embedding.column_field
        # column spans: runs of single-column fields, and one span per bag field
        spans: list[tuple[int, int, bool]] = []
        for j in range(len(self.fields)):
            start, width = column_field.index(j), column_field.count(j)
            if width == 1 and spans and not spans[-1][2] and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], start + 1, False)
            else:
                spans.append((start, start + width, width > 1))
        self.field_spans = tuple(spans)
        self.head = MLPHead(len(self.fields) * embedding_dim, list(hidden), output_bias=rating_mean)

    def _concat(self, emb: Tensor) -> Tensor:
        """Weighted column embeddings ``[..., C, d]`` (zeros on bag padding) -> one vector per
        field (bags summed over their column span), flattened to ``[..., F*d]``."""
        if not self.embedding.has_bags:
            return emb.flatten(-2)
        parts = emb.split([b - a for a, b, _ in self.field_spans], dim=-2)
        return torch.cat([part.sum(-2, keepdim=True) if bag else part
                          for part, (_, _, bag) in zip(parts, self.field_spans, strict=True)], -2).flatten(-2)

    def body(self, x: Tensor) -> Tensor:
        """Feature rows ``x [..., C_all]`` (LongTensor) -> concatenated field embeddings
        ``[..., F*d]`` (a bag field is the sum of its token embeddings).

        From :data:`FUSED_BAG_MIN_ROWS` rows on, runs of single-token fields are one lookup and
        each bag field one fused ``embedding_bag`` (gather and sum, bag padding weighted 0):
        several times faster on CPU than looking up every column and summing the spans, which
        has less fixed cost and stays the path for a few rows (the same numbers either way)."""
        codes, values = self.embedding.codes(x)
        weight = self.embedding.weight
        if not self.embedding.has_bags or codes.numel() < FUSED_BAG_MIN_ROWS * codes.shape[-1]:
            emb = F.embedding(codes, weight)
            return self._concat(emb * values.unsqueeze(-1) if self.embedding.has_bags else emb)
        lead = codes.shape[:-1]
        codes, values = codes.reshape(-1, codes.shape[-1]), values.reshape(-1, codes.shape[-1])
        parts = []
        for start, end, bag in self.field_spans:
            block = codes[:, start:end]
            if bag:
                keep = values[:, start:end]
                parts.append(F.embedding_bag(block, weight, mode="sum", per_sample_weights=keep))
            else:
                parts.append(F.embedding(block, weight).flatten(-2))
        return torch.cat(parts, -1).reshape(*lead, -1)

    @property
    def item_embedding_dim(self) -> int:
        """Size of :meth:`item_embedding`: ``F * d`` (every field's embedding)."""
        return self.embedding.dim * len(self.fields)

    def item_embedding(self, x: Tensor) -> Tensor:
        """Item embeddings ``[..., F*d]`` of rows ``x [..., F_all]``: the whole :meth:`body`,
        the concatenated embeddings of all the model's fields."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Feature rows ``x [..., F_all]`` -> predicted ratings ``[...]``."""
        return self.head(self.body(x))

    def forward_batched(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Per-task weights for every parameter: ``params[name] [B, *shape]``, ``x [B, L, F_all]``
        -> ``[B, L]``. The embedding lookup gathers from each task's own table (``[B, V, d]``,
        or its touched rows: :class:`~metarec_runner.models.fields.RowSparseTable`)."""
        emb = self.embedding.weighted(x, params["embedding.weight"])
        return self.head.forward_batched(params, self._concat(emb), prefix="head.")
