"""The batched functional core equals the per-task reference loop to float64 precision."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch.func import functional_call, vmap

from metarec_runner.algos.base import _min_padding_cuts, split_by_support_size
from metarec_runner.algos.fixed_input import fixed_input_inner_loop, has_fixed_input_path
from metarec_runner.algos.functional import (
    batched_forward,
    expand_params,
    inner_loop,
    masked_loss,
)
from metarec_runner.algos.maml import MAML
from metarec_runner.algos.reference import per_task_meta_loss
from metarec_runner.algos.reptile import Reptile
from metarec_runner.data.interactions import FeatureSchema
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
    for b, r in zip(batched, reference, strict=True):
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
    diff = max((a - b).abs().max() for a, b in zip(*grads, strict=True))
    assert diff > 1e-6


def test_hand_batched_forward_equals_vmap_functional_call():
    model = _model()
    batch = _batch()
    for module, inputs in ((model.head, model.body(batch.support_x)), (model, batch.support_x)):
        params = {n: p.detach().unsqueeze(0).expand(batch.size, *p.shape).clone()
                  + 0.01 * torch.randn(batch.size, *p.shape, dtype=p.dtype)
                  for n, p in module.named_parameters()}
        fast = batched_forward(module, params, inputs)
        ref = vmap(functools.partial(lambda m, p, x: functional_call(m, p, (x,)), module))(params, inputs)
        assert (fast - ref).abs().max() < TOL


def test_masked_loss_equals_unpadded_loss():
    batch = _batch()
    pred = torch.randn_like(batch.support_y)
    padded = masked_loss(pred, batch.support_y, batch.support_mask, "mse")
    for b in range(batch.size):
        n = int(batch.support_mask[b].sum())
        assert torch.allclose(padded[b], ((pred[b, :n] - batch.support_y[b, :n]) ** 2).mean(), atol=TOL)


def test_adapt_lowers_support_loss_and_leaves_model_unchanged():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), inner_lr=0.1, inner_steps=1,
                eval_inner_steps=5)
    batch = _batch()
    base = masked_loss(model(batch.support_x), batch.support_y, batch.support_mask, "mse")
    adapted = masked_loss(algo.adapt(batch).predict(batch.support_x), batch.support_y, batch.support_mask, "mse")
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


# -- padding-aware chunking and the fixed-input (kernel) path -------------------------------


def _ragged_batch(n_tasks: int = 9, seed: int = 3):
    tasks = random_taskset(SMALL_SCHEMA, n_tasks, support=(1, 12), query=(1, 6), seed=seed)
    return tasks.batch(torch.arange(n_tasks)).to("cpu", torch.float64)


@pytest.mark.parametrize("scope", ["head", "all"])
@pytest.mark.parametrize("first_order", [False, True])
def test_chunked_meta_loss_equals_unchunked(scope, first_order):
    batch = _ragged_batch()
    results = []
    for chunks in (1, 2, 4, 100):
        model = _model()
        algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), adapt=scope, inner_lr=0.3,
                    inner_steps=2, first_order=first_order, chunks=chunks)
        loss, inner = algo.meta_loss(batch)
        results.append((loss, inner, torch.autograd.grad(loss, list(model.parameters()))))
    reference = per_task_meta_loss(algo, batch, 0.3, 2, first_order)
    for loss, inner, grads in results:
        assert abs(loss - results[0][0]) < TOL and abs(inner - results[0][1]) < TOL
        assert abs(loss - reference) < TOL
        for g, g0 in zip(grads, results[0][2], strict=True):
            assert (g - g0).abs().max() < TOL


def test_split_by_support_size_partitions_tasks_and_trims_padding():
    batch = _ragged_batch(n_tasks=12)
    sizes = batch.support_mask.sum(1)
    parts = split_by_support_size(batch, 3)
    assert len(parts) == 3
    assert sorted(torch.cat([p.task_index for p in parts]).tolist()) == batch.task_index.tolist()
    for p in parts:
        assert p.support_x.shape[1] == int(p.support_mask.sum(1).max())  # own max, no more
        assert p.query_x.shape[1] == int(p.query_mask.sum(1).max())
        for j, t in enumerate(p.task_index.tolist()):
            n, q = int(sizes[t]), int(batch.query_mask[t].sum())
            assert int(p.support_mask[j].sum()) == n and int(p.query_mask[j].sum()) == q
            assert torch.equal(p.support_x[j, :n], batch.support_x[t, :n])
            assert torch.equal(p.support_y[j, :n], batch.support_y[t, :n])
            assert torch.equal(p.query_x[j, :q], batch.query_x[t, :q])
            assert torch.equal(p.query_y[j, :q], batch.query_y[t, :q])
    # padded rows of the split never exceed the unsplit batch's, and 1 chunk is the batch itself
    padded = sum(p.support_x.shape[0] * p.support_x.shape[1] for p in parts)
    assert padded <= batch.support_x.shape[0] * batch.support_x.shape[1]
    assert split_by_support_size(batch, 1) == [batch]


def test_split_by_support_size_isolates_outliers():
    """The cut minimises padding: one long support set gets its own group."""
    assert _min_padding_cuts(torch.tensor([2] * 7 + [50]), 2) == [7, 8]
    assert _min_padding_cuts(torch.tensor([1, 2, 3, 4]), 4) == [1, 2, 3, 4]
    assert _min_padding_cuts(torch.tensor([5, 5, 5]), 3) == [3]  # never cuts equal sizes
    assert _min_padding_cuts(torch.tensor([1, 1, 2, 2, 2, 9]), 2) == [5, 6]
    sizes = torch.tensor([1, 1, 3, 4, 4, 6, 7, 7, 10, 12])
    for groups in (1, 2, 3, 5):  # optimal against brute force over all cut sets

        def padded(cuts):
            ends, starts = list(cuts), [0, *cuts[:-1]]
            return sum((e - s) * int(sizes[e - 1]) for s, e in zip(starts, ends, strict=True))

        best = min(padded([*c, 10]) for c in itertools.combinations(range(1, 10), groups - 1)
                   if all(sizes[i - 1] != sizes[i] for i in c))
        assert padded(_min_padding_cuts(sizes, groups)) == best


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_fixed_input_path_equals_generic_inner_loop(first_order, detach, steps):
    """Kernel-form first layer: same adapted weights, same scores, same meta-gradients."""
    model = _model()
    batch = _ragged_batch()
    head = model.head
    assert has_fixed_input_path(head)
    h = model.body(batch.support_x)
    hq = model.body(batch.query_x)
    args = (batch.support_y, batch.support_mask)
    fast, losses = fixed_input_inner_loop(head, h, *args, 0.3, steps, not first_order, detach)
    params, ref_losses = inner_loop(head, expand_params(head, batch.size, detach=detach),
                                    h.detach() if detach else h, *args, 0.3, steps, not first_order)
    for a, b in zip(losses, ref_losses, strict=True):
        assert (a - b).abs().max() < TOL
    explicit = fast.materialize()
    assert list(explicit) == list(params)
    for n in params:
        assert explicit[n].shape == params[n].shape
        assert (explicit[n] - params[n]).abs().max() < TOL
    scores = fast.forward(hq)
    ref_scores = batched_forward(head, params, hq)
    assert (scores - ref_scores).abs().max() < TOL
    assert (batched_forward(head, explicit, hq) - ref_scores).abs().max() < TOL
    if not detach:
        loss = (scores ** 2).sum()
        ref = (ref_scores ** 2).sum()
        for a, b in zip(torch.autograd.grad(loss, list(model.parameters()), retain_graph=True),
                        torch.autograd.grad(ref, list(model.parameters())), strict=True):
            assert (a - b).abs().max() < TOL


class _PlainHead(torch.nn.Module):
    """An MLP head without ``forward_batched`` or the fixed-input protocol: runs through vmap."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


@pytest.mark.parametrize("first_order", [False, True])
def test_modules_without_batched_paths_fall_back_to_vmap(first_order):
    model = _model()
    model.head = _PlainHead(model.head.net)
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), adapt="head", inner_lr=0.3,
                inner_steps=2, first_order=first_order)
    assert not algo.uses_fixed_input_path(algo.inner_lr, 10, 2)
    batch = _batch()
    params = list(model.parameters())
    loss, _ = algo.meta_loss(batch)
    reference = per_task_meta_loss(algo, batch, 0.3, 2, first_order)
    assert abs(loss - reference) < TOL
    for b, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference, params), strict=True):
        assert (b - r).abs().max() < TOL


def test_head_scope_uses_fixed_input_path_and_adapt_matches_meta_loss_scores():
    model = _model()
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), adapt="head", inner_lr=0.3,
                inner_steps=3, eval_inner_steps=3)
    batch = _batch()
    assert algo.uses_fixed_input_path(algo.inner_lr, batch.support_x.shape[1], 3)
    scores, _ = algo.adapt_and_score(batch, 0.3, 3, create_graph=False)
    assert (algo.adapt(batch).predict(batch.query_x) - scores.detach()).abs().max() < TOL


def test_fixed_input_path_is_skipped_for_long_support_sets():
    """S of the order of D: the [B, S, S] kernel would cost more than explicit weights."""
    model = _model()  # head input D = 5 fields x 4 = 20
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), inner_lr=0.3, inner_steps=3)
    assert algo.uses_fixed_input_path(0.3, 8, 3) and algo.uses_fixed_input_path(0.3, 500, 1)
    assert not algo.uses_fixed_input_path(0.3, 60, 3)
    assert not algo.uses_fixed_input_path({"net.0.weight": torch.tensor(0.3)}, 8, 3)  # Meta-SGD
    tasks = random_taskset(SMALL_SCHEMA, 4, support=(30, 60), query=(1, 5), seed=5)
    batch = tasks.batch(torch.arange(4)).to("cpu", torch.float64)
    params = list(model.parameters())
    loss, _ = algo.meta_loss(batch)
    reference = per_task_meta_loss(algo, batch, 0.3, 3, False)
    assert abs(loss - reference) < TOL
    for b, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference, params), strict=True):
        assert (b - r).abs().max() < TOL


BAG_SCHEMA = FeatureSchema(("a", "genres", "user_id", "item_id"), (3, 6, 20, 30), (1, 3, 1, 1))


def _bag_batch(n_tasks: int = 5):
    tasks = random_taskset(BAG_SCHEMA, n_tasks, support=(2, 7), query=(1, 4), seed=4)
    # pad some bag slots with -1 (a bag of 1-3 genres)
    g = torch.Generator().manual_seed(0)
    for x in (tasks.support_x, tasks.query_x):
        drop = torch.rand(x.shape[0], 2, generator=g) < 0.5
        x[:, 2:4][drop] = -1
    return tasks.batch(torch.arange(n_tasks)).to("cpu", torch.float64)


def test_bag_fields_are_sums_of_token_embeddings():
    torch.manual_seed(0)
    model = PreferenceEstimator(BAG_SCHEMA, embedding_dim=4, hidden=(5,)).double()
    x = torch.tensor([[2, 1, 4, -1, 7, 9], [0, -1, -1, 5, 3, 1]])
    h = model.body(x)
    table = model.embedding.weight
    expect0 = torch.cat([table[2], table[3 + 1] + table[3 + 4], table[3 + 6 + 9]])  # no user_id
    expect1 = torch.cat([table[0], table[3 + 5], table[3 + 6 + 1]])
    assert torch.allclose(h, torch.stack([expect0, expect1]))


@pytest.mark.parametrize("scope", ["head", "all"])
def test_batched_meta_gradient_with_bag_fields(scope):
    torch.manual_seed(0)
    model = PreferenceEstimator(BAG_SCHEMA, embedding_dim=4, hidden=(6,), rating_mean=3.0).double()
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), adapt=scope, inner_lr=0.3,
                inner_steps=2)
    batch = _bag_batch()
    params = list(model.parameters())
    batched = torch.autograd.grad(algo.meta_loss(batch)[0], params)
    reference = torch.autograd.grad(per_task_meta_loss(algo, batch, 0.3, 2, False), params)
    for b, r in zip(batched, reference, strict=True):
        assert (b - r).abs().max() < TOL


@pytest.mark.parametrize("hidden", [(8, 6), (5,)])
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_packed_first_order_step_equals_per_task_loop(hidden, loss):
    """First order, one inner step, MLP head: the packed path is taken and its meta-loss and
    meta-gradient equal the per-task loop (float64), whatever ``chunks`` says."""
    torch.manual_seed(0)
    model = PreferenceEstimator(SMALL_SCHEMA, embedding_dim=4, hidden=hidden, rating_mean=0.5).double()
    batch = _batch()
    if loss == "bce":
        batch = type(batch)(batch.support_x, (batch.support_y > 3).double() * batch.support_mask,
                            batch.support_mask, batch.query_x,
                            (batch.query_y > 3).double() * batch.query_mask, batch.query_mask,
                            batch.task_index)
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), inner_lr=0.3, inner_steps=1,
                first_order=True, chunks=3, loss=loss)
    assert algo.uses_packed_first_step(algo.inner_lr, 1, create_graph=False)
    params = list(model.parameters())
    loss_value, inner = algo.meta_loss(batch)
    reference = per_task_meta_loss(algo, batch, 0.3, 1, True, loss=loss)
    assert abs(float(loss_value - reference)) < TOL
    for b, r in zip(torch.autograd.grad(loss_value, params), torch.autograd.grad(reference, params), strict=True):
        assert (b - r).abs().max() < TOL
    # the support loss before the step: each task's mean loss under the shared weights
    pred = model(batch.support_x)
    expected = masked_loss(pred, batch.support_y, batch.support_mask, loss).mean()
    assert abs(float(inner - expected)) < TOL
