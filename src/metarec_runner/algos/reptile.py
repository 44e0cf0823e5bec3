"""Reptile on the batched functional core.

Reference: A. Nichol, J. Achiam, J. Schulman. "On First-Order Meta-Learning Algorithms." 2018.

Every task of a meta-batch runs ``inner_steps`` SGD steps on its support set (no graph); the
outer "gradient" of each adapted parameter is ``theta - mean_b(phi_b)``, handed to the outer
optimizer (plain SGD with lr=eps gives the paper's ``theta += eps * (mean phi - theta)``).
Parameters outside the adaptation scope (the embeddings when ``adapt=head``) do not move in the
inner loop; they receive the first-order query-loss gradient at the adapted weights instead.
With ``aux_weight > 0`` every parameter also receives ``aux_weight`` times the gradient of the
auxiliary term (see ``SupportSGD``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from metarec_runner.algos.base import SupportSGD, task_mean
from metarec_runner.algos.functional import masked_loss
from metarec_runner.tasks.taskset import TaskBatch


class Reptile(SupportSGD):
    """Reptile. Args as :class:`~metarec_runner.algos.maml.MAML` (no ``first_order``: Reptile
    is first order by construction; no ``chunks``)."""

    def __init__(
        self,
        model: nn.Module,
        meta_optimizer: Callable[..., torch.optim.Optimizer],
        adapt: str = "head",
        inner_lr: float = 0.05,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        touched_rows: bool = True,
        loss: str = "mse",
        aux_loss: str = "none",
        aux_weight: float = 0.0,
    ) -> None:
        super().__init__(model, meta_optimizer, adapt, inner_lr, inner_steps, eval_inner_steps,
                         touched_rows, loss, aux_loss, aux_weight)

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        self.check_labels(batch)
        stats = self.meta_gradients(batch)
        self.optimizer.step()
        return stats

    def meta_gradients(self, batch: TaskBatch) -> dict[str, float]:
        """Set every parameter's ``.grad`` to Reptile's outer "gradient" (see the module
        docstring) without stepping; returns the diagnostics of :meth:`meta_step`."""
        with torch.enable_grad():
            fast, inner_losses = self.adapt_fast(
                batch, self.step_sizes(), self.inner_steps, create_graph=False, detach=True
            )
        fast = self.detach_fast(fast)
        self.optimizer.zero_grad(set_to_none=True)
        # query loss at the adapted weights; its gradient reaches only the non-adapted params
        pred = self.predict(fast, batch.query_x)
        loss = masked_loss(pred, batch.query_y, batch.query_mask, self.loss).mean()
        objective = loss
        stats = {"loss": loss.item(), "inner_loss": inner_losses[0].mean().item()}
        if self.uses_aux:
            aux = self.aux_objective(batch) / batch.size
            objective = objective + self.aux_weight * aux
            stats["aux_loss"] = aux.item()
        if objective.requires_grad:
            objective.backward()
        for name, p in self.adapted_module.named_parameters():
            delta = p.detach() - task_mean(fast, name)
            p.grad = delta if p.grad is None else p.grad + delta
        return stats

    @staticmethod
    def detach_fast(fast):
        """Fast weights without a graph (a dict or touched-row weights)."""
        if isinstance(fast, dict):
            return {n: p.detach() for n, p in fast.items()}
        return fast.detach()
