"""A set encoder for full-catalog ranking: the user is the pooled set of their support items.

Reference: S. Kabbur, X. Ning, G. Karypis. "FISM: Factored Item Similarity Models for top-N
Recommender Systems." KDD 2013 (a user as the normalised sum of their items' embeddings);
Y. Koren. "Factorization meets the neighborhood." KDD 2008 (the ``|N(u)|^-1/2`` norm); the
catalog softmax is the multinomial likelihood of D. Liang et al. "Variational Autoencoders for
Collaborative Filtering." WWW 2018. Read this way the model is a learned, low-rank item-item
model (``score(i) = sum_j w_j e_j . e'_i``, like EASE's ``x_s B``) whose initial user vector,
pooling weights and item priors are meta-learned (``algo=set_ranker``).

The user state over a support set ``S`` (ratings ``y_j``) is::

    state = g + (n + lambda)^-p * sum_{j in S} (a + c * (y_j - rating_mean)) * e(x_j)     # [d]

``e`` = the input embedding (sum over ``item_fields``, default the item id), ``g`` the learned
"no support" vector (a user with ``k = 0``), ``a``/``c`` learned weights of "rated at all" and
"rated above the mean", ``n = |S|`` and ``p`` from ``pool_norm`` (``mean`` 1, ``sqrt`` 1/2,
``sum`` 0). ``lambda >= 0`` (``shrinkage``, learned) shrinks small sets towards ``g``: with
``mean`` the pooled mean is weighted ``n / (n + lambda)``, so one rated item moves the user less
than twenty agreeing ones (a Bayesian prior of ``lambda`` pseudo-items at ``g``). Scores of item
``i`` for a row of that user::

    score(i) = (state + f(user)) . e'_i + b_i + s * log(1 + count_i)

``e'`` the output table over item ids (``tied``: the item-id rows of the input table), ``f`` a
sum of embeddings of the row's ``user_fields`` (demographics, zero-initialised: zero-shot
answers for ``k = 0`` users), ``b`` a learned bias and ``s log(1 + count_i)`` a popularity prior:
``count`` is a buffer of meta-train interaction counts the algorithm fills (``add_item_counts``)
from the meta-train tasks it sees (never validation or test users), ``s`` is learned (starts at 1).
The prior starts the bias at log popularity (the softmax is shift-invariant, so counts from only
part of the meta-train users already give nearly the right offsets).

**Full item-item weights** (``item_item: true``, the non-factorised form of the same model, like
EASE's ``B``): a learned ``W [n_items, n_items]`` (zero-initialised, zero diagonal: an item never
recommends itself) adds ``(n + lambda)^-q * sum_{j in S} (a' + c' (y_j - rating_mean)) W[j, i]``
to ``score(i)`` (:meth:`support_scores`; ``q`` from ``item_item_norm``, ``a'``/``c'`` learned).
It is a function of the support alone, so the algorithm computes it once per task and the inner
steps adapt only the low-rank state. ``item_item_l2`` is an L2 penalty on ``W``
(:meth:`penalty`, added to the meta-objective by the algorithm).

**Zero-shot correction** (``zero_shot_bias: true``): a learned per-item ``z [n_items]``
(zero-initialised) adds ``mu0 / (n + mu0) * z_i`` to ``score(i)`` (``mu0`` learned, starts at
``zero_shot_shrinkage``): the whole correction at ``k = 0``, fading as the support grows, so the
``k = 0`` answer is not tied to the item biases every support size shares (part of
:meth:`support_scores`). With ``zero_shot_fields`` (e.g. ``[age, gender, occupation]``) the
correction is ``z_i + h(user) . Z_i``: ``h`` a sum of the user's field embeddings ``[r]``, ``Z [n_items, r]``
(zero-initialised, ``r = zero_shot_dim``), a learned group popularity for a user with no ratings.

Capabilities (``algos.compat``): ``sequence`` (the ``encode_support`` / ``score`` protocol: the
model reads the support set itself) and ``catalog`` (:meth:`catalog_scores`: every item's score
for a batch of users in one matmul, what ``algo=set_ranker``'s catalog softmax needs). It has no
``item_embedding`` (so protonet/matchingnet refuse it) and is not ``rowwise``: ``forward(x)``
scores rows for a user with no history, but MAML-style algorithms would adapt whole tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import (
    ConfigError,
    require_choice,
    require_non_negative,
    require_positive,
)
from metarec_runner.models.fields import FieldEmbedding, resolve_fields, resolve_item_fields

POOL_NORMS = {"mean": 1.0, "sqrt": 0.5, "sum": 0.0}
"""``pool_norm`` -> the exponent ``p`` of the ``n^-p`` normalisation of the pooled support."""


class SetEncoder(nn.Module):
    """User = pooled support-item embeddings; scores = dot product with an output table + priors.

    Args:
        schema: the dataset's feature schema.
        embedding_dim: ``d``, the size of the user state and of both item tables.
        item_fields: fields summed into the input embedding ``e`` of a support row (``None`` =
            every field except ``user_id``; default ``[item_id]``). The output table is over item
            ids only, so the whole catalog is scored without its feature rows.
        user_fields: user-side fields whose embeddings are added to the user vector at scoring
            time (read from the scored row itself); empty = none.
        tied: use the input table's item-id rows as the output table ``e'``.
        pool_norm: ``mean`` | ``sqrt`` | ``sum``: divide the pooled support by ``n + lambda``,
            ``sqrt(n + lambda)``, 1.
        shrinkage: initial ``lambda`` (learned, kept positive through ``exp``); 0 = fixed at 0.
        rating_mean: the centre of the ratings in the pooling weights.
        init_std: std of the initial item embeddings.
        item_item: add the full item-item term ``W`` (see the module docstring).
        item_item_norm: ``mean`` | ``sqrt`` | ``sum``: the item-item term's normalisation ``q``.
        item_item_l2: L2 penalty on ``W`` (:meth:`penalty`); 0 = none.
        zero_shot_bias: add the zero-shot correction ``z`` (see the module docstring).
        zero_shot_shrinkage: initial ``mu0`` of the zero-shot correction (> 0).
        zero_shot_fields: user fields of the zero-shot correction's user term (needs
            ``zero_shot_bias``); empty = none.
        zero_shot_dim: ``r``, the size of that user term.
        missing_fields: ``error`` | ``skip``: what a ``zero_shot_fields`` entry the dataset does
            not have does (``skip``: one preset serves datasets with and without user features).
    """

    #: capabilities (``algos.compat``): reads the support set; scores the whole catalog
    provides: ClassVar[frozenset[str]] = frozenset({"sequence", "catalog"})

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int = 64,
        item_fields: Sequence[str] | None = ("item_id",),
        user_fields: Sequence[str] = (),
        tied: bool = False,
        pool_norm: str = "mean",
        shrinkage: float = 1.0,
        rating_mean: float = 0.0,
        init_std: float = 0.1,
        item_item: bool = False,
        item_item_norm: str = "sqrt",
        item_item_l2: float = 0.0,
        zero_shot_bias: bool = False,
        zero_shot_shrinkage: float = 1.0,
        zero_shot_fields: Sequence[str] = (),
        zero_shot_dim: int = 16,
        missing_fields: str = "error",
    ) -> None:
        super().__init__()
        require_positive("embedding_dim", embedding_dim)
        require_choice("pool_norm", pool_norm, tuple(POOL_NORMS))
        if "item_id" not in schema.names:
            raise ConfigError("model", "set_encoder needs an item_id field in the feature rows")
        self.schema = schema
        fields = resolve_item_fields(schema, item_fields)
        self.item = FieldEmbedding(schema, fields, embedding_dim, init_std)
        n_items = int(schema.cardinalities[schema.index("item_id")])
        self.tied = bool(tied)
        if self.tied:
            if "item_id" not in fields:
                raise ConfigError("tied", f"tied output needs item_id among item_fields {list(fields)}")
            start = sum(schema.cardinalities[schema.index(f)] for f in fields[: fields.index("item_id")])
            self._tied_start = int(start)
        else:
            self.output = nn.Parameter(torch.randn(n_items, embedding_dim) * init_std)
        user_fields = list(user_fields or [])
        self.users = (FieldEmbedding(schema, resolve_fields(schema, user_fields, "user_fields"),
                                     embedding_dim, init_std=0.0) if user_fields else None)
        self.empty = nn.Parameter(torch.zeros(embedding_dim))  # g: the state of an empty support
        self.weights = nn.Parameter(torch.tensor([1.0, 0.0]))  # (a, c) of the pooling weights
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        self.prior_scale = nn.Parameter(torch.ones(1))
        self.register_buffer("item_count", torch.zeros(n_items))  # meta-train interactions per item
        self.power = POOL_NORMS[pool_norm]
        require_non_negative("shrinkage", shrinkage)
        self.log_shrinkage = nn.Parameter(torch.tensor(math.log(shrinkage))) if shrinkage > 0 else None
        self.rating_mean = float(rating_mean)
        require_choice("item_item_norm", item_item_norm, tuple(POOL_NORMS))
        require_non_negative("item_item_l2", item_item_l2)
        self.item_item_power, self.item_item_l2 = POOL_NORMS[item_item_norm], float(item_item_l2)
        if item_item:  # W and the (a', c') of its pooling weights
            self.item_item = nn.Parameter(torch.zeros(n_items, n_items))
            self.item_item_weights = nn.Parameter(torch.tensor([1.0, 0.0]))
        else:
            self.item_item = None
        require_positive("zero_shot_shrinkage", zero_shot_shrinkage)
        self.zero_shot = nn.Parameter(torch.zeros(n_items)) if zero_shot_bias else None  # z
        self.log_zero_shrinkage = (nn.Parameter(torch.tensor(math.log(zero_shot_shrinkage)))
                                   if zero_shot_bias else None)
        require_choice("missing_fields", missing_fields, ("error", "skip"))
        zero_shot_fields = [f for f in zero_shot_fields or []
                            if missing_fields == "error" or f in schema.names]
        if zero_shot_fields and not zero_shot_bias:
            raise ConfigError("zero_shot_fields", "needs zero_shot_bias: true")
        require_positive("zero_shot_dim", zero_shot_dim)
        self.zero_users = (FieldEmbedding(schema, resolve_fields(schema, zero_shot_fields, "zero_shot_fields"),
                                          zero_shot_dim, init_std) if zero_shot_fields else None)  # h
        self.zero_items = nn.Parameter(torch.zeros(n_items, zero_shot_dim)) if zero_shot_fields else None  # Z

    # -- item side ---------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return int(self.item_bias.shape[0])

    @property
    def dim(self) -> int:
        return int(self.empty.shape[0])

    @property
    def output_weight(self) -> Tensor:
        """The output table ``e'`` ``[n_items, d]``."""
        if self.tied:
            return self.item.weight[self._tied_start: self._tied_start + self.n_items]
        return self.output

    def item_offset(self) -> Tensor:
        """``b_i + s * log(1 + count_i)`` ``[n_items]``: each item's score for a zero user vector."""
        return self.item_bias + self.prior_scale * torch.log1p(self.item_count)

    @torch.no_grad()
    def add_item_counts(self, items: Tensor) -> None:
        """Add one interaction for each item code in ``items`` (any shape) to ``item_count``."""
        items = items.reshape(-1).to(self.item_count.device)
        self.item_count.index_add_(0, items, torch.ones(items.shape, dtype=self.item_count.dtype,
                                                        device=items.device))

    # -- user side ---------------------------------------------------------------------------
    def user_vector(self, x: Tensor) -> Tensor:
        """``f(user)`` ``[..., d]`` of rows ``x [..., F_all]`` (only their user fields are read)."""
        if self.users is None:
            return x.new_zeros(*x.shape[:-1], self.dim, dtype=self.empty.dtype)
        return self.users.pooled(x)

    def encode_support(self, support_x: Tensor, support_y: Tensor, support_mask: Tensor) -> Tensor:
        """User states ``[B, d]`` of support sets ``support_x [B, S, F_all]`` (``support_y [B, S]``,
        ``support_mask [B, S]``; padded rows and empty sets contribute nothing)."""
        m = support_mask.to(self.empty.dtype)
        w = (self.weights[0] + self.weights[1] * (support_y.to(m.dtype) - self.rating_mean)) * m
        pooled = (w.unsqueeze(-1) * self.item.pooled(support_x)).sum(-2)  # [B, d]
        n = m.sum(-1, keepdim=True)
        if self.log_shrinkage is not None:
            n = n + torch.exp(self.log_shrinkage)
        norm = n.clamp_min(1.0).pow(-self.power) if self.log_shrinkage is None else n.pow(-self.power)
        return self.empty + norm * pooled

    @property
    def has_support_scores(self) -> bool:
        """Whether :meth:`support_scores` adds anything (``item_item`` or ``zero_shot_bias``)."""
        return self.item_item is not None or self.zero_shot is not None

    def support_scores(self, support_x: Tensor, support_y: Tensor, support_mask: Tensor,
                       user_rows: Tensor | None = None) -> Tensor | None:
        """Per-item scores ``[B, n_items]`` that depend on the support set ``support_x [B, S,
        F_all]`` (``support_y``, ``support_mask [B, S]``) beyond the state: the item-item term
        plus the zero-shot correction (its user term from ``user_rows [B, F_all]``, one feature
        row per user: only the user fields are read); None when the model has neither."""
        if not self.has_support_scores:
            return None
        out = None
        if self.zero_shot is not None:
            n = support_mask.to(self.zero_shot.dtype).sum(-1, keepdim=True)  # [B, 1]
            mu0 = torch.exp(self.log_zero_shrinkage)
            z = self.zero_shot
            if self.zero_users is not None:
                if user_rows is None:
                    raise ConfigError("zero_shot_fields", "the zero-shot user term needs the users' rows")
                z = z + self.zero_users.pooled(user_rows) @ self.zero_items.T  # [B, n_items]
            out = mu0 / (n + mu0) * z  # [B, n_items]
        if self.item_item is None:
            return out
        m = support_mask.to(self.item_item.dtype)
        a, c = self.item_item_weights
        w = (a + c * (support_y.to(m.dtype) - self.rating_mean)) * m  # [B, S]
        n = m.sum(-1, keepdim=True)
        if self.log_shrinkage is not None:
            n = n + torch.exp(self.log_shrinkage)
        w = w * n.clamp_min(1e-12).pow(-self.item_item_power)
        rows = support_x[..., -1].clamp(0, self.n_items - 1)
        xs = w.new_zeros(w.shape[0], self.n_items).index_put_(
            (torch.arange(w.shape[0], device=w.device).unsqueeze(-1).expand_as(rows), rows), w,
            accumulate=True)  # [B, n_items] weighted support rows
        eye = torch.eye(self.n_items, dtype=torch.bool, device=w.device)
        pair = xs @ self.item_item.masked_fill(eye, 0.0)
        return pair if out is None else out + pair

    def penalty(self) -> Tensor:
        """``item_item_l2 * ||W||^2`` (a scalar; 0 without ``item_item``)."""
        if self.item_item is None or not self.item_item_l2:
            return self.empty.new_zeros(())
        return self.item_item_l2 * self.item_item.pow(2).sum()

    # -- scores ------------------------------------------------------------------------------
    def score(self, state: Tensor, x: Tensor, extra: Tensor | None = None) -> Tensor:
        """States ``[B, d]`` (or ``[d]`` for every row) and rows ``x [B, L, F_all]`` -> ``[B, L]``;
        ``extra [B, n_items]``: per-item scores added (the item-item term), or None."""
        user = (state.unsqueeze(-2) if state.dim() == 2 else state) + self.user_vector(x)
        items = x[..., -1]
        out = (user * self.output_weight[items]).sum(-1) + self.item_offset()[items]
        return out if extra is None else out + extra.gather(-1, items)

    def catalog_scores(self, state: Tensor, user_rows: Tensor | None = None,
                       extra: Tensor | None = None) -> Tensor:
        """Every item's score ``[B, n_items]`` for states ``[B, d]``; ``user_rows [B, F_all]``: one
        feature row per user (only its user fields are read; None = no user features); ``extra
        [B, n_items]``: per-item scores added (the item-item term), or None."""
        user = state if user_rows is None else state + self.user_vector(user_rows)
        out = user @ self.output_weight.T + self.item_offset()
        return out if extra is None else out + extra

    def forward(self, x: Tensor) -> Tensor:
        """Rows ``x [..., F_all]`` -> scores ``[...]`` of a user with no history (state ``g``)."""
        return self.score(self.empty, x)
