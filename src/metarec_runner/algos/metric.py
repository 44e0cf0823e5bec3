"""Metric-based meta-learners: the support set is read, never trained on (no inner gradient steps).

References: J. Snell, K. Swersky, R. Zemel. "Prototypical Networks for Few-shot Learning."
NeurIPS 2017; O. Vinyals, C. Blundell, T. Lillicrap, K. Kavukcuoglu, D. Wierstra. "Matching
Networks for One Shot Learning." NeurIPS 2016.

Both score a query item from the model's base score ``model(x)`` (the rating a user with no
history gets) and the support set's *residuals* ``r_j = y_j - model(x_j)`` (``y_j -
sigmoid(model(x_j))`` with ``loss: bce``), using the model's item embeddings
(``model.item_embedding``, see ``algos.compat``). All tasks of a batch are read at once (padded, masked); the
model and the algorithm's own similarity parameters are meta-trained end-to-end on the mean
query loss. ``adapt(batch)`` computes each task's context once; the scorer then scores any rows.

- :class:`ProtoNet`: user prototype ``p = mean_j (r_j - rbar) e_j`` (the support item embeddings
  weighted by centred residuals), ``score(x) = model(x) + beta * rbar + e(x)^T W p`` (bilinear
  similarity ``W`` and user offset ``beta`` learned). With a *sequence* model (``model=gru``)
  the prototype is the model's own state after reading the support sequence and the score is
  the model's ``score(state, x)``.
- :class:`MatchingNet`: attention ``a_qj = softmax_j(<P e_q, P e_j> * exp(t) / sqrt(d))`` over
  the support items; ``score(x_q) = model(x_q) + gamma * sum_j a_qj r_j``. With ``gamma = 1`` this is
  the attention-weighted support ratings ``sum_j a_qj y_j`` plus the learned correction
  ``model(x_q) - sum_j a_qj model(x_j)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.algos.base import AdaptedScorer, MetaAlgorithm
from metarec_runner.algos.compat import check_compatible, provided
from metarec_runner.algos.functional import LOSSES, masked_loss
from metarec_runner.algos.ranking_loss import ranking_objective
from metarec_runner.errors import ConfigError, require_choice, require_non_negative
from metarec_runner.tasks.taskset import TaskBatch

Context = dict[str, Tensor]


class SupportConditioned(MetaAlgorithm):
    """Base class: a differentiable ``context(support) -> score(context, x)``, trained on the
    query loss.

    Args:
        model: a model with item embeddings (see ``algos.compat``).
        meta_optimizer: a partial ``torch.optim`` constructor; it gets the model's parameters
            and the algorithm's own (:attr:`net`).
        loss: ``mse`` (ratings), ``bce`` (clicks; scores are logits), or a ranking loss (``bpr``,
            ``softmax``, ``bce`` with ``negatives``): the query's positives against sampled
            negatives scored with the same context; the residuals are then ``positive -
            sigmoid(model(x))`` (positive: rated ``>= positive_threshold``).
        support_weight: weight of the base model's own loss on the support rows (``model(x)``,
            no context) added to the meta-objective, so the base model learns from every
            meta-train rating as the global model does (0 = query loss only); with a ranking
            loss, the support's positives against their own negatives.
        negatives, n_negatives, positive_threshold, seed: see :class:`MetaAlgorithm`.
    """

    #: capabilities it needs of the model (``algos.compat``)
    requires: ClassVar[frozenset[str]] = frozenset({"item_embedding"})

    def __init__(self, model: nn.Module, meta_optimizer: Callable[..., torch.optim.Optimizer],
                 loss: str = "mse", support_weight: float = 1.0, negatives: str | None = None,
                 n_negatives: int = 20, positive_threshold: float | None = None, seed: int = 0) -> None:
        # MetaAlgorithm.__init__ is not called: its optimizer would miss the algorithm's parameters
        require_choice("loss", loss, LOSSES)
        require_non_negative("support_weight", support_weight)
        self.support_weight = float(support_weight)
        self.model = model
        self.scope = "all"
        self.touched_rows = False
        self.loss = loss
        self.ranking = ranking_objective(loss, negatives, n_negatives, positive_threshold, seed)
        if self.ranking is not None:  # ranking scores, not ratings: RMSE/MAE are not reported
            self.predicts_ratings = False
        check_compatible(self, model)
        #: whether the model reads the support sequence itself and this algorithm uses that
        self.sequence = "sequence" in (self.uses & provided(model))
        first = next(model.parameters())
        self.net = self.build_net(int(model.item_embedding_dim)).to(device=first.device, dtype=first.dtype)
        try:
            self.optimizer = meta_optimizer(params=[*model.parameters(), *self.net.parameters()])
        except ValueError as e:
            raise ConfigError("meta_optimizer", f"{e}; fix the value under meta_optimizer") from None

    # -- what a subclass defines -----------------------------------------------------------
    def build_net(self, dim: int) -> nn.Module:
        """The algorithm's own parameters for item embeddings of size ``dim``."""
        raise NotImplementedError

    def context(self, batch: TaskBatch, support_scores: Tensor | None = None) -> Context:
        """What the scorer keeps of each task's support set (tensors with a leading ``B``).

        ``support_scores``: ``model(batch.support_x)`` ``[B, S]`` if already computed."""
        raise NotImplementedError

    def score(self, ctx: Context, x: Tensor) -> Tensor:
        """Scores ``[B, L]`` of rows ``x [B, L, F]`` for the tasks of ``ctx``."""
        raise NotImplementedError

    # -- shared pieces ---------------------------------------------------------------------
    def residuals(self, batch: TaskBatch, support_scores: Tensor | None = None) -> Tensor:
        """``[B, S]`` support residuals ``y - model(x)`` (0 on padding; ranking: ``positive -
        sigmoid(model(x))``)."""
        base = self.model(batch.support_x) if support_scores is None else support_scores
        y = batch.support_y
        if self.ranking is not None:
            y = self.ranking.positives(y, batch.support_mask).to(base.dtype)
        if self.loss == "bce" or self.ranking is not None:
            base = torch.sigmoid(base)
        return (y - base) * batch.support_mask.to(base.dtype)

    # -- the MetaAlgorithm interface ---------------------------------------------------------
    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        if self.ranking is not None:
            return self._ranking_step(batch)
        base = self.model(batch.support_x) if self.support_weight > 0 else None  # [B, S]
        pred = self.score(self.context(batch, base), batch.query_x)
        loss = masked_loss(pred, batch.query_y, batch.query_mask, self.loss).mean()
        objective = loss
        if base is not None:
            support = masked_loss(base, batch.support_y, batch.support_mask, self.loss).mean()
            objective = loss + self.support_weight * support
        self._outer_update(objective)
        return {"loss": loss.item()}

    def _ranking_step(self, batch: TaskBatch) -> dict[str, float]:
        """:meth:`meta_step` with a ranking loss: the context reads the real support rows; the
        query's positives and its negatives are scored with it in one call."""
        ep = self.ranking.episode(batch)
        n = batch.support_x.shape[1]
        base = self.model(ep.batch.support_x) if self.support_weight > 0 else None  # [B, S + N]
        pred = self.score(self.context(batch, None if base is None else base[:, :n]), ep.batch.query_x)
        loss = ep.query.loss(pred).mean()
        objective = loss if base is None else loss + self.support_weight * ep.support.loss(base).mean()
        self._outer_update(objective)
        return {"loss": loss.item()}

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        with torch.no_grad():
            ctx = self.context(batch)
        return AdaptedScorer(self, ctx)

    def predict(self, params: Context | None, x: Tensor) -> Tensor:
        if params is None:
            return self.model(x)
        return self.score(params, x)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "net": self.net.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.net.load_state_dict(state["net"])


class _Bilinear(nn.Module):
    """ProtoNet's similarity ``W [d, d]`` (starts at 0) and user-offset weight ``beta``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dim))
        self.beta = nn.Parameter(torch.ones(1))


class ProtoNet(SupportConditioned):
    """Prototypical user representation + bilinear similarity (see the module docstring)."""

    #: with a sequence model, the prototype is the model's state over the support sequence
    uses: ClassVar[frozenset[str]] = frozenset({"sequence"})

    def build_net(self, dim: int) -> nn.Module:
        return _Bilinear(dim)

    def context(self, batch: TaskBatch, support_scores: Tensor | None = None) -> Context:
        """``{"prototype": [B, d], "offset": [B]}``, or ``{"state": [B, H]}`` for a sequence model."""
        if self.sequence:
            return {"state": self.model.encode_support(batch.support_x, batch.support_y, batch.support_mask)}
        r = self.residuals(batch, support_scores)
        m = batch.support_mask.to(r.dtype)
        n = m.sum(1).clamp_min(1.0)
        offset = r.sum(1) / n
        centred = (r - offset.unsqueeze(1)) * m
        emb = self.model.item_embedding(batch.support_x)  # [B, S, d]
        prototype = (centred.unsqueeze(-1) * emb).sum(1) / n.unsqueeze(-1)
        return {"prototype": prototype, "offset": offset}

    def score(self, ctx: Context, x: Tensor) -> Tensor:
        if "state" in ctx:
            return self.model.score(ctx["state"], x)
        e = self.model.item_embedding(x)  # [B, L, d]
        user = ctx["prototype"] @ self.net.weight.T  # [B, d]: W p
        sim = (e * user.unsqueeze(1)).sum(-1)
        return self.model(x) + self.net.beta * ctx["offset"].unsqueeze(1) + sim


class _Attention(nn.Module):
    """MatchingNet's projection ``P [d, d]`` (starts at the identity), log temperature and ``gamma``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Parameter(torch.eye(dim))
        self.log_temperature = nn.Parameter(torch.zeros(1))
        self.gamma = nn.Parameter(torch.ones(1))


class MatchingNet(SupportConditioned):
    """Attention over the support items, residual-weighted (see the module docstring)."""

    def build_net(self, dim: int) -> nn.Module:
        return _Attention(dim)

    def _keys(self, x: Tensor) -> Tensor:
        """Projected item embeddings ``[B, L, d]``."""
        return self.model.item_embedding(x) @ self.net.project.T

    def context(self, batch: TaskBatch, support_scores: Tensor | None = None) -> Context:
        """``{"keys": [B, S, d], "residual": [B, S], "mask": [B, S]}``."""
        return {"keys": self._keys(batch.support_x), "residual": self.residuals(batch, support_scores),
                "mask": batch.support_mask}

    def attention(self, ctx: Context, x: Tensor) -> Tensor:
        """``[B, L, S]`` attention of rows ``x`` over each task's support items (0 on padding;
        all 0 for an empty support set)."""
        q = self._keys(x)
        scale = torch.exp(self.net.log_temperature) / math.sqrt(q.shape[-1])
        logits = torch.bmm(q, ctx["keys"].transpose(1, 2)) * scale
        mask = ctx["mask"].unsqueeze(1)  # [B, 1, S]
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)  # finite: no NaN gradients
        att = torch.softmax(logits, -1)
        return torch.where(mask.any(-1, keepdim=True), att, torch.zeros_like(att))

    def score(self, ctx: Context, x: Tensor) -> Tensor:
        att = self.attention(ctx, x)
        return self.model(x) + self.net.gamma * torch.bmm(att, ctx["residual"].unsqueeze(-1)).squeeze(-1)
