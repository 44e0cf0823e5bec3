"""Per-task reference implementation of the MAML meta-loss (a plain Python loop over tasks).

Never used for training: it exists so tests can check the batched core against it to float64
precision, and so ``scripts/bench_meta_step.py`` can time the loop the batched core replaces.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call

from metarec_runner.algos.base import MetaAlgorithm
from metarec_runner.tasks.taskset import TaskBatch


def per_task_meta_loss(
    algo: MetaAlgorithm, batch: TaskBatch, lr: float, steps: int, first_order: bool
) -> Tensor:
    """Mean over tasks of the query MSE after ``steps`` SGD steps, one task at a time.

    Each task is cut to its real (unpadded) rows; fast weights are a dict per task; inner
    gradients use ``torch.autograd.grad`` with ``create_graph=not first_order``.

    Returns:
        Scalar meta-loss, differentiable w.r.t. ``algo.model.parameters()``.
    """
    module = algo.adapted_module
    base = dict(module.named_parameters())
    total = torch.zeros((), dtype=batch.support_y.dtype)
    for b in range(batch.size):
        s_n = int(batch.support_mask[b].sum())
        q_n = int(batch.query_mask[b].sum())
        s_in = algo.inputs(batch.support_x[b, :s_n])
        q_in = algo.inputs(batch.query_x[b, :q_n])
        s_y, q_y = batch.support_y[b, :s_n], batch.query_y[b, :q_n]
        fast = dict(base)
        for _ in range(steps):
            loss = ((functional_call(module, fast, (s_in,)) - s_y) ** 2).mean()
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads)}
        total = total + ((functional_call(module, fast, (q_in,)) - q_y) ** 2).mean()
    return total / batch.size
