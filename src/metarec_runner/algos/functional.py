"""The batched functional core: per-task fast weights for all tasks of a meta-batch at once.

Fast weights are plain tensors with a leading task dimension ``B``; a module is run with them
through ``torch.func.functional_call`` under ``torch.func.vmap`` (one batched computation, no
Python loop over tasks) on its real ``forward``. Inner-loop gradients come from ordinary
``torch.autograd.grad`` on the *sum* of per-task losses: task ``b``'s loss depends only on slice
``b`` of the fast weights, so the gradient's slice ``b`` is exactly that task's own gradient.
With ``create_graph=True`` the updates stay differentiable (second-order MAML); gradients flow
back to ``module.parameters()``. No weights are ever copied into a module (``load_state_dict``
would cut the graph).

**Fast paths.** A class may hand-write per-task versions of its ``forward``
(:data:`FAST_PATHS`: ``forward_batched``, ``forward_rest``, ``lookup``); they are used only where
:func:`has_exact_fast_path` says they compute the module's real ``forward``, i.e. on the exact
classes that wrote them (a subclass overriding ``forward`` is trained through ``functional_call``
on its own forward) or on an explicit opt-in. A module whose first layer is a ``Linear`` on its
(non-adapted) input gets a faster, exact path, :func:`fixed_input_inner_loop`: the first layer's
per-task weights are never formed during the inner loop; its outputs are updated through the
Gram matrix of the support inputs instead.

**Fast weights** (:class:`FastWeights`) are a mapping ``{name: [B, *shape]}`` over the adapted
module's parameters that also knows how to apply itself: ``forward(h)`` on the module's inputs,
``predict(x)`` on feature rows, ``detach()`` and ``task_mean(name)``; the algorithms never look
at their type (:mod:`~metarec_runner.algos.inner_loop` makes them).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

Params = dict[str, Tensor]

#: hand-written per-task versions of a module's forward (see :func:`has_exact_fast_path`)
FAST_PATHS = ("forward_batched", "forward_rest", "lookup")


def has_exact_fast_path(module: nn.Module, method: str | None = None) -> bool:
    """Whether the batched core may run ``module`` through its hand-written fast paths.

    A fast path of :data:`FAST_PATHS` is written for the ``forward`` of the class that defines
    it, so it is trusted only while ``type(module).forward`` is that class's ``forward``; a
    subclass that overrides ``forward`` alone is trained through ``functional_call`` on its own
    forward. A class opts in (or out) explicitly with ``exact_fast_path = True`` (``False``) in
    its own class body (read from ``type(module).__dict__``, so never inherited). Every
    submodule must pass too; one without fast paths must be a ``torch`` built-in layer.

    Args:
        module: the module to run with per-task weights.
        method: also require this fast path (e.g. ``forward_batched``) on ``module`` itself.
    """
    cls = type(module)
    if method is not None and not callable(getattr(module, method, None)):
        return False
    declared = cls.__dict__.get("exact_fast_path")
    if declared is not None:
        own = bool(declared)
    else:
        owners = [next(c for c in cls.__mro__ if name in c.__dict__)
                  for name in FAST_PATHS if hasattr(cls, name)]
        own = (all(cls.forward is o.forward for o in owners) if owners
               else cls.__module__.startswith("torch."))
    return own and all(has_exact_fast_path(child) for child in module.children())


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


def batched_forward(
    module: nn.Module, params: Mapping[str, Tensor], inputs: Tensor, hand_batched: bool | None = None
) -> Tensor:
    """Run ``module`` once per task with that task's weights, as one batched computation.

    Args:
        module: maps ``[L, ...]`` inputs to ``[L]`` scores.
        params: ``{name: [B, *shape]}`` per-task weights (all of ``module``'s parameters).
        inputs: ``[B, L, ...]`` per-task inputs.
        hand_batched: run ``module.forward_batched(params, inputs)`` (hand-batched weights, e.g.
            ``baddbmm``); None = where :func:`has_exact_fast_path` allows it. Otherwise (the
            reference) ``vmap`` over ``functional_call`` on ``module``'s real forward.

    Returns:
        ``[B, L]`` scores.
    """
    if hand_batched is None:
        hand_batched = has_exact_fast_path(module, "forward_batched")
    if hand_batched:
        return module.forward_batched(params, inputs)

    def one_task(p: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(module, dict(p), (x,))

    return vmap(one_task, in_dims=(0, 0))(dict(params), inputs)


class FastWeights(Mapping):
    """Per-task fast weights of an adapted module for the ``B`` tasks of a batch.

    As a mapping: ``{name: [B, *shape]}`` for every parameter of the module (explicit tensors;
    a compact representation is materialised on access, for inspection and tests).

    Attributes:
        features: maps feature rows ``[B, L, F_all]`` to the module's inputs (``model.body``
            with ``adapt: head``); None = the rows themselves.
    """

    features: Callable[[Tensor], Tensor] | None = None

    def forward(self, h: Tensor) -> Tensor:
        """Scores ``[B, L]`` of the module's inputs ``h [B, L, ...]`` with every task's weights."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """Scores ``[B, L]`` of feature rows ``x [B, L, F_all]``."""
        return self.forward(x if self.features is None else self.features(x))

    def detach(self) -> FastWeights:
        """The same weights without a graph back to the model."""
        raise NotImplementedError

    def task_mean(self, name: str) -> Tensor:
        """The mean over tasks of parameter ``name``'s fast weights, ``[*shape]``."""
        return self[name].mean(0)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class DenseFastWeights(FastWeights):
    """Explicit per-task tensors ``params {name: [B, *shape]}`` of ``module``'s parameters, run
    by :func:`batched_forward` (``hand_batched`` as there)."""

    def __init__(self, module: nn.Module, params: Mapping[str, Tensor], hand_batched: bool | None = None,
                 features: Callable[[Tensor], Tensor] | None = None) -> None:
        self.module, self.params, self.hand_batched = module, dict(params), hand_batched
        self.features = features

    def forward(self, h: Tensor) -> Tensor:
        return batched_forward(self.module, self.params, h, self.hand_batched)

    def detach(self) -> DenseFastWeights:
        return DenseFastWeights(self.module, {n: p.detach() for n, p in self.params.items()},
                                self.hand_batched, self.features)

    def __getitem__(self, name: str) -> Tensor:
        return self.params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)


LOSSES = ("mse", "bce", "bpr", "softmax")
"""``mse``: squared error on ratings. ``bce``: binary cross-entropy on 0/1 labels, predictions
are logits (implicit feedback); with sampled negatives, positives against them. ``bpr`` and
``softmax``: a task's positives against its sampled negatives (``algos.ranking_loss``)."""

POINTWISE_LOSSES = ("mse", "bce")
"""The losses :func:`pointwise_loss` computes row by row from a target."""

TaskLoss = Callable[[Tensor], Tensor]
"""A per-task loss of scores: ``loss(pred [B, L]) -> [B]`` (what the inner loops minimise)."""


def pointwise_loss(pred: Tensor, target: Tensor, kind: str | TaskLoss = "mse") -> Tensor:
    """Elementwise loss ``[B, L]`` of predictions ``pred`` against ``target`` (both ``[B, L]``).

    ``mse``: ``(pred - target)^2``. ``bce``: ``-(y log sigmoid(pred) + (1 - y) log(1 -
    sigmoid(pred)))``, computed stably from the logits ``pred``. ``kind`` may also be a
    :data:`TaskLoss` (a ranking loss): its value per task, spread over the task's rows, so
    that weighted by :func:`row_weights` (which sum to 1 over a task's real rows) the rows give
    back the task loss and its gradient; this is how the kernel-form inner loop of
    ``algos.fixed_input`` takes a ranking loss (``target`` is then unused).
    """
    if callable(kind):  # a task loss, broadcast over the rows (see the docstring)
        return kind(pred).unsqueeze(-1).expand_as(pred)
    if kind == "mse":
        return (pred - target).square()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    if kind in LOSSES:
        raise ValueError(f"loss {kind!r} compares positives with sampled negatives, not rows with a "
                         "target: pass the episode's task loss (algos.ranking_loss.Episode)")
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def pointwise_task_loss(target: Tensor, mask: Tensor, kind: str = "mse") -> TaskLoss:
    """The task loss ``pred [B, L] -> [B]`` of :func:`masked_loss` on ``target`` and ``mask``
    (``[B, L]``), its row weights computed once (the same numbers as :func:`masked_loss`)."""
    weights = row_weights(mask, target.dtype)

    def loss(pred: Tensor) -> Tensor:
        return (pointwise_loss(pred, target, kind) * weights).sum(-1)

    return loss


def masked_loss(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "mse") -> Tensor:
    """Per-task mean of :func:`pointwise_loss` over real rows: ``[B, L]`` -> ``[B]``."""
    return (pointwise_loss(pred, target, kind) * row_weights(mask, pred.dtype)).sum(-1)


def row_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, L]`` weights ``1 / n_b`` on task ``b``'s ``n_b`` real rows, 0 on padding.

    ``((pred - target) ** 2 * row_weights(mask)).sum(-1)`` is :func:`masked_loss` (``kind="mse"``) with the
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
    loss: str | TaskLoss = "mse",
    forward: Callable[[Params, Tensor], Tensor] | None = None,
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
        loss: ``mse`` or ``bce`` on ``target`` (see :func:`pointwise_task_loss`), or a
            :data:`TaskLoss` of the scores (a ranking loss: ``target`` is then unused).
        forward: ``forward(params, inputs) -> [B, S]`` scores with per-task weights; None =
            :func:`batched_forward` on ``module``.

    Returns:
        ``(adapted params, [per-task support loss [B] before each step])``.
    """
    if forward is None:
        hand_batched = has_exact_fast_path(module, "forward_batched")

        def forward(p: Params, h: Tensor) -> Tensor:
            return batched_forward(module, p, h, hand_batched)

    losses: list[Tensor] = []
    names = list(params)
    task_loss_of = loss if callable(loss) else pointwise_task_loss(target, mask, loss)
    for _ in range(steps):
        pred = forward(params, inputs)
        task_loss = task_loss_of(pred)
        grads = torch.autograd.grad(
            task_loss.sum(), [params[n] for n in names], create_graph=create_graph
        )
        losses.append(task_loss.detach())
        step_lr = lr if isinstance(lr, Mapping) else dict.fromkeys(names, lr)
        params = {n: _sgd(params[n], g, step_lr[n]) for n, g in zip(names, grads, strict=True)}
    return params, losses
