"""Per-task reference implementation of the MAML meta-loss (a plain Python loop over tasks).

Never used for training: it exists so tests can check the batched core against it to float64
precision, and so ``scripts/bench_meta_step.py`` can time the loop the batched core replaces.
It always adapts full parameter tensors (whole embedding tables with ``adapt: all``), so it is
also the reference for touched-row adaptation; per-parameter step sizes cover Meta-SGD.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import functional_call

from metarec_runner.algos.base import MetaAlgorithm, SupportSGD
from metarec_runner.algos.functional import pointwise_loss
from metarec_runner.tasks.taskset import TaskBatch


def per_task_meta_loss(
    algo: MetaAlgorithm,
    batch: TaskBatch,
    lr: float | Mapping[str, Tensor],
    steps: int,
    first_order: bool,
    loss: str = "mse",
    aux_weight: float = 0.0,
) -> Tensor:
    """Mean over tasks of the query loss after ``steps`` SGD steps, one task at a time.

    Each task is cut to its real (unpadded) rows; fast weights are a dict per task; inner
    gradients use ``torch.autograd.grad`` with ``create_graph=not first_order``.

    Args:
        algo: supplies the model, the adaptation scope and the inputs.
        batch: ``B`` padded tasks.
        lr: scalar step size, or ``{name: step sizes shaped like the parameter}`` (Meta-SGD:
            ``algo.step_sizes()``, differentiable w.r.t. its log-rates).
        steps: inner steps; first_order: drop second-order terms.
        loss: ``mse`` or ``bce`` (see ``functional.pointwise_loss``), inner and outer.
        aux_weight: adds ``aux_weight`` times the mean over tasks of the base model's support
            loss (``aux_loss: support``).

    Returns:
        Scalar meta-objective, differentiable w.r.t. ``algo.model.parameters()`` (and ``lr``).
    """
    module = algo.adapted_module
    base = dict(module.named_parameters())
    step = lr if isinstance(lr, Mapping) else dict.fromkeys(base, lr)
    total = torch.zeros((), dtype=batch.support_y.dtype)
    for b in range(batch.size):
        s_n = int(batch.support_mask[b].sum())
        q_n = int(batch.query_mask[b].sum())
        with torch.set_grad_enabled(not first_order):  # first order: no meta-gradient here
            s_in = algo.inputs(batch.support_x[b, :s_n])
        q_in = algo.inputs(batch.query_x[b, :q_n])
        s_y, q_y = batch.support_y[b, :s_n], batch.query_y[b, :q_n]
        fast = dict(base)
        for _ in range(steps):
            inner = pointwise_loss(functional_call(module, fast, (s_in,)), s_y, loss).mean()
            grads = torch.autograd.grad(inner, list(fast.values()), create_graph=not first_order)
            fast = {n: w - step[n] * g for (n, w), g in zip(fast.items(), grads, strict=True)}
        total = total + pointwise_loss(functional_call(module, fast, (q_in,)), q_y, loss).mean()
        if aux_weight:
            aux = pointwise_loss(algo.model(batch.support_x[b, :s_n]), s_y, loss).mean()
            total = total + aux_weight * aux
    return total / batch.size


def per_task_reptile_gradients(algo: SupportSGD, batch: TaskBatch) -> Tensor:
    """Reptile's outer "gradients", one task at a time: sets ``.grad`` of every model parameter
    as :meth:`~metarec_runner.algos.reptile.Reptile.meta_gradients` does (full parameter tensors,
    scalar step size, ``mse``, no auxiliary term): ``theta - mean_b phi_b`` for the adapted
    parameters, the gradient of the mean query loss at ``phi_b`` for the others. The outer step
    itself (``meta_optimizer`` on the former at ``eps_t``, ``body_optimizer`` on the latter) is
    not part of the reference.

    Returns:
        The mean query loss at the adapted weights (scalar).
    """
    module = algo.adapted_module
    names = [n for n, _ in module.named_parameters()]
    base = {n: p.detach() for n, p in module.named_parameters()}
    phi_sum = {n: torch.zeros_like(p) for n, p in base.items()}
    algo.model.zero_grad(set_to_none=True)  # both optimizers' parameters
    total = torch.zeros((), dtype=batch.support_y.dtype)
    for b in range(batch.size):
        s_n = int(batch.support_mask[b].sum())
        q_n = int(batch.query_mask[b].sum())
        s_in = algo.inputs(batch.support_x[b, :s_n]).detach()
        s_y, q_y = batch.support_y[b, :s_n], batch.query_y[b, :q_n]
        fast = {n: p.clone().requires_grad_(True) for n, p in base.items()}
        with torch.enable_grad():
            for _ in range(algo.inner_steps):
                inner = ((functional_call(module, fast, (s_in,)) - s_y) ** 2).mean()
                grads = torch.autograd.grad(inner, [fast[n] for n in names])
                fast = {n: (fast[n] - algo.inner_lr * g).detach().requires_grad_(True)
                        for n, g in zip(names, grads, strict=True)}
        fast = {n: p.detach() for n, p in fast.items()}
        for n in names:
            phi_sum[n] += fast[n]
        q_in = algo.inputs(batch.query_x[b, :q_n])
        total = total + ((functional_call(module, fast, (q_in,)) - q_y) ** 2).mean()
    loss = total / batch.size
    if loss.requires_grad:
        loss.backward()
    for n, p in module.named_parameters():
        delta = p.detach() - phi_sum[n] / batch.size
        p.grad = delta if p.grad is None else p.grad + delta
    return loss.detach()
