"""Reptile on the batched functional core.

Reference: A. Nichol, J. Achiam, J. Schulman. "On First-Order Meta-Learning Algorithms." 2018.

Every task of a meta-batch runs ``inner_steps`` SGD steps on its support set (no graph); the
outer "gradient" of each adapted parameter is ``theta - mean_b(phi_b)``, handed to the outer
optimizer (plain SGD with lr=eps gives the paper's ``theta += eps * (mean phi - theta)``).
Parameters outside the adaptation scope (the embeddings when ``adapt=head``) do not move in the
inner loop; they receive the first-order query-loss gradient at the adapted weights instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from metarec_runner.algos.base import SupportSGD
from metarec_runner.algos.functional import batched_forward, masked_mse
from metarec_runner.tasks.taskset import TaskBatch


class Reptile(SupportSGD):
    """Reptile. Args as :class:`~metarec_runner.algos.maml.MAML` (no ``first_order``: Reptile
    is first order by construction)."""

    def __init__(
        self,
        model: nn.Module,
        meta_optimizer: Callable[..., torch.optim.Optimizer],
        adapt: str = "head",
        inner_lr: float = 0.05,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
    ) -> None:
        super().__init__(model, meta_optimizer, adapt, inner_lr, inner_steps, eval_inner_steps)

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        with torch.enable_grad():
            fast, inner_losses = self.adapt_fast(
                batch, self.inner_lr, self.inner_steps, create_graph=False, detach=True
            )
        fast = {n: p.detach() for n, p in fast.items()}
        self.optimizer.zero_grad(set_to_none=True)
        # query loss at the adapted weights; its gradient reaches only the non-adapted params
        pred = batched_forward(self.adapted_module, fast, self.inputs(batch.query_x))
        loss = masked_mse(pred, batch.query_y, batch.query_mask).mean()
        if loss.requires_grad:
            loss.backward()
        for name, p in self.adapted_module.named_parameters():
            p.grad = p.detach() - fast[name].mean(0)
        self.optimizer.step()
        return {"loss": loss.item(), "inner_loss": inner_losses[0].mean().item()}
