"""Cold-start protocols: MeLU's four states, user groups, cross-domain tasks, implicit feedback."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from metarec_runner.data.interactions import Interactions
from metarec_runner.data.toy import make_toy_catalog
from metarec_runner.errors import ConfigError, DataError
from metarec_runner.tasks.domains import Domains
from metarec_runner.tasks.four_states import FourStates, first_seen
from metarec_runner.tasks.implicit import ImplicitUserColdStart, sample_negatives
from metarec_runner.tasks.user_groups import UserGroups, kmeans

DATA = Path(os.environ.get("METAREC_DATA_DIR")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def need(folder: str) -> Path:
    """The real dataset folder, or skip the test with the reason."""
    path = DATA / folder
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (set METAREC_DATA_DIR to the shared data folder)")
    return path


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    """Real ML-100K (cache in a tmp folder), or skip."""
    from metarec_runner.data.movielens import load_movielens

    need("ml-100k")
    mp = pytest.MonkeyPatch()
    mp.setenv("METAREC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    try:
        yield load_movielens(name="ml-100k", data_dir=str(DATA))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def toy():
    return make_toy_catalog(n_users=200, n_items=300, interactions_per_user=(20, 60), seed=3)


def _parts(splits):
    return (splits.train, splits.val, splits.test)


def _rows(ts, role):
    """``(task position [N], user [N], item [N], rating [N])`` numpy arrays of a role's rows."""
    x, y, off = ((ts.support_x, ts.support_y, ts.support_offsets) if role == "support"
                 else (ts.query_x, ts.query_y, ts.query_offsets))
    task = torch.repeat_interleave(torch.arange(len(ts)), off[1:] - off[:-1]).numpy()
    return task, x[:, -2].numpy(), x[:, -1].numpy(), y.numpy()


def _users(ts):
    return set(_rows(ts, "support")[1].tolist()) | set(_rows(ts, "query")[1].tolist())


def _assert_support_query_disjoint(ts):
    """No (task, user, item) row is in both support and query, nor twice in one set."""
    for role in ("support", "query"):
        t, u, i, _ = _rows(ts, role)
        assert len(set(zip(t.tolist(), u.tolist(), i.tolist(), strict=True))) == len(t)
    s = set(zip(*[a.tolist() for a in _rows(ts, "support")[:3]], strict=True))
    q = set(zip(*[a.tolist() for a in _rows(ts, "query")[:3]], strict=True))
    assert not (s & q)


def _assert_users_disjoint(splits):
    a, b, c = (_users(p) for p in _parts(splits))
    assert a and b and c
    assert not (a & b) and not (a & c) and not (b & c)


# ------------------------------------------------------------------------- four states


def tiny_four_states() -> Interactions:
    """12 users x 12 items; users 0-5 and items 0-5 appear before t=100, the rest only after.

    Existing users rate the old items at t < 100 and the new items at t >= 100; new users rate
    everything at t >= 100. So every user has 6 ratings of old items and 6 of new ones.
    """
    rows = []
    for u in range(12):
        for i in range(12):
            old_u, old_i = u < 6, i < 6
            t = 10 * u + i if (old_u and old_i) else 100 + 10 * u + i
            rows.append((u, i, float(1 + (u + i) % 5), t))
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).astype(
        {"user": "int64", "item": "int64", "rating": "float32", "timestamp": "int64"})
    return Interactions(
        name="tiny", ratings=ratings,
        user_features=pd.DataFrame({"g": np.zeros(12, np.int64)}),
        item_features=pd.DataFrame({"c": np.zeros(12, np.int64)}),
        cardinalities={"g": 1, "c": 1},
    )


STATE_CLASSES = {  # state -> (val/test users existing?, val/test items existing?)
    "warm": (True, True), "user_cold": (False, True), "item_cold": (True, False), "user_item_cold": (False, False),
}


@pytest.mark.parametrize("state", list(STATE_CLASSES))
def test_four_states_semantics_on_a_hand_built_timeline(state):
    data = tiny_four_states()
    # the cuts sit exactly on user 6's first rating (t=160) and item 6's (t=106): "before" is strict
    splitter = FourStates(state=state, cut="time", user_cut=160, item_cut=106, ratios=(0.5, 0.25, 0.25),
                          n_query=2, min_interactions=3, seed=0)
    old_user, old_item = splitter.existing(data)
    assert old_user.tolist() == [True] * 6 + [False] * 6
    assert old_item.tolist() == [True] * 6 + [False] * 6
    splits = splitter(data)
    _assert_users_disjoint(splits)
    users_old, items_old = STATE_CLASSES[state]
    for name, part in zip(("train", "val", "test"), _parts(splits), strict=True):
        want_user_old = True if name == "train" else users_old
        want_item_old = True if name == "train" else items_old
        assert (old_user[part.task_ids.numpy()] == want_user_old).all(), name
        for role in ("support", "query"):
            _, u, i, _ = _rows(part, role)
            assert (old_item[i] == want_item_old).all(), (name, role)
            assert (old_user[u] == want_user_old).all(), (name, role)
        # one task per user, holding all 6 of the user's ratings of the state's item class
        assert (part.query_sizes == 2).all() and (part.support_sizes == 4).all()
        _assert_support_query_disjoint(part)
    if state in ("user_cold", "user_item_cold"):
        assert len(splits.train) == 6  # every existing user trains; new users split 1:1 into val/test
        assert len(splits.val) == 3 and len(splits.test) == 3
    else:
        assert len(splits.train) + len(splits.val) + len(splits.test) == 6


def test_four_states_quantile_cut_is_a_rating_time_quantile(toy):
    splitter = FourStates(cut="quantile", user_cut=0.7, item_cut=0.4)
    old_user, old_item = splitter.existing(toy)
    ts = toy.ratings["timestamp"].to_numpy()
    u_cut, i_cut = np.quantile(ts, 0.7, method="higher"), np.quantile(ts, 0.4, method="higher")
    first_u = toy.ratings.groupby("user")["timestamp"].min().reindex(range(toy.n_users)).to_numpy()
    first_i = toy.ratings.groupby("item")["timestamp"].min().reindex(range(toy.n_items)).to_numpy()
    assert (old_user == (first_u < u_cut)).all() and old_user.any() and (~old_user).any()
    assert (old_item == (np.where(np.isnan(first_i), np.inf, first_i) < i_cut)).all()
    assert (first_seen(toy.ratings["user"].to_numpy(), ts, toy.n_users) == first_u).all()


def test_four_states_seeded(toy):
    a = FourStates(state="warm", seed=4)(toy)
    b = FourStates(state="warm", seed=4)(toy)
    c = FourStates(state="warm", seed=5)(toy)
    assert a.split_hash == b.split_hash and a.test.fingerprint() == b.test.fingerprint()
    assert a.split_hash != c.split_hash


def test_four_states_impossible_settings_name_the_key():
    data = tiny_four_states()
    with pytest.raises(DataError, match="no new users.*lower splitter.user_cut"):
        FourStates(state="user_cold", cut="time", user_cut=10_000, n_query=2, min_interactions=3)(data)
    with pytest.raises(DataError, match="no new items.*lower splitter.item_cut"):
        FourStates(state="item_cold", cut="time", user_cut=100, item_cut=10_000, n_query=2,
                   min_interactions=3)(data)
    with pytest.raises(DataError, match="only 6 existing users.*new items.*splitter.ratios"):
        FourStates(state="item_cold", cut="time", user_cut=160, item_cut=106, ratios=(0.9, 0.05, 0.05),
                   n_query=2, min_interactions=3)(data)
    with pytest.raises(ConfigError, match="splitter.state.*warm"):
        FourStates(state="cold")
    with pytest.raises(ConfigError, match="splitter.user_cut.*fraction"):
        FourStates(cut="quantile", user_cut=80)
    with pytest.raises(ConfigError, match="splitter.cut"):
        FourStates(cut="date")


def test_four_states_on_ml100k(ml100k):
    """User cold start by the 0.8 quantile: test users joined after the cut, rate only old items."""
    splitter = FourStates(state="user_cold", cut="quantile", user_cut=0.8, seed=0)
    splits = splitter(ml100k)
    r = ml100k.ratings
    cut = np.quantile(r["timestamp"].to_numpy(), 0.8, method="higher")
    first_u = r.groupby("user")["timestamp"].min()
    first_i = r.groupby("item")["timestamp"].min()
    assert (first_u[splits.train.task_ids.numpy()] < cut).all()
    for part in (splits.val, splits.test):
        assert (first_u[part.task_ids.numpy()] >= cut).all()
        assert (first_i[_rows(part, "query")[2]] < cut).all()
        assert (first_i[_rows(part, "support")[2]] < cut).all()
    _assert_users_disjoint(splits)
    assert len(splits.train) > 500 and len(splits.test) > 50  # measured: 751 / 64 / 128
    item = FourStates(state="item_cold", item_cut=0.5, min_interactions=13)(ml100k)
    for part in (item.val, item.test):
        assert (first_i[_rows(part, "query")[2]] >= np.quantile(r["timestamp"], 0.5, method="higher")).all()


# ------------------------------------------------------------------------- user groups


def test_user_groups_by_feature(toy):
    splitter = UserGroups(group_by="region", ratios=(0.5, 0.25, 0.25), n_query=10, n_support=30,
                          min_interactions=40, seed=0)
    splits = splitter(toy)
    region = toy.user_features["region"].to_numpy()
    ids = [set(p.task_ids.tolist()) for p in _parts(splits)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    _assert_users_disjoint(splits)
    for part in _parts(splits):
        assert part.task_kind == "group"
        assert (part.query_sizes == 10).all() and (part.support_sizes == 30).all()
        _assert_support_query_disjoint(part)
        for role in ("support", "query"):
            t, u, _, _ = _rows(part, role)
            assert (region[u] == part.task_ids.numpy()[t]).all()  # every row's user is in the group


def test_user_groups_kmeans_seeded_and_disjoint(toy):
    a = UserGroups(n_groups=12, n_query=10, n_support=20, min_interactions=30, seed=1)(toy)
    b = UserGroups(n_groups=12, n_query=10, n_support=20, min_interactions=30, seed=1)(toy)
    c = UserGroups(n_groups=12, n_query=10, n_support=20, min_interactions=30, seed=2)(toy)
    assert a.split_hash == b.split_hash and a.split_hash != c.split_hash
    _assert_users_disjoint(a)
    feats = UserGroups(kmeans_on="features", n_groups=8, n_query=10, n_support=20, min_interactions=30)(toy)
    _assert_users_disjoint(feats)


def test_kmeans_recovers_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    truth = torch.arange(3).repeat_interleave(50)
    x = centers[truth] + 0.5 * torch.randn(150, 2, generator=gen, dtype=torch.float64)
    assign = kmeans(x, 3, seed=0)
    # a perfect clustering: each planted cluster maps to one label, all labels distinct
    labels = [set(assign[truth == k].tolist()) for k in range(3)]
    assert all(len(s) == 1 for s in labels) and len(set.union(*labels)) == 3
    assert torch.equal(assign, kmeans(x, 3, seed=0))
    sparse = kmeans(x.to_sparse(), 3, seed=0)
    assert torch.equal(sparse, assign)


def test_user_groups_bad_settings(toy):
    with pytest.raises(ConfigError, match="splitter.group_by.*region"):
        UserGroups(group_by="occupation")(toy)
    with pytest.raises(ConfigError, match="splitter.n_groups"):
        UserGroups(n_groups=10_000)(toy)
    with pytest.raises(ConfigError, match="splitter.kmeans_on"):
        UserGroups(kmeans_on="pixels")


# ------------------------------------------------------------------------- domains


def test_domains_train_and_test_domains_and_disjoint_users(toy):
    splitter = Domains(field="category", train_domains=[[0, 1, 2, 3, 4, 5]], test_domains=[7, [8, 9]],
                       n_query=5, min_interactions=8, seed=0)
    splits = splitter(toy)
    _assert_users_disjoint(splits)
    category = toy.item_features["category"].to_numpy()
    allowed = {"train": {0, 1, 2, 3, 4, 5}, "val": {0, 1, 2, 3, 4, 5}, "test": {7, 8, 9}}
    for name, part in zip(("train", "val", "test"), _parts(splits), strict=True):
        assert part.task_kind == "domain"
        assert len(set(part.task_ids.tolist())) == len(part)
        user, dom = splitter.decode(part.task_ids.numpy())
        _assert_support_query_disjoint(part)
        for role in ("support", "query"):
            t, u, i, _ = _rows(part, role)
            assert set(category[i].tolist()) <= allowed[name], (name, role)
            assert (u == user[t]).all()
        if name == "test":  # domain 1 = category 7, domain 2 = categories 8 and 9
            t, _, i, _ = _rows(part, "query")
            assert ((dom[t] == 1) == (category[i] == 7)).all()
    assert set(splitter.decode(splits.test.task_ids.numpy())[1].tolist()) <= {1, 2}


def test_domains_exclusive_items_with_a_bag_field():
    """Items in a test domain (genre bag) never appear in train tasks when exclusive_items."""
    data = make_toy_catalog(n_users=150, n_items=200, interactions_per_user=(30, 60), seed=5)
    rng = np.random.default_rng(0)
    bag = np.full((data.n_items, 2), -1, dtype=np.int64)
    bag[:, 0] = rng.integers(0, 4, data.n_items)
    two = rng.random(data.n_items) < 0.4
    bag[two, 1] = (bag[two, 0] + 1) % 4
    data.item_bags["genre"] = bag
    data.cardinalities["genre"] = 4
    data.metadata["vocab"] = {"genre": ["a", "b", "c", "d"]}
    for exclusive in (True, False):
        splitter = Domains(field="genre", test_domains=["d"], exclusive_items=exclusive, n_query=5,
                           min_interactions=8, seed=0)
        splits = splitter(data)
        in_test = (bag == 3).any(1)
        train_items = np.concatenate([_rows(splits.train, r)[2] for r in ("support", "query")])
        assert in_test[train_items].any() != exclusive
        test_items = np.concatenate([_rows(splits.test, r)[2] for r in ("support", "query")])
        assert in_test[test_items].all()
    same = Domains(field="genre", test_domains=["d"], n_query=5, min_interactions=8, seed=0)(data)
    assert same.split_hash == Domains(field="genre", test_domains=[3], n_query=5, min_interactions=8,
                                      seed=0)(data).split_hash


def test_domains_bad_settings(toy):
    with pytest.raises(ConfigError, match="splitter.test_domains.*'Horror'"):
        Domains(field="category", test_domains=["Horror"])(toy)
    with pytest.raises(ConfigError, match="splitter.train_domains.*remove"):
        Domains(field="category", train_domains=[1, 2], test_domains=[2])(toy)
    with pytest.raises(ConfigError, match="splitter.field"):
        Domains(field="genres", test_domains=[1])(toy)


def test_domains_on_ml100k_genres(ml100k):
    splitter = Domains(field="genres", train_domains=["Comedy", "Drama", "Action", "Romance"],
                       test_domains=[["Horror", "Thriller"]], seed=0)
    splits = splitter(ml100k)
    _assert_users_disjoint(splits)
    genres = ml100k.item_bags["genres"]
    vocab = ml100k.metadata["vocab"]["genres"]
    held = np.isin(genres, [vocab.index("Horror"), vocab.index("Thriller")]).any(1)
    for role in ("support", "query"):
        assert held[_rows(splits.test, role)[2]].all()
        assert not held[_rows(splits.train, role)[2]].any()
    assert len(splits.test) > 100  # measured: 1663 / 218 / 147 tasks


# ------------------------------------------------------------------------- implicit feedback


@pytest.mark.parametrize("others, k", [("drop", 1), ("zero", 3)])
def test_implicit_labels_and_negatives(toy, others, k):
    splitter = ImplicitUserColdStart(positive_threshold=4.0, others=others, negatives_per_positive=k,
                                     n_query=4, min_interactions=8, seed=0)
    splits = splitter(toy)
    assert splitter.capped_users == 0  # 300 items: every user has enough unrated ones
    r = toy.ratings
    rated = set(zip(r["user"].tolist(), r["item"].tolist(), strict=True))
    rating = dict(zip(zip(r["user"].tolist(), r["item"].tolist(), strict=True), r["rating"].tolist(), strict=True))
    _assert_users_disjoint(splits)
    for part in _parts(splits):
        _assert_support_query_disjoint(part)
        for role in ("support", "query"):
            t, u, i, y = _rows(part, role)
            assert set(np.unique(y).tolist()) <= {0.0, 1.0}
            real = np.array([(a, b) in rated for a, b in zip(u.tolist(), i.tolist(), strict=True)])
            # positives are real ratings >= threshold; real label-0 rows only when others=zero
            assert all(rating[(a, b)] >= 4.0 for a, b in zip(u[y == 1].tolist(), i[y == 1].tolist(), strict=True))
            assert real[y == 1].all()
            if others == "drop":
                assert not real[y == 0].any()  # every 0 is a sampled, never-interacted item
            sampled = ~real
            pos = np.bincount(t[y == 1], minlength=len(part))
            neg = np.bincount(t[sampled], minlength=len(part))
            assert (neg == k * pos).all(), role
            assert (y[sampled] == 0).all()
        assert (np.bincount(_rows(part, "query")[0][_rows(part, "query")[3] >= 0], minlength=len(part))
                >= 4).all()


def test_implicit_seeded_negatives(toy):
    a = ImplicitUserColdStart(negatives_per_positive=2, seed=3)(toy)
    b = ImplicitUserColdStart(negatives_per_positive=2, seed=3)(toy)
    c = ImplicitUserColdStart(negatives_per_positive=2, seed=4)(toy)
    assert a.split_hash == b.split_hash and a.split_hash != c.split_hash


def test_sample_negatives_never_returns_seen_items():
    rng = np.random.default_rng(0)
    n_items = 50
    users = np.array([0, 3, 7])
    seen_items = {0: np.arange(0, 45), 3: np.arange(10, 20), 7: np.array([], dtype=np.int64)}
    seen = np.sort(np.concatenate([u * n_items + s for u, s in seen_items.items()]))
    need = np.array([5, 30, 50])  # user 0 has exactly 5 unseen items; user 7 needs every item
    u, i = sample_negatives(users, need, seen, n_items, rng)
    assert np.bincount(u, minlength=8)[users].tolist() == need.tolist()
    assert (np.diff(np.searchsorted(users, u)) >= 0).all()  # grouped in users order
    for user in users:
        got = i[u == user]
        assert len(set(got.tolist())) == len(got)
        assert not set(got.tolist()) & set(seen_items[int(user)].tolist())
    assert sorted(i[u == 0].tolist()) == [45, 46, 47, 48, 49]


def test_implicit_bad_settings(toy):
    with pytest.raises(ConfigError, match="splitter.positive_threshold"):
        ImplicitUserColdStart(positive_threshold=6.0)(toy)
    with pytest.raises(ConfigError, match="splitter.others"):
        ImplicitUserColdStart(others="keep")
    with pytest.raises(ConfigError, match="splitter.negatives_per_positive"):
        ImplicitUserColdStart(negatives_per_positive=-1)
