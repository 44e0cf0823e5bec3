"""What every algorithm shares: the model, the outer optimizer, the adaptation scope.

An algorithm owns only its update rules: ``meta_step(batch)`` (one outer update on a meta-batch)
and ``adapt(batch)`` (per-task fast weights from the support sets, returned as a scorer). The
runner owns epochs, devices, seeding and tracking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.algos.compat import check_compatible
from metarec_runner.algos.functional import LOSSES, FastWeights, TaskLoss, masked_loss
from metarec_runner.algos.inner_loop import (
    InnerLoop,
    StepSize,
    check_fast_path,
    check_touched_rows,
    choose_inner_loop,
)
from metarec_runner.algos.negatives import NegativeSampler
from metarec_runner.algos.ranking_loss import RankingObjective, ranking_objective
from metarec_runner.algos.support_groups import _min_padding_cuts, split_by_support_size
from metarec_runner.errors import (
    ConfigError,
    require_choice,
    require_non_negative,
    require_positive,
)
from metarec_runner.tasks.taskset import TaskBatch, TaskSet

if TYPE_CHECKING:
    from metarec_runner.data.interactions import FeatureSchema
    from metarec_runner.evaluate.candidates import Catalog

SCOPES = ("head", "all")
"""``head``: adapt the MLP only, on precomputed embeddings (MeLU's local update, ANIL).
``all``: adapt every parameter, embedding tables included (on each task's touched rows only,
see ``algos.touched``, with ``touched_rows``)."""

AUX_LOSSES = ("none", "support")
"""Auxiliary meta-objective terms: ``support`` = the base model's loss on the support sets
before adaptation (a global-model regulariser), weighted by ``aux_weight``."""

__all__ = ["AdaptedScorer", "FastWeights", "MetaAlgorithm", "SupportSGD", "_min_padding_cuts",
           "split_by_support_size"]


@dataclass
class AdaptedScorer:
    """Scores any items for the tasks of one batch with their adapted weights.

    ``predict(x [B, L, F]) -> [B, L]``. ``params`` is None for models that do not adapt.
    """

    algo: MetaAlgorithm
    params: FastWeights | None

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.algo.predict(self.params, x)


class MetaAlgorithm:
    """Base class.

    Args:
        model: a model with ``body(x)`` and ``head`` (see ``models.preference``).
        meta_optimizer: a partial ``torch.optim`` constructor (Hydra ``_partial_: true``).
        adapt: adaptation scope, ``head`` or ``all``.
        touched_rows: adapt embedding tables on each task's touched rows only (``algos.touched``:
            the same numbers as full tables, no per-task table copies); with ``adapt: all`` the
            model must support it (a one-line ConfigError otherwise: set it false).
        loss: ``mse`` (ratings), ``bce`` (0/1 labels, predictions are logits; with
            ``negatives``: positives against sampled negatives), ``bpr`` or ``softmax`` (ranking
            losses, ``algos.ranking_loss``), in the inner and the outer loop.
        negatives: sampled negatives of the ranking losses, ``uniform`` | ``popularity``; None =
            the loss's own (none for mse and bce, uniform for bpr and softmax).
        n_negatives: negatives per task, drawn afresh for its support and its query every step.
        positive_threshold: ranking losses: ratings ``>=`` this are positives (None: every row).
        seed: seeds the negatives (:class:`~metarec_runner.algos.ranking_loss.RankingObjective`).
        check_fast_path: debug: compare the inner loop's fast path with ``functional_call`` on
            the model's forward, in float64, on the first batch of meta-training and of
            adaptation; a TrainingError if they differ (``inner_loop.check_fast_path``).

    Attributes:
        inner_loop: the :class:`~metarec_runner.algos.inner_loop.InnerLoop` strategy, chosen
            once (on first use, after the subclass has set its step sizes); ``inner_loop.name``
            is what a run logs (:attr:`inner_loop_name`).
        ranking: the :class:`~metarec_runner.algos.ranking_loss.RankingObjective` of a loss with
            sampled negatives (None: pointwise); it needs the catalog, :meth:`bind_catalog`.
    """

    #: whether ``adapt`` changes anything (False for non-adaptive baselines)
    adapts: bool = True
    #: whether the algorithm adapts by SGD on the support sets (it has an :attr:`inner_loop`)
    sgd_adapts: ClassVar[bool] = False
    #: capabilities the model must provide (``algos.compat``; read through the MRO, so a
    #: subclass inherits them); ``adapt: head`` adds ``head``. Nothing by default (the
    #: reference scorers accept every model); gradient-based algorithms require ``rowwise``.
    requires: ClassVar[frozenset[str]] = frozenset()
    #: optional capabilities this algorithm makes use of when the model has them (``algos.compat``)
    uses: ClassVar[frozenset[str]] = frozenset()
    #: fitted by one ``fit(train)`` call instead of the runner's epoch loop (closed-form and
    #: counting scorers); trained algorithms meta-step through epochs
    fits_once: ClassVar[bool] = False
    #: whether ``predict`` returns ratings: RMSE/MAE are reported, and may be monitored, only then
    predicts_ratings: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        meta_optimizer: Callable[..., torch.optim.Optimizer],
        adapt: str = "head",
        touched_rows: bool = True,
        loss: str = "mse",
        check_fast_path: bool = False,
        negatives: str | None = None,
        n_negatives: int = 20,
        positive_threshold: float | None = None,
        seed: int = 0,
    ) -> None:
        require_choice("adapt", adapt, SCOPES)
        require_choice("loss", loss, LOSSES)
        self.model = model
        self.scope = adapt
        self.loss = loss
        self.ranking: RankingObjective | None = ranking_objective(loss, negatives, n_negatives,
                                                                  positive_threshold, seed)
        if self.ranking is not None:  # ranking scores, not ratings: RMSE/MAE are not reported
            self.predicts_ratings = False
        check_compatible(self, model)  # class attributes (algos.compat): one line if incompatible
        if self.sgd_adapts:
            check_touched_rows(model, adapt, bool(touched_rows))
        self.touched_rows = bool(touched_rows)
        self.check_fast_path = bool(check_fast_path)
        try:
            self.optimizer = meta_optimizer(params=list(model.parameters()))
        except ValueError as e:  # torch.optim validates its own arguments (lr < 0, betas, ...)
            raise ConfigError("meta_optimizer", f"{e}; fix the value under meta_optimizer") from None

    # -- the inner loop ------------------------------------------------------------------
    @property
    def touched_rows(self) -> bool:
        return self._touched_rows

    @touched_rows.setter
    def touched_rows(self, value: bool) -> None:
        self._touched_rows = bool(value)
        self._inner_loop: InnerLoop | None = None  # chosen again on next use

    def step_sizes(self) -> StepSize:
        """Inner step size(s) of meta-training (a scalar here; see :class:`SupportSGD`)."""
        return 0.0

    def packs_first_order_step(self) -> bool:
        """Whether meta-training takes one first-order inner step (``packed_first_order``)."""
        return False

    @property
    def inner_loop(self) -> InnerLoop:
        """The inner-loop strategy (see :mod:`~metarec_runner.algos.inner_loop`)."""
        if getattr(self, "_inner_loop", None) is None:
            self._inner_loop = choose_inner_loop(
                self.model, self.scope, self.loss, self.touched_rows,
                scalar_lr=not isinstance(self.step_sizes(), Mapping),
                packed_step=self.packs_first_order_step(),
                task_loss=getattr(self, "ranking", None) is not None)
        return self._inner_loop

    @property
    def inner_loop_name(self) -> str:
        """``inner_loop.name``, or ``none`` for an algorithm that does not adapt by SGD."""
        return self.inner_loop.name if self.sgd_adapts else "none"

    @property
    def adapted_module(self) -> nn.Module:
        """The module whose parameters get per-task fast weights."""
        return self.model.head if self.scope == "head" else self.model

    @property
    def uses_touched_rows(self) -> bool:
        """Whether the inner loop adapts touched rows (:mod:`metarec_runner.algos.touched`)."""
        return self.inner_loop.name == "touched_rows"

    def uses_fixed_input_path(self, lr: StepSize, support_len: int, steps: int) -> bool:
        """Whether a batch with supports of ``support_len`` rows takes the kernel form
        (``algos.fixed_input``; never with per-parameter step sizes)."""
        return self.inner_loop.uses_fixed_input(lr, support_len, steps)

    def uses_packed_first_step(self, lr: StepSize, steps: int, create_graph: bool) -> bool:
        """Whether meta-training runs on packed support rows (no grouping by support size)."""
        return not self.inner_loop.groups_pay_off(lr, steps, create_graph)

    def inputs(self, x: Tensor) -> Tensor:
        """Inputs of :attr:`adapted_module` for feature rows ``x [B, L, F]``."""
        return self.model.body(x) if self.scope == "head" else x

    def bind_catalog(self, catalog: Catalog, train: TaskSet | None = None,
                     schema: FeatureSchema | None = None) -> None:
        """Give a ranking loss the catalog its negatives come from (a no-op for pointwise losses).

        Args:
            catalog: the evaluator's :class:`~metarec_runner.evaluate.candidates.Catalog`.
            train: the meta-train tasks (``negatives: popularity`` counts their items).
            schema: the feature schema (None: ``model.schema``, which the run sets).
        """
        if getattr(self, "ranking", None) is None:  # scorers and set_ranker never set it
            return
        schema = schema if schema is not None else getattr(self.model, "schema", None)
        if schema is None:
            raise ConfigError("loss", f"loss={self.loss} needs the dataset's feature schema to find "
                              "user ids; pass schema= to bind_catalog or set model.schema")
        self.ranking.bind(NegativeSampler.build(catalog, schema, self.ranking.negatives, train))

    def check_labels(self, batch: TaskBatch) -> None:
        """``bce`` on given labels needs 0/1 labels: raise a ConfigError naming ``loss`` otherwise
        (with sampled negatives the labels come from ``positive_threshold``)."""
        if self.loss != "bce" or getattr(self, "ranking", None) is not None:
            return
        for y, m in ((batch.support_y, batch.support_mask), (batch.query_y, batch.query_mask)):
            y = y[m]
            if y.numel() and (bool((y < 0).any()) or bool((y > 1).any())):
                raise ConfigError("loss", "bce needs labels in [0, 1], got ratings up to "
                                  f"{float(y.max()):g}; use loss=mse or binary feedback")

    def verify_inner_loop(self, path: str, batch: TaskBatch, lr: StepSize, steps: int,
                          create_graph: bool, detach: bool, loss: TaskLoss | None = None,
                          query_loss: TaskLoss | None = None) -> None:
        """With ``check_fast_path``, :func:`~metarec_runner.algos.inner_loop.check_fast_path` on
        the first batch of ``path`` (``meta``: meta-training, ``adapt``: adaptation); ``loss``
        and ``query_loss``: an episode's task losses (ranking)."""
        checked = self.__dict__.setdefault("_checked_paths", set())
        if getattr(self, "check_fast_path", False) and path not in checked:
            checked.add(path)
            check_fast_path(self.inner_loop, batch, lr, steps, create_graph, detach, loss, query_loss)

    def adapt_fast(self, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
                   detach: bool, loss: TaskLoss | None = None) -> tuple[FastWeights, list[Tensor]]:
        """Fast weights for every task of ``batch`` after ``steps`` support SGD steps (``loss``:
        the support task loss, None = the pointwise ``loss``).

        Returns:
            ``(fast weights, [per-task support loss [B] before each step])``: a
            :class:`~metarec_runner.algos.functional.FastWeights` (a mapping ``{name: [B,
            *shape]}`` that applies itself: ``predict``, ``detach``, ``task_mean``).
        """
        self.verify_inner_loop("adapt", batch, lr, steps, create_graph, detach, loss)
        return self.inner_loop.adapt(batch, lr, steps, create_graph, detach, loss)

    def adapt_and_score(self, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
                        loss: TaskLoss | None = None) -> tuple[Tensor, list[Tensor]]:
        """Query scores ``[B, Q]`` after ``steps`` support SGD steps, differentiable w.r.t. the
        model, and ``[per-task support loss [B] before each step]`` (the numbers of
        :meth:`adapt_fast` then :meth:`predict` on ``batch.query_x``, faster)."""
        return self.inner_loop.adapt_and_score(batch, lr, steps, create_graph, loss)

    def predict(self, params: Mapping[str, Tensor] | None, x: Tensor) -> Tensor:
        """Scores ``[B, L]`` for rows ``x [B, L, F]`` with per-task ``params`` (None = base)."""
        if params is None:
            return self.model(x)
        return self.inner_loop.wrap(params).predict(x)

    # -- the rules an algorithm defines ---------------------------------------------------
    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        """One outer update on a meta-batch; returns scalar diagnostics (``loss`` at least)."""
        raise NotImplementedError

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        """Adapt to every task's support set; the model itself is left unchanged."""
        raise NotImplementedError

    # -- state for checkpoints and best-model restore ------------------------------------
    def state_dict(self) -> dict:
        """``model`` and ``optimizer`` (and ``negatives``, the draws' generator, with a ranking loss)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if getattr(self, "ranking", None) is not None:
            state["negatives"] = self.ranking.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if getattr(self, "ranking", None) is not None and "negatives" in state:
            self.ranking.load_state_dict(state["negatives"])

    def sgd_adapt(self, batch: TaskBatch, lr: StepSize, steps: int) -> AdaptedScorer:
        """Test-time adaptation: ``steps`` SGD steps on each support set, starting from the
        current weights, with no graph back to them (the model is left unchanged)."""
        loss = None
        if self.ranking is not None:  # the support's negatives, the same at every evaluation
            episode = self.ranking.episode(batch, self.ranking.adapt_generator(batch))
            batch, loss = episode.batch, episode.support.loss
        with torch.enable_grad():
            fast, _ = self.adapt_fast(batch, lr, steps, create_graph=False, detach=True, loss=loss)
        return AdaptedScorer(self, self.inner_loop.wrap(fast).detach())

    def _outer_update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class SupportSGD(MetaAlgorithm):
    """An algorithm that adapts by SGD on each task's support set (the MAML family, Reptile).

    Args:
        model, meta_optimizer, adapt, touched_rows, loss, check_fast_path, negatives,
            n_negatives, positive_threshold, seed: see :class:`MetaAlgorithm`.
        inner_lr: inner SGD step size.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at validation/test time (None = ``inner_steps``).
        aux_loss: ``none`` or ``support`` (see :data:`AUX_LOSSES`).
        aux_weight: weight of the auxiliary term in the meta-objective (0 = off).
    """

    sgd_adapts: ClassVar[bool] = True
    #: SGD on the support rows: the model must score rows on their own (``algos.compat``)
    requires: ClassVar[frozenset[str]] = frozenset({"rowwise"})

    def __init__(
        self,
        model: nn.Module,
        meta_optimizer: Callable[..., torch.optim.Optimizer],
        adapt: str,
        inner_lr: float,
        inner_steps: int,
        eval_inner_steps: int | None,
        touched_rows: bool = True,
        loss: str = "mse",
        aux_loss: str = "none",
        aux_weight: float = 0.0,
        check_fast_path: bool = False,
        negatives: str | None = None,
        n_negatives: int = 20,
        positive_threshold: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, meta_optimizer, adapt, touched_rows, loss, check_fast_path,
                         negatives, n_negatives, positive_threshold, seed)
        require_positive("inner_lr", inner_lr)
        require_positive("inner_steps", inner_steps)
        if eval_inner_steps is not None:
            require_positive("eval_inner_steps", eval_inner_steps)
        require_choice("aux_loss", aux_loss, AUX_LOSSES)
        require_non_negative("aux_weight", aux_weight)
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = int(eval_inner_steps or inner_steps)
        self.aux_loss = aux_loss
        self.aux_weight = float(aux_weight)

    @property
    def uses_aux(self) -> bool:
        """Whether the meta-objective has an auxiliary term."""
        return self.aux_loss != "none" and self.aux_weight > 0

    def step_sizes(self) -> StepSize:
        """Inner step size(s): the scalar ``inner_lr`` (Meta-SGD: learned per-parameter ones)."""
        return self.inner_lr

    def aux_objective(self, batch: TaskBatch) -> Tensor:
        """Sum over the ``B`` tasks of the auxiliary term (``support``: the base model's
        per-task support loss before adaptation, against fresh negatives with a ranking loss);
        differentiable w.r.t. the model."""
        if self.ranking is not None:
            episode = self.ranking.episode(batch)
            return episode.support.loss(self.model(episode.batch.support_x)).sum()
        pred = self.model(batch.support_x)
        return masked_loss(pred, batch.support_y, batch.support_mask, self.loss).sum()

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        return self.sgd_adapt(batch, self.inner_lr, self.eval_inner_steps)
