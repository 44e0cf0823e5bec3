"""The algorithm zoo on the batched core: Meta-SGD, touched-row adaptation, loss choice and the
auxiliary support loss equal their per-task / full-table / hand-written references in float64."""

from __future__ import annotations

import copy
import functools
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.func import functional_call

from metarec_runner.algos.baselines import Finetune
from metarec_runner.algos.maml import MAML
from metarec_runner.algos.metasgd import MetaSGD
from metarec_runner.algos.reference import per_task_meta_loss
from metarec_runner.algos.reptile import Reptile
from metarec_runner.algos.touched import TouchedFastWeights, locate, touched_rows
from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import ConfigError
from metarec_runner.models.preference import PreferenceEstimator
from metarec_runner.paths import conf_dir
from tests.conftest import SMALL_SCHEMA, random_taskset

TOL = 1e-10
SGD = functools.partial(torch.optim.SGD, lr=0.1)
BAG_SCHEMA = FeatureSchema(("a", "genres", "user_id", "item_id"), (3, 6, 20, 30), (1, 3, 1, 1))


def _model(bags: bool = False, seed: int = 0) -> PreferenceEstimator:
    torch.manual_seed(seed)
    schema = BAG_SCHEMA if bags else SMALL_SCHEMA
    return PreferenceEstimator(schema, embedding_dim=4, hidden=(8, 6), rating_mean=3.0).double()


def _batch(bags: bool = False, n_tasks: int = 6, seed: int = 1, binary: bool = False):
    schema = BAG_SCHEMA if bags else SMALL_SCHEMA
    tasks = random_taskset(schema, n_tasks, support=(2, 9), query=(1, 5), seed=seed)
    if bags:  # bags of 1-3 genres: empty slots are -1
        g = torch.Generator().manual_seed(0)
        for x in (tasks.support_x, tasks.query_x):
            drop = torch.rand(x.shape[0], 2, generator=g) < 0.5
            x[:, 2:4][drop] = -1
    batch = tasks.batch(torch.arange(n_tasks)).to("cpu", torch.float64)
    if binary:
        batch = type(batch)(batch.support_x, (batch.support_y > 3).double() * batch.support_mask,
                            batch.support_mask, batch.query_x,
                            (batch.query_y > 3).double() * batch.query_mask, batch.query_mask,
                            batch.task_index)
    return batch


def _f(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# -- Meta-SGD --------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["head", "all"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_metasgd_meta_gradients_equal_per_task_loop(scope, first_order, steps):
    """Batched meta-gradients w.r.t. the initialisation and the step sizes equal the loop's."""
    model = _model(bags=scope == "all")
    algo = MetaSGD(model, SGD, adapt=scope, inner_lr=0.3, inner_steps=steps,
                   first_order=first_order)
    with torch.no_grad():  # distinct step sizes per entry, so a wrong gather would show
        for a in algo.step_sizes.parameters():
            a.add_((torch.rand_like(a) + 0.5).log())
    batch = _batch(bags=scope == "all")
    params = [*model.parameters(), *algo.step_sizes.parameters()]
    loss, _ = algo.meta_loss(batch)
    reference = per_task_meta_loss(algo, batch, algo.step_sizes(), steps, first_order)
    assert abs(_f(loss - reference)) < TOL
    batched = torch.autograd.grad(loss, params)
    expected = torch.autograd.grad(reference, params)
    assert _max_diff(batched, expected) < TOL
    lr_grads = batched[len(list(model.parameters())):]
    assert all(g.abs().sum() > 0 for g in lr_grads)  # every step size learns


def test_metasgd_step_sizes_shapes_training_and_state():
    model = _model()
    algo = MetaSGD(model, SGD, adapt="head", inner_lr=0.2, inner_steps=2)
    assert isinstance(algo.step_sizes, torch.nn.Module)
    rates = algo.rates()
    assert set(rates) == {n for n, _ in model.head.named_parameters()}
    for n, p in model.head.named_parameters():
        assert rates[n].shape == p.shape and torch.allclose(rates[n], torch.tensor(0.2).double())
    batch = _batch()
    assert not algo.uses_fixed_input_path(algo.step_sizes(), batch.support_x.shape[1], 2)
    state = copy.deepcopy(algo.state_dict())
    algo.meta_step(batch)
    assert any(not torch.allclose(a, state_a) for a, state_a in
               zip(algo.step_sizes.state_dict().values(), state["step_sizes"].values(), strict=True))  # learned
    algo.load_state_dict(state)
    assert all(torch.allclose(a, torch.tensor(0.2).double()) for a in algo.rates().values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo.adapt(batch).predict(batch.query_x)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_metasgd_equals_maml_while_step_sizes_are_uniform():
    batch = _batch()
    losses = []
    for cls in (MAML, MetaSGD):
        algo = cls(_model(), SGD, adapt="head", inner_lr=0.3, inner_steps=2)
        losses.append(algo.meta_loss(batch)[0])
        assert (algo.adapt(batch).predict(batch.query_x) - MAML(
            _model(), SGD, inner_lr=0.3, inner_steps=2).adapt(batch).predict(batch.query_x)
        ).abs().max() < TOL
    assert abs(_f(losses[0] - losses[1])) < TOL


# -- touched-row adaptation -------------------------------------------------------------------


def test_touched_rows_are_sorted_distinct_and_skip_padding():
    codes = torch.tensor([[[5, 2], [2, 9], [7, 7]], [[1, 1], [0, 3], [4, 4]]])
    keep = torch.tensor([[[True, True], [True, False], [False, False]],
                         [[True, True], [True, True], [True, True]]])
    rows = touched_rows(codes, keep, 10)
    assert rows.tolist() == [[2, 5, 10, 10], [0, 1, 3, 4]]
    pos, hit = locate(rows, codes)
    assert hit.tolist() == [[[True, True], [True, False], [False, False]],
                            [[True, True], [True, True], [True, True]]]
    assert torch.equal(rows.gather(1, pos.flatten(1)).view_as(codes)[hit], codes[hit])


def _pair(cls, **kw):
    """The same algorithm with touched rows and with full per-task tables (same init)."""
    return [cls(_model(bags=True), SGD, touched_rows=touched, **kw) for touched in (True, False)]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_touched_rows_equal_full_table_sgd_with_bags(first_order, steps):
    batch = _batch(bags=True)
    touched, full = _pair(MAML, adapt="all", inner_lr=0.3, inner_steps=steps,
                          eval_inner_steps=steps, first_order=first_order)
    assert touched.uses_touched_rows and not full.uses_touched_rows
    # adapted predictions (query rows and rows no support touched) and adapted weights
    other = _batch(bags=True, seed=7).query_x[:, : batch.query_x.shape[1]]
    fast_t, fast_f = touched.adapt(batch).params, full.adapt(batch).params
    assert isinstance(fast_t, TouchedFastWeights)
    for x in (batch.query_x, batch.support_x, other):
        assert (touched.predict(fast_t, x) - full.predict(fast_f, x)).abs().max() < TOL
    for n in fast_f:
        assert (fast_t[n] - fast_f[n]).abs().max() < TOL
        assert (fast_t.task_mean(n) - fast_f[n].mean(0)).abs().max() < TOL
    # the table is really sparse: untouched rows are the initial ones
    assert fast_t.values.shape[1] < touched.model.embedding.weight.shape[0]
    # meta-loss and meta-gradients: equal to full tables and to the per-task loop
    grads = []
    for algo in (touched, full):
        loss, inner = algo.meta_loss(batch)
        grads.append((loss, inner, torch.autograd.grad(loss, list(algo.model.parameters()))))
    reference = per_task_meta_loss(full, batch, 0.3, steps, first_order)
    ref_grads = torch.autograd.grad(reference, list(full.model.parameters()))
    assert abs(_f(grads[0][0] - grads[1][0])) < TOL and abs(_f(grads[0][0] - reference)) < TOL
    assert abs(_f(grads[0][1] - grads[1][1])) < TOL
    assert _max_diff(grads[0][2], grads[1][2]) < TOL
    assert _max_diff(grads[0][2], ref_grads) < TOL


def test_touched_rows_reptile_and_finetune_equal_full_tables():
    batch = _batch(bags=True)
    reptiles = _pair(Reptile, adapt="all", inner_lr=0.2, inner_steps=3)
    for algo in reptiles:
        algo.meta_step(batch)
    for a, b in zip(reptiles[0].model.parameters(), reptiles[1].model.parameters(), strict=True):
        assert (a - b).abs().max() < TOL
    tunes = [Finetune(_model(bags=True), SGD, adapt="all", finetune_lr=0.2, finetune_steps=4)
             for _ in range(2)]
    tunes[1].touched_rows = False
    assert tunes[0].uses_touched_rows and not tunes[1].uses_touched_rows
    preds = [t.adapt(batch).predict(batch.query_x) for t in tunes]
    assert (preds[0] - preds[1]).abs().max() < TOL


# -- loss choice and the auxiliary support loss ----------------------------------------------


def _bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy written out: -(y log s + (1 - y) log(1 - s)), s = sigmoid."""
    s = 1 / (1 + torch.exp(-logits))
    return -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean()


@pytest.mark.parametrize("scope", ["head", "all"])
def test_bce_meta_gradient_equals_hand_written_loop(scope):
    """One inner step on the written-out BCE, then the query BCE, task by task."""
    batch = _batch(binary=True)
    algo = MAML(_model(), SGD, adapt=scope, inner_lr=0.3, inner_steps=1, loss="bce")
    params = list(algo.model.parameters())
    loss, _ = algo.meta_loss(batch)
    module, total = algo.adapted_module, 0.0
    for b in range(batch.size):
        s, q = int(batch.support_mask[b].sum()), int(batch.query_mask[b].sum())
        theta = dict(module.named_parameters())
        inner = _bce(functional_call(module, theta, (algo.inputs(batch.support_x[b, :s]),)),
                     batch.support_y[b, :s])
        grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
        fast = {n: w - 0.3 * g for (n, w), g in zip(theta.items(), grads, strict=True)}
        total = total + _bce(functional_call(module, fast, (algo.inputs(batch.query_x[b, :q]),)),
                             batch.query_y[b, :q])
    total = total / batch.size
    assert abs(_f(loss - total)) < TOL
    grads = torch.autograd.grad(loss, params)
    assert _max_diff(grads, torch.autograd.grad(total, params)) < TOL
    mse = MAML(_model(), SGD, adapt=scope, inner_lr=0.3, inner_steps=1)
    assert _max_diff(torch.autograd.grad(mse.meta_loss(batch)[0], list(mse.model.parameters())),
                     grads) > 1e-3  # the loss really changed


def test_bce_refuses_ratings():
    algo = MAML(_model(), SGD, loss="bce")
    with pytest.raises(ConfigError, match="^loss: bce needs labels"):
        algo.meta_step(_batch())
    with pytest.raises(ConfigError, match="^loss: unknown value"):
        MAML(_model(), SGD, loss="hinge")


@pytest.mark.parametrize("cls, extra", [(MAML, {}), (MetaSGD, {}), (MAML, {"loss": "bce"})])
def test_aux_support_loss_adds_its_weighted_gradient(cls, extra):
    """grad(objective, aux_weight=w) - grad(objective, 0) = w * grad(mean_b support loss of the
    base model), the support loss computed by hand task by task."""
    batch = _batch(binary=extra.get("loss") == "bce")
    w = 0.7
    algos = [cls(_model(), SGD, adapt="head", inner_lr=0.3, inner_steps=2, aux_loss="support",
                 aux_weight=weight, **extra) for weight in (w, 0.0)]
    assert algos[0].uses_aux and not algos[1].uses_aux
    grads = [torch.autograd.grad(a.meta_objective(batch)[0], list(a.model.parameters()))
             for a in algos]
    model = algos[0].model
    aux = 0.0
    for b in range(batch.size):
        s = int(batch.support_mask[b].sum())
        pred, y = model(batch.support_x[b, :s]), batch.support_y[b, :s]
        aux = aux + (_bce(pred, y) if extra else ((pred - y) ** 2).mean())
    aux_grad = torch.autograd.grad(aux / batch.size, list(model.parameters()))
    expected = [g0 + w * ga for g0, ga in zip(grads[1], aux_grad, strict=True)]
    assert _max_diff(grads[0], expected) < TOL
    objective, parts = algos[0].meta_objective(batch)
    assert abs(_f(parts["aux_loss"] - aux / batch.size)) < TOL
    reference = per_task_meta_loss(algos[0], batch, algos[0].step_sizes(), 2, False,
                                   loss=algos[0].loss, aux_weight=w)
    assert abs(_f(objective - reference)) < TOL
    stats = algos[0].meta_step(batch)
    assert set(stats) == {"loss", "inner_loss", "aux_loss"}


def test_reptile_aux_gradient_is_added_to_the_reptile_step():
    batch = _batch()
    sgd = functools.partial(torch.optim.SGD, lr=1.0)
    algos = [Reptile(_model(), sgd, adapt="head", inner_lr=0.2, inner_steps=2,
                     aux_loss="support", aux_weight=weight, body_optimizer=sgd)
             for weight in (0.5, 0.0)]
    theta = [p.detach().clone() for p in algos[0].model.parameters()]
    model = _model()
    aux = sum(((model(batch.support_x[b, :int(batch.support_mask[b].sum())])
                - batch.support_y[b, :int(batch.support_mask[b].sum())]) ** 2).mean()
              for b in range(batch.size)) / batch.size
    aux_grad = torch.autograd.grad(aux, list(model.parameters()))
    for a in algos:
        a.meta_step(batch)
    for p_aux, p_plain, _theta, g in zip(algos[0].model.parameters(), algos[1].model.parameters(),
                                    theta, aux_grad, strict=True):
        # SGD(lr=1): theta_aux - theta_plain = -0.5 * grad(aux)
        assert ((p_aux - p_plain) + 0.5 * g).abs().max() < TOL


# -- presets and learnability -----------------------------------------------------------------


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_melu_preset_has_the_papers_values():
    cfg = _compose("+algo=melu", "logger=none")
    assert cfg.algo._target_ == "metarec_runner.algos.maml.MAML"
    assert cfg.algo.adapt == "head" and cfg.algo.inner_steps == 1
    assert cfg.algo.inner_lr == 5e-6 and cfg.algo.meta_optimizer.lr == 5e-5
    assert cfg.algo.meta_optimizer._target_ == "torch.optim.Adam"
    meta = _compose("+algo=metasgd", "logger=none")
    assert meta.algo._target_ == "metarec_runner.algos.metasgd.MetaSGD"


@pytest.mark.slow
def test_metasgd_beats_global_on_the_toy_catalog():
    from rich.console import Console

    from metarec_runner.evaluate.summary import mean_ci
    from metarec_runner.run import Prepared
    from metarec_runner.runner import Runner

    torch.set_num_threads(1)
    results = {}
    start = time.perf_counter()
    for algo in ("metasgd", "global"):
        cfg = _compose(f"+algo={algo}", "logger=none", "trainer.progress=false",
                       "trainer.max_epochs=10")
        prep = Prepared(cfg)
        runner = Runner(prep.algo, prep.evaluator, prep.tracker, prep.trainer, prep.device,
                        cfg.seed, console=Console(quiet=True))
        runner.fit(prep.splits.train, prep.splits.val)
        results[algo] = runner.test(prep.splits.test).per_task
    m, g = results["metasgd"], results["global"]
    assert (m["task_id"].to_numpy() == g["task_id"].to_numpy()).all()
    diff, half, n = mean_ci(g["rmse"].to_numpy() - m["rmse"].to_numpy())
    print(f"global rmse {g['rmse'].mean():.3f}, metasgd {m['rmse'].mean():.3f}, paired gain "
          f"{diff:.3f} ± {half:.3f} over {n} users in {time.perf_counter() - start:.0f} s")
    assert diff > 0.05 and diff - half > 0


@pytest.mark.parametrize("scope", ["head", "all"])
def test_reptile_gradients_equal_per_task_loop(scope):
    from metarec_runner.algos.reference import per_task_reptile_gradients

    batch = _batch(bags=scope == "all")
    grads = []
    for use_loop in (False, True):
        algo = Reptile(_model(bags=scope == "all"), SGD, adapt=scope, inner_lr=0.2, inner_steps=3)
        algo.optimizer.zero_grad(set_to_none=True)
        per_task_reptile_gradients(algo, batch) if use_loop else algo.meta_gradients(batch)
        grads.append([p.grad for p in algo.model.parameters()])
    assert _max_diff(*grads) < TOL


def test_global_and_finetune_train_on_bce_when_asked():
    """The non-meta baselines take the same ``loss``: one SGD step on the written-out BCE."""
    from metarec_runner.algos.baselines import GlobalModel

    batch = _batch(binary=True)
    algo = GlobalModel(_model(), functools.partial(torch.optim.SGD, lr=0.1), loss="bce")
    ref = _model()
    rows = [(batch.support_x, batch.support_y, batch.support_mask), (batch.query_x, batch.query_y, batch.query_mask)]
    logits = torch.cat([ref(x)[m] for x, _, m in rows])
    labels = torch.cat([y[m] for _, y, m in rows])
    grads = torch.autograd.grad(_bce(logits, labels), list(ref.parameters()))
    expected = [p.detach() - 0.1 * g for p, g in zip(ref.parameters(), grads, strict=True)]
    stats = algo.meta_step(batch)
    assert abs(stats["loss"] - _f(_bce(logits, labels))) < TOL
    assert _max_diff(list(algo.model.parameters()), expected) < TOL
    with pytest.raises(ConfigError, match="^loss: bce needs labels"):
        GlobalModel(_model(), SGD, loss="bce").meta_step(_batch())
    tuned = Finetune(_model(), SGD, loss="bce")
    assert tuned.loss == "bce"
