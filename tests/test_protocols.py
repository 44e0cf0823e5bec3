"""Evaluation protocols: candidate sets (all_unseen, sampled, query_only), hand-computed ranking
metrics over them, the guards, and the few-shot / adaptation curves."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.evaluate.candidates import Catalog, build_candidates
from metarec_runner.evaluate.curves import adaptation_curve, few_shot_curve
from metarec_runner.evaluate.evaluator import Evaluator
from metarec_runner.tasks.taskset import TaskSet


def _rows(users: np.ndarray, items: np.ndarray) -> torch.Tensor:
    """Feature rows of the tiny catalog: just ``[user_id, item_id]``."""
    return torch.from_numpy(np.stack([users, items], 1).astype(np.int64))


# user 0 rated items 0..3, user 1 rated items 4, 5, 6, 7, 8 (of 10)
RATED = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7, 8]}
CATALOG = Catalog(
    n_items=10,
    rated_offsets=torch.tensor([0, 4, 9]),
    rated_items=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8]),
    feature_rows=_rows,
)


def _tasks(kind: str = "user") -> TaskSet:
    """User 0: support items 0, 1; query 2 (5 stars), 3 (2 stars); item 1 ... untouched.
    User 1: support 4, 5; query 6 (4 stars), 7 (1 star); item 8 rated but in neither set."""
    sx = torch.tensor([[0, 0], [0, 1], [1, 4], [1, 5]])
    qx = torch.tensor([[0, 2], [0, 3], [1, 6], [1, 7]])
    return TaskSet(
        task_ids=torch.tensor([0, 1]),
        support_x=sx, support_y=torch.tensor([3.0, 4.0, 2.0, 5.0]), support_offsets=torch.tensor([0, 2, 4]),
        query_x=qx, query_y=torch.tensor([5.0, 2.0, 4.0, 1.0]), query_offsets=torch.tensor([0, 2, 4]),
        task_kind=kind,
    )


class _ByItem:
    """A non-adapting 'algorithm' whose score is ``sign * item id`` (or NaN)."""

    def __init__(self, sign: float = 1.0, nan: bool = False) -> None:
        self.model = nn.Linear(1, 1).double()
        self.sign, self.nan = sign, nan
        self.eval_inner_steps = 1

    def adapt(self, batch):
        algo = self

        class Scorer:
            def predict(self, x):
                s = algo.sign * x[..., -1].double()
                return s * float("nan") if algo.nan else s

        return Scorer()


def test_rated_mask_marks_exactly_the_rated_items():
    mask = CATALOG.rated_mask(torch.tensor([1, 0]))
    assert mask[0].nonzero().flatten().tolist() == RATED[1]
    assert mask[1].nonzero().flatten().tolist() == RATED[0]


def test_all_unseen_candidates_are_the_query_and_the_never_rated_items():
    items = torch.tensor([[2, 3], [6, 7]])
    y = torch.tensor([[5.0, 2.0], [4.0, 1.0]])
    qmask = torch.ones(2, 2, dtype=torch.bool)
    c = build_candidates("all_unseen", CATALOG, torch.tensor([0, 1]), items, y, qmask, y >= 4)
    assert c.mask[0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    # user 1: item 8 was rated outside support and query: known, so never a (false) negative
    assert c.mask[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 6, 7, 9]
    assert c.relevant.nonzero().tolist() == [[0, 2], [1, 6]]
    assert c.target[0, 2] == 5.0 and c.target[0, 3] == 2.0 and c.target[0, 4] == 0.0
    assert c.is_query.sum() == 4


def test_sampled_negatives_are_never_rated_seeded_and_bounded():
    items = torch.tensor([[2, 3], [6, 7]])
    y = torch.tensor([[5.0, 2.0], [4.0, 1.0]])
    qmask = torch.ones(2, 2, dtype=torch.bool)
    users = torch.tensor([0, 1])

    def draw(seed: int):
        return build_candidates("sampled", CATALOG, users, items, y, qmask, y >= 4, n_negatives=4,
                                generator=torch.Generator().manual_seed(seed))

    c = draw(0)
    assert c.items.shape == (2, 6) and bool(c.mask.all())
    for b, u in enumerate((0, 1)):
        negatives = c.items[b, 2:].tolist()
        assert len(set(negatives)) == 4 and not set(negatives) & set(RATED[u])
    assert torch.equal(draw(0).items, c.items)
    assert any(not torch.equal(draw(s).items, c.items) for s in range(1, 6))
    assert c.relevant[:, 2:].sum() == 0 and c.relevant[:, :2].tolist() == [[True, False], [True, False]]
    with pytest.raises(ConfigError, match="evaluator.n_negatives.*user 1 left only 5 unrated"):
        build_candidates("sampled", CATALOG, users, items, y, qmask, y >= 4, n_negatives=6)


def test_full_ranking_metrics_equal_hand_computed_values():
    ev = Evaluator(protocol="all_unseen", ks=(1, 5), metrics=["ndcg", "mrr", "recall", "auc"],
                   references=False).bind(CATALOG)
    res = ev.evaluate(_ByItem(sign=1.0), _tasks(), "test", torch.device("cpu"))
    row0, row1 = res.per_task.iloc[0], res.per_task.iloc[1]
    # user 0: candidates 2..9 ranked 9, 8, ..., 2; the relevant item 2 comes 8th of 8
    assert row0.n_candidates == 8 and row0.n_relevant == 1
    assert row0.ndcg_at_5 == 0.0 and row0.mrr_at_5 == 0.0 and row0.auc == 0.0
    # user 1: candidates 9, 7, 6, 3, 2, 1, 0; the relevant item 6 comes 3rd of 7
    assert row1.n_candidates == 7
    assert math.isclose(row1.ndcg_at_5, 1 / math.log2(4)) and math.isclose(row1.mrr_at_5, 1 / 3)
    assert row1.recall_at_1 == 0.0 and row1.recall_at_5 == 1.0
    assert math.isclose(row1.auc, 4 / 6)  # 4 of the 6 irrelevant candidates score below item 6
    flipped = ev.evaluate(_ByItem(sign=-1.0), _tasks(), "test", torch.device("cpu")).per_task
    assert flipped.iloc[0].ndcg_at_1 == 1.0  # item 2 is now first of user 0's candidates


def test_query_only_and_all_unseen_differ_on_the_same_scores():
    only = Evaluator(protocol="query_only", ks=(1,), metrics=["ndcg"], references=False)
    res = only.evaluate(_ByItem(sign=1.0), _tasks(), "test", torch.device("cpu")).per_task
    assert res.n_candidates.tolist() == [2, 2]
    assert res.ndcg_at_1.tolist() == [0.0, 0.0]  # item 3 above 2, item 7 above 6


def test_references_appear_beside_the_model_under_full_ranking():
    ev = Evaluator(protocol="all_unseen", ks=(5,), metrics=["ndcg"]).bind(CATALOG)
    res = ev.evaluate(_ByItem(), _tasks(), "test", torch.device("cpu"))
    assert res.summary["test/ref/oracle/ndcg_at_5"] == 1.0
    assert 0.0 <= res.summary["test/ref/constant/ndcg_at_5"] <= 1.0
    # the evaluation is deterministic: the tie-breaking permutation is seeded
    again = ev.evaluate(_ByItem(), _tasks(), "test", torch.device("cpu"))
    assert again.summary == res.summary


class _Constant(_ByItem):
    """Scores every candidate alike."""

    def adapt(self, batch):
        class Scorer:
            def predict(self, x):
                return torch.zeros(x.shape[:2], dtype=torch.float64)

        return Scorer()


def test_constant_scores_get_the_expectation_of_random_ties_on_popularity_sorted_ids():
    """Every user rated items 0, 1 (query, 5 stars) and 2 (support) of 50: the ids are sorted by
    popularity, so breaking score ties by position would rank both relevant items first (NDCG
    1.0). With ties broken by a seeded random permutation, the mean NDCG@10 over many users
    equals the expectation of a random ranking: each of the 49 candidates is relevant with
    probability 2/49 at every rank."""
    users, n_items, k = 1500, 50, 10
    catalog = Catalog(
        n_items=n_items,
        rated_offsets=torch.arange(0, 3 * users + 1, 3),
        rated_items=torch.tensor([0, 1, 2] * users),
        feature_rows=_rows,
    )
    ids = torch.arange(users)
    tasks = TaskSet(
        task_ids=ids,
        support_x=torch.stack([ids, torch.full_like(ids, 2)], 1),
        support_y=torch.full((users,), 3.0), support_offsets=torch.arange(users + 1),
        query_x=torch.stack([ids.repeat_interleave(2), torch.tensor([0, 1]).repeat(users)], 1),
        query_y=torch.full((2 * users,), 5.0), query_offsets=torch.arange(0, 2 * users + 1, 2),
    )
    ev = Evaluator(protocol="all_unseen", ks=(k,), metrics=["ndcg", "recall"]).bind(catalog)
    res = ev.evaluate(_Constant(), tasks, "test", torch.device("cpu"))
    disc = 1 / np.log2(np.arange(2, k + 2))
    expected_ndcg = (2 / 49) * disc.sum() / disc[:2].sum()
    expected_recall = k / 49
    per_user = res.per_task["ndcg_at_10"].to_numpy()
    tolerance = 4 * per_user.std() / math.sqrt(users)
    assert abs(per_user.mean() - expected_ndcg) < tolerance, (per_user.mean(), expected_ndcg)
    assert abs(res.summary["test/recall_at_10"] - expected_recall) < 4 * res.per_task[
        "recall_at_10"].std() / math.sqrt(users)
    # the constant reference on the same candidates tells the same story
    assert abs(res.summary["test/ref/constant/ndcg_at_10"] - expected_ndcg) < tolerance
    assert res.summary["test/ndcg_at_10"] < 0.5  # far from the 1.0 the id order would give


def test_full_ranking_refuses_tasks_that_are_not_users():
    ev = Evaluator(protocol="all_unseen").bind(CATALOG)
    with pytest.raises(ConfigError, match="ranks each user's unseen items, but the test tasks are items"):
        ev.evaluate(_ByItem(), _tasks("item"), "test", torch.device("cpu"))


def test_candidates_equal_to_the_relevant_set_raise():
    ev = Evaluator(protocol="query_only", ks=(1,), metrics=["ndcg"], relevance_threshold=1.0, references=False)
    with pytest.raises(ConfigError, match="every test task .* has every candidate relevant"):
        ev.check_tasks(_tasks(), "test")
    with pytest.raises(ConfigError, match="every candidate relevant"):
        ev.evaluate(_ByItem(), _tasks(), "test", torch.device("cpu"))


def test_a_single_all_relevant_task_is_left_out_of_the_ranking_mean():
    ev = Evaluator(protocol="query_only", ks=(1,), metrics=["rmse", "ndcg"], relevance_threshold=2.0,
                   references=False)
    res = ev.evaluate(_ByItem(), _tasks(), "test", torch.device("cpu"))
    # user 0: ratings 5, 2 are both >= 2 (trivial); user 1: 4 relevant, 1 not
    assert res.per_task.ranking_trivial.tolist() == [True, False]
    assert math.isnan(res.per_task.ndcg_at_1[0]) and not math.isnan(res.per_task.rmse[0])
    assert res.summary["test/ndcg_at_1"] == 0.0  # the mean runs over user 1 only


def test_nan_scores_raise():
    ev = Evaluator(protocol="all_unseen", ks=(1,), metrics=["ndcg"]).bind(CATALOG)
    with pytest.raises(TrainingError, match="NaN or infinite scores"):
        ev.evaluate(_ByItem(nan=True), _tasks(), "test", torch.device("cpu"))


def test_unknown_protocol_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="evaluator.protocol: must be one of"):
        Evaluator(protocol="everything")


def test_few_shot_and_adaptation_curves_evaluate_every_point():
    ev = Evaluator(protocol="all_unseen", ks=(5,), metrics=["ndcg"], references=False).bind(CATALOG)
    shots = few_shot_curve(ev, _ByItem(), _tasks(), torch.device("cpu"), (0, 1, 2, 3))
    # both users have 2 support items: k = 3 leaves them out, and says so
    assert shots.curve.shots.tolist() == [0, 1, 2] and set(shots.curve.metric) == {"ndcg_at_5"}
    assert shots.dropped == {0: 0, 1: 0, 2: 0, 3: 2} and shots.summary["test_k3/n_dropped"] == 2
    assert "test_k3/ndcg_at_5" not in shots.summary
    assert "test_k1/ndcg_at_5" in shots.summary and "test_k2/ndcg_at_5_ci95" in shots.summary
    # one row per (k, user), with the support actually used: nested supports, paired per user
    assert shots.per_task[["shots", "task_id", "n_support"]].values.tolist() == [
        [0, 0, 0], [0, 1, 0], [1, 0, 1], [1, 1, 1], [2, 0, 2], [2, 1, 2]]
    algo = _ByItem()
    frame, summary = adaptation_curve(ev, algo, _tasks(), torch.device("cpu"), (0, 3))
    assert frame.steps.tolist() == [0, 3] and algo.eval_inner_steps == 1  # restored


def _data_dir() -> Path:
    return Path(os.environ.get("METAREC_DATA_DIR", "/work/shared/data"))


def test_ml100k_all_unseen_candidate_counts():
    if not (_data_dir() / "ml-100k" / "u.data").exists():
        pytest.skip(f"ml-100k not found under {_data_dir()} (set METAREC_DATA_DIR)")
    from metarec_runner.data.movielens import load_movielens
    from metarec_runner.tasks.splitters import UserColdStart

    data = load_movielens("ml-100k", data_dir=_data_dir())
    splits = UserColdStart(ratios=(0.8, 0.1, 0.1), n_query=10, min_interactions=13, max_interactions=100)(data)
    catalog = Catalog.from_interactions(data)
    ev = Evaluator(protocol="all_unseen", ks=(10,), metrics=["ndcg"]).bind(catalog)
    res = ev.evaluate(_ByItem(), splits.test, "test", torch.device("cpu"))
    rated = data.ratings.groupby("user").size()
    expected = [data.n_items - rated[u] + 10 for u in res.per_task.task_id]
    assert res.per_task.n_candidates.tolist() == expected
    assert res.summary["test/ref/oracle/ndcg_at_10"] == 1.0


def test_cut_offs_are_checked_against_each_users_own_candidate_count():
    # user 1 rated 5 of 10 items: 5 unrated + 2 query = 7 candidates, so recall@7 is trivial
    ev = Evaluator(protocol="all_unseen", ks=(7,), metrics=["recall"]).bind(CATALOG)
    with pytest.raises(ConfigError, match=r"cut-offs \[7\] are >= the smallest candidate set \(7 items"):
        ev.check_tasks(_tasks(), "test")
    Evaluator(protocol="all_unseen", ks=(6,), metrics=["recall"]).bind(CATALOG).check_tasks(_tasks(), "test")


def test_no_relevant_item_anywhere_is_refused():
    ev = Evaluator(protocol="all_unseen", ks=(1,), metrics=["ndcg"], relevance_threshold=6.0).bind(CATALOG)
    with pytest.raises(ConfigError, match="no test task has a relevant query item under rating >= "
                                          "relevance_threshold=6"):
        ev.evaluate(_ByItem(), _tasks(), "test", torch.device("cpu"))


def test_support_items_are_never_candidates_even_when_not_in_the_ratings():
    # implicit feedback: support holds a sampled negative (item 9) that the data never rated
    tasks = _tasks()
    sx = tasks.support_x.clone()
    sx[1, 1] = 9
    tasks = TaskSet(tasks.task_ids, sx, tasks.support_y, tasks.support_offsets, tasks.query_x, tasks.query_y,
                    tasks.query_offsets)
    ev = Evaluator(protocol="all_unseen", ks=(1,), metrics=["ndcg"]).bind(CATALOG)
    per_task = ev.evaluate(_ByItem(), tasks, "test", torch.device("cpu")).per_task
    assert per_task.n_candidates.tolist() == [7, 7]  # user 0 loses item 9 too


def test_sampled_negatives_never_repeat_a_query_item():
    # query items 8 and 9 are unrated by the catalog (implicit negatives): they must not be drawn again
    items = torch.tensor([[8, 9]])
    y = torch.tensor([[1.0, 0.0]])
    qmask = torch.ones(1, 2, dtype=torch.bool)
    for seed in range(20):
        c = build_candidates("sampled", CATALOG, torch.tensor([0]), items, y, qmask, y >= 1, n_negatives=4,
                             generator=torch.Generator().manual_seed(seed))
        assert len(set(c.items[0].tolist())) == 6
    with pytest.raises(ConfigError, match="left only 4 unrated"):
        build_candidates("sampled", CATALOG, torch.tensor([0]), items, y, qmask, y >= 1, n_negatives=5)


def test_oracle_reference_is_perfect_under_full_ranking_with_top_n_ties():
    # user 0's query ratings tie (3, 3): relevance picks the earlier query item (item 3, by position)
    tasks = _tasks()
    qx = torch.tensor([[0, 3], [0, 2], [1, 6], [1, 7]])
    tasks = TaskSet(tasks.task_ids, tasks.support_x, tasks.support_y, tasks.support_offsets, qx,
                    torch.tensor([3.0, 3.0, 4.0, 1.0]), tasks.query_offsets)
    ev = Evaluator(protocol="all_unseen", ks=(1,), metrics=["ndcg"], relevance="top_n", top_n=1).bind(CATALOG)
    res = ev.evaluate(_ByItem(), tasks, "test", torch.device("cpu"))
    assert res.summary["test/ref/oracle/ndcg_at_1"] == 1.0


def test_an_empty_split_is_a_one_line_error():
    empty = TaskSet(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0),
                    torch.zeros(1, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0),
                    torch.zeros(1, dtype=torch.long))
    with pytest.raises(ConfigError, match="the val split has no tasks"):
        Evaluator(protocol="query_only").evaluate(_ByItem(), empty, "val", torch.device("cpu"))
