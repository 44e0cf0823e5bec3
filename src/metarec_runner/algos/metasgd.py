"""Meta-SGD on the batched functional core.

Reference: Z. Li, F. Zhou, F. Chen, H. Li. "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning." arXiv:1707.09835, 2017.

MAML whose inner step is ``theta - alpha * grad`` with ``alpha`` a learnable tensor of the same
shape as each adapted parameter, meta-learned with the initialisation by the outer optimizer.
The step sizes live in an ``nn.Module``, :class:`StepSizes` (``algo.step_sizes``), as log-rates:
``alpha = exp(log_rate)``, initialised to ``inner_lr``, so every step size stays positive (the
paper leaves ``alpha`` unconstrained; a negative entry would ascend the support loss). Their
gradient is ``alpha * dL/dalpha``: the outer optimizer changes each rate by a factor, not by an
absolute amount, so ``step_size_lr`` (the learning rate of the log-rates, by default the
meta-optimizer's) is a relative step. They are part of :meth:`MetaSGD.state_dict`
(``step_sizes``: ``log_rates.<name>`` entries, next to ``model``), so the runner's best-epoch
copy and any checkpoint of the algorithm carry them; they are not registered on the model (its
parameters are the adapted ones, and a rate must never get a fast weight of its own).

Step sizes are per-parameter tensors, so ``adapt: head`` takes the generic batched inner loop:
the fixed-input (kernel) path needs one scalar step size for the first layer (its update
``alpha * (coef^T support)`` is elementwise and has no kernel form). With ``adapt: all`` and
touched rows the table's step sizes are gathered at each task's touched rows, so they learn
from (and only from) the rows tasks read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from metarec_runner.algos.base import AdaptedScorer
from metarec_runner.algos.maml import MAML
from metarec_runner.errors import require_positive
from metarec_runner.tasks.taskset import TaskBatch


def _key(name: str) -> str:
    """A parameter name as a ``ParameterDict`` key (no dots): ``net.0.weight`` -> ``net__0__weight``."""
    return name.replace(".", "__")


class StepSizes(nn.Module):
    """Positive per-parameter step sizes ``alpha = exp(log_rate)``, one tensor per parameter.

    Calling the module returns ``{name: alpha [*shape]}`` (differentiable w.r.t. the
    log-rates), the mapping the batched inner loop takes as its step size.

    Args:
        params: ``(name, parameter)`` pairs of the adapted module; each gets a log-rate tensor
            of its shape.
        init: the initial value of every step size (> 0).

    Attributes:
        names: the parameter names, in order.
        log_rates: ``ParameterDict`` of ``log alpha [*shape]`` keyed by the parameter name with
            dots replaced by ``__`` (``state_dict`` keys ``log_rates.net__0__weight``, ...).
    """

    def __init__(self, params: Iterable[tuple[str, Tensor]], init: float) -> None:
        super().__init__()
        require_positive("inner_lr", init)
        params = list(params)
        self.names = [n for n, _ in params]
        keys = [_key(n) for n in self.names]
        if len(set(keys)) != len(keys):
            raise ValueError(f"parameter names collide once dots become '__': {self.names}")
        self.log_rates = nn.ParameterDict([  # pairs keep the model's order (a dict is sorted)
            (k, nn.Parameter(torch.full_like(p.detach(), math.log(init))))
            for k, (_, p) in zip(keys, params, strict=True)
        ])

    def log_rate(self, name: str) -> nn.Parameter:
        """The learnable ``log alpha [*shape]`` of parameter ``name``."""
        return self.log_rates[_key(name)]

    def forward(self) -> dict[str, Tensor]:
        """``{name: alpha [*shape]}``, ``alpha = exp(log_rate) > 0``."""
        return {n: self.log_rate(n).exp() for n in self.names}


class MetaSGD(MAML):
    """Meta-SGD: MAML with learned positive per-parameter inner step sizes.

    Args:
        model, meta_optimizer, adapt, inner_steps, eval_inner_steps, first_order, chunks,
        touched_rows, loss, aux_loss, aux_weight, check_fast_path, negatives, n_negatives,
        positive_threshold, seed: see :class:`~metarec_runner.algos.maml.MAML`.
        inner_lr: initial value of every inner step size.
        step_size_lr: learning rate of the log-rates' parameter group in the meta-optimizer
            (a relative change of each step size per outer step); None = the meta-optimizer's
            ``lr``.

    Attributes:
        step_sizes: the :class:`StepSizes` module (one log-rate tensor per parameter of
            :attr:`adapted_module`, names as there); ``algo.step_sizes()`` is
            ``{name: alpha}``, the same call as :meth:`SupportSGD.step_sizes` it replaces. The
            outer optimizer updates the log-rates with the model (an extra parameter group).
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
        step_size_lr: float | None = None,
        check_fast_path: bool = False,
        negatives: str | None = None,
        n_negatives: int = 20,
        positive_threshold: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, meta_optimizer, adapt, inner_lr, inner_steps, eval_inner_steps,
                         first_order, chunks, touched_rows, loss, aux_loss, aux_weight,
                         check_fast_path=check_fast_path, negatives=negatives,
                         n_negatives=n_negatives, positive_threshold=positive_threshold, seed=seed)
        self.step_sizes = StepSizes(self.adapted_module.named_parameters(), self.inner_lr)
        group: dict = {"params": list(self.step_sizes.parameters())}
        if step_size_lr is not None:
            require_positive("step_size_lr", step_size_lr)
            group["lr"] = float(step_size_lr)
        self.optimizer.add_param_group(group)

    def rates(self) -> dict[str, Tensor]:
        """The current step sizes ``{name: alpha [*shape]}``, without a graph."""
        with torch.no_grad():
            return self.step_sizes()

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        return self.sgd_adapt(batch, self.rates(), self.eval_inner_steps)

    def state_dict(self) -> dict:
        """``model``, ``optimizer`` (both groups) and ``step_sizes`` (the log-rates)."""
        state = super().state_dict()
        state["step_sizes"] = self.step_sizes.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.step_sizes.load_state_dict(state["step_sizes"])
