"""Exact fast paths for a module whose first layer is a ``Linear`` on inputs that do not adapt.

The MLP head with ``adapt: head`` (MeLU's local update): the first layer's per-task weights are
never formed during the inner loop (:func:`fixed_input_inner_loop`: its outputs move through the
Gram matrix of the support inputs), and one first-order step runs on the packed real support
rows (:func:`packed_first_order_step`). Both give the numbers of
:func:`~metarec_runner.algos.functional.inner_loop` (tested to 1e-10 in float64) and apply only
where :func:`has_fixed_input_path` holds: the module's class wrote ``forward_rest`` for its own
``forward`` (:func:`~metarec_runner.algos.functional.has_exact_fast_path`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarec_runner.algos.functional import (
    FastWeights,
    Params,
    _sgd,
    expand_params,
    has_exact_fast_path,
    pointwise_loss,
    row_weights,
)


def has_fixed_input_path(module: nn.Module) -> bool:
    """Whether ``module`` offers :func:`fixed_input_inner_loop`'s protocol.

    The module must name its first layer, an ``nn.Linear`` applied to the module's input, as
    ``first_linear_name`` and run everything after it with per-task weights in
    ``forward_rest(params, z [B, L, H]) -> [B, L]`` (``params`` as in ``batched_forward``), and
    that ``forward_rest`` must be exact for the module's class (``has_exact_fast_path``).
    """
    name = getattr(module, "first_linear_name", None)
    return (
        isinstance(name, str)
        and has_exact_fast_path(module, "forward_rest")
        and isinstance(module.get_submodule(name), nn.Linear)
    )


def fixed_input_pays_off(module: nn.Module, support_len: int, steps: int) -> bool:
    """Whether :func:`fixed_input_inner_loop` takes fewer multiply-adds than ``functional.inner_loop``.

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


@dataclass(eq=False)
class FixedInputFastWeights(FastWeights):
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

    def detach(self) -> FixedInputFastWeights:
        bias = None if self.bias is None else self.bias.detach()
        fast = FixedInputFastWeights(self.module, self.weight.detach(), bias, self.support.detach(),
                                     self.coef.detach(), self.lr,
                                     {n: p.detach() for n, p in self.rest.items()})
        fast.features = self.features
        return fast

    def __getitem__(self, name: str) -> Tensor:
        return self.materialize()[name]

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self.module.named_parameters())

    def materialize(self) -> Params:
        """All fast weights as explicit ``{name: [B, *shape]}`` tensors (see
        :func:`~metarec_runner.algos.functional.batched_forward`); costs one ``[B, H, S] x [B, S, D]`` bmm."""
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
    """:func:`~metarec_runner.algos.functional.inner_loop` from the module's own weights, exact,
    for modules whose first layer is a Linear on the (non-adapted) inputs and a scalar step size.

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
        create_graph: second order (see ``functional.inner_loop``); in first order the first layer's
            updates ``coef^T support`` are constants, so ``support`` is detached.
        detach: start from detached copies (see ``functional.expand_params``).
        loss: ``mse`` or ``bce`` (see ``functional.pointwise_loss``).

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
        rest = {n: _sgd(rest[n], g, lr) for n, g in zip(rest_names, grads, strict=True)}
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
    for (i, a, _), g in zip(taps, grads, strict=True):
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
