"""What every algorithm shares: the model, the outer optimizer, the adaptation scope.

An algorithm owns only its update rules: ``meta_step(batch)`` (one outer update on a meta-batch)
and ``adapt(batch)`` (per-task fast weights from the support sets, returned as a scorer). The
runner owns epochs, devices, seeding and tracking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metarec_runner.algos.functional import Params, batched_forward, expand_params, inner_loop
from metarec_runner.errors import ConfigError, require_choice
from metarec_runner.tasks.taskset import TaskBatch

SCOPES = ("head", "all")
"""``head``: adapt the MLP only, on precomputed embeddings (MeLU's local update, ANIL).
``all``: adapt every parameter, embedding tables included."""


@dataclass
class AdaptedScorer:
    """Scores any items for the tasks of one batch with their adapted weights.

    ``predict(x [B, L, F]) -> [B, L]``. ``params`` is None for models that do not adapt.
    """

    algo: "MetaAlgorithm"
    params: Params | None

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.algo.predict(self.params, x)


class MetaAlgorithm:
    """Base class.

    Args:
        model: a model with ``body(x)`` and ``head`` (see ``models.preference``).
        meta_optimizer: a partial ``torch.optim`` constructor (Hydra ``_partial_: true``).
        adapt: adaptation scope, ``head`` or ``all``.
    """

    #: whether ``adapt`` changes anything (False for non-adaptive baselines)
    adapts: bool = True

    def __init__(
        self,
        model: nn.Module,
        meta_optimizer: Callable[..., torch.optim.Optimizer],
        adapt: str = "head",
    ) -> None:
        require_choice("adapt", adapt, SCOPES)
        self.model = model
        self.scope = adapt
        try:
            self.optimizer = meta_optimizer(params=list(model.parameters()))
        except ValueError as e:  # torch.optim validates its own arguments (lr < 0, betas, ...)
            raise ConfigError("meta_optimizer", f"{e}; fix the value under meta_optimizer") from None

    # -- the adapted function ------------------------------------------------------------
    @property
    def adapted_module(self) -> nn.Module:
        """The module whose parameters get per-task fast weights."""
        return self.model.head if self.scope == "head" else self.model

    def inputs(self, x: Tensor) -> Tensor:
        """Inputs of :attr:`adapted_module` for feature rows ``x [B, L, F]``."""
        return self.model.body(x) if self.scope == "head" else x

    def adapt_fast(
        self, batch: TaskBatch, lr: float, steps: int, create_graph: bool, detach: bool
    ) -> tuple[Params, list[Tensor]]:
        """Fast weights for every task of ``batch`` after ``steps`` support SGD steps."""
        params = expand_params(self.adapted_module, batch.size, detach=detach)
        inputs = self.inputs(batch.support_x)
        if detach:
            inputs = inputs.detach() if inputs.is_floating_point() else inputs
        return inner_loop(
            self.adapted_module, params, inputs, batch.support_y, batch.support_mask,
            lr, steps, create_graph,
        )

    def predict(self, params: Params | None, x: Tensor) -> Tensor:
        """Scores ``[B, L]`` for rows ``x [B, L, F]`` with per-task ``params`` (None = base)."""
        if params is None:
            return self.model(x)
        return batched_forward(self.adapted_module, params, self.inputs(x))

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

    def _outer_update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
