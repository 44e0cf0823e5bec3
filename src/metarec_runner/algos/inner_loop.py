"""One inner loop per algorithm: how per-task fast weights are computed and applied, chosen once.

An :class:`InnerLoop` receives the model, the adaptation scope and the loss (never the
algorithm), and runs support-set SGD for every task of a batch at once: ``adapt`` (fast weights,
a :class:`~metarec_runner.algos.functional.FastWeights`) and ``adapt_and_score`` (query scores,
differentiable w.r.t. the model: the meta-training path). :func:`choose_inner_loop` picks the
strategy when the algorithm is built; its :attr:`InnerLoop.name` is what a run logs:

- ``functional``: ``vmap`` over ``torch.func.functional_call`` on the adapted module's real
  ``forward``. Any module; the reference every other strategy must equal.
- ``batched``: the same per-task tensors through the module's hand-written ``forward_batched``.
- ``fixed_input``: ``adapt: head`` on an MLP-like head (``first_linear_name`` + ``forward_rest``)
  with one scalar step size: the first layer in kernel form (``algos.fixed_input``) on batches
  whose support sets are short enough for it to pay off, else as ``batched``.
- ``packed_first_order``: ``fixed_input`` for an algorithm whose meta-training inner loop is one
  first-order step: that step runs on the packed real support rows (no padding, so no grouping
  by support size); adaptation at validation/test time is ``fixed_input``'s.
- ``touched_rows``: the adapted module's embedding tables adapted on each task's touched rows
  only (``algos.touched``); every other parameter as ``batched``.

So the strategy is fixed per run (by the model's classes, the scope, ``touched_rows``, whether the
step size is one scalar and, for ``packed_first_order``, the meta-training steps); within
``fixed_input`` and ``packed_first_order`` the kernel form is a per-batch choice (support length).
Fast paths apply only where ``functional.has_exact_fast_path`` holds (exact classes or explicit
opt-in); :func:`check_fast_path` compares a strategy with ``functional`` on one batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from metarec_runner.algos.fixed_input import (
    fixed_input_inner_loop,
    fixed_input_pays_off,
    has_fixed_input_path,
    has_packed_first_step,
    packed_first_order_step,
)
from metarec_runner.algos.functional import (
    DenseFastWeights,
    FastWeights,
    Params,
    TaskLoss,
    batched_forward,
    expand_params,
    has_exact_fast_path,
    inner_loop,
    masked_loss,
)
from metarec_runner.algos.touched import (
    row_sparse_tables,
    supports_touched_rows,
    touched_inner_loop,
)
from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.tasks.taskset import TaskBatch

StepSize = float | Mapping[str, Tensor]
"""A scalar step size, or per-parameter step sizes ``{name: tensor like the parameter}``."""

#: the relative difference from ``functional`` above which :func:`check_fast_path` fails
CHECK_TOLERANCE = 1e-6


class InnerLoop:
    """Support-set SGD for all tasks of a batch: the ``functional`` strategy, and the base class.

    Args:
        model: the model (``body(x)`` and ``head`` for ``adapt: head``).
        scope: ``head`` (adapt ``model.head`` on ``model.body(x)``) or ``all``.
        loss: ``mse`` or ``bce`` (``functional.pointwise_loss``), inner loop and query scores; a
            ranking loss (``algos.ranking_loss``) is passed to every call as a task loss instead.

    Every entry point takes ``loss``: None = the pointwise ``loss`` on the support ratings, or a
    :data:`~metarec_runner.algos.functional.TaskLoss` of the support scores ``[B, S] -> [B]``
    (a ranking loss of an :class:`~metarec_runner.algos.ranking_loss.Episode`, whose support rows
    hold the sampled negatives). The kernel form (``fixed_input``) takes a task loss too
    (``functional.pointwise_loss``); the packed first-order step is pointwise only.
    """

    #: the strategy's name (logged by the run)
    name: ClassVar[str] = "functional"
    #: whether per-task weights run through the module's ``forward_batched``
    hand_batched: ClassVar[bool] = False

    def __init__(self, model: nn.Module, scope: str, loss: str = "mse") -> None:
        self.model, self.scope, self.loss = model, scope, loss
        self.module: nn.Module = model.head if scope == "head" else model

    # -- inputs of the adapted module ----------------------------------------------------
    def inputs(self, x: Tensor) -> Tensor:
        """Inputs of :attr:`module` for feature rows ``x [B, L, F]``."""
        return self.model.body(x) if self.scope == "head" else x

    @property
    def features(self) -> Callable[[Tensor], Tensor] | None:
        """How fast weights turn feature rows into :attr:`module`'s inputs (None: identity)."""
        return self.model.body if self.scope == "head" else None

    def real_inputs(self, x: Tensor, mask: Tensor) -> Tensor:
        """:meth:`inputs` computed on the real rows only (``mask [B, L]``), zeros on padding.

        With ``adapt: head`` the body runs once on the packed real rows (support sets are
        ragged: padding is often half the rows); padded rows' loss weights are zero, so every
        loss, gradient and adapted weight is unchanged."""
        if self.scope != "head" or bool(mask.all()):
            return self.inputs(x)
        real = self.model.body(x[mask])  # [N, D]
        out = real.new_zeros(*mask.shape, real.shape[-1])
        return out.index_put_((mask,), real)  # in place: no copy of the zeros

    def _support_and_query(self, batch: TaskBatch, create_graph: bool) -> tuple[Tensor, Tensor]:
        """Support ``[B, S, ...]`` and query ``[B, Q, ...]`` inputs: one body pass over the real
        rows of both (second order), or the support rows without autograd (first order: they
        reach the meta-loss only through constant gradients)."""
        if create_graph:
            rows = torch.cat([batch.support_x, batch.query_x], 1)
            mask = torch.cat([batch.support_mask, torch.ones_like(batch.query_mask)], 1)
            support, query = self.real_inputs(rows, mask).split(
                [batch.support_x.shape[1], batch.query_x.shape[1]], dim=1)
            return support, query
        with torch.no_grad():
            support = self.real_inputs(batch.support_x, batch.support_mask)
        return support, self.inputs(batch.query_x)

    # -- the two entry points ------------------------------------------------------------
    def wrap(self, params: Mapping[str, Tensor]) -> FastWeights:
        """``params`` as fast weights: fast weights pass through; a plain mapping of explicit
        ``{name: [B, *shape]}`` tensors is run as this strategy runs dense weights."""
        if isinstance(params, FastWeights):
            return params
        return DenseFastWeights(self.module, params, self.hand_batched, self.features)

    def adapt(self, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
              detach: bool, loss: TaskLoss | None = None) -> tuple[FastWeights, list[Tensor]]:
        """Fast weights for every task of ``batch`` after ``steps`` support SGD steps.

        Args:
            detach: start from detached copies (test-time adaptation, Reptile): no graph back
                to the model.
            loss: the support loss (None: the pointwise ``loss``; see the class docstring).

        Returns:
            ``(fast weights, [per-task support loss [B] before each step])``.
        """
        inputs = self.real_inputs(batch.support_x, batch.support_mask)
        if detach and inputs.is_floating_point():
            inputs = inputs.detach()
        return self._adapt(inputs, batch, lr, steps, create_graph, detach, loss)

    def adapt_and_score(self, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
                        loss: TaskLoss | None = None) -> tuple[Tensor, list[Tensor]]:
        """Query scores ``[B, Q]`` after ``steps`` support SGD steps, differentiable w.r.t. the
        model (the numbers of :meth:`adapt` then ``predict(batch.query_x)``, faster), and the
        per-task support losses ``[B]`` before each step."""
        support, query = self._support_and_query(batch, create_graph)
        fast, losses = self._adapt(support, batch, lr, steps, create_graph, False, loss)
        return fast.forward(query), losses

    def _adapt(self, inputs: Tensor, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
               detach: bool, loss: TaskLoss | None = None) -> tuple[FastWeights, list[Tensor]]:
        """Dense per-task weights from the module's own, ``steps`` steps on ``inputs``."""
        params = expand_params(self.module, batch.size, detach=detach)
        params, losses = inner_loop(self.module, params, inputs, batch.support_y,
                                    batch.support_mask, lr, steps, create_graph,
                                    self.loss if loss is None else loss, forward=self._forward)
        return self.wrap(params), losses

    def _forward(self, params: Params, h: Tensor) -> Tensor:
        return batched_forward(self.module, params, h, self.hand_batched)

    # -- what the algorithm asks ---------------------------------------------------------
    def groups_pay_off(self, lr: StepSize, steps: int, create_graph: bool) -> bool:
        """Whether splitting a batch by support size cuts work (not for packed rows)."""
        return True

    def uses_fixed_input(self, lr: StepSize, support_len: int, steps: int) -> bool:
        """Whether a batch with supports of ``support_len`` rows takes the kernel form."""
        return False


class BatchedInnerLoop(InnerLoop):
    """Dense per-task tensors through the module's exact ``forward_batched``."""

    name: ClassVar[str] = "batched"
    hand_batched: ClassVar[bool] = True


class FixedInputInnerLoop(BatchedInnerLoop):
    """The first layer in kernel form where it pays off (``algos.fixed_input``)."""

    name: ClassVar[str] = "fixed_input"

    def uses_fixed_input(self, lr: StepSize, support_len: int, steps: int) -> bool:
        return not isinstance(lr, Mapping) and fixed_input_pays_off(self.module, support_len, steps)

    def adapt(self, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
              detach: bool, loss: TaskLoss | None = None) -> tuple[FastWeights, list[Tensor]]:
        fast, losses = super().adapt(batch, lr, steps, create_graph, detach, loss)
        if self.uses_fixed_input(lr, batch.support_x.shape[1], steps):
            fast = self.wrap(fast.materialize())  # explicit for scoring
        return fast, losses

    def _adapt(self, inputs: Tensor, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
               detach: bool, loss: TaskLoss | None = None) -> tuple[FastWeights, list[Tensor]]:
        if not self.uses_fixed_input(lr, inputs.shape[1], steps):
            return super()._adapt(inputs, batch, lr, steps, create_graph, detach, loss)
        fast, losses = fixed_input_inner_loop(self.module, inputs, batch.support_y,
                                              batch.support_mask, lr, steps, create_graph,
                                              detach, self.loss if loss is None else loss)
        fast.features = self.features
        return fast, losses


class PackedFirstOrderInnerLoop(FixedInputInnerLoop):
    """``fixed_input`` whose one-step first-order meta-training runs on packed support rows."""

    name: ClassVar[str] = "packed_first_order"

    @staticmethod
    def packs(lr: StepSize, steps: int, create_graph: bool) -> bool:
        """Whether a call takes :func:`~metarec_runner.algos.fixed_input.packed_first_order_step`."""
        return steps == 1 and not create_graph and not isinstance(lr, Mapping)

    def groups_pay_off(self, lr: StepSize, steps: int, create_graph: bool) -> bool:
        return not self.packs(lr, steps, create_graph)

    def adapt_and_score(self, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
                        loss: TaskLoss | None = None) -> tuple[Tensor, list[Tensor]]:
        if loss is not None or not self.packs(lr, steps, create_graph):
            return super().adapt_and_score(batch, lr, steps, create_graph, loss)
        support, query = self._support_and_query(batch, create_graph)
        fast, losses = packed_first_order_step(self.module, support, batch.support_y,
                                               batch.support_mask, lr, self.loss)
        return fast.forward(query), losses


class TouchedRowsInnerLoop(InnerLoop):
    """Embedding tables adapted on each task's touched rows (``algos.touched``)."""

    name: ClassVar[str] = "touched_rows"
    hand_batched: ClassVar[bool] = True

    def adapt(self, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
              detach: bool, loss: TaskLoss | None = None) -> tuple[FastWeights, list[Tensor]]:
        # a task loss goes through touched_inner_loop to functional.inner_loop unchanged
        fast, losses = touched_inner_loop(self.module, self.inputs(batch.support_x),
                                          batch.support_y, batch.support_mask, lr, steps,
                                          create_graph, detach, self.loss if loss is None else loss)
        fast.features = self.features
        return fast, losses

    def adapt_and_score(self, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
                        loss: TaskLoss | None = None) -> tuple[Tensor, list[Tensor]]:
        fast, losses = self.adapt(batch, lr, steps, create_graph, False, loss)
        return fast.predict(batch.query_x), losses


# -- choosing and checking ----------------------------------------------------------------------


def check_touched_rows(model: nn.Module, scope: str, touched_rows: bool) -> None:
    """Raise a one-line :class:`ConfigError` (key ``touched_rows``) if ``adapt: all`` asks for
    touched rows on a model that cannot adapt them (``touched.supports_touched_rows``)."""
    if scope != "all" or not touched_rows or supports_touched_rows(model):
        return
    name = type(model).__name__
    why = (f"model {name} has no row-sparse embedding table (a models.fields.FieldEmbedding "
           "layer)" if not row_sparse_tables(model) else
           f"model {name} has no forward_batched written for its own forward (see "
           "algos.functional.has_exact_fast_path)")
    raise ConfigError("touched_rows", f"adapt: all with touched rows needs a model whose tables "
                      f"adapt on the rows each task reads; {why}; set algo.touched_rows=false "
                      "(full per-task tables) or use model=mf, fm, linear, mlp or melu")


def choose_inner_loop(model: nn.Module, scope: str, loss: str, touched_rows: bool,
                      scalar_lr: bool, packed_step: bool, task_loss: bool = False) -> InnerLoop:
    """The strategy for an algorithm (see the module docstring for the order).

    Args:
        model, scope, loss: see :class:`InnerLoop`.
        touched_rows: adapt tables on touched rows where the adapted module supports it.
        scalar_lr: the inner step size is one scalar (Meta-SGD's per-parameter ones are not).
        packed_step: meta-training takes one first-order inner step.
        task_loss: the support loss is a task loss (a ranking loss): no ``packed_first_order``
            (its packed rows are scored one by one), ``fixed_input`` instead.
    """
    module = model.head if scope == "head" else model
    exact = has_exact_fast_path(module, "forward_batched")
    if touched_rows and supports_touched_rows(module):
        cls: type[InnerLoop] = TouchedRowsInnerLoop
    elif exact and scalar_lr and has_fixed_input_path(module):
        packs = packed_step and not task_loss and has_packed_first_step(module)
        cls = PackedFirstOrderInnerLoop if packs else FixedInputInnerLoop
    else:
        cls = BatchedInnerLoop if exact else InnerLoop
    return cls(model, scope, loss)


def _relative(value: Tensor, reference: Tensor, floor: float) -> float:
    return float((value - reference).abs().max()) / max(float(reference.abs().max()), floor, 1e-300)


def _quantities(loop: InnerLoop, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
                detach: bool, support_loss: TaskLoss | None = None,
                query_loss: TaskLoss | None = None) -> dict[str, Tensor]:
    """What :func:`check_fast_path` compares: the query loss and inner loss, then the
    meta-gradients (meta-training) or the adapted weights' task means (adaptation)."""
    params = dict(loop.model.named_parameters())
    if detach:
        fast, losses = loop.adapt(batch, lr, steps, create_graph, True, support_loss)
        scores = fast.predict(batch.query_x)
    else:
        scores, losses = loop.adapt_and_score(batch, lr, steps, create_graph, support_loss)
    loss = (masked_loss(scores, batch.query_y, batch.query_mask, loop.loss) if query_loss is None
            else query_loss(scores)).mean()
    out = {"the query loss": loss.detach(), "the inner loss": losses[0].mean()}
    if detach:
        out.update({f"adapted {n} (task mean)": fast.task_mean(n).detach()
                    for n, _ in loop.module.named_parameters()})
        return out
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    out.update({f"the meta-gradient of {n}": torch.zeros_like(p) if g is None else g
                for (n, p), g in zip(params.items(), grads, strict=True)})
    return out


def check_fast_path(loop: InnerLoop, batch: TaskBatch, lr: StepSize, steps: int, create_graph: bool,
                    detach: bool, support_loss: TaskLoss | None = None,
                    query_loss: TaskLoss | None = None) -> None:
    """Compare ``loop`` with the ``functional`` strategy on ``batch`` in float64 (a copy of the
    model): the query loss, the inner loss and the meta-gradients (``detach``: the adapted
    weights). Raise a one-line :class:`TrainingError` naming the first quantity whose relative
    difference exceeds :data:`CHECK_TOLERANCE` (gradients relative to their own largest entry,
    at least 1e-6 of the largest of all). ``support_loss``/``query_loss``: an episode's task
    losses (ranking; their masks are cast to float64 by the scores they receive)."""
    if loop.name == InnerLoop.name:
        return
    model = copy.deepcopy(loop.model).to(torch.float64)
    batch = batch.to(batch.support_y.device, torch.float64)
    if isinstance(lr, Mapping):
        lr = {n: v.detach().to(torch.float64) for n, v in lr.items()}
    with torch.enable_grad():
        fast = _quantities(type(loop)(model, loop.scope, loop.loss), batch, lr, steps,
                           create_graph, detach, support_loss, query_loss)
        ref = _quantities(InnerLoop(model, loop.scope, loop.loss), batch, lr, steps,
                          create_graph, detach, support_loss, query_loss)
    scale = max(float(r.abs().max()) for r in ref.values())
    for what, r in ref.items():
        rel = _relative(fast[what], r, CHECK_TOLERANCE * scale if what.startswith(("the meta", "adapted")) else 0.0)
        if not rel <= CHECK_TOLERANCE:
            raise TrainingError(
                f"algo.check_fast_path: the {loop.name} inner loop differs from "
                f"torch.func.functional_call on {type(loop.module).__name__}.forward in {what} "
                f"on the first batch (relative {rel:.2e} > {CHECK_TOLERANCE:g}); its fast path "
                "(forward_batched / forward_rest / lookup) does not compute its forward: fix it, "
                "or set exact_fast_path = False in the class to train it through functional_call")
