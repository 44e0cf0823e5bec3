"""``evaluate/stats.py``: Student's t-intervals (equal to scipy's), intervals over distinct seeds,
the paired difference over distinct users, the bootstrap, clipping to a metric's range."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from metarec_runner.evaluate import stats
from metarec_runner.evaluate.summary import by_support_size, mean_ci, summarize


@pytest.mark.parametrize("n", [2, 3, 5])
def test_t_interval_equals_scipy(n: int) -> None:
    values = np.random.default_rng(n).normal(loc=1.0, scale=0.3, size=n)
    lo, hi = sps.t.interval(0.95, n - 1, loc=values.mean(), scale=sps.sem(values))
    iv = stats.t_interval(values)
    assert iv.n == n and iv.method == "t"
    assert iv.mean == pytest.approx(values.mean(), rel=1e-12)
    assert iv.lo == pytest.approx(lo, rel=1e-12) and iv.hi == pytest.approx(hi, rel=1e-12)
    assert iv.half == pytest.approx((hi - lo) / 2, rel=1e-12)
    # the same through the (mean, half, n) form the summaries use
    assert mean_ci(values) == pytest.approx((values.mean(), (hi - lo) / 2, n), rel=1e-12)
    # not the normal interval: with 2 values t is 12.71, 6.5 times 1.96
    assert stats.t_critical(n - 1) == pytest.approx(sps.t.ppf(0.975, n - 1), rel=1e-12)


def test_t_critical_known_values_and_level() -> None:
    assert stats.t_critical(1) == pytest.approx(12.7062, abs=1e-4)
    assert stats.t_critical(57) == pytest.approx(2.0025, abs=1e-4)
    assert stats.t_critical(10**6) == pytest.approx(1.95996, abs=1e-4)
    assert stats.t_critical(4, level=0.9) == pytest.approx(sps.t.ppf(0.95, 4))
    assert math.isnan(stats.t_critical(0))
    with pytest.raises(ValueError):
        stats.t_critical(3, level=1.5)


def test_fewer_than_two_values_have_no_interval_never_zero() -> None:
    one = stats.t_interval([2.5, float("nan")])
    assert one.mean == 2.5 and one.n == 1
    assert math.isnan(one.lo) and math.isnan(one.hi) and math.isnan(one.half)
    none = stats.t_interval([])
    assert none.n == 0 and math.isnan(none.mean) and math.isnan(none.half)
    # equal values: a genuine interval of width 0 (n = 2, sd 0), not "no interval"
    assert stats.t_interval([1.0, 1.0]).half == 0.0


def test_mean_ci_skips_nans_with_t_quantile() -> None:
    mean, half, n = mean_ci(np.array([1.0, 2.0, 3.0, 4.0, np.nan]))
    assert n == 4 and mean == pytest.approx(2.5)
    assert half == pytest.approx(sps.t.ppf(0.975, 3) * np.std([1, 2, 3, 4], ddof=1) / 2)


def test_summarize_uses_t_over_tasks_and_keeps_its_keys() -> None:
    values = np.random.default_rng(0).uniform(size=58)
    frame = pd.DataFrame({"ndcg_at_5": values, "n_support": np.arange(58) % 30 + 1})
    out = summarize(frame, ["ndcg_at_5"], "test")
    assert set(out) == {"test/ndcg_at_5", "test/ndcg_at_5_ci95"}
    assert out["test/ndcg_at_5_ci95"] == pytest.approx(
        sps.t.ppf(0.975, 57) * values.std(ddof=1) / math.sqrt(58))
    boot = summarize(frame, ["ndcg_at_5"], "test", ci="bootstrap", seed=1)
    assert set(boot) == {"test/ndcg_at_5", "test/ndcg_at_5_ci95", "test/ndcg_at_5_ci_lo",
                         "test/ndcg_at_5_ci_hi"}
    table = by_support_size(frame, ["ndcg_at_5"])
    first = frame[frame["n_support"] <= 5]["ndcg_at_5"]
    assert table.loc[0, "ndcg_at_5_ci95"] == pytest.approx(stats.t_interval(first).half)


def test_bootstrap_stays_available_and_reproducible() -> None:
    values = np.random.default_rng(1).normal(size=200)
    a = stats.bootstrap_interval(values, n_boot=500, seed=3)
    assert a == stats.bootstrap_interval(values, n_boot=500, seed=3)
    assert a.method == "bootstrap" and a.n == 200 and a.lo < a.mean < a.hi
    assert a.half == pytest.approx(stats.t_interval(values).half, rel=0.15)
    assert stats.bootstrap_ci(values, n_boot=500, seed=3) == (a.mean, a.lo, a.hi, a.n)


def test_seed_interval_counts_distinct_seeds() -> None:
    runs = pd.DataFrame({"split_hash": ["h"] * 4, "seed": [0, 1, 2, 2],
                         "test/rmse": [1.0, 1.2, 1.3, 1.5]})
    iv = stats.seed_interval(runs, "test/rmse")
    seed_means = np.array([1.0, 1.2, 1.4])  # seed 2 run twice: one seed, its runs averaged
    assert iv.n == 3 and iv.mean == pytest.approx(seed_means.mean())
    lo, hi = sps.t.interval(0.95, 2, loc=seed_means.mean(), scale=sps.sem(seed_means))
    assert (iv.lo, iv.hi) == pytest.approx((lo, hi))
    # the same seed twice is one seed: no interval, not an interval of 0
    twice = pd.DataFrame({"split_hash": ["h", "h"], "seed": [0, 0], "test/rmse": [1.0, 1.0]})
    one = stats.seed_interval(twice, "test/rmse")
    assert one.n == 1 and one.mean == 1.0 and math.isnan(one.half)
    # a split seed is a seed too: (split_hash, seed) pairs are distinct
    splits = pd.DataFrame({"split_hash": ["a", "b"], "seed": [0, 0], "test/rmse": [1.0, 2.0]})
    assert stats.seed_interval(splits, "test/rmse").n == 2


def _long(values: np.ndarray, seeds: list[int], split: str = "h", users=None,
          checksum: str = "") -> pd.DataFrame:
    """``values[s, u]``: user u's metric under seed s, as per-task rows."""
    users = np.arange(values.shape[1]) if users is None else np.asarray(users)
    return pd.DataFrame({
        "split_hash": split, "data_checksum": checksum,
        "seed": np.repeat(seeds, values.shape[1]), "task_id": np.tile(users, len(seeds)),
        "rmse": values.ravel()})


def test_paired_difference_2_seeds_reports_distinct_users() -> None:
    rng = np.random.default_rng(0)
    U = 28
    own, base = rng.normal(1.0, 0.2, size=(2, U)), rng.normal(1.1, 0.2, size=(2, U))
    d = stats.paired_difference(_long(own, [0, 1]), _long(base, [0, 1]), "rmse")
    assert d.n_users == U and d.n == U and d.n_seeds == 2  # not 2 * 28 = 56 pairs
    per_user = own.mean(axis=0) - base.mean(axis=0)  # each user averaged over seeds first
    lo, hi = sps.t.interval(0.95, U - 1, loc=per_user.mean(), scale=sps.sem(per_user))
    assert d.mean == pytest.approx(per_user.mean())
    assert (d.lo, d.hi) == pytest.approx((lo, hi))
    boot = stats.paired_difference(_long(own, [0, 1]), _long(base, [0, 1]), "rmse",
                                   ci="bootstrap", n_boot=400)
    assert boot.method == "bootstrap" and boot.n_users == U and boot.mean == pytest.approx(d.mean)
    with pytest.raises(ValueError):
        stats.paired_difference(_long(own, [0, 1]), _long(base, [0, 1]), "rmse", ci="normal")


def test_paired_difference_unbalanced_seeds_nans_and_splits() -> None:
    own = _long(np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0], [5.0, 6.0, 7.0]]), [0, 1, 1])
    base = _long(np.array([[1.0, 1.0, 1.0]]), [7])
    d = stats.paired_difference(own, base, "rmse")
    # seed 1 run twice counts once: user 0 = mean(1, mean(3, 5)) - 1 = 1.5; user 2 has seed 1 only
    assert d.n_users == 3 and d.n_seeds == 2
    assert d.mean == pytest.approx(np.mean([1.5, 2.5, 5.0]))
    # two split seeds on the same data: a user tested in both counts once, its pairs averaged
    a = _long(np.array([[2.0, 2.0]]), [0], split="s0", users=[10, 11], checksum="same")
    b = _long(np.array([[4.0, 4.0]]), [0], split="s1", users=[11, 12], checksum="same")
    zero = _long(np.zeros((1, 2)), [0], split="s0", users=[10, 11], checksum="same")
    zero = pd.concat([zero, _long(np.zeros((1, 2)), [0], split="s1", users=[11, 12], checksum="same")],
                     ignore_index=True)
    split = stats.paired_difference(pd.concat([a, b]), zero, "rmse",
                                    user=("data_checksum", "task_id"))
    assert split.n_users == 3 and split.n_seeds == 2  # users 10, 11, 12; (s0, 0) and (s1, 0)
    assert split.mean == pytest.approx(np.mean([2.0, 3.0, 4.0]))
    # generated data per split seed: the same id is another user
    b["data_checksum"] = "other"
    zero.loc[zero["split_hash"] == "s1", "data_checksum"] = "other"
    assert stats.paired_difference(pd.concat([a, b]), zero, "rmse",
                                   user=("data_checksum", "task_id")).n_users == 4
    # nothing in common: no users, no interval
    none = stats.paired_difference(a, _long(np.zeros((1, 2)), [0], split="zz"), "rmse")
    assert none.n_users == 0 and none.n_seeds == 0 and math.isnan(none.mean)


def test_clip_to_range() -> None:
    lo, hi = stats.clip_to_range(np.array([-0.2, 0.5, np.nan]), np.array([0.3, 1.4, np.nan]), 0.0, 1.0)
    assert lo[:2].tolist() == [0.0, 0.5] and hi[:2].tolist() == [0.3, 1.0]
    assert math.isnan(lo[2]) and math.isnan(hi[2])
    lo, hi = stats.clip_to_range(np.array([-1.0]), np.array([9.0]), 0.0, None)
    assert (lo[0], hi[0]) == (0.0, 9.0)
