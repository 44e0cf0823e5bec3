"""The batched functional core equals the per-task reference loop to float64 precision."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call, vmap

from metarec_runner.algos.functional import batched_forward, masked_mse
from metarec_runner.algos.maml import MAML
from metarec_runner.algos.reference import per_task_meta_loss
from metarec_runner.algos.reptile import Reptile
from metarec_runner.models.preference import PreferenceEstimator
from tests.conftest import SMALL_SCHEMA, random_taskset

TOL = 1e-10


def _model(seed: int = 0) -> PreferenceEstimator:
    torch.manual_seed(seed)
    return PreferenceEstimator(SMALL_SCHEMA, embedding_dim=4, hidden=(8, 6), rating_mean=3.0).double()


def _batch(n_tasks: int = 6, seed: int = 1):
    tasks = random_taskset(SMALL_SCHEMA, n_tasks, support=(2, 9), query=(1, 5), seed=seed)
    return tasks.batch(torch.arange(n_tasks)).to("cpu", torch.float64)


@pytest.mark.parametrize("scope", ["head", "all"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_batched_meta_gradient_equals_per_task_loop(scope, first_order, steps):
    model = _model()
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), adapt=scope, inner_lr=0.3,
                inner_steps=steps, first_order=first_order)
    batch = _batch()
    params = list(model.parameters())
    loss, _ = algo.meta_loss(batch)
    batched = torch.autograd.grad(loss, params)
    reference = torch.autograd.grad(per_task_meta_loss(algo, batch, 0.3, steps, first_order), params)
    assert torch.allclose(loss, per_task_meta_loss(algo, batch, 0.3, steps, first_order), atol=TOL, rtol=0)
    for b, r in zip(batched, reference):
        assert (b - r).abs().max() < TOL
    assert any(g.abs().sum() > 0 for g in batched)


def test_second_and_first_order_gradients_differ():
    """Second order must not silently degrade to first order (the peer's load_state_dict bug)."""
    batch = _batch()
    grads = []
    for first_order in (False, True):
        model = _model()
        algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), inner_lr=0.3, inner_steps=2,
                    first_order=first_order)
        loss, _ = algo.meta_loss(batch)
        grads.append(torch.autograd.grad(loss, list(model.head.parameters())))
    diff = max((a - b).abs().max() for a, b in zip(*grads))
    assert diff > 1e-6


def test_hand_batched_forward_equals_vmap_functional_call():
    model = _model()
    batch = _batch()
    for module, inputs in ((model.head, model.body(batch.support_x)), (model, batch.support_x)):
        params = {n: p.detach().unsqueeze(0).expand(batch.size, *p.shape).clone() + 0.01 * torch.randn(batch.size, *p.shape, dtype=p.dtype)
                  for n, p in module.named_parameters()}
        fast = batched_forward(module, params, inputs)
        ref = vmap(lambda p, x: functional_call(module, p, (x,)))(params, inputs)
        assert (fast - ref).abs().max() < TOL


def test_masked_loss_equals_unpadded_loss():
    batch = _batch()
    pred = torch.randn_like(batch.support_y)
    padded = masked_mse(pred, batch.support_y, batch.support_mask)
    for b in range(batch.size):
        n = int(batch.support_mask[b].sum())
        assert torch.allclose(padded[b], ((pred[b, :n] - batch.support_y[b, :n]) ** 2).mean(), atol=TOL)


def test_adapt_lowers_support_loss_and_leaves_model_unchanged():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), inner_lr=0.1, inner_steps=1,
                eval_inner_steps=5)
    batch = _batch()
    base = masked_mse(model(batch.support_x), batch.support_y, batch.support_mask)
    adapted = masked_mse(algo.adapt(batch).predict(batch.support_x), batch.support_y, batch.support_mask)
    assert (adapted < base).all()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_reptile_update_is_mean_of_adapted_minus_initial():
    """With SGD(lr=1) on adapt=all, Reptile moves theta exactly to mean_b(phi_b)."""
    model = _model()
    algo = Reptile(model, functools.partial(torch.optim.SGD, lr=1.0), adapt="all", inner_lr=0.2,
                   inner_steps=3)
    batch = _batch()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi = algo.adapt(batch).params  # eval_inner_steps defaults to inner_steps
    algo.meta_step(batch)
    for n, p in model.named_parameters():
        expected = theta[n] + (phi[n].mean(0) - theta[n])
        assert (p.detach() - expected).abs().max() < TOL
