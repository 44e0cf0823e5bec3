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
        idx = [schema.index(f) for f in fields]
        cards = torch.tensor([schema.cardinalities[i] for i in idx])
        field_offsets = torch.zeros(len(idx), dtype=torch.long)
        field_offsets[1:] = torch.cumsum(cards, 0)[:-1]
        # one table for all fields; a bag field spans several row columns (padded with -1)
        columns, column_field = [], []
        for j, f in enumerate(fields):
            cols = list(schema.columns(f))
            columns += cols
            column_field += [j] * len(cols)
        self.fields = tuple(fields)
        self.has_bags = len(columns) > len(fields)
        self.register_buffer("field_index", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.register_buffer("field_offset", field_offsets[column_field], persistent=False)
        bag_sum = torch.zeros(len(fields), len(columns))
        bag_sum[column_field, torch.arange(len(columns))] = 1.0
        self.register_buffer("bag_sum", bag_sum, persistent=False)
        # column spans for forward_rows: runs of single-column fields, and one span per bag field
        spans: list[tuple[int, int, bool]] = []
        for j, f in enumerate(fields):
            start, width = column_field.index(j), column_field.count(j)
            if width == 1 and spans and not spans[-1][2] and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], start + 1, False)
            else:
                spans.append((start, start + width, width > 1))
        self.field_spans = tuple(spans)
        self.embedding = nn.Embedding(int(cards.sum()), embedding_dim)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.head = MLPHead(len(idx) * embedding_dim, list(hidden), output_bias=rating_mean)

    def _codes(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Table rows ``[..., C]`` for the selected columns, and the bag padding mask (or None)."""
        raw = x.index_select(-1, self.field_index)
        if not self.has_bags:
            return raw + self.field_offset, None
        present = raw >= 0
        return raw.clamp_min(0) + self.field_offset, present

    def _pool(self, emb: Tensor, present: Tensor | None) -> Tensor:
        """Column embeddings ``[..., C, d]`` -> one vector per field (bags summed), flattened
        to ``[..., F*d]``."""
        if present is None:
            return emb.flatten(-2)
        emb = emb * present.unsqueeze(-1).to(emb.dtype)
        return torch.matmul(self.bag_sum.to(emb.dtype), emb).flatten(-2)

    def body(self, x: Tensor) -> Tensor:
        """Feature rows ``x [..., C_all]`` (LongTensor) -> concatenated field embeddings
        ``[..., F*d]`` (a bag field is the sum of its token embeddings).

        From :data:`FUSED_BAG_MIN_ROWS` rows on, runs of single-token fields are one lookup and
        each bag field one fused ``embedding_bag`` (gather and sum, bag padding weighted 0):
        several times faster on CPU than looking up every column and pooling with
        :attr:`bag_sum`, which has less fixed cost and stays the path for a few rows (the
        same numbers either way)."""
        codes, present = self._codes(x)
        if present is None or codes.numel() < FUSED_BAG_MIN_ROWS * codes.shape[-1]:
            return self._pool(self.embedding(codes), present)
        lead, weight = codes.shape[:-1], self.embedding.weight
        codes, present = codes.reshape(-1, codes.shape[-1]), present.reshape(-1, codes.shape[-1])
        parts = []
        for start, end, bag in self.field_spans:
            block = codes[:, start:end]
            if bag:
                keep = present[:, start:end].to(weight.dtype)
                parts.append(F.embedding_bag(block, weight, mode="sum", per_sample_weights=keep))
            else:
                parts.append(F.embedding(block, weight).flatten(-2))
        return torch.cat(parts, -1).reshape(*lead, -1)

    @property
    def item_embedding_dim(self) -> int:
        """Size of :meth:`item_embedding`: ``F * d`` (every field's embedding)."""
        return int(self.embedding.embedding_dim) * len(self.fields)

    def item_embedding(self, x: Tensor) -> Tensor:
        """Item embeddings ``[..., F*d]`` of rows ``x [..., F_all]``: the whole :meth:`body`,
        the concatenated embeddings of all the model's fields."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Feature rows ``x [..., F_all]`` -> predicted ratings ``[...]``."""
        return self.head(self.body(x))

    def forward_batched(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Per-task weights for every parameter: ``params[name] [B, *shape]``, ``x [B, L, F_all]``
        -> ``[B, L]``. The embedding lookup gathers from each task's own table."""
        codes, present = self._codes(x)  # [B, L, C]
        table = params["embedding.weight"]  # [B, V, d]
        task = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
        h = self._pool(table[task, codes], present)  # [B, L, F*d]
        return self.head.forward_batched(params, h, prefix="head.")

    # -- touched-row adaptation (algos.touched): per-task tables of the rows a task reads --------
    #: the parameter whose rows are gathered per task
    table_name = "embedding.weight"

    def table_rows(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows of :attr:`table_name` that feature rows ``x [..., F_all]`` read.

        Returns:
            ``(codes [..., C], present [..., C] bool or None)``: one table row per column;
            ``present`` is False on bag padding (those columns contribute nothing).
        """
        return self._codes(x)

    def forward_rows(self, params: dict[str, Tensor], emb: Tensor, keep: Tensor | None) -> Tensor:
        """Scores from looked-up column embeddings, with per-task head weights.

        Args:
            params: ``{"head.<name>": [B, *shape]}`` per-task head weights.
            emb: ``[B, L, C, d]`` the embedding of every column of every row.
            keep: ``[B, L, C]`` bool or None; False columns contribute nothing.

        Returns:
            ``[B, L]``; with ``emb`` gathered from the table this is :meth:`forward_batched`.
        """
        if keep is not None:
            emb = emb * keep.unsqueeze(-1).to(emb.dtype)
        if self.has_bags:  # sums over each bag's column span (cheaper than the bag_sum matmul)
            spans = emb.split([b - a for a, b, _ in self.field_spans], dim=-2)
            emb = torch.cat([part.sum(-2, keepdim=True) if bag else part
                             for part, (_, _, bag) in zip(spans, self.field_spans)], -2)
        return self.head.forward_batched(params, emb.flatten(-2), prefix="head.")
