"""Meta-SGD's step sizes as a module in the algorithm's state; Reptile's paper outer rule and
its linear annealing, checked on hand-computed cases in float64."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch.func import functional_call

from metarec_runner.algos.metasgd import MetaSGD, StepSizes
from metarec_runner.algos.reptile import Reptile
from metarec_runner.errors import ConfigError
from metarec_runner.models.preference import PreferenceEstimator
from tests.helpers import SMALL_SCHEMA, compose, random_taskset, tiny_batch, tiny_model

TOL = 1e-12


def _sgd(lr: float):
    return functools.partial(torch.optim.SGD, lr=lr)


def _model(seed: int = 0) -> PreferenceEstimator:
    return tiny_model(seed, embedding_dim=2, hidden=(3,))  # few weights: hand-checked cases


def _batch(n_tasks: int = 2, seed: int = 1):
    return tiny_batch(n_tasks, seed, support=(2, 6), query=(1, 4))


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# -- Meta-SGD -------------------------------------------------------------------------------


def test_metasgd_rates_appear_in_state_dict_and_round_trip():
    algo = MetaSGD(_model(), _sgd(0.1), adapt="head", inner_lr=0.2, inner_steps=2)
    assert isinstance(algo.step_sizes, StepSizes) and isinstance(algo.step_sizes, torch.nn.Module)
    state = algo.state_dict()
    assert set(state) == {"model", "optimizer", "step_sizes"}
    head = [n for n, _ in algo.model.head.named_parameters()]
    assert set(state["step_sizes"]) == {"log_rates." + n.replace(".", "__") for n in head}
    for n, p in algo.model.head.named_parameters():  # alpha = exp(log_rate) = inner_lr
        log_rate = state["step_sizes"]["log_rates." + n.replace(".", "__")]
        assert log_rate.shape == p.shape and torch.allclose(log_rate, torch.tensor(math.log(0.2)).double())
    batch = _batch(4)
    for _ in range(3):
        algo.meta_step(batch)
    saved = copy.deepcopy(algo.state_dict())  # what the runner keeps for the best epoch
    expected = algo.adapt(batch).predict(batch.query_x)
    assert any(not torch.allclose(a, torch.tensor(0.2).double()) for a in algo.rates().values())
    fresh = MetaSGD(_model(seed=5), _sgd(0.1), adapt="head", inner_lr=0.2, inner_steps=2)
    fresh.load_state_dict(saved)
    for n, a in algo.rates().items():
        assert torch.equal(fresh.rates()[n], a)
    assert (fresh.adapt(batch).predict(batch.query_x) - expected).abs().max() < TOL


def test_metasgd_step_sizes_stay_positive_and_have_their_own_lr():
    algo = MetaSGD(_model(), _sgd(0.1), adapt="all", inner_lr=0.05, inner_steps=1,
                   step_size_lr=50.0)
    assert algo.optimizer.param_groups[-1]["lr"] == 50.0
    assert algo.optimizer.param_groups[0]["lr"] == 0.1
    assert {id(p) for p in algo.optimizer.param_groups[-1]["params"]} == {
        id(p) for p in algo.step_sizes.parameters()}
    batch = _batch(4)
    for _ in range(5):  # an unconstrained alpha with this lr would be pushed far past zero
        algo.meta_step(batch)
    rates = algo.rates()
    assert all(bool((a > 0).all()) for a in rates.values())
    assert any(float(a.min()) < 0.05 * 0.9 for a in rates.values())  # some did shrink
    # the rates are the algorithm's, not the model's: the model's own state is unchanged in form
    assert not any("log_rates" in k for k in algo.model.state_dict())
    with pytest.raises(ConfigError, match="step_size_lr"):
        MetaSGD(_model(), _sgd(0.1), step_size_lr=0.0)


def test_metasgd_log_rate_gradient_is_alpha_times_the_step_size_gradient():
    """d loss / d log alpha = alpha * d loss / d alpha (the log parameterisation, by hand)."""
    algo = MetaSGD(_model(), _sgd(0.1), adapt="head", inner_lr=0.3, inner_steps=1)
    batch = _batch(3)
    loss, _ = algo.meta_loss(batch)
    log_grads = torch.autograd.grad(loss, list(algo.step_sizes.parameters()))
    alphas = {n: a.detach().clone().requires_grad_(True) for n, a in algo.rates().items()}
    from metarec_runner.algos.reference import per_task_meta_loss

    reference = per_task_meta_loss(algo, batch, alphas, 1, False)
    alpha_grads = torch.autograd.grad(reference, list(alphas.values()))
    for g_log, g_alpha, a in zip(log_grads, alpha_grads, alphas.values(), strict=True):
        assert (g_log - a.detach() * g_alpha).abs().max() < 1e-10


# -- Reptile: the outer rule ---------------------------------------------------------------


def _fake_inner_loop(algo: Reptile, phi_of_theta, monkeypatch) -> None:
    """Replace the inner loop by known fast weights ``phi_of_theta(theta) -> {name: [B, ...]}``."""

    def adapt_fast(batch, lr, steps, create_graph, detach):
        theta = _params(algo.adapted_module)
        return algo.inner_loop.wrap(phi_of_theta(theta)), [torch.zeros(batch.size, dtype=torch.float64)]

    monkeypatch.setattr(algo, "adapt_fast", adapt_fast)


def test_reptile_outer_step_on_known_phi(monkeypatch):
    """phi_1 = theta + 1, phi_2 = 2 theta - 4: theta + eps (mean phi - theta) = 1.25 theta - 0.75
    at eps = 0.5."""
    algo = Reptile(_model(), _sgd(0.5), adapt="all", inner_lr=0.1, inner_steps=1)
    _fake_inner_loop(algo, lambda t: {n: torch.stack([p + 1.0, 2.0 * p - 4.0]) for n, p in t.items()},
                     monkeypatch)
    theta = _params(algo.model)
    stats = algo.meta_step(_batch(2))
    assert stats["outer_lr"] == 0.5
    for n, p in algo.model.named_parameters():
        assert (p.detach() - (1.25 * theta[n] - 0.75)).abs().max() < TOL


def test_reptile_linear_annealing_on_known_phi(monkeypatch):
    """phi_b = theta + c_b: each step moves theta by eps_t * mean(c), eps_t = 0.8 (1 - t / 4)."""
    algo = Reptile(_model(), _sgd(0.8), adapt="all", inner_lr=0.1, inner_steps=1,
                   anneal="linear", anneal_steps=4)
    _fake_inner_loop(algo, lambda t: {n: torch.stack([p + 0.5, p + 1.5, p - 0.5])
                                      for n, p in t.items()}, monkeypatch)
    theta = _params(algo.model)
    batch = _batch(3)
    moved = 0.0
    for t in range(6):
        eps = 0.8 * max(0.0, 1 - t / 4)
        assert algo.anneal_factor() == pytest.approx(max(0.0, 1 - t / 4), abs=1e-15)
        stats = algo.meta_step(batch)
        assert stats["outer_lr"] == pytest.approx(eps, abs=1e-15)
        moved += eps * 0.5  # mean(c) = 0.5
        for n, p in algo.model.named_parameters():
            assert (p.detach() - (theta[n] + moved)).abs().max() < TOL
    assert algo.outer_steps == 6


def _hand_phi(module, base, inputs, y, lr, steps):
    """Plain SGD on the mean squared error, one task: the adapted weights, no graph."""
    fast = {n: p.detach().clone().requires_grad_(True) for n, p in base.items()}
    for _ in range(steps):
        loss = ((functional_call(module, fast, (inputs,)) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {n: (w - lr * g).detach().requires_grad_(True) for (n, w), g in zip(fast.items(), grads, strict=True)}
    return {n: w.detach() for n, w in fast.items()}


@pytest.mark.parametrize("body", ["sgd", "frozen"])
def test_reptile_head_step_and_body_step_by_hand(body):
    """adapt=head: the head moves by eps (mean phi - theta) (phi from a hand-written inner loop),
    the embeddings by their own optimizer's step on the query-loss gradient at phi (or not)."""
    eps, body_lr, inner_lr, steps = 0.7, 0.3, 0.2, 3
    algo = Reptile(_model(), _sgd(eps), adapt="head", inner_lr=inner_lr, inner_steps=steps,
                   body_optimizer=_sgd(body_lr) if body == "sgd" else None)
    assert (algo.body_optimizer is None) == (body == "frozen")
    batch = _batch(3)
    model, head = algo.model, algo.model.head
    theta_head, theta_body = _params(head), {n: p.detach().clone() for n, p in model.named_parameters()
                                             if not n.startswith("head.")}
    phis, query_loss = [], 0.0
    for b in range(batch.size):
        s, q = int(batch.support_mask[b].sum()), int(batch.query_mask[b].sum())
        with torch.no_grad():
            s_in = model.body(batch.support_x[b, :s])
        phi = _hand_phi(head, theta_head, s_in, batch.support_y[b, :s], inner_lr, steps)
        phis.append(phi)
        pred = functional_call(head, phi, (model.body(batch.query_x[b, :q]),))
        query_loss = query_loss + ((pred - batch.query_y[b, :q]) ** 2).mean()
    body_params = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    body_grads = torch.autograd.grad(query_loss / batch.size, body_params)
    algo.meta_step(batch)
    for n, p in head.named_parameters():
        mean_phi = sum(phi[n] for phi in phis) / len(phis)
        assert (p.detach() - (theta_head[n] + eps * (mean_phi - theta_head[n]))).abs().max() < 1e-10
    body_now = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    for p, g, t in zip(body_now, body_grads, theta_body.values(), strict=True):
        expected = t - body_lr * g if body == "sgd" else t
        assert (p.detach() - expected).abs().max() < 1e-10


def test_reptile_counts_epochs_from_the_task_stream():
    """Runner-style epochs (a permutation of 10 tasks in meta-batches of 4 = 3 steps): with
    anneal_epochs=2 the horizon is 6 steps; eps is eps_0 until the first epoch ends, then
    eps_0 (1 - t / 6), then 0 (the model no longer moves)."""
    tasks = random_taskset(SMALL_SCHEMA, 10, support=(2, 6), query=(1, 4), seed=2)
    algo = Reptile(_model(), _sgd(1.0), adapt="all", inner_lr=0.05, inner_steps=2,
                   anneal="linear", anneal_epochs=2)
    gen = torch.Generator().manual_seed(0)
    lrs, states = [], []
    for epoch in range(3):
        if epoch == 2:
            frozen = _params(algo.model)
        for chunk in torch.randperm(10, generator=gen).split(4):
            lrs.append(algo.meta_step(tasks.batch(chunk).to("cpu", torch.float64))["outer_lr"])
        states.append(copy.deepcopy(algo.state_dict()))
    assert algo.steps_per_epoch == 3 and algo.horizon == 6
    assert lrs == pytest.approx([1, 1, 1, 0.5, 1 / 3, 1 / 6, 0, 0, 0], abs=1e-15)
    assert all(torch.equal(p, frozen[n]) for n, p in algo.model.named_parameters())
    # the schedule is part of the state: a fresh algorithm resumes it
    fresh = Reptile(_model(seed=3), _sgd(1.0), adapt="all", anneal="linear", anneal_epochs=2)
    fresh.load_state_dict(states[0])
    assert fresh.outer_steps == 3 and fresh.steps_per_epoch is None and fresh.anneal_factor() == 1.0
    fresh.load_state_dict(states[1])
    assert fresh.horizon == 6 and fresh.anneal_factor() == 0.0


def test_reptile_anneal_options_are_checked():
    with pytest.raises(ConfigError, match="^anneal: linear needs a horizon"):
        Reptile(_model(), _sgd(1.0), anneal="linear")
    with pytest.raises(ConfigError, match="^anneal: unknown value"):
        Reptile(_model(), _sgd(1.0), anneal="cosine")
    with pytest.raises(ConfigError, match="^anneal_steps"):
        Reptile(_model(), _sgd(1.0), anneal="linear", anneal_steps=0)
    with pytest.raises(ConfigError, match="^body_optimizer"):
        Reptile(_model(), _sgd(1.0), body_optimizer=_sgd(-1.0))


def test_reptile_optimizers_split_the_parameters():
    algo = Reptile(_model(), _sgd(1.0), adapt="head", body_optimizer=_sgd(0.1))
    outer = {id(p) for g in algo.optimizer.param_groups for p in g["params"]}
    body = {id(p) for g in algo.body_optimizer.param_groups for p in g["params"]}
    assert outer == {id(p) for p in algo.model.head.parameters()}
    assert not outer & body and outer | body == {id(p) for p in algo.model.parameters()}
    assert "body_optimizer" in algo.state_dict()
    everything = Reptile(_model(), _sgd(1.0), adapt="all", body_optimizer=_sgd(0.1))
    assert everything.body_optimizer is None  # nothing is left out of the inner loop


# -- presets ----------------------------------------------------------------------------------


def test_reptile_presets():
    cfg = compose("+algo=reptile", "logger=none", "trainer.max_epochs=7")
    assert cfg.algo.meta_optimizer._target_ == "torch.optim.SGD" and cfg.algo.meta_optimizer.lr == 1.0
    assert cfg.algo.anneal == "linear" and cfg.algo.anneal_epochs == 7
    assert cfg.algo.body_optimizer._target_ == "torch.optim.Adam"
    adam = compose("+algo=reptile_adam", "logger=none")
    assert adam.algo._target_ == "metarec_runner.algos.reptile.Reptile"
    assert adam.algo.meta_optimizer._target_ == "torch.optim.Adam"
    assert adam.algo.meta_optimizer.lr == 2e-3 and adam.algo.anneal == "none"
