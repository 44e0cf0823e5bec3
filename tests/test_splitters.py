"""User cold-start splits: disjoint users, disjoint support/query, seeded, hashed, validated."""

from __future__ import annotations

import pytest
import torch

from metarec_runner.data.toy import make_toy_catalog
from metarec_runner.errors import ConfigError, DataError
from metarec_runner.tasks.splitters import UserColdStart


@pytest.fixture(scope="module")
def data():
    return make_toy_catalog(n_users=200, n_items=120, interactions_per_user=(15, 40), seed=3)


def _pairs(ts, part):
    """Set of (task user, item id) pairs in a TaskSet's support or query rows."""
    x = ts.support_x if part == "support" else ts.query_x
    offsets = ts.support_offsets if part == "support" else ts.query_offsets
    sizes = offsets[1:] - offsets[:-1]
    users = torch.repeat_interleave(ts.task_ids, sizes)
    return set(zip(users.tolist(), x[:, -1].tolist(), strict=True))


def test_users_disjoint_and_support_query_disjoint(data):
    splits = UserColdStart(ratios=(0.6, 0.2, 0.2), n_query=5, min_interactions=13, seed=0)(data)
    sets = [set(p.task_ids.tolist()) for p in (splits.train, splits.val, splits.test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == data.n_users  # every user has >= 15 >= 13 interactions
    for part in (splits.train, splits.val, splits.test):
        assert (part.query_sizes == 5).all()
        assert not (_pairs(part, "support") & _pairs(part, "query"))
        # the user_id column of each row is the task's user
        sizes = part.support_sizes
        assert torch.equal(part.support_x[:, -2], torch.repeat_interleave(part.task_ids, sizes))
    # every rating of the user is in exactly one of support or query
    counts = data.ratings.groupby("user").size()
    part = splits.test
    for t, s, q in zip(part.task_ids.tolist(), part.support_sizes.tolist(), part.query_sizes.tolist(), strict=True):
        assert s + q == counts[t]


def test_same_seed_same_tasks_and_hash_other_seed_differs(data):
    a = UserColdStart(n_query=5, seed=7)(data)
    b = UserColdStart(n_query=5, seed=7)(data)
    c = UserColdStart(n_query=5, seed=8)(data)
    assert a.split_hash == b.split_hash and a.test.fingerprint() == b.test.fingerprint()
    assert a.split_hash != c.split_hash


def test_fixed_support_size_and_filters(data):
    kwargs = dict(n_query=5, n_support=8, min_interactions=20, max_interactions=30, seed=0)
    splits = UserColdStart(**kwargs, filtered_users="drop")(data)
    counts = data.ratings.groupby("user").size()
    for part in (splits.train, splits.val, splits.test):
        assert (part.support_sizes == 8).all()
        assert counts[part.task_ids.numpy()].between(20, 30).all()
    left_out = counts[~counts.between(20, 30)]
    assert splits.summary()["filtered_users"] == len(left_out) > 0
    assert splits.summary()["filtered_interactions"] == left_out.sum()


def test_filtered_users_still_train_but_are_never_evaluated(data):
    kwargs = dict(n_query=5, n_support=8, min_interactions=20, max_interactions=30, seed=0)
    dropped = UserColdStart(**kwargs, filtered_users="drop")(data)
    kept = UserColdStart(**kwargs)(data)
    counts = data.ratings.groupby("user").size()
    for part in ("val", "test"):  # the same evaluation users either way
        assert getattr(kept, part).fingerprint() == getattr(dropped, part).fingerprint()
    extra = set(kept.train.task_ids.tolist()) - set(dropped.train.task_ids.tolist())
    left_out = counts[~counts.between(20, 30)]
    assert extra == set(left_out[left_out >= 2].index.tolist())
    assert kept.summary()["filtered_to_train_users"] == len(extra)
    # every extra train task keeps min(n_query, n // 2) query rows, and at most n_support support rows
    position = {u: i for i, u in enumerate(kept.train.task_ids.tolist())}
    for user in extra:
        i = position[user]
        assert int(kept.train.query_sizes[i]) == min(5, counts[user] // 2)
        assert int(kept.train.support_sizes[i]) == min(8, counts[user] - min(5, counts[user] // 2))


def test_with_support_size_truncates(data):
    test = UserColdStart(n_query=5, seed=0)(data).test
    cut = test.with_support_size(3)
    assert (cut.support_sizes == 3).all()
    assert torch.equal(cut.support_x[:3], test.support_x[:3])
    assert torch.equal(cut.query_x, test.query_x)


def test_bad_settings_name_the_key(data):
    with pytest.raises(ConfigError, match="splitter.n_query.*lower splitter.n_query"):
        UserColdStart(n_query=50, min_interactions=13)(data)
    with pytest.raises(ConfigError, match="ratios"):
        UserColdStart(ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="n_query"):
        UserColdStart(n_query=0)
    with pytest.raises(DataError, match="min_interactions"):
        UserColdStart(min_interactions=1000)(data)
