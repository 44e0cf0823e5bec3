"""Set ranker: a meta-learned set encoder trained with a softmax over the whole catalog.

References: C. Finn et al. "Model-Agnostic Meta-Learning." ICML 2017; Z. Li et al. "Meta-SGD."
2017 (learned per-dimension step sizes); D. Liang et al. "Variational Autoencoders for
Collaborative Filtering." WWW 2018 (multinomial likelihood over the catalog); S. Jean et al.
ACL 2015, X. Yi et al. RecSys 2019 (sampled softmax with the logQ correction).

The model (``model=set_encoder``, capability ``catalog``) reads each task's support set into a
user state ``u [B, d]`` (pooled support-item embeddings). This algorithm takes ``inner_steps``
Meta-SGD steps on ``u`` only, ``u <- u - exp(log_lr) * grad_u L_support(u)`` with meta-learned
per-dimension ``log_lr [d]``, and meta-trains everything end-to-end on the query loss (second
order through the steps is cheap: ``u`` is ``[B, d]``). All tasks of a batch at once.

**Catalog softmax** (:func:`catalog_softmax_loss`). With excluded items ``X`` and positives
``P``, positive ``q`` costs ``-s_q + log sum_{i in catalog - X, or i = q} exp(s_i)``: the item
against every item the user could still be recommended, as under ``evaluator=all_unseen``; a
task's loss is the mean over ``P``, a batch's the mean over tasks with a positive (``weighting:
task``) or over positives (``positive``: a task weighs its number of positives). Outer loss:
``P`` = the query items rated ``>= positive_threshold`` (every row with ``null``: implicit data)
plus, with ``dropped: target | protocol``, the support rows the episode hid; ``X`` = the
episode's support, or with ``protocol`` every item the user rated (each positive keeps itself).
Inner loss: the support's positives, each against the catalog minus the other support items.
``n_negatives`` replaces the catalog by that many items shared by the batch, drawn ``~ (count +
1)^sampling_exponent``, logits ``s_i - log(n_negatives q_i)`` (:func:`sampled_softmax_loss`).

**Episodes with random k.** Meta-train supports are cut to ``k ~ Uniform{k_min..min(k_max, n)}``
random rows (:func:`subsample_support`, a CPU generator seeded by ``seed``), so small-k users
are trained for; validation and test use the support as given. Hidden rows are extra targets
(``dropped: target``: random items of the same user, as the query is), extra targets scored as
the evaluation scores the query (``protocol``), or only leave the softmax (``exclude``).

**Zero-shot term.** With ``zero_shot_weight > 0`` every episode also scores its user with an
empty support (the model's ``k = 0`` answer: the no-support state, the user's own fields, the
item priors) on all of the user's positives, and adds that loss times the weight: the ``k = 0``
answer is trained on every user, not only on the rare ``k = 0`` episodes (``X`` as the outer
loss's; ``zero_shot_min_ratings`` keeps only users with as many ratings as the evaluated ones).

**Item-item term.** A model with ``support_scores`` (``model.item_item: true``) adds per-item
scores computed from the support alone; they take no inner step (only ``u`` does), its
``penalty()`` is added to the meta-objective, and ``item_item_lr`` gives its weights their own
learning rate.

**Popularity prior.** ``meta_step`` adds each meta-train task's support and query items to the
model's ``item_count`` buffer once (``batch.task_index``): from the end of the first epoch (the
first validation) it holds every meta-train interaction (``count: positive``: every positive).
Validation/test tasks are never counted.

Scores rank, they are not ratings (``predicts_ratings = False``): monitor a ranking metric,
e.g. ``trainer.monitor=val/ndcg_at_10``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.algos.base import AdaptedScorer, MetaAlgorithm
from metarec_runner.algos.catalog_softmax import (
    WEIGHTINGS,
    catalog_softmax_loss,
    sampled_softmax_loss,
    subsample_support,
    task_weights,
)
from metarec_runner.algos.compat import check_compatible
from metarec_runner.errors import (
    ConfigError,
    require_choice,
    require_non_negative,
    require_positive,
)
from metarec_runner.tasks.taskset import TaskBatch

DROPPED = ("target", "exclude", "protocol")
"""What an episode does with the support rows it hides: score them as extra positives, only
remove them from the softmax, or ``protocol``: score them as extra positives, each against the
catalog minus every other item the user rated (support and query): the evaluation's candidate
set (``evaluator=all_unseen`` never ranks an item the user rated outside the query)."""


class _StepSizes(nn.Module):
    """Meta-SGD's per-dimension log step sizes of the inner steps on ``u``, and the log of the
    pseudo-count ``mu`` that shrinks a step on ``n`` support positives by ``n / (n + mu)``."""

    def __init__(self, dim: int, lr: float, shrinkage: float) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.full((dim,), math.log(lr)))
        self.log_shrinkage = nn.Parameter(torch.tensor(math.log(shrinkage))) if shrinkage > 0 else None


class SetRanker(MetaAlgorithm):
    """Meta-SGD on a set encoder's user vector, meta-trained with a catalog softmax.

    Args:
        model: a model with the ``catalog`` capability (``model=set_encoder``).
        meta_optimizer: a partial ``torch.optim`` constructor; it gets the model's parameters
            and the step sizes.
        positive_threshold: ratings ``>=`` this are positives (null: every row is, implicit data).
        inner_steps: Meta-SGD steps on ``u`` during meta-training (0 = the pooled state as is).
        eval_inner_steps: steps at validation/test time (null = ``inner_steps``).
        inner_lr: initial value of every per-dimension step size.
        step_shrinkage: initial ``mu`` (learned): a step on ``n`` support positives is scaled
            by ``n / (n + mu)``, so one rated item moves the user less than many; 0 = off.
        first_order: drop the second-order terms of the inner steps.
        subsample: cut meta-train support sets to a random ``k`` (episodes with random k).
        k_min, k_max: the range of ``k`` (``k_max`` null = up to the whole support set).
        dropped: ``target`` | ``exclude`` | ``protocol`` (see :data:`DROPPED`).
        n_negatives: null = full softmax over the catalog; else sampled softmax with this many
            shared negatives per batch.
        sampling_exponent: negatives drawn ``~ (count + 1)^exponent`` (0 = uniform).
        zero_shot_weight: weight of the zero-shot term (see the module docstring); 0 = off.
        zero_shot_min_ratings: the zero-shot term counts only meta-train users with at least this
            many ratings (e.g. the splitter's ``min_interactions``, the evaluated users'); 0 or
            null = all.
        weighting: ``task`` | ``positive``: a batch's loss is the mean over its tasks, or over
            its positives (:func:`~metarec_runner.algos.catalog_softmax.task_weights`).
        count: ``all`` | ``positive``: which meta-train rows the popularity prior counts (every
            interaction, or only the positives, what the softmax's targets are).
        item_item_lr: learning rate of the model's item-item weights (null = the optimizer's).
        seed: seeds the episode sampling and the negatives.
    """

    #: the catalog softmax scores every item for a batch of users (``algos.compat``)
    requires: ClassVar[frozenset[str]] = frozenset({"catalog"})
    #: named in ``uses`` too, so the compatibility check suggests ``algo=set_ranker`` to a user
    #: of a catalog model with another algorithm
    uses: ClassVar[frozenset[str]] = frozenset({"catalog"})
    #: ranking scores, not ratings: RMSE/MAE are not reported
    predicts_ratings = False
    #: meta-trained in epochs by the runner
    fits_once = False

    def __init__(self, model: nn.Module, meta_optimizer: Callable[..., torch.optim.Optimizer],
                 positive_threshold: float | None = 4.0, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, inner_lr: float = 0.1,
                 step_shrinkage: float = 1.0,
                 first_order: bool = False, subsample: bool = True, k_min: int = 0,
                 k_max: int | None = 20, dropped: str = "target", n_negatives: int | None = None,
                 sampling_exponent: float = 0.75, zero_shot_weight: float = 0.0,
                 zero_shot_min_ratings: int | None = 0,
                 item_item_lr: float | None = None, weighting: str = "task", count: str = "all",
                 seed: int = 0) -> None:
        # MetaAlgorithm.__init__ is not called: its optimizer would miss the step sizes
        self.model, self.scope, self.touched_rows, self.loss = model, "all", False, "softmax"
        check_compatible(self, model)
        require_non_negative("inner_steps", inner_steps)
        if eval_inner_steps is not None:
            require_non_negative("eval_inner_steps", eval_inner_steps)
        require_positive("inner_lr", inner_lr)
        require_non_negative("step_shrinkage", step_shrinkage)
        require_non_negative("k_min", k_min)
        if k_max is not None:
            require_positive("k_max", k_max)
        require_choice("dropped", dropped, DROPPED)
        if n_negatives is not None:
            require_positive("n_negatives", n_negatives)
        require_non_negative("zero_shot_weight", zero_shot_weight)
        require_non_negative("zero_shot_min_ratings", zero_shot_min_ratings or 0)
        require_choice("count", count, ("all", "positive"))
        require_choice("weighting", weighting, WEIGHTINGS)
        self.count, self.weighting = count, weighting
        if item_item_lr is not None:
            require_positive("item_item_lr", item_item_lr)
        self.item_item = getattr(model, "item_item", None)  # W [n_items, n_items] or None
        if self.item_item is not None and n_negatives is not None:
            raise ConfigError("n_negatives", "the item-item term needs the full softmax; set "
                              "algo.n_negatives=null or model.item_item=false")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")
        self.threshold = None if positive_threshold is None else float(positive_threshold)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = int(inner_steps if eval_inner_steps is None else eval_inner_steps)
        self.first_order = bool(first_order)
        self.subsample, self.k_min = bool(subsample), int(k_min)
        self.k_max = None if k_max is None else int(k_max)
        self.dropped = dropped
        self.n_negatives = None if n_negatives is None else int(n_negatives)
        self.sampling_exponent = float(sampling_exponent)
        self.zero_shot_weight = float(zero_shot_weight)
        self.zero_shot_min_ratings = int(zero_shot_min_ratings or 0)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        first = next(model.parameters())
        self.net = _StepSizes(model.dim, float(inner_lr), float(step_shrinkage)).to(
            device=first.device, dtype=first.dtype)
        self.seen = torch.zeros(0, dtype=torch.bool)  # meta-train task positions counted
        rest = [p for p in [*model.parameters(), *self.net.parameters()] if p is not self.item_item]
        groups = [{"params": rest}]
        if self.item_item is not None:
            groups.append({"params": [self.item_item]} if item_item_lr is None else
                          {"params": [self.item_item], "lr": float(item_item_lr)})
        try:
            self.optimizer = meta_optimizer(params=groups)
        except ValueError as e:
            raise ConfigError("meta_optimizer", f"{e}; fix the value under meta_optimizer") from None

    # -- pieces ------------------------------------------------------------------------------
    def positives(self, y: Tensor, mask: Tensor) -> Tensor:
        """Bool ``[B, L]``: real rows that are positives."""
        return mask if self.threshold is None else mask & (y >= self.threshold)

    def count_items(self, batch: TaskBatch) -> None:
        """Add the batch's not-yet-counted meta-train tasks (support + query) to ``item_count``."""
        idx = batch.task_index.cpu()
        if not batch.size:
            return
        grow = int(idx.max()) + 1 - self.seen.shape[0]
        if grow > 0:
            self.seen = torch.cat([self.seen, self.seen.new_zeros(grow)])
        new = ~self.seen[idx]
        if not bool(new.any()):
            return
        self.seen[idx[new]] = True
        new = new.to(batch.support_x.device)
        items = torch.cat([batch.support_x[..., -1], batch.query_x[..., -1]], 1)[new]
        mask = torch.cat([batch.support_mask, batch.query_mask], 1)[new]
        if self.count == "positive":
            y = torch.cat([batch.support_y, batch.query_y], 1)[new]
            mask = self.positives(y, mask)
        self.model.add_item_counts(items[mask])

    def loss_of(self, state: Tensor, user_rows: Tensor, pos_items: Tensor, pos_mask: Tensor,
                excl_items: Tensor, excl_mask: Tensor, negatives: Tensor | None = None,
                extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-task softmax loss ``[B]`` and whether the task has a positive, for states ``[B, d]``
        (``extra [B, n_items]``: the item-item term, or None)."""
        model = self.model
        if negatives is None:
            scores = model.catalog_scores(state, user_rows, extra) if extra is not None else \
                model.catalog_scores(state, user_rows)
            excluded = torch.zeros_like(scores, dtype=torch.bool)
            rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(-1).expand_as(excl_items)
            excluded[rows[excl_mask], excl_items[excl_mask]] = True
            return catalog_softmax_loss(scores, pos_items, pos_mask, excluded)
        log_q = self.sampling_exponent * torch.log1p(model.item_count)
        log_q = torch.log_softmax(log_q, 0)
        user = state + model.user_vector(user_rows)
        return sampled_softmax_loss(user, model.output_weight, model.item_offset(), pos_items,
                                    pos_mask, excl_items, excl_mask, negatives, log_q)

    def draw_negatives(self, device: torch.device) -> Tensor | None:
        """``n_negatives`` item codes for one batch (None: full softmax)."""
        if self.n_negatives is None:
            return None
        q = (self.model.item_count.detach().double().cpu() + 1.0).pow(self.sampling_exponent)
        return torch.multinomial(q, self.n_negatives, replacement=True,
                                 generator=self.generator).to(device)

    def inner_loop(self, state: Tensor, batch: TaskBatch, keep: Tensor, user_rows: Tensor,
                   steps: int, create_graph: bool, negatives: Tensor | None = None,
                   extra: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``steps`` Meta-SGD steps on states ``[B, d]`` on the kept support rows ``keep [B, S]``.

        Returns ``(adapted states [B, d], support loss [B] before the first step or None)``."""
        items = batch.support_x[..., -1]
        pos = self.positives(batch.support_y, keep)
        if not bool(pos.any()):  # no support positive anywhere: every gradient is zero
            return state, (state.new_zeros(state.shape[0]) if steps else None)
        lr = torch.exp(self.net.log_lr)  # [d]
        if self.net.log_shrinkage is not None:
            n = pos.sum(-1, keepdim=True).to(lr.dtype)
            lr = lr * n / (n + torch.exp(self.net.log_shrinkage))  # [B, d]
        first = None
        for _ in range(steps):
            if not state.requires_grad:
                state = state.detach().requires_grad_(True)
            loss, _ = self.loss_of(state, user_rows, items, pos, items, keep, negatives, extra)
            first = loss.detach() if first is None else first
            (grad,) = torch.autograd.grad(loss.sum(), state, create_graph=create_graph)
            state = state - lr * grad
        return state, first

    # -- the MetaAlgorithm interface ---------------------------------------------------------
    def support_scores(self, batch: TaskBatch, keep: Tensor) -> Tensor | None:
        """The model's support-dependent per-item scores ``[B, n_items]`` (item-item term,
        zero-shot correction) of the kept support rows, or None. User fields are read from each
        task's first query row (constant within a user task; no item of it is read)."""
        if not getattr(self.model, "has_support_scores", False):
            return None
        return self.model.support_scores(batch.support_x, batch.support_y, keep, batch.query_x[:, 0])

    def zero_shot_loss(self, batch: TaskBatch, user_rows: Tensor) -> tuple[Tensor, Tensor]:
        """The ``k = 0`` answer's loss ``[B]`` on all of each user's positives (support and query),
        and the tasks' weights (:func:`task_weights`). Excluded: nothing, or with ``dropped:
        protocol`` every other item the user rated."""
        empty = batch.support_mask[:, :0]
        state = self.model.encode_support(batch.support_x[:, :0], batch.support_y[:, :0], empty)  # [B, d]
        extra = self.support_scores(replace(batch, support_mask=empty, support_x=batch.support_x[:, :0],
                                            support_y=batch.support_y[:, :0]), empty)
        items = torch.cat([batch.query_x[..., -1], batch.support_x[..., -1]], 1)
        pos = torch.cat([self.positives(batch.query_y, batch.query_mask),
                         self.positives(batch.support_y, batch.support_mask)], 1)
        rated = torch.cat([batch.query_mask, batch.support_mask], 1)
        if self.dropped == "protocol":  # every rated item out, each positive keeps itself
            loss, has = self.loss_of(state, user_rows, items, pos, items, rated, None, extra)
        else:
            loss, has = self.loss_of(state, user_rows, items, pos, items[:, :0], rated[:, :0], None, extra)
        weight = task_weights(pos, has, self.weighting, loss.dtype)
        if self.zero_shot_min_ratings:  # only users like the evaluated ones (>= that many ratings)
            weight = weight * (rated.sum(-1) >= self.zero_shot_min_ratings).to(weight.dtype)
        return loss, weight

    def episode_loss(self, batch: TaskBatch, keep: Tensor,
                     negatives: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The meta-objective's terms for an episode that keeps support rows ``keep [B, S]``.

        Returns:
            ``(query loss [B], task weight [B] (:func:`task_weights`; 0 = no positive), support
            loss [B] before the inner steps or None)``, differentiable w.r.t. the model and the
            step sizes.
        """
        mask = batch.support_mask
        user_rows = batch.query_x[:, 0]  # user fields from a query row: every task has one, k = 0 too
        state = self.model.encode_support(batch.support_x, batch.support_y, keep)
        extra = self.support_scores(batch, keep)
        state, support_loss = self.inner_loop(state, batch, keep, user_rows, self.inner_steps,
                                              not self.first_order, negatives, extra)
        q_items, s_items = batch.query_x[..., -1], batch.support_x[..., -1]
        pos_items, pos = q_items, self.positives(batch.query_y, batch.query_mask)
        excl = keep
        excl_items = s_items
        if self.dropped in ("target", "protocol"):
            pos_items = torch.cat([q_items, s_items], 1)
            pos = torch.cat([pos, self.positives(batch.support_y, mask & ~keep)], 1)
        if self.dropped == "exclude":
            excl = mask
        elif self.dropped == "protocol":  # every rated item out, each positive keeps itself
            excl_items, excl = pos_items, torch.cat([batch.query_mask, mask], 1)
        loss, has = self.loss_of(state, user_rows, pos_items, pos, excl_items, excl, negatives, extra)
        return loss, task_weights(pos, has, self.weighting, loss.dtype), support_loss

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        self.count_items(batch)
        mask = batch.support_mask
        keep = subsample_support(mask, self.generator, self.k_min, self.k_max) if self.subsample else mask
        loss, has, support_loss = self.episode_loss(batch, keep, self.draw_negatives(mask.device))
        objective = (loss * has).sum() / has.sum().clamp_min(1)  # weighted mean over the tasks
        out = {"loss": objective.item(), "support_k": keep.sum(-1).double().mean().item()}
        if self.zero_shot_weight:
            zero, zero_has = self.zero_shot_loss(batch, batch.query_x[:, 0])
            zero = (zero * zero_has).sum() / zero_has.sum().clamp_min(1)
            objective = objective + self.zero_shot_weight * zero
            out["zero_shot_loss"] = zero.item()
        if hasattr(self.model, "penalty"):
            objective = objective + self.model.penalty()
        self._outer_update(objective)
        if support_loss is not None:
            out["support_loss"] = support_loss.mean().item()
        return out

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        """Each task's state from its whole support set, then ``eval_inner_steps`` steps (full
        catalog softmax even with ``n_negatives``: evaluation scores the catalog anyway, and no
        random draw makes the result depend on what ran before)."""
        with torch.no_grad():
            state = self.model.encode_support(batch.support_x, batch.support_y, batch.support_mask)
            extra = self.support_scores(batch, batch.support_mask)
        if self.eval_inner_steps and batch.support_x.shape[1]:
            with torch.enable_grad():  # support rows carry the user's own fields
                state, _ = self.inner_loop(state, batch, batch.support_mask, batch.support_x[:, 0],
                                           self.eval_inner_steps, False, None, extra)
        params = {"state": state.detach()}
        if extra is not None:
            params["extra"] = extra.detach()
        return AdaptedScorer(self, params)

    def predict(self, params: dict[str, Tensor] | None, x: Tensor) -> Tensor:
        if params is None:
            return self.model(x)
        if "extra" in params:
            return self.model.score(params["state"], x, params["extra"])
        return self.model.score(params["state"], x)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "net": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "seen": self.seen.clone(),
                "generator": self.generator.get_state().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.seen = state["seen"].clone()
        self.generator.set_state(state["generator"])
