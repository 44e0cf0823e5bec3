"""Temporal user cold start and item cold start: disjoint tasks, time order, item tasks, seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from metarec_runner.data.toy import make_toy_catalog
from metarec_runner.errors import ConfigError, DataError
from metarec_runner.tasks.item_cold_start import ItemColdStart
from metarec_runner.tasks.temporal import TemporalUserColdStart
from tests.helpers import compose, fit_test


@pytest.fixture(scope="module")
def data():
    return make_toy_catalog(n_users=200, n_items=120, interactions_per_user=(15, 40), seed=3)


def _task_of_rows(offsets: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(task_ids, offsets[1:] - offsets[:-1])


def _pairs(ts, part):
    """Set of (user id, item id) pairs in a TaskSet's support or query rows."""
    x = ts.support_x if part == "support" else ts.query_x
    return set(zip(x[:, -2].tolist(), x[:, -1].tolist(), strict=True))


def _parts(splits):
    return (splits.train, splits.val, splits.test)


def _assert_disjoint_tasks(splits):
    sets = [set(p.task_ids.tolist()) for p in _parts(splits)]
    assert all(len(s) == len(p) for s, p in zip(sets, _parts(splits), strict=True))  # no task twice
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    return sets


# ---------------------------------------------------------------- temporal user cold start


def test_temporal_users_disjoint_and_support_query_disjoint(data):
    splits = TemporalUserColdStart(ratios=(0.6, 0.2, 0.2), n_query=5, min_interactions=13, seed=0)(data)
    sets = _assert_disjoint_tasks(splits)
    assert sum(map(len, sets)) == data.n_users  # every user has >= 15 >= 13 interactions
    counts = data.ratings.groupby("user").size()
    for part in _parts(splits):
        assert (part.query_sizes == 5).all()
        assert not (_pairs(part, "support") & _pairs(part, "query"))
        assert torch.equal(part.support_x[:, -2], _task_of_rows(part.support_offsets, part.task_ids))
        assert torch.equal(part.query_x[:, -2], _task_of_rows(part.query_offsets, part.task_ids))
        users = part.task_ids.numpy()
        assert ((part.support_sizes + part.query_sizes).numpy() == counts[users].to_numpy()).all()


def test_temporal_query_is_latest(data):
    splits = TemporalUserColdStart(n_query=6, seed=1)(data)
    when = {(u, i): t for u, i, t in data.ratings[["user", "item", "timestamp"]].itertuples(index=False)}
    for part in _parts(splits):
        s_off, q_off = part.support_offsets.tolist(), part.query_offsets.tolist()
        for k in range(len(part)):
            s = [when[(u, i)] for u, i in part.support_x[s_off[k]:s_off[k + 1], -2:].tolist()]
            q = [when[(u, i)] for u, i in part.query_x[q_off[k]:q_off[k + 1], -2:].tolist()]
            assert len(q) == 6 and s
            assert min(q) >= max(s)
            assert q == sorted(q)  # query stored chronologically
            assert s == sorted(s, reverse=True)  # support stored most recent first


def test_temporal_n_support_takes_the_history_just_before_the_query(data):
    full = TemporalUserColdStart(n_query=5, seed=0)(data)
    cut = TemporalUserColdStart(n_query=5, n_support=4, seed=0)(data)
    for a, b in zip(_parts(full), _parts(cut), strict=True):
        assert torch.equal(a.task_ids, b.task_ids) and torch.equal(a.query_x, b.query_x)
        assert (b.support_sizes == 4).all()
        # the n_support rows are the most recent ones of the full history
        assert torch.equal(a.with_support_size(4).support_x, b.support_x)


def test_temporal_filters(data):
    splits = TemporalUserColdStart(n_query=5, min_interactions=20, max_interactions=30, seed=0)(data)
    counts = data.ratings.groupby("user").size()
    for part in _parts(splits):
        assert counts[part.task_ids.numpy()].between(20, 30).all()


def test_temporal_same_seed_same_hash_other_seed_differs(data):
    a = TemporalUserColdStart(n_query=5, seed=7)(data)
    b = TemporalUserColdStart(n_query=5, seed=7)(data)
    c = TemporalUserColdStart(n_query=5, seed=8)(data)
    assert a.split_hash == b.split_hash and a.test.fingerprint() == b.test.fingerprint()
    assert a.split_hash != c.split_hash


def test_temporal_ties_are_broken_deterministically(data):
    """Coarse timestamps (many ties) still give one split, independent of the frame's row order."""
    ratings = data.ratings.assign(timestamp=data.ratings["timestamp"] // (30 * 86_400))
    coarse = dataclasses.replace(data, ratings=ratings)
    shuffled = dataclasses.replace(data, ratings=ratings.sample(frac=1.0, random_state=0).reset_index(drop=True))
    a = TemporalUserColdStart(n_query=5, seed=0)(coarse)
    b = TemporalUserColdStart(n_query=5, seed=0)(shuffled)
    assert a.split_hash == b.split_hash


def test_temporal_equal_timestamps_is_an_error(data):
    flat = dataclasses.replace(data, ratings=data.ratings.assign(timestamp=0))
    with pytest.raises(DataError, match="TemporalUserColdStart.*timestamp.*splitter=user_cold_start"):
        TemporalUserColdStart(n_query=5)(flat)


def test_temporal_bad_settings_name_the_key(data):
    with pytest.raises(ConfigError, match="splitter.n_query"):
        TemporalUserColdStart(n_query=50, min_interactions=13)(data)
    with pytest.raises(ConfigError, match="n_support"):
        TemporalUserColdStart(n_support=0)


# ---------------------------------------------------------------- item cold start


def test_item_tasks_are_items_and_disjoint(data):
    splits = ItemColdStart(ratios=(0.6, 0.2, 0.2), n_query=5, min_interactions=15, seed=0)(data)
    sets = _assert_disjoint_tasks(splits)
    counts = data.ratings.groupby("item").size().reindex(range(data.n_items), fill_value=0)
    assert sum(map(len, sets)) == int((counts >= 15).sum())
    for part in _parts(splits):
        # every row of a task is a rating of the task's item (last column = item_id)
        assert torch.equal(part.support_x[:, -1], _task_of_rows(part.support_offsets, part.task_ids))
        assert torch.equal(part.query_x[:, -1], _task_of_rows(part.query_offsets, part.task_ids))
        assert (part.query_sizes == 5).all()
        items = part.task_ids.numpy()
        assert ((part.support_sizes + part.query_sizes).numpy() == counts[items].to_numpy()).all()
        assert not (_pairs(part, "support") & _pairs(part, "query"))
    # no test (or validation) item's ratings appear anywhere in the meta-train tasks
    train_items = set(splits.train.support_x[:, -1].tolist()) | set(splits.train.query_x[:, -1].tolist())
    assert not (train_items & sets[2]) and not (train_items & sets[1])


def test_item_filters_and_fixed_support(data):
    splits = ItemColdStart(n_query=5, n_support=7, min_interactions=20, max_interactions=60, seed=0)(data)
    counts = data.ratings.groupby("item").size()
    for part in _parts(splits):
        assert counts[part.task_ids.numpy()].between(20, 60).all()
        assert (part.support_sizes == 7).all() and (part.query_sizes == 5).all()
    n = int(counts.between(20, 60).sum())
    sizes = [len(p) for p in _parts(splits)]  # default ratios (0.8, 0.1, 0.1)
    assert sum(sizes) == n and sizes[:2] == [round(0.8 * n), round(0.1 * n)]


def test_item_same_seed_same_hash_other_seed_differs(data):
    a = ItemColdStart(n_query=5, min_interactions=15, seed=7)(data)
    b = ItemColdStart(n_query=5, min_interactions=15, seed=7)(data)
    c = ItemColdStart(n_query=5, min_interactions=15, seed=8)(data)
    assert a.split_hash == b.split_hash and a.test.fingerprint() == b.test.fingerprint()
    assert a.split_hash != c.split_hash


def test_item_bad_settings_name_the_key(data):
    with pytest.raises(ConfigError, match="splitter.n_query.*items"):
        ItemColdStart(n_query=50, min_interactions=13)(data)
    with pytest.raises(DataError, match="no item.*min_interactions"):
        ItemColdStart(min_interactions=100_000)(data)


# ---------------------------------------------------------------- end to end through Hydra


@pytest.mark.parametrize("overrides", [
    ["splitter=temporal"],
    ["splitter=item_cold_start", "splitter.min_interactions=20", "splitter.n_query=10", "evaluator=query_only"],
], ids=["temporal", "item_cold_start"])
def test_one_meta_epoch_through_hydra(overrides):
    prep, fit, result = fit_test(compose("+algo=maml", "logger=none", "dataset.n_users=120",
                                         "dataset.n_items=80", "trainer.max_epochs=1",
                                         "trainer.progress=false", *overrides))
    assert len(fit.history) == 1
    assert np.isfinite(result.summary["test/rmse"])
    assert len(result.per_task) == len(prep.splits.test)
