"""The batched functional core: per-task fast weights for all tasks of a meta-batch at once.

Fast weights are plain tensors with a leading task dimension ``B``; a module is run with them
through ``torch.func.functional_call`` under ``torch.func.vmap`` (one batched computation, no
Python loop over tasks). Inner-loop gradients come from ordinary ``torch.autograd.grad`` on the
*sum* of per-task losses: task ``b``'s loss depends only on slice ``b`` of the fast weights, so
the gradient's slice ``b`` is exactly that task's own gradient. With ``create_graph=True`` the
updates stay differentiable (second-order MAML); gradients flow back to ``module.parameters()``.
No weights are ever copied into a module (``load_state_dict`` would cut the graph).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

Params = dict[str, Tensor]


def expand_params(module: nn.Module, batch_size: int, detach: bool = False) -> Params:
    """Per-task copies (views) of ``module``'s parameters.

    Args:
        module: the module whose parameters adapt.
        batch_size: number of tasks ``B``.
        detach: cut the link to the module (test-time adaptation, Reptile's inner loop).

    Returns:
        ``{name: [B, *shape]}``; without ``detach`` these are ``expand`` views, so gradients of
        anything computed from them sum over tasks into the module's parameters.
    """
    out: Params = {}
    for name, p in module.named_parameters():
        base = p.detach() if detach else p
        fast = base.unsqueeze(0).expand(batch_size, *p.shape)
        if detach:
            fast = fast.clone().requires_grad_(True)
        out[name] = fast
    return out


def batched_forward(module: nn.Module, params: Params, inputs: Tensor) -> Tensor:
    """Run ``module`` once per task with that task's weights, as one vmapped computation.

    Args:
        module: maps ``[L, ...]`` inputs to ``[L]`` scores.
        params: ``{name: [B, *shape]}`` per-task weights (all of ``module``'s parameters).
        inputs: ``[B, L, ...]`` per-task inputs.

    Returns:
        ``[B, L]`` scores.

    A module may provide ``forward_batched(params, inputs)`` (hand-batched weights, e.g.
    ``baddbmm``); it must equal the vmapped ``functional_call``, which is the fallback.
    """

    if hasattr(module, "forward_batched"):
        return module.forward_batched(params, inputs)

    def one_task(p: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(module, dict(p), (x,))

    return vmap(one_task, in_dims=(0, 0))(params, inputs)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-task mean squared error over real (unpadded) rows.

    Args:
        pred, target: ``[B, L]``.
        mask: ``[B, L]`` bool, True on real rows.

    Returns:
        ``[B]``; equals each task's unpadded MSE exactly (padding contributes zero).
    """
    m = mask.to(pred.dtype)
    return ((pred - target) ** 2 * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def inner_loop(
    module: nn.Module,
    params: Params,
    inputs: Tensor,
    target: Tensor,
    mask: Tensor,
    lr: float | Mapping[str, Tensor],
    steps: int,
    create_graph: bool,
) -> tuple[Params, list[Tensor]]:
    """``steps`` SGD steps on every task's support loss, all tasks at once.

    Args:
        module: the adapted module (see :func:`batched_forward`).
        params: ``{name: [B, *shape]}`` starting fast weights.
        inputs: ``[B, S, ...]`` support inputs; target ``[B, S]``; mask ``[B, S]``.
        lr: a scalar step size, or per-parameter step sizes ``{name: tensor broadcastable to
            the parameter}`` (Meta-SGD).
        steps: number of inner steps ``K``.
        create_graph: keep the updates differentiable (second order); False = first order
            (gradients are constants, so the meta-gradient skips the Hessian terms).

    Returns:
        ``(adapted params, [per-task support loss [B] before each step])``.
    """
    losses: list[Tensor] = []
    names = list(params)
    for _ in range(steps):
        loss = masked_mse(batched_forward(module, params, inputs), target, mask)
        grads = torch.autograd.grad(
            loss.sum(), [params[n] for n in names], create_graph=create_graph
        )
        losses.append(loss.detach())
        if isinstance(lr, Mapping):
            params = {n: params[n] - lr[n] * g for n, g in zip(names, grads)}
        else:
            params = {n: params[n] - lr * g for n, g in zip(names, grads)}
    return params, losses
