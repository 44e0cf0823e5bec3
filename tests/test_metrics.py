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
from metarec_runner.evaluate.references import reference_metrics
from metarec_runner.evaluate.summary import bootstrap_ci, by_support_size, mean_ci, summarize


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


def test_mean_ci_t_interval_and_nan_skipping():
    from scipy import stats

    values = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    mean, half, n = mean_ci(values)
    assert n == 4 and mean == pytest.approx(2.5)
    assert half == pytest.approx(stats.t.ppf(0.975, 3) * np.std([1, 2, 3, 4], ddof=1) / 2)


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


# ---------------------------------------------------------------------------------------------
# precision, hit rate, MRR, AUC, graded NDCG, top-n relevance, bootstrap CI


def _example():
    # relevant (>=4): items 0 and 2; ranking by pred: 1, 2, 3, 0
    target = torch.tensor([[5.0, 1.0, 4.0, 2.0]], dtype=torch.float64)
    pred = torch.tensor([[0.1, 0.9, 0.8, 0.2]], dtype=torch.float64)
    return pred, target, torch.ones_like(target, dtype=torch.bool)


def test_precision_hit_mrr_hand_computed():
    pred, target, mask = _example()
    assert M.precision_at_k(pred, target, mask, 3, 4.0).item() == pytest.approx(1 / 3)
    assert M.precision_at_k(pred, target, mask, 1, 4.0).item() == pytest.approx(0.0)
    assert M.precision_at_k(pred, target, mask, 4, 4.0).item() == pytest.approx(0.5)
    assert M.hit_rate_at_k(pred, target, mask, 1, 4.0).item() == 0.0
    assert M.hit_rate_at_k(pred, target, mask, 2, 4.0).item() == 1.0
    assert M.mrr_at_k(pred, target, mask, 1, 4.0).item() == 0.0
    assert M.mrr_at_k(pred, target, mask, 3, 4.0).item() == pytest.approx(0.5)
    # precomputed relevance gives the same as the threshold
    rel = M.relevance(target, mask, "threshold", threshold=4.0)
    assert M.mrr_at_k(pred, target, mask, 3, relevant=rel).item() == pytest.approx(0.5)


def test_auc_hand_computed_with_ties_and_undefined_cases():
    pred, target, mask = _example()
    # relevant scores 0.1, 0.8 vs irrelevant 0.9, 0.2: only 0.8 > 0.2 wins -> 1/4
    assert M.auc(pred, target, mask, 4.0).item() == pytest.approx(0.25)
    tied = torch.tensor([[0.5, 0.5, 0.1, 0.9]], dtype=torch.float64)
    # 0.5 vs 0.5 counts 1/2, everything else loses -> 0.5 / 4
    assert M.auc(tied, target, mask, 4.0).item() == pytest.approx(0.125)
    assert M.auc(-pred, target, mask, 4.0).item() == pytest.approx(0.75)
    # padding ignored: item 3 padded -> relevant {0, 2} vs irrelevant {1}: both lose
    pad = torch.tensor([[True, True, True, False]])
    assert M.auc(pred, target, pad, 4.0).item() == pytest.approx(0.0)
    assert math.isnan(M.auc(pred, target, mask, 0.0).item())  # nothing irrelevant
    assert math.isnan(M.auc(pred, target, mask, 6.0).item())  # nothing relevant


def test_graded_ndcg_hand_computed_exp_and_linear():
    pred, target, mask = _example()
    d = 1 / math.log2(3)
    # top 2 by pred: items 1 (rating 1), 2 (rating 4); ideal: ratings 5, 4
    exp = (1 + 15 * d) / (31 + 15 * d)
    lin = (1 + 4 * d) / (5 + 4 * d)
    assert M.graded_ndcg_at_k(pred, target, mask, 2, gain="exp").item() == pytest.approx(exp)
    assert M.graded_ndcg_at_k(pred, target, mask, 2, gain="linear").item() == pytest.approx(lin)
    assert M.graded_ndcg_at_k(target, target, mask, 3).item() == pytest.approx(1.0)
    zero = torch.zeros_like(target)
    assert math.isnan(M.graded_ndcg_at_k(pred, zero, mask, 2).item())
    with pytest.raises(ValueError):
        M.graded_ndcg_at_k(pred, target, mask, 2, gain="log")


def test_top_n_relevance_hand_computed():
    target = torch.tensor([[3.0, 5, 3, 3, 1, 3, 2, 3, 3, 4]])
    mask = torch.ones_like(target, dtype=torch.bool)
    rel = M.relevance(target, mask, "top_n", top_n=5, tie="position")
    # 5 and 4 (items 1, 9), then the first three 3s in query order (items 0, 2, 3)
    assert rel[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 9]
    # fewer valid items than top_n: all valid items, never padding
    short = torch.tensor([[True, True, False, False, False, False, False, False, False, False]])
    assert M.relevance(target, short, "top_n", top_n=5)[0].nonzero().flatten().tolist() == [0, 1]
    # padding never displaces a valid item even when it holds a high rating
    padded = torch.tensor([[1.0, 2.0, 9.0]])
    top = M.relevance(padded, torch.tensor([[True, True, False]]), "top_n", top_n=1)
    assert top[0].tolist() == [False, True, False]
    with pytest.raises(ValueError):
        M.relevance(target, mask, "graded")


# independent plain-Python references for one task (lists of length n) ---------------------------


def _ranking(pred, n):
    return sorted(range(n), key=lambda i: (-pred[i], i))


def _ref_binary(pred, rel, n, k):
    """Precision@k, HR@k, MRR@k, AUC for one task with relevance list ``rel``."""
    n_rel = sum(rel[:n])
    if n_rel == 0:
        return (float("nan"),) * 4
    top = [rel[i] for i in _ranking(pred, n)[:k]]
    precision = sum(top) / k
    hit = 1.0 if any(top) else 0.0
    mrr = next((1.0 / (j + 1) for j, r in enumerate(top) if r), 0.0)
    pos = [pred[i] for i in range(n) if rel[i]]
    neg = [pred[i] for i in range(n) if not rel[i]]
    if not neg:
        auc = float("nan")
    else:
        wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
        auc = wins / (len(pos) * len(neg))
    return precision, hit, mrr, auc


def _ref_graded(pred, target, n, k, gain):
    g = [(2.0 ** t - 1.0) if gain == "exp" else t for t in target[:n]]
    dcg = sum(g[i] / math.log2(j + 2) for j, i in enumerate(_ranking(pred, n)[:k]))
    idcg = sum(x / math.log2(j + 2) for j, x in enumerate(sorted(g, reverse=True)[:k]))
    return float("nan") if idcg == 0 else dcg / idcg


def _ref_top_n(target, n, top_n):
    order = sorted(range(n), key=lambda i: (-target[i], i))
    chosen = set(order[:top_n])
    return [i in chosen for i in range(len(target))]


def _random_case(seed, B=40, Q=12):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(1, 6, (B, Q), generator=g).double()
    pred = torch.randint(0, 4, (B, Q), generator=g).double()  # few distinct scores: many ties
    lengths = torch.randint(1, Q + 1, (B,), generator=g)
    mask = torch.arange(Q)[None, :] < lengths[:, None]
    return pred, target, mask, lengths


def _close(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rule", ["threshold", "top_n"])
def test_binary_metrics_match_independent_implementation_with_many_ties(seed, rule):
    pred, target, mask, lengths = _random_case(seed)
    B = target.shape[0]
    relevant = M.relevance(target, mask, rule, threshold=4.0, top_n=3, tie="position")
    for b in range(B):
        n = int(lengths[b])
        t = target[b].tolist()
        ref_rel = [x >= 4.0 for x in t[:n]] if rule == "threshold" else _ref_top_n(t, n, 3)[:n]
        assert relevant[b, :n].tolist() == ref_rel and not relevant[b, n:].any()
    auc = M.auc(pred, target, mask, relevant=relevant)
    for k in (1, 3, 5, 20):
        got = [
            fn(pred, target, mask, k, relevant=relevant)
            for fn in (M.precision_at_k, M.hit_rate_at_k, M.mrr_at_k)
        ]
        for b in range(B):
            n = int(lengths[b])
            rel = relevant[b].tolist()
            ref = _ref_binary(pred[b].tolist(), rel, n, k)
            for value, expected in zip([g[b].item() for g in got] + [auc[b].item()], ref, strict=True):
                assert _close(value, expected), (b, k, value, expected)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gain", ["exp", "linear"])
def test_graded_ndcg_matches_independent_implementation(seed, gain):
    pred, target, mask, lengths = _random_case(seed)
    target = target - 1.0  # ratings 0-4: some tasks have all-zero gains (NaN)
    for k in (1, 3, 5, 20):
        got = M.graded_ndcg_at_k(pred, target, mask, k, gain=gain)
        for b in range(target.shape[0]):
            n = int(lengths[b])
            assert _close(got[b].item(), _ref_graded(pred[b].tolist(), target[b].tolist(), n, k, gain))


@pytest.mark.parametrize("seed", range(5))
def test_top_n_relevance_tie_rules(seed):
    g = torch.Generator().manual_seed(seed)
    B, Q, n = 200, 10, 5
    target = torch.randint(1, 6, (B, Q), generator=g).double()
    mask = torch.ones(B, Q, dtype=torch.bool)
    # tie="topk" is literally torch.topk on the true ratings (the peer's code)
    topk = torch.zeros(B, Q, dtype=torch.bool).scatter(-1, torch.topk(target, n).indices, True)
    assert torch.equal(M.relevance(target, mask, "top_n", top_n=n, tie="topk"), topk)
    position = M.relevance(target, mask, "top_n", top_n=n, tie="position")
    for b in range(B):
        assert position[b].tolist() == _ref_top_n(target[b].tolist(), Q, n)
    # every rule picks n items with the same multiset of ratings (a valid top n); where the cut
    # falls between two distinct ratings the set is unique and all rules agree with torch.topk
    rnd = M.relevance(target, mask, "top_n", top_n=n, tie="random", generator=torch.Generator().manual_seed(1))
    srt = target.sort(-1, descending=True).values
    unique_cut = srt[:, n - 1] > srt[:, n]
    for rel in (position, rnd):
        assert (rel.sum(-1) == n).all()
        assert torch.equal((target * rel).sum(-1), srt[:, :n].sum(-1))
        assert torch.equal(rel[unique_cut], topk[unique_cut])
    # the random tie-break is reproducible with its seed and differs from position order
    again = M.relevance(target, mask, "top_n", top_n=n, tie="random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(rnd, again)
    assert not torch.equal(rnd, position)


def test_peer_protocol_random_scorer_precision_is_one_half():
    """10 query items, relevant = top 5 true ratings (position ties): a random scorer's mean P@5
    (= R@5) and NDCG@5 converge to 0.5; a constant scorer sits above it (ties by position in both
    the relevance and the ranking), which is why the peer protocol needs reference scorers."""
    g = torch.Generator().manual_seed(0)
    B, Q = 20_000, 10
    target = torch.randint(1, 6, (B, Q), generator=g).double()
    mask = torch.ones(B, Q, dtype=torch.bool)
    rel = M.relevance(target, mask, "top_n", top_n=5, tie="position")
    pred = torch.rand(B, Q, generator=g, dtype=torch.float64)
    p5 = M.precision_at_k(pred, target, mask, 5, relevant=rel)
    assert abs(p5.mean().item() - 0.5) < 0.01
    assert torch.allclose(p5, M.recall_at_k(pred, target, mask, 5, relevant=rel))
    assert abs(M.ndcg_at_k(pred, target, mask, 5, relevant=rel).mean().item() - 0.5) < 0.01
    assert abs(M.auc(pred, target, mask, relevant=rel).mean().item() - 0.5) < 0.01
    # HR@5 misses only when the top 5 are exactly the 5 irrelevant items: 1 - 1 / C(10, 5)
    assert abs(M.hit_rate_at_k(pred, target, mask, 5, relevant=rel).mean().item() - (1 - 1 / 252)) < 0.002
    # MRR@5: sum over r of P(first relevant at rank r) / r, drawing without replacement
    mrr, p_miss = 0.0, 1.0
    for r in range(1, 6):
        mrr += p_miss * 5 / (11 - r) / r
        p_miss *= (5 - (r - 1)) / (11 - r)
    assert abs(M.mrr_at_k(pred, target, mask, 5, relevant=rel).mean().item() - mrr) < 0.01
    const = M.precision_at_k(torch.zeros_like(pred), target, mask, 5, relevant=rel).mean().item()
    assert const > 0.55


def test_bootstrap_ci_reproducible_contains_mean_and_matches_normal():
    rng = np.random.default_rng(0)
    small = rng.normal(size=50)
    a = bootstrap_ci(small, seed=3)
    assert a == bootstrap_ci(small, seed=3)
    assert a != bootstrap_ci(small, seed=4)
    mean, lo, hi, n = a
    assert n == 50 and lo < mean < hi and mean == pytest.approx(small.mean())
    big = rng.normal(loc=0.5, scale=0.2, size=5000)
    mean, lo, hi, n = bootstrap_ci(big, n_boot=2000, seed=0)
    nmean, half, _ = mean_ci(big)
    assert mean == pytest.approx(nmean)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(nmean, abs=0.2 * half)
    # NaNs skipped; too few values give NaN bounds
    with_nan = np.concatenate([small, [np.nan, np.nan]])
    assert bootstrap_ci(with_nan, seed=3) == a
    m1, lo1, hi1, n1 = bootstrap_ci(np.array([1.0, np.nan]))
    assert (m1, n1) == (1.0, 1) and math.isnan(lo1) and math.isnan(hi1)
    assert bootstrap_ci(np.array([np.nan]))[3] == 0


def test_summarize_normal_and_bootstrap_keys():
    frame = pd.DataFrame({"p": np.linspace(0, 1, 101)})
    normal = summarize(frame, ["p"], "test")
    assert set(normal) == {"test/p", "test/p_ci95"}
    boot = summarize(frame, ["p"], "test", ci="bootstrap", seed=1)
    assert set(boot) == {"test/p", "test/p_ci95", "test/p_ci_lo", "test/p_ci_hi"}
    assert boot["test/p_ci95"] == pytest.approx((boot["test/p_ci_hi"] - boot["test/p_ci_lo"]) / 2)
    assert boot["test/p"] == pytest.approx(normal["test/p"])
    with pytest.raises(ValueError):
        summarize(frame, ["p"], "test", ci="t")


def test_evaluator_metric_names_and_query_size_rules():
    assert QueryEvaluator().metric_names == ["rmse", "mae", "ndcg_at_3", "ndcg_at_5", "recall_at_3", "recall_at_5"]
    ev = QueryEvaluator(
        ks=(5,), metrics=["precision", "recall", "hit", "ndcg", "mrr", "graded_ndcg", "auc", "mae", "rmse"],
        relevance="top_n", top_n=5,
    )
    assert ev.metric_names == [
        "precision_at_5", "recall_at_5", "hit_at_5", "ndcg_at_5", "mrr_at_5", "graded_ndcg_at_5", "auc", "mae", "rmse",
    ]
    ev.check_query_size(10)  # the peer protocol: 10 query items, top 5 relevant, k = 5
    with pytest.raises(ConfigError, match="evaluator.top_n"):
        QueryEvaluator(ks=(3,), relevance="top_n", top_n=10).check_query_size(10)
    with pytest.raises(ConfigError, match="evaluator.ks"):
        QueryEvaluator(ks=(10,), metrics=["precision"]).check_query_size(10)
    # k >= the query size is not trivial for NDCG and MRR
    QueryEvaluator(ks=(10,), metrics=["ndcg", "mrr", "graded_ndcg", "auc"]).check_query_size(10)
    for bad in ({"metrics": ["ndcg@5"]}, {"relevance": "graded"}, {"tie_break": "first"}, {"ci": "t"},
                {"top_n": 0}, {"graded_gain": "log"}):
        with pytest.raises(ConfigError):
            QueryEvaluator(**bad)


def test_evaluator_task_metrics_columns_and_random_ties_seeded():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(1, 6, (64, 10), generator=g).double()
    pred = torch.rand(64, 10, generator=g, dtype=torch.float64)
    mask = torch.ones(64, 10, dtype=torch.bool)
    names = ["rmse", "mae", "ndcg", "graded_ndcg", "recall", "precision", "hit", "mrr", "auc"]
    ev = QueryEvaluator(ks=(5,), metrics=names, relevance="top_n", top_n=5, tie_break="random", seed=7)
    out = ev.task_metrics(pred, target, mask)
    assert list(out) == ev.metric_names and all(v.shape == (64,) for v in out.values())
    again = ev.task_metrics(pred, target, mask)
    assert all(torch.equal(out[m], again[m]) for m in out)
    rel = M.relevance(target, mask, "top_n", top_n=5, tie="random", generator=torch.Generator().manual_seed(7))
    assert torch.equal(out["precision_at_5"], M.precision_at_k(pred, target, mask, 5, relevant=rel))


def test_reference_scorers_on_the_same_items():
    ev = QueryEvaluator(ks=(2,), metrics=("rmse", "precision", "ndcg"), relevance="top_n", top_n=2)
    target = torch.tensor([[5.0, 4.0, 1.0, 1.0], [2.0, 2.0, 5.0, 3.0]])
    mask = torch.ones_like(target, dtype=torch.bool)
    relevant = ev.relevant(target, mask)
    out = reference_metrics(ev.scoring, target, mask, relevant, mask, torch.Generator().manual_seed(0),
                            ev.rating_mean)
    assert not any(k.endswith("rmse") for k in out)
    assert torch.equal(out["ref/oracle/precision_at_2"], torch.ones(2))
    # constant scores + position ties: the first two query items are "ranked" first
    assert torch.allclose(out["ref/constant/precision_at_2"], torch.tensor([1.0, 0.0]))
    assert set(out) == {f"ref/{s}/{m}_at_2" for s in ("random", "constant", "oracle") for m in ("precision", "ndcg")}
