"""What every algorithm shares: the model, the outer optimizer, the adaptation scope.

An algorithm owns only its update rules: ``meta_step(batch)`` (one outer update on a meta-batch)
and ``adapt(batch)`` (per-task fast weights from the support sets, returned as a scorer). The
runner owns epochs, devices, seeding and tracking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.algos.compat import check_compatible
from metarec_runner.algos.functional import LOSSES, FastWeights, masked_loss
from metarec_runner.algos.inner_loop import (
    InnerLoop,
    StepSize,
    check_fast_path,
    check_touched_rows,
    choose_inner_loop,
)
from metarec_runner.errors import (
    ConfigError,
    require_choice,
    require_non_negative,
    require_positive,
)
from metarec_runner.tasks.taskset import TaskBatch

SCOPES = ("head", "all")
"""``head``: adapt the MLP only, on precomputed embeddings (MeLU's local update, ANIL).
``all``: adapt every parameter, embedding tables included (on each task's touched rows only,
see ``algos.touched``, with ``touched_rows``)."""

AUX_LOSSES = ("none", "support")
"""Auxiliary meta-objective terms: ``support`` = the base model's loss on the support sets
before adaptation (a global-model regulariser), weighted by ``aux_weight``."""

__all__ = ["AdaptedScorer", "FastWeights", "MetaAlgorithm", "SupportSGD", "split_by_support_size"]


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


def _min_padding_cuts(sizes: Tensor, groups: int) -> list[int]:
    """Cut ascending ``sizes [B]`` into ``groups`` contiguous runs with the fewest padded rows.

    A run costs ``len(run) * max(run)``; cuts fall only between distinct sizes. Dynamic
    programming over the ``m`` distinct sizes (``O(groups m^2)``, vectorised).

    Returns:
        End positions of the runs (the last is ``B``); fewer runs if ``sizes`` has fewer than
        ``groups`` distinct values.
    """
    values, counts = torch.unique_consecutive(sizes.cpu(), return_counts=True)  # tiny: plan on CPU
    m = values.shape[0]
    groups = max(1, min(groups, m))
    pos = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).double()  # boundaries [m + 1]
    # span[i, j]: cost of one run from boundary i to boundary j + 1 (inf unless i <= j)
    span = (pos[None, 1:] - pos[:-1, None]) * values.double()[None, :]
    span = span.masked_fill(torch.ones(m, m, dtype=torch.bool).tril(-1), float("inf"))
    cost = torch.full((m + 1,), float("inf"), dtype=torch.float64)
    cost[0] = 0.0  # cost[j]: fewest padded rows for the sizes before boundary j
    back = []
    for _ in range(groups):
        best, arg = (cost[:-1, None] + span).min(0)
        cost = torch.cat([cost.new_full((1,), float("inf")), best])
        back.append(arg)
    cuts, j = [], m
    for arg in reversed(back):
        cuts.append(int(pos[j]))
        j = int(arg[j - 1])
    return cuts[::-1]


def split_by_support_size(batch: TaskBatch, chunks: int) -> list[TaskBatch]:
    """Split a meta-batch into groups of tasks with similar support sizes.

    Tasks are sorted by support size and cut into ``min(chunks, distinct sizes)`` runs that
    minimise the padded support rows; each group is padded only to its own longest support
    and query set, so batched work on the groups wastes less on padding than on the whole
    batch. Per-task results are unchanged.

    Args:
        batch: ``B`` padded tasks.
        chunks: the largest number of groups; 1 returns ``[batch]``.

    Returns:
        Sub-batches (shorter ``S`` and ``Q``) whose tasks together are ``batch``'s, in
        ascending support size.
    """
    if chunks <= 1 or batch.size <= 1:
        return [batch]
    support_n = batch.support_mask.sum(1)
    order = torch.argsort(support_n, stable=True)
    cuts = _min_padding_cuts(support_n[order], chunks)
    if len(cuts) == 1:
        return [batch]
    query_n = batch.query_mask.sum(1)
    out, start = [], 0
    for end in cuts:
        idx = order[start:end]
        s, q = int(support_n[idx].max()), int(query_n[idx].max())
        out.append(TaskBatch(
            batch.support_x[idx, :s], batch.support_y[idx, :s], batch.support_mask[idx, :s],
            batch.query_x[idx, :q], batch.query_y[idx, :q], batch.query_mask[idx, :q],
            batch.task_index[idx],
        ))
        start = end
    return out


class MetaAlgorithm:
    """Base class.

    Args:
        model: a model with ``body(x)`` and ``head`` (see ``models.preference``).
        meta_optimizer: a partial ``torch.optim`` constructor (Hydra ``_partial_: true``).
        adapt: adaptation scope, ``head`` or ``all``.
        touched_rows: adapt embedding tables on each task's touched rows only (``algos.touched``:
            the same numbers as full tables, no per-task table copies); with ``adapt: all`` the
            model must support it (a one-line ConfigError otherwise: set it false).
        loss: ``mse`` (ratings) or ``bce`` (0/1 labels, predictions are logits), in the inner
            and the outer loop.
        check_fast_path: debug: compare the inner loop's fast path with ``functional_call`` on
            the model's forward, in float64, on the first batch of meta-training and of
            adaptation; a TrainingError if they differ (``inner_loop.check_fast_path``).

    Attributes:
        inner_loop: the :class:`~metarec_runner.algos.inner_loop.InnerLoop` strategy, chosen
            once (on first use, after the subclass has set its step sizes); ``inner_loop.name``
            is what a run logs (:attr:`inner_loop_name`).
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
    ) -> None:
        require_choice("adapt", adapt, SCOPES)
        require_choice("loss", loss, LOSSES)
        self.model = model
        self.scope = adapt
        check_compatible(self, model)  # class attributes (algos.compat): one line if incompatible
        if self.sgd_adapts:
            check_touched_rows(model, adapt, bool(touched_rows))
        self.touched_rows = bool(touched_rows)
        self.loss = loss
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
                packed_step=self.packs_first_order_step())
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

    def check_labels(self, batch: TaskBatch) -> None:
        """``bce`` needs 0/1 labels: raise a ConfigError naming ``loss`` otherwise."""
        if self.loss != "bce":
            return
        for y, m in ((batch.support_y, batch.support_mask), (batch.query_y, batch.query_mask)):
            y = y[m]
            if y.numel() and (bool((y < 0).any()) or bool((y > 1).any())):
                raise ConfigError("loss", "bce needs labels in [0, 1], got ratings up to "
                                  f"{float(y.max()):g}; use loss=mse or binary feedback")

    def verify_inner_loop(self, path: str, batch: TaskBatch, lr: StepSize, steps: int,
                          create_graph: bool, detach: bool) -> None:
        """With ``check_fast_path``, :func:`~metarec_runner.algos.inner_loop.check_fast_path` on
        the first batch of ``path`` (``meta``: meta-training, ``adapt``: adaptation)."""
        checked = self.__dict__.setdefault("_checked_paths", set())
        if getattr(self, "check_fast_path", False) and path not in checked:
            checked.add(path)
            check_fast_path(self.inner_loop, batch, lr, steps, create_graph, detach)

    def adapt_fast(self, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
                   detach: bool) -> tuple[FastWeights, list[Tensor]]:
        """Fast weights for every task of ``batch`` after ``steps`` support SGD steps.

        Returns:
            ``(fast weights, [per-task support loss [B] before each step])``: a
            :class:`~metarec_runner.algos.functional.FastWeights` (a mapping ``{name: [B,
            *shape]}`` that applies itself: ``predict``, ``detach``, ``task_mean``).
        """
        self.verify_inner_loop("adapt", batch, lr, steps, create_graph, detach)
        return self.inner_loop.adapt(batch, lr, steps, create_graph, detach)

    def adapt_and_score(self, batch: TaskBatch, lr: StepSize, steps: int,
                        create_graph: bool) -> tuple[Tensor, list[Tensor]]:
        """Query scores ``[B, Q]`` after ``steps`` support SGD steps, differentiable w.r.t. the
        model, and ``[per-task support loss [B] before each step]`` (the numbers of
        :meth:`adapt_fast` then :meth:`predict` on ``batch.query_x``, faster)."""
        return self.inner_loop.adapt_and_score(batch, lr, steps, create_graph)

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
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def sgd_adapt(self, batch: TaskBatch, lr: StepSize, steps: int) -> AdaptedScorer:
        """Test-time adaptation: ``steps`` SGD steps on each support set, starting from the
        current weights, with no graph back to them (the model is left unchanged)."""
        with torch.enable_grad():
            fast, _ = self.adapt_fast(batch, lr, steps, create_graph=False, detach=True)
        return AdaptedScorer(self, self.inner_loop.wrap(fast).detach())

    def _outer_update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class SupportSGD(MetaAlgorithm):
    """An algorithm that adapts by SGD on each task's support set (the MAML family, Reptile).

    Args:
        model, meta_optimizer, adapt, touched_rows, loss, check_fast_path: see
            :class:`MetaAlgorithm`.
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
    ) -> None:
        super().__init__(model, meta_optimizer, adapt, touched_rows, loss, check_fast_path)
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
        per-task support loss before adaptation); differentiable w.r.t. the model."""
        pred = self.model(batch.support_x)
        return masked_loss(pred, batch.support_y, batch.support_mask, self.loss).sum()

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        return self.sgd_adapt(batch, self.inner_lr, self.eval_inner_steps)
