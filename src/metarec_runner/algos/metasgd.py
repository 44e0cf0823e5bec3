"""Meta-SGD on the batched functional core.

Reference: Z. Li, F. Zhou, F. Chen, H. Li. "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning." arXiv:1707.09835, 2017.

MAML whose inner step is ``theta - alpha * grad`` with ``alpha`` a learnable tensor of the same
shape as each adapted parameter (initialised to ``inner_lr``), meta-learned with the
initialisation by the outer optimizer. ``alpha`` is unconstrained, as in the paper (an entry may
turn negative). Step sizes are per-parameter tensors, so ``adapt: head`` takes the generic
batched inner loop: the fixed-input (kernel) path needs one scalar step size for the first layer
(its update ``alpha * (coef^T support)`` is elementwise and has no kernel form). With
``adapt: all`` and touched rows the table's step sizes are gathered at each task's touched rows,
so they learn from (and only from) the rows tasks read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from metarec_runner.algos.base import AdaptedScorer
from metarec_runner.algos.maml import MAML
from metarec_runner.tasks.taskset import TaskBatch


class MetaSGD(MAML):
    """Meta-SGD: MAML with learned per-parameter inner step sizes.

    Args:
        model, meta_optimizer, adapt, inner_steps, eval_inner_steps, first_order, chunks,
        touched_rows, loss, aux_loss, aux_weight: see :class:`~metarec_runner.algos.maml.MAML`.
        inner_lr: initial value of every inner step size.

    Attributes:
        step_size: ``{name: alpha [*shape]}``, one learnable tensor per adapted parameter
            (names as in :attr:`adapted_module`); the outer optimizer updates them with the
            model (an extra parameter group with the optimizer's defaults).
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
    ) -> None:
        super().__init__(model, meta_optimizer, adapt, inner_lr, inner_steps, eval_inner_steps,
                         first_order, chunks, touched_rows, loss, aux_loss, aux_weight)
        self.step_size: dict[str, nn.Parameter] = {
            name: nn.Parameter(torch.full_like(p.detach(), self.inner_lr))
            for name, p in self.adapted_module.named_parameters()
        }
        self.optimizer.add_param_group({"params": list(self.step_size.values())})

    def step_sizes(self) -> dict[str, Tensor]:
        """The learnable per-parameter step sizes (differentiable)."""
        return dict(self.step_size)

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        lr = {n: a.detach() for n, a in self.step_size.items()}
        return self.sgd_adapt(batch, lr, self.eval_inner_steps)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["step_size"] = {n: a.detach().clone() for n, a in self.step_size.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for n, a in self.step_size.items():
                a.copy_(state["step_size"][n])
