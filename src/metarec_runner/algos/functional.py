"""The batched functional core: per-task fast weights for all tasks of a meta-batch at once.

Fast weights are plain tensors with a leading task dimension ``B``; a module is run with them
through ``torch.func.functional_call`` under ``torch.func.vmap`` (one batched computation, no
Python loop over tasks). Inner-loop gradients come from ordinary ``torch.autograd.grad`` on the
*sum* of per-task losses: task ``b``'s loss depends only on slice ``b`` of the fast weights, so
the gradient's slice ``b`` is exactly that task's own gradient. With ``create_graph=True`` the
updates stay differentiable (second-order MAML); gradients flow back to ``module.parameters()``.
No weights are ever copied into a module (``load_state_dict`` would cut the graph).

A module whose first layer is a ``Linear`` on its (non-adapted) input gets a faster, exact path,
:func:`fixed_input_inner_loop`: the first layer's per-task weights are never formed during the
inner loop; its outputs are updated through the Gram matrix of the support inputs instead.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

Params = dict[str, Tensor]


def expand_params(
    module: nn.Module, batch_size: int, detach: bool = False, skip: Collection[str] = ()
) -> Params:
    """Per-task copies (views) of ``module``'s parameters.

    Args:
        module: the module whose parameters adapt.
        batch_size: number of tasks ``B``.
        detach: cut the link to the module (test-time adaptation, Reptile's inner loop).
        skip: parameter names to leave out.

    Returns:
        ``{name: [B, *shape]}``; without ``detach`` these are ``expand`` views, so gradients of
        anything computed from them sum over tasks into the module's parameters.
    """
    out: Params = {}
    for name, p in module.named_parameters():
        if name in skip:
            continue
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


LOSSES = ("mse", "bce")
"""``mse``: squared error on ratings. ``bce``: binary cross-entropy on 0/1 labels, predictions
are logits (implicit feedback)."""


def pointwise_loss(pred: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Elementwise loss ``[B, L]`` of predictions ``pred`` against ``target`` (both ``[B, L]``).

    ``mse``: ``(pred - target)^2``. ``bce``: ``-(y log sigmoid(pred) + (1 - y) log(1 -
    sigmoid(pred)))``, computed stably from the logits ``pred``.
    """
    if kind == "mse":
        return (pred - target).square()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def masked_loss(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "mse") -> Tensor:
    """Per-task mean of :func:`pointwise_loss` over real rows: ``[B, L]`` -> ``[B]``."""
    return (pointwise_loss(pred, target, kind) * row_weights(mask, pred.dtype)).sum(-1)


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


def row_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, L]`` weights ``1 / n_b`` on task ``b``'s ``n_b`` real rows, 0 on padding.

    ``((pred - target) ** 2 * row_weights(mask)).sum(-1)`` is :func:`masked_mse` with the
    normalisation hoisted out of an inner loop.
    """
    m = mask.to(dtype)
    return m / m.sum(-1, keepdim=True).clamp_min(1.0)


def _sgd(param: Tensor, grad: Tensor, lr: float | Tensor) -> Tensor:
    """``param - lr * grad`` (one fused op for a scalar ``lr``)."""
    if isinstance(lr, Tensor):
        return param - lr * grad
    return torch.add(param, grad, alpha=-lr)


def inner_loop(
    module: nn.Module,
    params: Params,
    inputs: Tensor,
    target: Tensor,
    mask: Tensor,
    lr: float | Mapping[str, Tensor],
    steps: int,
    create_graph: bool,
    loss: str = "mse",
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
        loss: ``mse`` or ``bce`` (see :func:`pointwise_loss`).

    Returns:
        ``(adapted params, [per-task support loss [B] before each step])``.
    """
    losses: list[Tensor] = []
    names = list(params)
    weights = row_weights(mask, target.dtype)
    for _ in range(steps):
        pred = batched_forward(module, params, inputs)
        task_loss = (pointwise_loss(pred, target, loss) * weights).sum(-1)
        grads = torch.autograd.grad(
            task_loss.sum(), [params[n] for n in names], create_graph=create_graph
        )
        losses.append(task_loss.detach())
        step_lr = lr if isinstance(lr, Mapping) else dict.fromkeys(names, lr)
        params = {n: _sgd(params[n], g, step_lr[n]) for n, g in zip(names, grads)}
    return params, losses


# -- exact fast path: a first Linear layer on inputs that do not adapt -------------------------


def has_fixed_input_path(module: nn.Module) -> bool:
    """Whether ``module`` offers :func:`fixed_input_inner_loop`'s protocol.

    The module must name its first layer, an ``nn.Linear`` applied to the module's input, as
    ``first_linear_name`` and run everything after it with per-task weights in
    ``forward_rest(params, z [B, L, H]) -> [B, L]`` (``params`` as in :func:`batched_forward`).
    """
    name = getattr(module, "first_linear_name", None)
    return (
        isinstance(name, str)
        and callable(getattr(module, "forward_rest", None))
        and isinstance(module.get_submodule(name), nn.Linear)
    )


def fixed_input_pays_off(module: nn.Module, support_len: int, steps: int) -> bool:
    """Whether :func:`fixed_input_inner_loop` takes fewer multiply-adds than :func:`inner_loop`.

    Per task, with ``S = support_len`` and a first layer ``D -> H``: explicit per-task weights
    cost ``2 K S D H`` (forward and weight gradient each step); the kernel form costs
    ``S D H + S^2 D + (K - 1) S^2 H`` (step-0 outputs, the Gram matrix, its updates; no Gram
    matrix for ``K = 1``). The kernel form wins unless support sets are long (``S`` of the
    order of ``D``), where it would also hold a ``[B, S, S]`` matrix.
    """
    layer = module.get_submodule(module.first_linear_name)
    d, h, s = layer.in_features, layer.out_features, support_len
    kernel = s * d * h + (s * s * d + (steps - 1) * s * s * h if steps > 1 else 0)
    return kernel <= 2 * steps * s * d * h


def _support_kernel(x: Tensor, support: Tensor, bias: bool) -> Tensor:
    """``x support^T (+ 1 if bias)``: ``x [B, L, D]``, ``support [B, S, D]`` -> ``[B, L, S]``."""
    if bias:
        return torch.baddbmm(x.new_ones(1, 1, 1), x, support.transpose(1, 2))
    return torch.bmm(x, support.transpose(1, 2))


@dataclass
class FixedInputFastWeights:
    """Per-task fast weights whose first Linear layer is kept in kernel form.

    After SGD steps with a scalar step size ``lr`` on a first layer ``z = x W^T + c`` whose input
    does not adapt, task ``b``'s weight is ``W - lr * coef[b]^T support[b]`` and its bias
    ``c - lr * coef[b].sum(0)``, where ``coef[b]`` is the sum over steps of the support loss's
    gradients w.r.t. ``z`` (zero on padded rows). So on any inputs ``x[b]`` the adapted layer gives
    ``x[b] W^T + c - lr * (x[b] support[b]^T + 1) coef[b]``, with no per-task ``[H, D]`` matrix.

    Attributes:
        module: the adapted module (see :func:`has_fixed_input_path`).
        weight: ``[H, D]`` the first layer's initial (shared) weight; bias ``[H]`` or None.
        support: ``[B, S, D]`` the support inputs the updates were computed on.
        coef: ``[B, S, H]`` summed first-layer output gradients (zeros before any step).
        lr: the inner step size.
        rest: ``{name: [B, *shape]}`` fast weights of every other parameter.
    """

    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    support: Tensor
    coef: Tensor
    lr: float
    rest: Params

    def first_layer(self, x: Tensor) -> Tensor:
        """Adapted first-layer outputs ``[B, L, H]`` for inputs ``x [B, L, D]``."""
        z = F.linear(x, self.weight, self.bias)  # shared initial weights: one flat GEMM
        kernel = _support_kernel(x, self.support, self.bias is not None)
        return torch.baddbmm(z, kernel, self.coef, alpha=-self.lr)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``[B, L]`` for inputs ``x [B, L, D]`` with every task's adapted weights."""
        return self.module.forward_rest(self.rest, self.first_layer(x))

    def materialize(self) -> Params:
        """All fast weights as explicit ``{name: [B, *shape]}`` tensors (see
        :func:`batched_forward`); costs one ``[B, H, S] x [B, S, D]`` bmm."""
        name = self.module.first_linear_name
        batch, (hidden, width) = self.coef.shape[0], self.weight.shape
        weight = torch.baddbmm(
            self.weight.expand(batch, hidden, width), self.coef.transpose(1, 2), self.support,
            alpha=-self.lr,
        )
        out = {f"{name}.weight": weight}
        if self.bias is not None:
            out[f"{name}.bias"] = self.bias - self.lr * self.coef.sum(1)
        out.update(self.rest)
        return {n: out[n] for n, _ in self.module.named_parameters()}


def fixed_input_inner_loop(
    module: nn.Module,
    inputs: Tensor,
    target: Tensor,
    mask: Tensor,
    lr: float,
    steps: int,
    create_graph: bool,
    detach: bool = False,
    loss: str = "mse",
) -> tuple[FixedInputFastWeights, list[Tensor]]:
    """:func:`inner_loop` from the module's own weights, exact, for modules whose first layer is
    a Linear on the (non-adapted) inputs and a scalar step size.

    The first layer's support outputs ``z [B, S, H]`` start as one flat GEMM with the shared
    weights and move by ``z <- z - lr * K delta`` per step, with ``delta = dloss/dz`` and the
    per-task kernel ``K = support support^T + 1`` ``[B, S, S]`` (computed once): the same
    numbers as updating ``W`` and ``c`` and recomputing ``z``, in ``S^2 H`` instead of
    ``2 S D H`` multiply-adds per step, and no per-task ``[H, D]`` weights.

    Args:
        module: see :func:`has_fixed_input_path`.
        inputs: ``[B, S, D]`` support inputs; target ``[B, S]``; mask ``[B, S]``.
        lr: scalar step size.
        steps: number of inner steps ``K``.
        create_graph: second order (see :func:`inner_loop`); in first order the first layer's
            updates ``coef^T support`` are constants, so ``support`` is detached.
        detach: start from detached copies (see :func:`expand_params`).
        loss: ``mse`` or ``bce`` (see :func:`pointwise_loss`).

    Returns:
        ``(fast weights, [per-task support loss [B] before each step])``.
    """
    layer = module.get_submodule(module.first_linear_name)
    names = {f"{module.first_linear_name}.{n}" for n, _ in layer.named_parameters()}
    weight, bias = layer.weight, layer.bias
    if detach:
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
        inputs = inputs.detach()
    rest = expand_params(module, inputs.shape[0], detach=detach, skip=names)
    rest_names = list(rest)
    support = inputs if create_graph else inputs.detach()
    z = F.linear(inputs, weight, bias)  # [B, S, H]: all tasks share step 0's weights
    if not z.requires_grad:  # detached start: z is the leaf the inner gradients are taken at
        z.requires_grad_(True)
    kernel = _support_kernel(support, support, bias is not None) if steps > 1 else None
    weights = row_weights(mask, target.dtype)
    coef: Tensor | None = None
    losses: list[Tensor] = []
    for step in range(steps):
        pred = module.forward_rest(rest, z)
        task_loss = (pointwise_loss(pred, target, loss) * weights).sum(-1)
        delta, *grads = torch.autograd.grad(
            task_loss.sum(), [z, *(rest[n] for n in rest_names)], create_graph=create_graph
        )
        losses.append(task_loss.detach())
        rest = {n: _sgd(rest[n], g, lr) for n, g in zip(rest_names, grads)}
        coef = delta if coef is None else coef + delta
        if step + 1 < steps:
            z = torch.baddbmm(z, kernel, delta, alpha=-lr)
    if coef is None:  # no steps
        coef = torch.zeros_like(z)
    fast = FixedInputFastWeights(module, weight, bias, support, coef, float(lr), rest)
    return fast, losses


# -- first-order single step on packed rows: every task starts from the same weights -----------


def has_packed_first_step(module: nn.Module) -> bool:
    """Whether ``module`` can take :func:`packed_first_order_step`: the fixed-input protocol
    (:func:`has_fixed_input_path`) on a plain MLP, ``module.net`` an ``nn.Sequential`` of
    ``Linear`` layers and ReLUs whose first layer is ``first_linear_name`` and whose output is
    ``net(h).squeeze(-1)``."""
    net = getattr(module, "net", None)
    return (
        has_fixed_input_path(module)
        and isinstance(net, nn.Sequential)
        and module.first_linear_name == "net.0"
        and all(isinstance(layer, (nn.Linear, nn.ReLU)) for layer in net)
        and isinstance(net[-1], nn.Linear) and net[-1].out_features == 1
        and all(layer.bias is not None for layer in net if isinstance(layer, nn.Linear))
    )


def packed_first_order_step(
    module: nn.Module,
    support: Tensor,
    target: Tensor,
    mask: Tensor,
    lr: float,
    loss: str = "mse",
) -> tuple[FixedInputFastWeights, list[Tensor]]:
    """:func:`fixed_input_inner_loop` for one first-order step (``steps=1``,
    ``create_graph=False``, not detached), computed on the packed real support rows.

    Before the first step every task has the module's own weights, so the support forward pass
    is one flat pass over the ``N`` real rows with shared weights (no padded rows, no per-task
    weights), and first order needs no graph through it. Per-task gradients then come from the
    per-row gradients of every Linear layer's output ``g [N, out]`` and its input ``a [N, in]``:
    task ``b``'s weight gradient is ``sum over its rows of g^T a`` (a bmm over the rows put
    back into the padded layout ``[B, S, .]``), its bias gradient the sum of ``g``; the first
    layer keeps its kernel form (``coef`` = the padded output gradients). The same numbers as
    :func:`fixed_input_inner_loop`, in fewer multiply-adds: padding costs only those bmms.

    Args:
        module: see :func:`has_packed_first_step`.
        support: ``[B, S, D]`` padded support inputs (zeros on padding); target ``[B, S]``;
            mask ``[B, S]``.
        lr: scalar step size.
        loss: ``mse`` or ``bce``.

    Returns:
        ``(fast weights, [per-task support loss [B] before the step])``.
    """
    net = module.net
    first = net[0]
    batch, length = mask.shape
    support = support.detach()
    rows = support[mask]  # [N, D] real rows, task-major
    weights = row_weights(mask, target.dtype)[mask]  # [N] 1 / n_task
    with torch.enable_grad():
        z = F.linear(rows, first.weight.detach(), first.bias.detach()).requires_grad_(True)
        h, taps = z, []  # taps: (layer index, its input [N, in], its output [N, out])
        for i, layer in enumerate(net):
            if i == 0:
                continue
            if isinstance(layer, nn.Linear):
                a = h
                h = F.linear(a, layer.weight.detach(), layer.bias.detach())
                taps.append((i, a.detach(), h))
            else:
                h = layer(h)
        row_loss = pointwise_loss(h.squeeze(-1), target[mask], loss) * weights  # [N]
        delta, *grads = torch.autograd.grad(row_loss.sum(), [z, *(out for _, _, out in taps)])
    task_loss = torch.zeros(batch, dtype=row_loss.dtype, device=row_loss.device)
    task_loss.index_put_((mask.nonzero()[:, 0],), row_loss.detach(), accumulate=True)

    def padded(values: Tensor) -> Tensor:  # [N, k] -> [B, S, k], zeros on padding
        out = values.new_zeros(batch, length, values.shape[-1])
        return out.index_put_((mask,), values)

    rest: Params = {}
    for (i, a, _), g in zip(taps, grads):
        layer = net[i]
        g_pad = padded(g)
        if layer.out_features == 1:  # [B, 1, in]: the sum over a task's rows of g * a
            g_weight = (g_pad * padded(a)).sum(1, keepdim=True)
        else:
            g_weight = torch.bmm(g_pad.transpose(1, 2), padded(a))  # [B, out, in]
        for name, grad in ((f"net.{i}.weight", g_weight), (f"net.{i}.bias", g_pad.sum(1))):
            param = module.get_parameter(name)
            rest[name] = torch.add(param.unsqueeze(0).expand(batch, *param.shape), grad, alpha=-lr)
    fast = FixedInputFastWeights(module, first.weight, first.bias, support, padded(delta),
                                 float(lr), rest)
    return fast, [task_loss]
