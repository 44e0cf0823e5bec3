"""The set ranker (``algo=set_ranker``, ``model=set_encoder``): the catalog softmax and its
gradient by hand, support items out of the denominator, sampled softmax = full softmax when the
sample is the catalog, batched adaptation and meta-gradients equal a per-task loop (float64),
seeded random-k episodes that never keep padding, popularity counted from meta-train tasks once,
evaluation-shaped (``protocol``) episodes and positive weighting against a hand computation and a
per-task loop, the zero-shot correction (fading with k, its user term, only users with enough
ratings), the item-item term (no diagonal, its own learning rate), and a short run on the toy
catalog that beats popularity under full ranking."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from rich.console import Console

from metarec_runner.algos.catalog_softmax import (
    catalog_softmax_loss,
    sampled_softmax_loss,
    subsample_support,
)
from metarec_runner.algos.compat import compatible
from metarec_runner.algos.maml import MAML
from metarec_runner.algos.set_ranker import SetRanker
from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import ConfigError
from metarec_runner.models.mf import MatrixFactorization
from metarec_runner.models.set_encoder import SetEncoder
from metarec_runner.paths import conf_dir
from metarec_runner.run import Prepared
from metarec_runner.runner import Runner
from metarec_runner.tasks.synthetic import random_taskset
from metarec_runner.tasks.taskset import TaskBatch

TOL = 1e-10
SCHEMA = FeatureSchema(("age", "genre", "user_id", "item_id"), (4, 6, 20, 40))


def _model(seed: int = 0, **kw) -> SetEncoder:
    torch.manual_seed(seed)
    kw = {"user_fields": ["age"], "shrinkage": 0.7, **kw}
    model = SetEncoder(SCHEMA, embedding_dim=8, rating_mean=3.0, **kw).double()
    with torch.no_grad():  # move every parameter off its (often zero) initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.item_count.copy_(torch.randint(0, 30, model.item_count.shape))
    return model


def _algo(model: SetEncoder, lr: float = 0.1, **kw) -> SetRanker:
    kw = {"step_shrinkage": 1.5, **kw}
    return SetRanker(model, functools.partial(torch.optim.SGD, lr=lr), positive_threshold=2.5, **kw)


def _batch(n_tasks: int = 6, seed: int = 1) -> TaskBatch:
    tasks = random_taskset(SCHEMA, n_tasks, support=(0, 9), query=(2, 6), seed=seed)
    return tasks.batch(torch.arange(n_tasks)).to("cpu", torch.float64)


def _task(batch: TaskBatch, b: int) -> TaskBatch:
    """Task ``b`` alone, padded to its own sizes only."""
    s, q = int(batch.support_mask[b].sum()), int(batch.query_mask[b].sum())
    return TaskBatch(batch.support_x[b:b + 1, :s], batch.support_y[b:b + 1, :s],
                     batch.support_mask[b:b + 1, :s], batch.query_x[b:b + 1, :q],
                     batch.query_y[b:b + 1, :q], batch.query_mask[b:b + 1, :q], batch.task_index[b:b + 1])


# -- the loss ----------------------------------------------------------------------------------


def test_softmax_loss_and_gradient_equal_the_hand_computed_ones():
    """1 user, 4 items, item 0 in the support (excluded), items 2 and 3 positive."""
    s = torch.tensor([[0.3, -1.2, 0.7, 2.0]], dtype=torch.float64, requires_grad=True)
    loss, has = catalog_softmax_loss(s, torch.tensor([[2, 3]]), torch.ones(1, 2, dtype=torch.bool),
                                     torch.tensor([[True, False, False, False]]))
    e = [math.exp(v) for v in (-1.2, 0.7, 2.0)]
    lse = math.log(sum(e))
    assert has.tolist() == [True]
    assert loss.item() == pytest.approx(lse - (0.7 + 2.0) / 2, abs=TOL)
    loss.sum().backward()
    soft = [v / sum(e) for v in e]  # d/ds_i: softmax over the allowed items minus 1/|P| on positives
    expected = [0.0, soft[0], soft[1] - 0.5, soft[2] - 0.5]
    assert s.grad[0].tolist() == pytest.approx(expected, abs=TOL)


def test_an_excluded_positive_keeps_only_itself_and_no_positive_costs_nothing():
    s = torch.tensor([[0.3, -1.2, 0.7], [1.0, 2.0, 3.0]], dtype=torch.float64)
    excluded = torch.tensor([[True, True, False], [False, False, False]])
    loss, has = catalog_softmax_loss(s, torch.tensor([[0], [1]]), torch.tensor([[True], [False]]), excluded)
    assert loss[0].item() == pytest.approx(math.log(math.exp(0.3) + math.exp(0.7)) - 0.3, abs=TOL)
    assert loss[1].item() == 0.0 and has.tolist() == [True, False]


def test_support_items_are_left_out_of_the_softmax_denominator():
    model = _model()
    algo = _algo(model)
    state = torch.randn(1, 8, dtype=torch.float64)
    rows = torch.tensor([[1, 0, 0, 0]])
    support = torch.tensor([[5, 9, 11]])
    s_mask = torch.ones(1, 3, dtype=torch.bool)
    pos, p_mask = torch.tensor([[7, 30]]), torch.ones(1, 2, dtype=torch.bool)
    loss, _ = algo.loss_of(state, rows, pos, p_mask, support, s_mask)
    scores = model.catalog_scores(state, rows)[0]
    keep = torch.ones(40, dtype=torch.bool)
    keep[support[0]] = False
    lse = torch.logsumexp(scores[keep], 0)
    assert loss.item() == pytest.approx((lse - scores[pos[0]]).mean().item(), abs=TOL)
    with torch.no_grad():  # the support items' scores do not matter at all
        model.item_bias[support[0]] += 50.0
    again, _ = algo.loss_of(state, rows, pos, p_mask, support, s_mask)
    assert again.item() == pytest.approx(loss.item(), abs=TOL)


def test_sampled_softmax_over_the_whole_catalog_is_the_full_softmax():
    """Negatives = every item once under uniform sampling: the logQ terms cancel, and the
    positive's own copy among them is an accidental hit, so the two losses agree."""
    model = _model()
    state, rows = torch.randn(3, 8, dtype=torch.float64), torch.randint(0, 4, (3, 4))
    pos, p_mask = torch.randint(0, 40, (3, 4)), torch.rand(3, 4) < 0.7
    p_mask[:, 0] = True
    excl, e_mask = torch.randint(0, 40, (3, 5)), torch.rand(3, 5) < 0.8
    full, _ = _algo(model).loss_of(state, rows, pos, p_mask, excl, e_mask)
    user = state + model.user_vector(rows)
    log_q = torch.full((40,), -math.log(40), dtype=torch.float64)
    sampled, _ = sampled_softmax_loss(user, model.output_weight, model.item_offset(), pos, p_mask,
                                      excl, e_mask, torch.arange(40), log_q)
    assert torch.allclose(sampled, full, atol=TOL, rtol=0)


def test_sampled_softmax_training_is_seeded_and_finite():
    batch = _batch()
    runs = []
    for _ in range(2):
        algo = _algo(_model(), n_negatives=16, seed=3)
        stats = [algo.meta_step(batch) for _ in range(3)]
        assert all(math.isfinite(v) for s in stats for v in s.values())
        runs.append([s["loss"] for s in stats])
    assert runs[0] == runs[1]


def test_shrinkage_pulls_small_supports_towards_the_empty_state():
    model = _model(shrinkage=2.0)
    x = torch.randint(0, 4, (1, 3, 4))
    y, m = torch.tensor([[5.0, 4.0, 1.0]], dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool)
    a, c = model.weights.detach()
    w = a + c * (y - 3.0)
    lam = torch.exp(model.log_shrinkage).item()
    expected = model.empty + (w.unsqueeze(-1) * model.item.pooled(x)).sum(1) / (3 + lam)
    assert torch.allclose(model.encode_support(x, y, m), expected, atol=TOL, rtol=0)


def test_tied_output_is_the_input_tables_item_id_rows():
    model = SetEncoder(SCHEMA, embedding_dim=4, item_fields=["genre", "item_id"], tied=True)
    assert not hasattr(model, "output")
    assert torch.equal(model.output_weight, model.item.weight[6:46])  # after genre's 6 rows
    x = torch.tensor([[[0, 2, 0, 17]]])
    user = model.empty.detach() + 1.0
    with torch.no_grad():
        model.item.weight.normal_()
    assert torch.allclose(model.score(user[None], x)[0, 0], user @ model.item.weight[6 + 17])
    with pytest.raises(ConfigError, match="tied"):
        SetEncoder(SCHEMA, item_fields=["genre"], tied=True)


# -- batched = per task ------------------------------------------------------------------------


_EXTRAS = {"item_item": True, "zero_shot_bias": True, "zero_shot_fields": ["age"], "zero_shot_dim": 3}
"""A set encoder with the item-item term and the zero-shot correction (with a user term)."""


@pytest.mark.parametrize("extras", [False, True])
def test_batched_adapt_equals_a_per_task_loop(extras):
    batch = _batch()
    batch.support_mask[0] = False  # an empty support set among them (k = 0)
    algo = _algo(_model(**_EXTRAS) if extras else _model(), inner_steps=3)
    x = batch.query_x
    state = algo.adapt(batch).params["state"]
    pred = algo.adapt(batch).predict(x)
    for b in range(batch.size):
        one = algo.adapt(_task(batch, b))
        assert torch.allclose(one.params["state"][0], state[b], atol=TOL, rtol=0), b
        assert torch.allclose(one.predict(x[b:b + 1])[0], pred[b], atol=TOL, rtol=0), b
    assert not torch.allclose(state, _algo(_model(), inner_steps=0).adapt(batch).params["state"])


@pytest.mark.parametrize(("dropped", "weighting", "extras"), [
    ("target", "task", False), ("exclude", "task", False), ("protocol", "positive", True)])
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_meta_gradient_equals_a_per_task_loop(first_order, dropped, weighting, extras):
    """The batched meta-gradient (weighted mean over the tasks with a positive) is the weighted
    mean of each task's own, through two inner steps, on a random-k episode; with the item-item
    term and the zero-shot correction too."""
    batch = _batch(n_tasks=6, seed=3)
    model = _model(**_EXTRAS) if extras else _model()
    algo = _algo(model, inner_steps=2, k_max=4, first_order=first_order, dropped=dropped,
                 weighting=weighting, seed=7)
    keep = subsample_support(batch.support_mask, algo.generator, 0, 4)
    params = [*algo.model.parameters(), *algo.net.parameters()]
    loss, weight, _ = algo.episode_loss(batch, keep)
    batched = torch.autograd.grad((loss * weight).sum() / weight.sum(), params, allow_unused=True)
    per_task, weights = [], []
    for b in range(batch.size):
        task = _task(batch, b)
        one, one_weight, _ = algo.episode_loss(task, keep[b:b + 1, :task.support_x.shape[1]])
        assert one_weight.item() == weight[b].item()
        assert one.item() == pytest.approx(loss[b].item(), abs=TOL)
        if one_weight.item():
            per_task.append(torch.autograd.grad(one.sum(), params, allow_unused=True))
            weights.append(one_weight.item())
    assert 3 <= len(per_task) < batch.size + 1
    if weighting == "positive":
        assert len(set(weights)) > 1  # tasks with different numbers of positives
    for i, got in enumerate(batched):
        parts = [(g[i], w) for g, w in zip(per_task, weights, strict=True) if g[i] is not None]
        if got is None:
            assert not parts
            continue
        assert torch.allclose(got, sum(p * w for p, w in parts) / sum(weights), atol=TOL, rtol=0)


# -- episodes ----------------------------------------------------------------------------------


def test_random_k_is_seeded_within_range_and_never_keeps_padding():
    mask = torch.arange(12)[None, :] < torch.tensor([0, 1, 3, 7, 12])[:, None]
    draws = [subsample_support(mask, torch.Generator().manual_seed(4), 2, 6) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    g = torch.Generator().manual_seed(4)
    ks = []
    for _ in range(300):
        keep = subsample_support(mask, g, 2, 6)
        assert not bool((keep & ~mask).any())
        ks.append(keep.sum(1))
    ks = torch.stack(ks)
    n = mask.sum(1)
    assert bool((ks >= n.clamp_max(2)).all() and (ks <= n.clamp_max(6)).all())
    assert set(ks[:, 4].tolist()) == {2, 3, 4, 5, 6} and set(ks[:, 3].tolist()) == {2, 3, 4, 5, 6}
    assert ks[:, 0].eq(0).all() and ks[:, 1].eq(1).all()
    other = subsample_support(mask, torch.Generator().manual_seed(5), 2, 6)
    assert not torch.equal(other, draws[0]) or not torch.equal(
        subsample_support(mask, torch.Generator().manual_seed(6), 2, 6), draws[0])


def test_popularity_is_counted_once_per_meta_train_task_and_never_at_evaluation():
    batch = _batch()
    model = SetEncoder(SCHEMA, embedding_dim=4).double()
    algo = _algo(model)
    algo.meta_step(batch)
    algo.meta_step(batch)
    items = torch.cat([batch.support_x[..., -1][batch.support_mask], batch.query_x[..., -1][batch.query_mask]])
    assert torch.equal(model.item_count, torch.bincount(items, minlength=40).double())
    algo.adapt(replace(batch, task_index=batch.task_index + 100))
    assert torch.equal(model.item_count, torch.bincount(items, minlength=40).double())


# -- compatibility -----------------------------------------------------------------------------


def test_set_ranker_needs_the_catalog_model_and_others_are_pointed_to_it():
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    assert compatible(SetRanker, SetEncoder) and not compatible(SetRanker, MatrixFactorization)
    with pytest.raises(ConfigError, match="set_ranker needs .*catalog.*use model=set_encoder") as err:
        SetRanker(MatrixFactorization(SCHEMA), sgd)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model set_encoder reads the user's support sequence; "
                       "use algo=set_ranker with model=set_encoder"):
        MAML(SetEncoder(SCHEMA), sgd, adapt="all")
    model = SetEncoder(SCHEMA)  # the sequence protocol: a state from the set, then scores
    x, y, m = torch.zeros(2, 3, 4, dtype=torch.long), torch.full((2, 3), 3.0), torch.ones(2, 3, dtype=torch.bool)
    assert model.score(model.encode_support(x, y, m), x).shape == (2, 3) == model(x).shape
    assert model.catalog_scores(model.encode_support(x, y, m), x[:, 0]).shape == (2, 40)


# -- a real run --------------------------------------------------------------------------------

TOY = ["logger=none", "dataset.n_users=300", "dataset.n_items=150", "trainer.progress=false",
       "evaluator.ks=[10]", "evaluator.metrics=[ndcg]", "trainer.monitor=val/ndcg_at_10"]


def _fit_test(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TOY, *overrides])
    prep = Prepared(cfg)
    runner = Runner(prep.algo, prep.evaluator, prep.tracker, prep.trainer, prep.device, cfg.seed,
                    console=Console(quiet=True))
    fit = runner.fit(prep.splits.train, prep.splits.val)
    return fit, runner.test(prep.splits.test).summary


def test_a_short_toy_run_beats_popularity_under_full_ranking():
    _, pop = _fit_test("+algo=popularity")
    fit, ours = _fit_test("+algo=set_ranker", "model=set_encoder", "trainer.max_epochs=4")
    assert fit.best_epoch >= 1
    assert "test/rmse" not in ours  # ranking scores: no rating metrics
    assert ours["test/ndcg_at_10"] > pop["test/ndcg_at_10"] + 0.05, (ours, pop)


# -- the evaluation-shaped episodes, the zero-shot term, the item-item term -----------------------


def test_protocol_episodes_score_each_positive_against_the_items_the_user_did_not_rate():
    """``dropped: protocol``: a positive competes with every catalog item except the user's other
    rated items (support kept or hidden, query), as the all-unseen evaluation ranks."""
    batch = _batch(n_tasks=1, seed=5)
    algo = _algo(_model(), inner_steps=0, dropped="protocol")
    keep = batch.support_mask.clone()
    keep[0, 2:] = False
    loss, weight, _ = algo.episode_loss(batch, keep)
    state = algo.model.encode_support(batch.support_x, batch.support_y, keep)
    scores = algo.model.catalog_scores(state, batch.query_x[:, 0])[0]
    rated = torch.cat([batch.query_x[0, :, -1][batch.query_mask[0]], batch.support_x[0, :, -1][batch.support_mask[0]]])
    pos = torch.cat([batch.query_x[0, :, -1][batch.query_mask[0] & (batch.query_y[0] >= 2.5)],
                     batch.support_x[0, :, -1][~keep[0] & batch.support_mask[0] & (batch.support_y[0] >= 2.5)]])
    expected = []
    for q in pos.tolist():
        allowed = torch.ones(40, dtype=torch.bool)
        allowed[rated] = False
        allowed[q] = True
        expected.append(torch.logsumexp(scores[allowed], 0) - scores[q])
    assert len(expected) >= 2 and weight.item() == 1.0  # weighting: task
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=TOL)


def test_zero_shot_correction_fades_with_the_support_and_depends_on_the_users_fields():
    model = _model(**_EXTRAS)
    x = torch.randint(0, 4, (2, 5, 4))
    x[1, :, 0] = (x[0, :, 0] + 1) % 4  # the second user has another age
    y, m = torch.full((2, 5), 4.0, dtype=torch.float64), torch.ones(2, 5, dtype=torch.bool)
    rows = x[:, 0]
    mu0 = torch.exp(model.log_zero_shrinkage)
    z = model.zero_shot + model.zero_users.pooled(rows) @ model.zero_items.T  # [2, 40]
    model.item_item.data.zero_()  # the item-item term alone is tested below
    for n in (0, 2, 5):
        got = model.support_scores(x[:, :n], y[:, :n], m[:, :n], rows)
        assert torch.allclose(got, mu0 / (n + mu0) * z, atol=TOL, rtol=0), n
    assert not torch.allclose(z[0], z[1])  # a learned group popularity
    with pytest.raises(ConfigError, match="zero_shot_fields"):
        SetEncoder(SCHEMA, zero_shot_fields=["genre", "town"], zero_shot_bias=True)
    skip = SetEncoder(SCHEMA, zero_shot_fields=["age", "town"], zero_shot_bias=True, missing_fields="skip")
    assert skip.zero_users.fields == ("age",)


def test_item_item_term_is_the_weighted_support_row_times_w_without_the_diagonal_and_learns():
    model = _model(item_item=True, item_item_norm="sum", shrinkage=0.0)
    x = torch.zeros(1, 3, 4, dtype=torch.long)
    x[0, :, -1] = torch.tensor([3, 7, 3])  # item 3 twice
    y, m = torch.tensor([[5.0, 2.0, 4.0]], dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool)
    a, c = model.item_item_weights.detach()
    w = a + c * (y[0] - 3.0)
    W = model.item_item.detach().clone().fill_diagonal_(0.0)
    expected = (w[0] + w[2]) * W[3] + w[1] * W[7]
    got = model.support_scores(x, y, m)[0]
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
    with torch.no_grad():
        model.item_item[3, 3] += 100.0  # the diagonal never scores an item from itself
    assert torch.allclose(model.support_scores(x, y, m)[0], got, atol=TOL, rtol=0)
    algo = _algo(model, item_item_lr=0.5)
    assert algo.optimizer.param_groups[1]["params"][0] is model.item_item
    assert algo.optimizer.param_groups[1]["lr"] == 0.5
    before = model.item_item.detach().clone()
    algo.meta_step(_batch())
    assert not torch.equal(model.item_item.detach(), before)
    with pytest.raises(ConfigError, match="n_negatives"):
        _algo(_model(item_item=True), n_negatives=8)


def test_zero_shot_term_trains_the_k0_answer_on_users_with_enough_ratings_only():
    batch = _batch(n_tasks=6, seed=2)
    n = batch.support_mask.sum(1) + batch.query_mask.sum(1)
    cut = int(n.float().median())
    algo = _algo(_model(zero_shot_bias=True), zero_shot_weight=1.0, zero_shot_min_ratings=cut,
                 weighting="positive", dropped="protocol")
    loss, weight = algo.zero_shot_loss(batch, batch.query_x[:, 0])
    pos = (batch.query_mask & (batch.query_y >= 2.5)).sum(1) + (batch.support_mask & (batch.support_y >= 2.5)).sum(1)
    assert torch.equal(weight, (pos * (n >= cut)).to(weight.dtype))
    assert 0 < int((weight > 0).sum()) < batch.size
    empty = replace(batch, support_x=batch.support_x[:, :0], support_y=batch.support_y[:, :0],
                    support_mask=batch.support_mask[:, :0])
    k0 = algo.adapt(empty).predict(batch.query_x)  # the zero-shot answer the term trains
    before = k0.clone()
    z = algo.model.zero_shot
    grad = torch.autograd.grad((loss * weight).sum() / weight.sum(), z)[0]
    assert grad.abs().sum() > 0
    stats = algo.meta_step(batch)
    assert math.isfinite(stats["zero_shot_loss"])
    assert not torch.allclose(algo.adapt(empty).predict(batch.query_x), before)


def test_popularity_can_count_only_the_positives():
    batch = _batch()
    model = SetEncoder(SCHEMA, embedding_dim=4).double()
    _algo(model, count="positive").meta_step(batch)
    items = torch.cat([batch.support_x[..., -1][batch.support_mask & (batch.support_y >= 2.5)],
                       batch.query_x[..., -1][batch.query_mask & (batch.query_y >= 2.5)]])
    assert torch.equal(model.item_count, torch.bincount(items, minlength=40).double())
