"""MAML and first-order MAML on the batched functional core.

Reference: C. Finn, P. Abbeel, S. Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of
Deep Networks." ICML 2017. First-order MAML is the same algorithm with ``first_order=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from metarec_runner.algos.base import SupportSGD, split_by_support_size
from metarec_runner.algos.functional import masked_loss
from metarec_runner.errors import require_positive
from metarec_runner.tasks.taskset import TaskBatch


class MAML(SupportSGD):
    """MAML: meta-learn an initialization that adapts to a task in a few SGD steps.

    The meta-loss is the mean over tasks of each task's query loss (MSE, BCE with ``loss: bce``,
    or a ranking loss: the query's positives against fresh sampled negatives, the inner steps on
    the support's positives against their own, ``algos.ranking_loss``) after ``inner_steps`` SGD
    steps on its support set; gradients flow through
    the inner updates (second order) unless ``first_order``. The meta-objective adds
    ``aux_weight`` times the mean auxiliary term (``aux_loss: support``: the base model's
    support loss before adaptation).

    Args:
        model, meta_optimizer, adapt: see :class:`MetaAlgorithm`.
        inner_lr: inner SGD step size.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at validation/test time (None = ``inner_steps``).
        first_order: drop second-order terms (FOMAML).
        chunks: meta-training splits each meta-batch into at most this many groups of tasks
            with similar support sizes, each padded to its own longest support set (see
            :func:`~metarec_runner.algos.base.split_by_support_size`); the meta-loss and its
            gradient are unchanged, less work goes into padding. Each group costs a fixed
            overhead; 2 was fastest for 32 tasks with 20-90 support rows (1 = no split).
            Ignored (one group) where the packed first-order step applies (``first_order``,
            one inner step, MLP head: its support pass has no padding).
        touched_rows, loss, aux_loss, aux_weight, check_fast_path, negatives, n_negatives,
            positive_threshold, seed: see :class:`SupportSGD`.
    """

    def __init__(
        self,
        model: nn.Module,
        meta_optimizer: Callable[..., torch.optim.Optimizer],
        adapt: str = "head",
        inner_lr: float = 0.05,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        chunks: int = 2,
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
        super().__init__(model, meta_optimizer, adapt, inner_lr, inner_steps, eval_inner_steps,
                         touched_rows, loss, aux_loss, aux_weight, check_fast_path, negatives,
                         n_negatives, positive_threshold, seed)
        require_positive("chunks", chunks)
        self.first_order = bool(first_order)
        self.chunks = int(chunks)

    def packs_first_order_step(self) -> bool:
        """One first-order inner step: the ``packed_first_order`` inner loop where it applies."""
        return self.first_order and self.inner_steps == 1

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean query loss after adaptation, mean support loss before it)``; differentiable.

        Both are means over the ``B`` tasks: per-task losses are summed over the groups of
        :func:`~metarec_runner.algos.base.split_by_support_size` and divided by ``B``. With a
        ranking loss each group draws its own negatives (an :class:`~metarec_runner.algos.
        ranking_loss.Episode`) after the split.
        """
        query_loss = support_loss = None
        lr = self.step_sizes()
        create_graph = not self.first_order
        if self.ranking is None:
            self.verify_inner_loop("meta", batch, lr, self.inner_steps, create_graph, detach=False)
        # the packed first-order step pads nothing in its support pass: grouping would only cost
        groups = self.inner_loop.groups_pay_off(lr, self.inner_steps, create_graph)
        for part in split_by_support_size(batch, self.chunks if groups else 1):
            if self.ranking is None:
                pred, inner_losses = self.adapt_and_score(part, lr, self.inner_steps, create_graph)
                q = masked_loss(pred, part.query_y, part.query_mask, self.loss).sum()
            else:
                ep = self.ranking.episode(part)
                self.verify_inner_loop("meta", ep.batch, lr, self.inner_steps, create_graph, False,
                                       ep.support.loss, ep.query.loss)
                pred, inner_losses = self.adapt_and_score(ep.batch, lr, self.inner_steps,
                                                          create_graph, ep.support.loss)
                q = ep.query.loss(pred).sum()
            s = inner_losses[0].sum()
            query_loss = q if query_loss is None else query_loss + q
            support_loss = s if support_loss is None else support_loss + s
        return query_loss / batch.size, support_loss / batch.size

    def meta_objective(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The differentiable outer objective ``meta_loss + aux_weight * aux`` and its parts
        (``loss``: mean query loss, ``inner_loss``, and ``aux_loss`` when used)."""
        loss, inner = self.meta_loss(batch)
        parts = {"loss": loss, "inner_loss": inner}
        objective = loss
        if self.uses_aux:
            aux = self.aux_objective(batch) / batch.size
            parts["aux_loss"] = aux
            objective = loss + self.aux_weight * aux
        return objective, parts

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        self.check_labels(batch)
        objective, parts = self.meta_objective(batch)
        self._outer_update(objective)
        return {k: v.item() for k, v in parts.items()}
