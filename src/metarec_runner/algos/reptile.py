"""Reptile on the batched functional core, with the paper's outer rule.

Reference: A. Nichol, J. Achiam, J. Schulman. "On First-Order Meta-Learning Algorithms." 2018.

Every task ``b`` of a meta-batch runs ``inner_steps`` SGD steps on its support set from the
current weights ``theta`` (no graph) and ends at ``phi_b``. The outer update moves every adapted
parameter towards the mean adapted weights, in one unit (a displacement)::

    theta <- theta + eps_t * (mean_b phi_b - theta)

:meth:`Reptile.meta_gradients` hands ``theta - mean_b phi_b`` to ``meta_optimizer`` as the
"gradient" of the adapted parameters; with the preset's plain SGD (``lr = eps_0 = 1.0``, no
momentum) its step is exactly the rule above. ``eps_t`` is annealed linearly from ``eps_0`` to 0
over training (``anneal: linear``, the paper's schedule: ``eps_t = eps_0 (1 - t / T)`` at outer
step ``t = 0 .. T-1``) by rescaling the meta-optimizer's learning rate before each step; any
other ``torch.optim`` class can take the displacement instead (``conf/algo/reptile_adam.yaml``:
Adam at a constant 2e-3, the repository's earlier outer rule; Adam is elementwise, so it gives
the same numbers as the earlier single Adam over every parameter).

The horizon ``T``: ``anneal_steps`` outer steps when given; otherwise ``anneal_epochs`` epochs
(the preset: ``${trainer.max_epochs}``) times the steps of one epoch, counted by the algorithm
itself: the runner's epoch is one pass over the meta-train tasks in a random order, so the first
meta-batch holding a task already seen in the current epoch starts a new epoch (exact for
permutation epochs; the runner needs to know nothing). Until the first epoch ends its length is
unknown and ``eps_t = eps_0``, i.e. at most ``eps_0 / anneal_epochs`` above the linear value;
from the first step of the second epoch on ``eps_t`` is the linear schedule. A caller that
repeats one batch starts an "epoch" with every call; pass ``anneal_steps`` (or ``anneal: none``)
there.

Parameters outside the adaptation scope (the embeddings with ``adapt: head``) do not move in
the inner loop, so Reptile has no displacement for them (in the paper every parameter is
adapted: ``adapt: all`` is Reptile proper, on each task's touched embedding rows). With
``adapt: head`` they are trained by the first-order gradient of the query loss at the adapted
weights, stepped by their own ``body_optimizer`` (a gradient step, never mixed with the
displacements inside one optimizer; not annealed); ``body_optimizer: null`` keeps them frozen.
With ``aux_weight > 0`` every parameter also receives ``aux_weight`` times the gradient of the
auxiliary term (see ``SupportSGD``): for the adapted ones it is added to the displacement, so
the meta-optimizer's step on it is ``eps_t * aux_weight * grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from metarec_runner.algos.base import SupportSGD
from metarec_runner.algos.functional import masked_loss
from metarec_runner.errors import ConfigError, require_choice, require_positive
from metarec_runner.tasks.taskset import TaskBatch

ANNEALS = ("linear", "none")
"""Schedules of the outer step size: ``linear`` = the paper's decay from the meta-optimizer's
``lr`` to 0 over the horizon; ``none`` = the meta-optimizer's ``lr`` throughout."""


def _build_optimizer(
    key: str, factory: Callable[..., torch.optim.Optimizer], params: list[nn.Parameter]
) -> torch.optim.Optimizer:
    try:
        return factory(params=params)
    except ValueError as e:  # torch.optim validates its own arguments (lr < 0, betas, ...)
        raise ConfigError(key, f"{e}; fix the value under {key}") from None


class Reptile(SupportSGD):
    """Reptile (see the module docstring for the outer rule, the schedule and the body).

    Args:
        model, adapt, inner_lr, inner_steps, eval_inner_steps, touched_rows, loss, aux_loss,
        aux_weight, check_fast_path, negatives, n_negatives, positive_threshold, seed: as
            :class:`~metarec_runner.algos.maml.MAML` (a ranking loss: the inner steps on the
            support's positives against sampled negatives, the query loss against fresh ones; no
            ``first_order``: Reptile is first order by construction; no ``chunks``).
        meta_optimizer: partial ``torch.optim`` constructor for the adapted parameters; it
            receives ``theta - mean phi`` as their gradient (SGD with ``lr = eps_0`` is the
            paper's rule).
        body_optimizer: partial ``torch.optim`` constructor for the parameters outside the
            adaptation scope (``adapt: head``: the embeddings), which receive the first-order
            query-loss gradient; None freezes them. Unused with ``adapt: all``.
        anneal: ``linear`` or ``none`` (see :data:`ANNEALS`).
        anneal_epochs: with ``anneal: linear``, the horizon in epochs (steps per epoch counted
            in the first epoch); ignored when ``anneal_steps`` is given.
        anneal_steps: with ``anneal: linear``, the horizon in outer steps.

    Attributes:
        optimizer: the meta-optimizer, over the adapted parameters only.
        body_optimizer: the optimizer of the other parameters, or None.
        outer_steps: outer steps taken so far (``t``).
        steps_per_epoch: outer steps of one epoch once the first epoch has ended, else None.
    """

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
        body_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        anneal: str = "none",
        anneal_epochs: int | None = None,
        anneal_steps: int | None = None,
        check_fast_path: bool = False,
        negatives: str | None = None,
        n_negatives: int = 20,
        positive_threshold: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, meta_optimizer, adapt, inner_lr, inner_steps, eval_inner_steps,
                         touched_rows, loss, aux_loss, aux_weight, check_fast_path, negatives,
                         n_negatives, positive_threshold, seed)
        require_choice("anneal", anneal, ANNEALS)
        if anneal_steps is not None:
            require_positive("anneal_steps", anneal_steps)
        if anneal_epochs is not None:
            require_positive("anneal_epochs", anneal_epochs)
        if anneal == "linear" and anneal_steps is None and anneal_epochs is None:
            raise ConfigError("anneal", "linear needs a horizon; set anneal_epochs (e.g. "
                              "${trainer.max_epochs}) or anneal_steps, or use anneal=none")
        self.anneal = anneal
        self.anneal_epochs = None if anneal_epochs is None else int(anneal_epochs)
        self.anneal_steps = None if anneal_steps is None else int(anneal_steps)
        adapted = {id(p) for p in self.adapted_module.parameters()}
        # the base class built the meta-optimizer over every parameter: rebuild it on the
        # adapted ones, and give the others their own optimizer (units are never mixed)
        self.optimizer = _build_optimizer(
            "meta_optimizer", meta_optimizer, list(self.adapted_module.parameters())
        )
        body = [p for p in model.parameters() if id(p) not in adapted]
        self.body_optimizer: torch.optim.Optimizer | None = None
        if body and body_optimizer is not None:
            self.body_optimizer = _build_optimizer("body_optimizer", body_optimizer, body)
        self.base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.outer_steps = 0
        self.steps_per_epoch: int | None = None
        self._epoch_steps = 0  # outer steps in the current epoch
        self._seen: set[int] = set()  # task indices seen in the current epoch

    # -- the outer step size ------------------------------------------------------------
    @property
    def horizon(self) -> int | None:
        """``T``, the outer steps over which ``eps`` decays to 0 (None: not known yet, or
        ``anneal: none``)."""
        if self.anneal == "none":
            return None
        if self.anneal_steps is not None:
            return self.anneal_steps
        if self.steps_per_epoch is None:
            return None
        return self.anneal_epochs * self.steps_per_epoch

    def anneal_factor(self) -> float:
        """``eps_t / eps_0`` for the next outer step ``t = outer_steps``: ``max(0, 1 - t / T)``
        with ``anneal: linear`` once ``T`` is known, else 1."""
        total = self.horizon
        if total is None:
            return 1.0
        return max(0.0, 1.0 - self.outer_steps / total)

    def _count_epoch(self, task_index: Tensor) -> None:
        """Track epochs from the task stream (``task_index [B]``): a batch holding a task seen
        in the current epoch starts the next one; the first such batch fixes
        :attr:`steps_per_epoch`."""
        if self.anneal != "linear" or self.anneal_steps is not None:
            return
        tasks = task_index.tolist()
        if self._epoch_steps and not self._seen.isdisjoint(tasks):
            if self.steps_per_epoch is None:
                self.steps_per_epoch = self._epoch_steps
            self._seen.clear()
            self._epoch_steps = 0
        self._seen.update(tasks)
        self._epoch_steps += 1

    # -- the outer update ----------------------------------------------------------------
    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        """One Reptile update: :meth:`meta_gradients`, then the meta-optimizer's step on the
        adapted parameters at ``lr = eps_t`` and the body optimizer's step on the others.

        Returns:
            :meth:`meta_gradients`' diagnostics and ``outer_lr`` (the meta-optimizer's learning
            rate of this step, ``eps_t`` with SGD).
        """
        self.check_labels(batch)
        self._count_epoch(batch.task_index)
        factor = self.anneal_factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        stats = self.meta_gradients(batch)
        self.optimizer.step()
        if self.body_optimizer is not None:
            self.body_optimizer.step()
        self.outer_steps += 1
        stats["outer_lr"] = self.base_lrs[0] * factor
        return stats

    def meta_gradients(self, batch: TaskBatch) -> dict[str, float]:
        """Set every model parameter's ``.grad`` to its outer direction without stepping.

        Adapted parameters: ``theta - mean_b phi_b`` (``[*shape]``, their own shape); the
        others: the gradient of the mean query loss at the adapted weights; plus
        ``aux_weight`` times the auxiliary gradient on all of them when used.

        Returns:
            ``{"loss": mean query loss at phi, "inner_loss": mean support loss before the
            first inner step}`` (and ``aux_loss`` when used).
        """
        episode = None if self.ranking is None else self.ranking.episode(batch)
        rows = batch if episode is None else episode.batch  # with the negatives appended
        ranked = {} if episode is None else {"loss": episode.support.loss}  # the support task loss
        with torch.enable_grad():
            fast, inner_losses = self.adapt_fast(
                rows, self.step_sizes(), self.inner_steps, create_graph=False, detach=True, **ranked
            )
        fast = fast.detach()
        self.model.zero_grad(set_to_none=True)
        # query loss at the adapted weights; its gradient reaches only the non-adapted params
        pred = self.predict(fast, rows.query_x)
        loss = (masked_loss(pred, batch.query_y, batch.query_mask, self.loss) if episode is None
                else episode.query.loss(pred)).mean()
        objective = loss
        stats = {"loss": loss.item(), "inner_loss": inner_losses[0].mean().item()}
        if self.uses_aux:
            aux = self.aux_objective(batch) / batch.size
            objective = objective + self.aux_weight * aux
            stats["aux_loss"] = aux.item()
        if objective.requires_grad:
            objective.backward()
        for name, p in self.adapted_module.named_parameters():
            delta = p.detach() - fast.task_mean(name)
            p.grad = delta if p.grad is None else p.grad + delta
        return stats

    # -- state for checkpoints and best-model restore ------------------------------------
    def state_dict(self) -> dict:
        """The model, both optimizers and the schedule's counters."""
        state = super().state_dict()
        if self.body_optimizer is not None:
            state["body_optimizer"] = self.body_optimizer.state_dict()
        state["schedule"] = {
            "outer_steps": self.outer_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_steps": self._epoch_steps,
            "seen": sorted(self._seen),
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.body_optimizer is not None:
            self.body_optimizer.load_state_dict(state["body_optimizer"])
        schedule = state["schedule"]
        self.outer_steps = int(schedule["outer_steps"])
        self.steps_per_epoch = schedule["steps_per_epoch"]
        self._epoch_steps = int(schedule["epoch_steps"])
        self._seen = set(schedule["seen"])
