"""Two-tower model: a user tower over the user's side features, an item tower over the item id and
its features, scored by a dot product.

References: P. Covington, J. Adams, E. Sargin. "Deep Neural Networks for YouTube
Recommendations." RecSys 2016; X. Yi et al. "Sampling-Bias-Corrected Neural Modeling for Large
Corpus Item Recommendations." RecSys 2019 (two towers trained with a sampled softmax).

``score(x) = (u0 + U(user features)) . I(item fields) + b(item fields) + b_u``:

- the **item tower** ``I`` embeds ``item_fields`` (default: every field that is neither a user
  field nor ``user_id``, so the item id and every item feature) per field, concatenates them and
  maps them through an MLP to ``[d]``; ``b`` is a per-token item bias (the item's popularity
  learns into it);
- the **user tower** ``U`` does the same for ``user_fields`` (default: the dataset's user side
  features, ``FeatureSchema.user_fields``); with no user features it is zero and the model is
  MF with a meta-learned user vector;
- the **head** (:class:`TwoTowerHead`) holds the new user's own parameters: an offset ``u0 [d]``
  added to the user tower's output and the bias ``b_u``. ``adapt: head`` moves exactly those by
  SGD on the support set, so the zero-shot answer (k = 0) is the user tower's, from features
  alone, and every support rating refines it; ``adapt: all`` also adapts the towers (touched
  rows of the embedding tables, ``algos.touched``).

Scoring a catalog is one matrix product per batch of users: the item tower's output for every
candidate row dotted with the user vector, all rows at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import ConfigError, require_positive
from metarec_runner.models.fields import FieldEmbedding, resolve_fields


def _tower(n_fields: int, dim: int, hidden: Sequence[int], out: int) -> nn.Sequential:
    """MLP ``[..., n_fields * dim] -> [..., out]`` (ReLU between layers, linear output)."""
    layers: list[nn.Module] = []
    width = n_fields * dim
    for h in hidden:
        require_positive("hidden", h)
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class TwoTowerHead(nn.Module):
    """The new user's parameters: ``u0 [d]`` (added to the user tower's output) and ``bias [1]``.

    ``h [..., 2d + 1]`` = ``[user tower d, item tower d, item bias 1]`` ->
    ``(h_user + u0) . h_item + h_bias + bias``.
    """

    def __init__(self, dim: int, bias: float = 0.0, init_std: float = 0.05) -> None:
        super().__init__()
        self.user = nn.Parameter(torch.randn(dim) * init_std)
        self.bias = nn.Parameter(torch.full((1,), float(bias)))

    def forward(self, h: Tensor) -> Tensor:
        """``h [..., 2d + 1]`` -> scores ``[...]``."""
        d = self.user.shape[0]
        return ((h[..., :d] + self.user) * h[..., d:2 * d]).sum(-1) + h[..., 2 * d] + self.bias


class TwoTower(nn.Module):
    """User tower (user side features) and item tower (item id and features), dot-product scored.

    Args:
        schema: the dataset's feature schema (``user_fields`` says which fields are the user's).
        embedding_dim: size ``e`` of every token embedding.
        tower_dim: size ``d`` of both towers' outputs (and of the user vector).
        hidden: hidden widths of each tower's MLP (``[]`` = one linear map).
        user_fields: the user tower's fields (``None`` = ``schema.user_fields``; ``[]`` = none).
        item_fields: the item tower's fields (``None`` = every field but the user's and ``user_id``).
        rating_mean: initial user bias (the training ratings' mean).
        init_std: std of the initial embeddings and user vector.
    """

    #: capabilities (``algos.compat``): scores rows, body/head split, item embeddings
    provides: ClassVar[frozenset[str]] = frozenset({"rowwise", "head", "item_embedding"})

    def __init__(self, schema: FeatureSchema, embedding_dim: int = 16, tower_dim: int = 32,
                 hidden: Sequence[int] = (64,), user_fields: Sequence[str] | None = None,
                 item_fields: Sequence[str] | None = None, rating_mean: float = 0.0,
                 init_std: float = 0.05) -> None:
        super().__init__()
        require_positive("embedding_dim", embedding_dim)
        require_positive("tower_dim", tower_dim)
        users = tuple(schema.user_fields if user_fields is None else user_fields)
        if user_fields is not None and users:
            users = resolve_fields(schema, users, "user_fields")
        if "user_id" in users:
            raise ConfigError("user_fields", "user_id is never trained for a cold-start user; leave it out")
        if item_fields is None:
            item_fields = [n for n in schema.names if n not in users and n != "user_id"]
        items = resolve_fields(schema, item_fields, "item_fields")
        overlap = sorted(set(users) & set(items))
        if overlap:
            raise ConfigError("item_fields", f"{overlap} are in both towers; keep each field in one")
        self.user_fields, self.item_fields = users, items
        self.item = FieldEmbedding(schema, items, embedding_dim, init_std)
        self.item_bias = FieldEmbedding(schema, items, 1, init_std=0.0)
        self.item_tower = _tower(len(items), embedding_dim, hidden, tower_dim)
        self.user_embedding = FieldEmbedding(schema, users, embedding_dim, init_std) if users else None
        self.user_tower = _tower(len(users), embedding_dim, hidden, tower_dim) if users else None
        self.head = TwoTowerHead(tower_dim, bias=rating_mean, init_std=init_std)
        self.tower_dim = int(tower_dim)

    @property
    def item_embedding_dim(self) -> int:
        return self.tower_dim

    def item_embedding(self, x: Tensor) -> Tensor:
        """The item tower's output ``[..., d]`` for rows ``x [..., F_all]``."""
        return self.item_tower(self.item.per_field(x).flatten(-2))

    def user_embedding_of(self, x: Tensor) -> Tensor:
        """The user tower's output ``[..., d]`` (zeros without user fields)."""
        if self.user_embedding is None:
            return x.new_zeros((*x.shape[:-1], self.tower_dim), dtype=self.head.user.dtype)
        return self.user_tower(self.user_embedding.per_field(x).flatten(-2))

    def body(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> ``[..., 2d + 1]``: user tower, item tower, item bias."""
        return torch.cat([self.user_embedding_of(x), self.item_embedding(x), self.item_bias.pooled(x)], -1)

    def forward(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> scores ``[...]``."""
        return self.head(self.body(x))
