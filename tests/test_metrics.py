"""Metrics equal hand-computed values and an independent per-task Python implementation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.evaluate import metrics as M
from metarec_runner.evaluate.evaluator import QueryEvaluator
from metarec_runner.evaluate.summary import by_support_size, mean_ci


def test_ndcg_and_recall_hand_computed():
    # ratings of 4 query items; relevant (>=4): items 0 and 2
    target = torch.tensor([[5.0, 1.0, 4.0, 2.0]])
    pred = torch.tensor([[0.1, 0.9, 0.8, 0.2]])  # ranking: 1, 2, 3, 0
    mask = torch.ones_like(target, dtype=torch.bool)
    # top-3 = items 1, 2, 3 -> one relevant at rank 2: DCG = 1/log2(3); IDCG = 1 + 1/log2(3)
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert M.ndcg_at_k(pred, target, mask, 3, 4.0).item() == pytest.approx(expected)
    assert M.recall_at_k(pred, target, mask, 3, 4.0).item() == pytest.approx(0.5)
    assert M.recall_at_k(pred, target, mask, 1, 4.0).item() == pytest.approx(0.0)
    assert M.rmse(pred, target, mask).item() == pytest.approx(math.sqrt(((pred - target) ** 2).mean().item()))
    assert M.mae(pred, target, mask).item() == pytest.approx((pred - target).abs().mean().item())


def test_ties_broken_by_query_position_and_padding_ignored():
    target = torch.tensor([[1.0, 5.0, 0.0]])
    pred = torch.tensor([[2.0, 2.0, 9.0]])  # tie between items 0 and 1; item 2 is padding
    mask = torch.tensor([[True, True, False]])
    # tie -> position order: item 0 first, relevant item 1 second
    assert M.ndcg_at_k(pred, target, mask, 2, 4.0).item() == pytest.approx(1 / math.log2(3))
    assert M.rmse(pred, target, mask).item() == pytest.approx(math.sqrt((1 + 9) / 2))


def test_no_relevant_item_gives_nan():
    target = torch.tensor([[1.0, 2.0, 3.0]])
    pred = torch.rand(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert math.isnan(M.ndcg_at_k(pred, target, mask, 2, 4.0).item())
    assert math.isnan(M.recall_at_k(pred, target, mask, 2, 4.0).item())


def _reference(pred, target, n, k, thr):
    """Independent plain-Python NDCG@k and Recall@k for one task."""
    order = sorted(range(n), key=lambda i: (-pred[i], i))
    rel = [1.0 if target[i] >= thr else 0.0 for i in order]
    n_rel = sum(1.0 for i in range(n) if target[i] >= thr)
    if n_rel == 0:
        return float("nan"), float("nan")
    dcg = sum(r / math.log2(j + 2) for j, r in enumerate(rel[:k]))
    idcg = sum(1 / math.log2(j + 2) for j in range(int(min(k, n_rel))))
    return dcg / idcg, sum(rel[:k]) / n_rel


@pytest.mark.parametrize("seed", range(5))
def test_matches_independent_implementation_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    B, Q = 40, 12
    target = torch.randint(1, 6, (B, Q), generator=g).double()
    pred = torch.randint(0, 4, (B, Q), generator=g).double()  # few distinct scores: many ties
    lengths = torch.randint(1, Q + 1, (B,), generator=g)
    mask = torch.arange(Q)[None, :] < lengths[:, None]
    for k in (1, 3, 5, 20):
        ndcg = M.ndcg_at_k(pred, target, mask, k, 4.0)
        recall = M.recall_at_k(pred, target, mask, k, 4.0)
        for b in range(B):
            n = int(lengths[b])
            ref_ndcg, ref_recall = _reference(pred[b].tolist(), target[b].tolist(), n, k, 4.0)
            if math.isnan(ref_ndcg):
                assert math.isnan(ndcg[b]) and math.isnan(recall[b])
            else:
                assert ndcg[b].item() == pytest.approx(ref_ndcg, abs=1e-12)
                assert recall[b].item() == pytest.approx(ref_recall, abs=1e-12)


def test_mean_ci_normal_interval_and_nan_skipping():
    values = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    mean, half, n = mean_ci(values)
    assert n == 4 and mean == pytest.approx(2.5)
    assert half == pytest.approx(1.959963984540054 * np.std([1, 2, 3, 4], ddof=1) / 2)


def test_by_support_size_buckets():
    frame = pd.DataFrame({"n_support": [3, 4, 8, 30, 100], "rmse": [1.0, 3.0, 2.0, 1.0, 0.5]})
    table = by_support_size(frame, ["rmse"])
    assert list(table["support_size"]) == ["<=5", "6-10", "21-40", ">40"]
    assert list(table["tasks"]) == [2, 1, 1, 1]
    assert table.loc[0, "rmse"] == pytest.approx(2.0)


def test_evaluator_refuses_trivial_cutoffs_and_nan_scores():
    ev = QueryEvaluator(ks=(5, 10))
    with pytest.raises(ConfigError, match="evaluator.ks"):
        ev.check_query_size(10)
    ev.check_query_size(11)
    with pytest.raises(TrainingError, match="NaN"):
        ev.task_metrics(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
