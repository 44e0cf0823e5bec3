"""Non-learning reference scorers that run through the same runner and evaluator as every model.

Under query-only candidates with heavily tied ratings and position tie-breaking, ranking metrics
have a high floor (see ``/work/shared/design/protocols.md`` section A); these scorers put numbers
on it for the exact tasks a model is scored on:

- :class:`RandomScorer`: i.i.d. uniform scores (the chance level).
- :class:`ConstantScorer`: one score for every item (how much the protocol rewards ties).
- :class:`OracleScorer`: the true ratings (the ceiling of ranking metrics).
- :class:`Popularity`: the item's number of meta-train interactions.
- :class:`ItemMean`: the item's mean meta-train rating, optionally shrunk to the global mean.

None of them trains the model: ``model`` is kept only because the runner and evaluator read
``algo.model`` (its ``train()``/``eval()`` and its parameters' dtype). None needs an optimizer,
so :meth:`MetaAlgorithm.__init__` is not called and no ``meta_optimizer`` is configured.

Scores are computed from the item id, the LAST column of every feature row
(``InteractionData.feature_rows``).

Every scorer here is **fitted once** (``fits_once = True``): the runner calls
:meth:`ReferenceScorer.fit` on the meta-train TaskSet, then validates and tests; there is no
epoch loop and no early stopping. Counting (``Popularity``, ``ItemMean``,
``ConstantScorer(value=None)``) uses every support and query rating of the meta-train tasks,
each task counted ONCE (a mask of the task positions already counted, ``batch.task_index``,
makes ``meta_step`` on the same task a no-op, so counting through ``meta_step`` batches gives
the same numbers as ``fit``). The counts, the mask and the generator state live in
``state_dict()`` as tensors. Call :meth:`reset` before fitting the same object on a different
meta-train TaskSet (task positions would collide).

``predicts_ratings`` says whether a scorer's scores are ratings: the evaluator reports RMSE/MAE
only for those (item mean, the constant at the training mean, the oracle's true ratings), never
for counts (popularity) or noise (random).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarec_runner.algos.base import AdaptedScorer, MetaAlgorithm
from metarec_runner.algos.functional import masked_loss
from metarec_runner.errors import ConfigError, TrainingError, require_non_negative
from metarec_runner.evaluate.references import constant_scores, random_scores, unknown_score
from metarec_runner.tasks.taskset import TaskBatch, TaskSet


def _item_ids(x: Tensor) -> Tensor:
    """Item codes ``[B, L]`` of feature rows ``x [B, L, F]`` (the last column)."""
    return x[..., -1]


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _grow(t: Tensor, size: int) -> Tensor:
    """``t`` zero-padded to at least ``size`` entries along dim 0."""
    if t.shape[0] >= size:
        return t
    return torch.cat([t, t.new_zeros(size - t.shape[0], *t.shape[1:])])


class ReferenceScorer(MetaAlgorithm):
    """Base class of the reference scorers: no optimizer, no adaptation, tensor state.

    Subclasses define :meth:`scores` (``x [B, L, F] -> [B, L]``) and, if they learn anything
    from the meta-train tasks, :meth:`meta_step`.
    """

    adapts = False
    #: fitted by one call of :meth:`fit` on the meta-train tasks: no epoch loop, no early stopping
    fits_once = True
    #: whether the scores are rating predictions (RMSE/MAE are reported only then)
    predicts_ratings = False
    #: meta-train tasks per batch in :meth:`fit`
    fit_batch_size = 512

    def __init__(self, model: nn.Module) -> None:
        # MetaAlgorithm.__init__ is not called: there is no optimizer to build
        self.model = model
        self.scope = "all"
        self.optimizer = None

    # the runner calls these -------------------------------------------------------------
    def fit(self, train: TaskSet) -> None:
        """Learn whatever the scorer learns from the meta-train tasks, once: every task's
        support and query rows, in batches of :attr:`fit_batch_size` tasks (CPU)."""
        for chunk in torch.arange(len(train)).split(self.fit_batch_size):
            self.observe(train.batch(chunk))

    def observe(self, batch: TaskBatch) -> None:
        """Learn from one batch of meta-train tasks (nothing, for stateless scorers)."""

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        return {"loss": 0.0}

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        return AdaptedScorer(self, None)

    def predict(self, params, x: Tensor) -> Tensor:
        return self.scores(x).to(_dtype(self.model))

    def scores(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def reset(self) -> None:
        """Forget everything learned in ``meta_step`` (nothing for stateless scorers)."""

    def _batch_loss(self, batch: TaskBatch) -> float:
        """Mean over tasks of the MSE of :meth:`scores` on the batch's real support and query rows."""
        x = torch.cat([batch.support_x, batch.query_x], 1)
        y = torch.cat([batch.support_y, batch.query_y], 1)
        mask = torch.cat([batch.support_mask, batch.query_mask], 1)
        return float(masked_loss(self.scores(x).to(y.dtype), y, mask).mean())


class RandomScorer(ReferenceScorer):
    """I.i.d. uniform scores in ``[0, 1)`` (chance level for ranking metrics).

    Draws come from one CPU ``torch.Generator`` seeded with ``seed`` (CPU so that the same seed
    gives the same scores on every device). Every evaluation pass starts from the same generator
    state: when ``adapt`` sees a batch whose first task is position 0 of its TaskSet (the
    evaluator's first batch), the generator is re-seeded with ``seed``. So the test scores do not
    depend on how many validation passes came before, and the same seed always gives the same
    scores for the same tasks. Rating metrics (RMSE/MAE) of these scores are meaningless.

    Args:
        model: kept for the runner (dtype); not used.
        seed: generator seed.
    """

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__(model)
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        if batch.size and int(batch.task_index[0]) == 0:
            self.generator.manual_seed(self.seed)
        return AdaptedScorer(self, None)

    def scores(self, x: Tensor) -> Tensor:
        return random_scores(x.shape[:2], self.generator, torch.float64).to(x.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class _CountingScorer(ReferenceScorer):
    """Per-item interaction counts and rating sums over the meta-train tasks, each task once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.reset()

    def reset(self) -> None:
        self.seen = torch.zeros(0, dtype=torch.bool)  # [T] meta-train task positions counted
        self.count = torch.zeros(0, dtype=torch.float64)  # [n_items] interactions per item
        self.rating_sum = torch.zeros(0, dtype=torch.float64)  # [n_items] sum of their ratings

    def _count(self, batch: TaskBatch) -> None:
        """Add the batch's not-yet-counted tasks (support + query rows) to the counts."""
        device = batch.support_x.device
        idx = batch.task_index.to(device)
        self.seen = _grow(self.seen.to(device), int(idx.max()) + 1 if batch.size else 0)
        new = ~self.seen[idx]  # [B]
        if not bool(new.any()):
            return
        self.seen[idx[new]] = True
        items = torch.cat([_item_ids(batch.support_x), _item_ids(batch.query_x)], 1)[new]
        ratings = torch.cat([batch.support_y, batch.query_y], 1)[new].double()
        mask = torch.cat([batch.support_mask, batch.query_mask], 1)[new]
        items, ratings = items[mask], ratings[mask]
        if items.numel() == 0:
            return
        size = int(items.max()) + 1
        self.count = _grow(self.count.to(device), size)
        self.rating_sum = _grow(self.rating_sum.to(device), size)
        self.count.index_add_(0, items, torch.ones_like(ratings))
        self.rating_sum.index_add_(0, items, ratings)

    def _lookup(self, table: Tensor, items: Tensor, default: float | Tensor) -> Tensor:
        """``table[items]``, ``default`` for items beyond the table (never seen)."""
        table = table.to(items.device)
        known = items < table.shape[0]
        safe = torch.where(known, items, torch.zeros_like(items))
        if not table.numel():
            vals = torch.zeros(items.shape, dtype=table.dtype, device=items.device)
        else:
            vals = table[safe]
        fill = torch.as_tensor(default, dtype=table.dtype, device=items.device)
        return torch.where(known, vals, fill)

    @property
    def global_mean(self) -> float:
        """Mean of every counted rating (0.0 before anything was counted)."""
        n = float(self.count.sum())
        return float(self.rating_sum.sum()) / n if n > 0 else 0.0

    def observe(self, batch: TaskBatch) -> None:
        self._count(batch)

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        self._count(batch)
        return {"loss": self._batch_loss(batch)}

    def state_dict(self) -> dict:
        return {"seen": self.seen.clone(), "count": self.count.clone(),
                "rating_sum": self.rating_sum.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"].clone()
        self.count = state["count"].clone()
        self.rating_sum = state["rating_sum"].clone()


class ConstantScorer(_CountingScorer):
    """The same score for every item.

    Every ranking is a full tie, which the evaluator breaks in a seeded random order: its
    ranking metrics are those of a random ranking. With ``value=None`` (the default) it
    predicts the meta-train mean rating, and its RMSE/MAE are the "global mean" baseline.

    Args:
        model: kept for the runner (dtype); not used.
        value: the score; ``None`` = the mean of every meta-train rating (support and query,
            learned in :meth:`fit`; 0.0 before it), which makes its RMSE the "global mean"
            rating baseline.
    """

    def __init__(self, model: nn.Module, value: float | None = None) -> None:
        super().__init__(model)
        if value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError("value", f"must be a number or null, got {value!r}") from None
            if not torch.isfinite(torch.tensor(value)):
                raise ConfigError("value", f"must be finite, got {value!r}")
        self.value = value

    @property
    def predicts_ratings(self) -> bool:
        """Only the training mean is a rating prediction (a fixed ``value`` is an arbitrary score)."""
        return self.value is None

    @property
    def score(self) -> float:
        """The score given to every item."""
        return self.global_mean if self.value is None else self.value

    def scores(self, x: Tensor) -> Tensor:
        return constant_scores(x.shape[:2], self.score, torch.float64, x.device)


class Popularity(_CountingScorer):
    """Score = the number of meta-train interactions (support + query) of the item; 0 if never
    seen. RMSE/MAE of these scores are meaningless (counts are not ratings).

    Args:
        model: kept for the runner (dtype); not used.
    """

    def scores(self, x: Tensor) -> Tensor:
        return self._lookup(self.count, _item_ids(x), 0.0)


class ItemMean(_CountingScorer):
    """Score = the item's mean meta-train rating, shrunk towards the global mean.

    ``(sum_i + shrinkage * mu) / (count_i + shrinkage)`` with ``mu`` the mean of all meta-train
    ratings; items never seen get ``mu``.

    Args:
        model: kept for the runner (dtype); not used.
        shrinkage: pseudo-count of global-mean ratings added to every item (>= 0).
    """

    predicts_ratings = True

    def __init__(self, model: nn.Module, shrinkage: float = 0.0) -> None:
        super().__init__(model)
        require_non_negative("shrinkage", shrinkage)
        self.shrinkage = float(shrinkage)

    def item_means(self) -> Tensor:
        """``[n_items]`` shrunk means of every item id up to the largest one seen."""
        mu = self.global_mean
        den = self.count + self.shrinkage
        num = self.rating_sum + self.shrinkage * mu
        return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, mu))

    def scores(self, x: Tensor) -> Tensor:
        return self._lookup(self.item_means(), _item_ids(x), self.global_mean)


class OracleScorer(ReferenceScorer):
    """Score = the true rating: the ceiling of ranking metrics under query-only candidates.

    ``adapt(batch)`` keeps a lookup table of every (task, item) rating in the batch's query and
    support sets (the query rating wins if an item is in both); ``predict(x)`` returns, for each
    row of ``x [B, L, F]`` (task ``b`` = row ``b`` of the batch), the rating of its item in task
    ``b``. Any item whose rating the task does not know (an unrated candidate under full or
    sampled ranking, or padding) scores one below the lowest known rating (and below 0), so the
    oracle ranks every rated query item first: the ceiling of ranking metrics under every
    protocol.

    Args:
        model: kept for the runner (dtype); not used.
    """

    #: its query scores are the true ratings: RMSE 0, the ceiling
    predicts_ratings = True

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        items = torch.cat([_item_ids(batch.query_x), _item_ids(batch.support_x)], 1)  # query first
        ratings = torch.cat([batch.query_y, batch.support_y], 1)
        mask = torch.cat([batch.query_mask, batch.support_mask], 1)
        task = torch.arange(batch.size, device=items.device)[:, None].expand_as(items)
        stride = int(items.max()) + 1 if items.numel() else 1
        keys = (task * stride + items)[mask]
        keys, order = torch.sort(keys, stable=True)  # stable: a query rating precedes a support one
        table = {"keys": keys, "ratings": ratings[mask][order],
                 "stride": torch.tensor(stride), "tasks": torch.tensor(batch.size)}
        return AdaptedScorer(self, table)

    def predict(self, params, x: Tensor) -> Tensor:
        if params is None:
            raise TrainingError("the oracle scores only through adapt(batch).predict(x): it needs "
                                "the batch's true ratings")
        keys, ratings = params["keys"], params["ratings"]
        stride, tasks = int(params["stride"]), int(params["tasks"])
        if x.shape[0] != tasks:
            raise TrainingError(
                f"the oracle was adapted on {tasks} tasks but asked to score {x.shape[0]}")
        items = _item_ids(x)
        task = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(items)
        query = task * stride + items.clamp(max=stride - 1)
        pos = torch.searchsorted(keys, query).clamp(max=max(keys.numel() - 1, 0))
        found = (items < stride) & (keys.numel() > 0)
        if keys.numel():
            found = found & (keys[pos] == query)
        if not keys.numel():  # nothing rated: every row is padding
            return torch.zeros(items.shape, dtype=_dtype(self.model), device=x.device)
        lowest = unknown_score(ratings).to(ratings.dtype)  # below every rated item
        out = torch.where(found, ratings[pos], lowest)
        return out.to(_dtype(self.model))
