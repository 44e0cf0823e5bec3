"""Reference scorers (random, constant, oracle, popularity, item mean): they build from their
configs, run through the same runner and evaluator as every model, and score what they claim."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from metarec_runner.algos.scorers import (
    ConstantScorer,
    ItemMean,
    OracleScorer,
    Popularity,
    RandomScorer,
)
from metarec_runner.errors import ConfigError
from metarec_runner.run import Prepared
from metarec_runner.tasks.taskset import TaskSet
from tests.helpers import compose, quiet_runner

SCORERS = ["random", "constant", "oracle", "popularity", "item_mean"]
FAST = ["logger=none", "dataset.n_users=120", "dataset.n_items=80", "trainer.progress=false"]


def _prepare(algo: str, *extra: str) -> tuple[Prepared, int]:
    cfg = compose(f"+algo={algo}", *FAST, "trainer.max_epochs=2", *extra)
    return Prepared(cfg), cfg.seed


def _run(algo: str, *extra: str):
    prep, seed = _prepare(algo, *extra)
    runner = quiet_runner(prep, seed)
    fit = runner.fit(prep.splits.train, prep.splits.val)
    return prep, fit, runner.test(prep.splits.test)


def _taskset(tasks: list[tuple[list[tuple[int, float]], list[tuple[int, float]]]]) -> TaskSet:
    """Tasks given as (support [(item, rating)], query [(item, rating)]); rows are
    ``[feature, user_id, item_id]`` with the task's position as its user."""
    def flat(part: int):
        rows, ys, sizes = [], [], []
        for user, task in enumerate(tasks):
            for item, y in task[part]:
                rows.append([item % 3, user, item])
                ys.append(y)
            sizes.append(len(task[part]))
        offsets = torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.long)
        x = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
        return x, torch.tensor(ys, dtype=torch.float32), offsets

    sx, sy, so = flat(0)
    qx, qy, qo = flat(1)
    return TaskSet(torch.arange(len(tasks)), sx, sy, so, qx, qy, qo)


TINY = _taskset([
    ([(0, 5.0), (1, 3.0), (2, 4.0)], [(3, 1.0), (0, 4.0)]),
    ([(1, 2.0), (4, 5.0)], [(0, 3.0), (2, 2.0), (6, 1.0)]),
    ([(0, 1.0)], [(1, 4.0), (2, 5.0)]),
])
TINY_COUNTS = {0: 4, 1: 3, 2: 3, 3: 1, 4: 1, 5: 0, 6: 1, 7: 0}  # hand-counted, support + query


def _model() -> nn.Module:
    return nn.Linear(1, 1)


def _epochs(algo, tasks: TaskSet, epochs: int, batch_size: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for chunk in torch.randperm(len(tasks), generator=gen).split(batch_size):
            stats = algo.meta_step(tasks.batch(chunk))
            assert set(stats) == {"loss"} and math.isfinite(stats["loss"])


def _score_items(algo, items: list[int]) -> torch.Tensor:
    x = torch.tensor([[[i % 3, 0, i] for i in items]], dtype=torch.long)
    return algo.predict(None, x)[0]


# -- through Hydra, Prepared and the Runner --------------------------------------------------
@pytest.mark.parametrize("algo", SCORERS)
def test_scorer_builds_from_its_config_and_runs_fit_and_test(algo):
    prep, fit, test = _run(algo)
    assert prep.algo.model is prep.model and prep.algo.adapts is False
    # fitted once: one validation row at epoch 0, no training loss, nothing selected
    assert [h["epoch"] for h in fit.history] == [0] and fit.best_epoch == 0
    assert not any(k.startswith("train/") for k in fit.history[0])
    assert len(test.per_task) == len(prep.splits.test)
    rating_metrics = {"rmse", "mae"}
    for name in prep.evaluator.metric_names:
        if name in rating_metrics and not prep.algo.predicts_ratings:
            assert f"test/{name}" not in test.summary and name not in test.per_task, name
        else:
            assert math.isfinite(test.summary[f"test/{name}"]), name
    # the constant reference predicts the meta-train mean: its RMSE is the rating baseline
    assert math.isfinite(test.summary["test/ref/constant/rmse"])


def test_popularity_runs_no_epoch_loop_and_reports_no_rating_metric(monkeypatch):
    def no_meta_step(self, batch):
        raise AssertionError("a fitted-once scorer must not go through the epoch loop")

    monkeypatch.setattr(Popularity, "meta_step", no_meta_step)
    prep, fit, test = _run("popularity", "trainer.max_epochs=6", "trainer.patience=1")
    assert [h["epoch"] for h in fit.history] == [0]
    assert "test/rmse" not in test.summary and "test/mae" not in test.summary
    assert "rmse" not in test.per_task and "val/rmse" not in fit.history[0]
    assert math.isfinite(test.summary["test/ndcg_at_5"])
    # the rating baseline the popularity row is read against: the constant at the training mean
    train = prep.splits.train
    mean = float(torch.cat([train.support_y, train.query_y]).double().mean())
    batch = prep.splits.test.batch(torch.arange(len(prep.splits.test)))
    per_user = (((batch.query_y.double() - mean) ** 2 * batch.query_mask).sum(1)
                / batch.query_mask.sum(1)).sqrt()
    np.testing.assert_allclose(test.per_task["ref/constant/rmse"].to_numpy(), per_user.numpy(), rtol=1e-5)


@pytest.mark.parametrize("evaluator", ["query_only", "all_unseen", "sampled"])
def test_oracle_ranks_perfectly_under_every_protocol(evaluator):
    prep, _, test = _run("oracle", f"evaluator={evaluator}", "evaluator.n_negatives=20")
    tasks = prep.splits.test
    threshold = prep.evaluator.threshold
    relevant = tasks.batch(torch.arange(len(tasks)))
    has_relevant = ((relevant.query_y >= threshold) & relevant.query_mask).any(1).numpy()
    has_relevant &= ~test.per_task["ranking_trivial"].to_numpy()
    assert has_relevant.sum() > 0
    ndcg = test.per_task.loc[has_relevant, [c for c in test.per_task if c.startswith("ndcg_at_")]]
    np.testing.assert_allclose(ndcg.to_numpy(), 1.0)
    assert test.summary["test/rmse"] == 0.0 and test.summary["test/mae"] == 0.0


def test_oracle_looks_up_query_and_support_ratings_and_ranks_unknown_items_last():
    oracle = OracleScorer(_model())
    batch = TINY.batch(torch.arange(3))
    scorer = oracle.adapt(batch)
    np.testing.assert_allclose(scorer.predict(batch.query_x)[batch.query_mask].numpy(),
                               batch.query_y[batch.query_mask].numpy())
    # support items are known too; task 0 rates item 0 in both sets (5 support, 4 query): query wins
    support = batch.support_y.clone()
    support[0, 0] = 4.0
    np.testing.assert_allclose(scorer.predict(batch.support_x)[batch.support_mask].numpy(),
                               support[batch.support_mask].numpy())
    # rows in another order are looked up by item, within their own task
    flipped = batch.query_x.flip(1)
    expected = batch.query_y.flip(1)
    mask = batch.query_mask.flip(1)
    np.testing.assert_allclose(scorer.predict(flipped)[mask].numpy(), expected[mask].numpy())
    unknown = batch.query_x.clone()
    unknown[0, 0, -1] = 5  # item 5 is rated by no task
    lowest = min(float(batch.query_y[batch.query_mask].min()), float(batch.support_y[batch.support_mask].min()))
    below = min(lowest, 0.0) - 1.0  # unrated candidates rank below every rated item
    assert float(scorer.predict(unknown)[0, 0]) == below
    borrowed = batch.query_x.clone()
    borrowed[2, 0, -1] = 6  # item 6 is rated by task 1, not task 2: unknown to task 2
    assert float(scorer.predict(borrowed)[2, 0]) == below


# -- counting scorers ------------------------------------------------------------------------
def test_popularity_equals_hand_counted_frequencies():
    pop = Popularity(_model())
    _epochs(pop, TINY, epochs=1, batch_size=2)
    items = list(TINY_COUNTS)
    assert _score_items(pop, items).tolist() == [float(TINY_COUNTS[i]) for i in items]
    assert _score_items(pop, [40]).tolist() == [0.0]  # far beyond every seen id


@pytest.mark.parametrize("cls", [Popularity, ItemMean, lambda m: ConstantScorer(m, value=None)])
def test_counts_do_not_change_with_more_epochs_or_batch_sizes(cls):
    once = cls(_model())
    _epochs(once, TINY, epochs=1, batch_size=3)
    many = cls(_model())
    _epochs(many, TINY, epochs=5, batch_size=1, seed=7)
    items = list(range(9))
    torch.testing.assert_close(_score_items(once, items), _score_items(many, items))


def test_fit_once_ignores_epochs_and_equals_counting_through_meta_steps():
    per_task = {}
    for epochs in (1, 3):
        prep, fit, test = _run("item_mean", f"trainer.max_epochs={epochs}", "trainer.patience=5")
        assert len(fit.history) == 1
        per_task[epochs] = test.per_task
        if epochs == 1:
            state = copy.deepcopy(prep.algo.state_dict())
        else:
            for k in ("count", "rating_sum", "seen"):
                torch.testing.assert_close(prep.algo.state_dict()[k], state[k])
    pd.testing.assert_frame_equal(per_task[1], per_task[3])
    stepped = ItemMean(prep.model)
    _epochs(stepped, prep.splits.train, epochs=2, batch_size=16)
    for k in ("count", "rating_sum"):
        torch.testing.assert_close(stepped.state_dict()[k], state[k])


def _train_frame(tasks: TaskSet) -> pd.DataFrame:
    return pd.DataFrame({
        "item": torch.cat([tasks.support_x[:, -1], tasks.query_x[:, -1]]).numpy(),
        "rating": torch.cat([tasks.support_y, tasks.query_y]).double().numpy(),
    })


@pytest.mark.parametrize("shrinkage", [0.0, 3.0])
def test_item_mean_equals_a_pandas_groupby_mean(shrinkage):
    prep, _ = _prepare("item_mean", f"algo.shrinkage={shrinkage}")
    train = prep.splits.train
    _epochs(prep.algo, train, epochs=2, batch_size=16)
    frame = _train_frame(train)
    mu = frame["rating"].mean()
    stats = frame.groupby("item")["rating"].agg(["sum", "count"])
    expected = (stats["sum"] + shrinkage * mu) / (stats["count"] + shrinkage)
    unseen = max(int(frame["item"].max()) + 5, 200)
    got = _score_items(prep.algo, [*expected.index.tolist(), unseen]).double().numpy()
    np.testing.assert_allclose(got[:-1], expected.to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(got[-1], mu, rtol=1e-5)  # never-seen items get the global mean
    # popularity on the same tasks equals the groupby counts
    pop = Popularity(prep.model)
    _epochs(pop, train, epochs=1, batch_size=16)
    got = _score_items(pop, stats.index.tolist()).numpy()
    np.testing.assert_array_equal(got, stats["count"].to_numpy())


def test_item_mean_refuses_negative_shrinkage():
    with pytest.raises(ConfigError, match="algo.shrinkage"):
        _prepare("item_mean", "algo.shrinkage=-1")


# -- constant and random -----------------------------------------------------------------------
def test_constant_scores_are_all_equal():
    prep, _, _ = _run("constant")
    batch = prep.splits.test.batch(torch.arange(len(prep.splits.test)))
    scores = prep.algo.adapt(batch).predict(batch.query_x)
    assert (scores == scores.flatten()[0]).all()
    # value: null learns the mean of every meta-train rating (support + query)
    mean = _train_frame(prep.splits.train)["rating"].mean()
    assert scores.flatten()[0].item() == pytest.approx(mean, rel=1e-5)
    fixed = ConstantScorer(_model(), value=3.5)
    assert (fixed.adapt(batch).predict(batch.query_x) == 3.5).all()
    with pytest.raises(ConfigError, match="value"):
        ConstantScorer(_model(), value=float("nan"))


def _random_test_scores(seed: int) -> torch.Tensor:
    algo = RandomScorer(_model(), seed=seed)
    batch = TINY.batch(torch.arange(3))
    return algo.adapt(batch).predict(batch.query_x)


def test_random_scores_depend_on_the_seed_only():
    a, b, c = _random_test_scores(0), _random_test_scores(0), _random_test_scores(1)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert ((a >= 0) & (a < 1)).all() and len(set(a.flatten().tolist())) == a.numel()


def test_random_test_scores_do_not_depend_on_the_number_of_epochs():
    results = [_run("random", f"trainer.max_epochs={e}", "algo.seed=3")[2].per_task for e in (1, 3)]
    pd.testing.assert_frame_equal(*results)
    other = _run("random", "algo.seed=4")[2].per_task
    assert not other["ndcg_at_5"].equals(results[0]["ndcg_at_5"])


@pytest.mark.parametrize("algo", SCORERS)
def test_state_dict_round_trips(algo):
    prep, _ = _prepare(algo)
    _epochs(prep.algo, prep.splits.train, epochs=1, batch_size=32)
    batch = prep.splits.val.batch(torch.arange(len(prep.splits.val)))
    state = copy.deepcopy(prep.algo.state_dict())
    before = prep.algo.adapt(batch).predict(batch.query_x)
    fresh, _ = _prepare(algo)
    fresh.algo.load_state_dict(state)
    torch.testing.assert_close(fresh.algo.adapt(batch).predict(batch.query_x), before)
