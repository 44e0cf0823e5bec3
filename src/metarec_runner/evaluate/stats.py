"""Honest statistics: every confidence interval metarec reports is computed here.

The run summaries logged to MLflow (:func:`metarec_runner.evaluate.summary.summarize`),
``metarec compare`` (:func:`metarec_runner.report.compare.compare_table`) and the sweep
comparison plot all call this module, so one interval means one thing everywhere. All intervals are two-sided,
at ``level`` (95% by default). Only numpy and pandas are imported at module level; scipy is
imported on the first quantile.

**Student's t-interval of a mean** (:func:`t_interval`, :func:`mean_ci`). Given n finite values
x_1..x_n (NaNs dropped first), the interval is ``mean ± t_{(1+level)/2, n-1} * s / sqrt(n)``,
with s the sample standard deviation (``ddof=1``) and ``t_{q, n-1}`` the q-quantile of Student's
t law with n − 1 degrees of freedom (:func:`t_critical`; 12.71 for n = 2, 4.30 for n = 3, 2.78
for n = 5, 2.00 for n = 58, tending to the normal 1.96). Its coverage is exact when the x_i are
independent draws of one normal law, and asymptotically right (CLT) otherwise. With n < 2 there
is no interval: the half-width and both bounds are NaN, never 0. It is used with three kinds of n:

- *over test tasks* (``test/<metric>_ci95`` in MLflow, ``evaluator.ci=normal``): x_i is one
  run's metric on test task i, n the tasks where the metric is defined. The interval is
  conditional on the trained model: it covers only the sampling of test users.
- *over seeds* (``ci95`` of ``metarec compare``, ``ci_over="seeds"``, and the sweep plot's
  bars): x_i is the test mean of one *distinct seed* of a group, n = ``n_seeds``
  (:func:`seed_interval`). A seed is a distinct ``(split_hash, seed)`` pair: runs that share both
  (the same seed run twice) are averaged into one value before anything else, so they count
  once; with split seeds swept too, each split counts as a seed. The interval covers training
  randomness (and, across split seeds, the sampling of the test set). With 2 seeds its
  half-width is 12.71 * s / sqrt(2): wide, and honestly so. With one distinct seed there is none.
- *over distinct users* for a paired difference (``diff_ci95`` of ``metarec compare``): below.

**Paired difference to a baseline** (:func:`paired_difference`). Input: per-task values of the
group's runs and of the baseline's runs, each row tagged with its ``split_hash``, ``seed`` and
user key. (1) On each side separately and for each ``(split_hash, user)``, average the user's
value over that side's seeds (runs with the same seed averaged first, so each distinct seed
weighs the same). (2) Per split, ``d = group - baseline`` for the users that both sides tested
on that split (a user's value that is NaN on one side is not paired). (3) Average each user's d
over the splits in which it was paired, so a user is counted once whatever the number of seeds
and split seeds: a user is identified by its user key (``task_id``, with the data checksum when
runs carry one, since generated data change with the split seed and so do their users).
(4) The t-interval over the ``n_users`` distinct values d_u (or a percentile bootstrap over
them). ``n_seeds`` is the number of distinct seeds of the group that entered the pairs. The
interval treats the users as the random sample: it is an interval for the mean difference on
these users between the models trained with these seeds. It does not model the training-seed
effect shared by all users (a seed that trains a better model shifts every user), so it does not
say how much the difference would move under other seeds; read it beside the interval over
seeds.

**Percentile bootstrap of a mean** (:func:`bootstrap_ci`). The n finite values are resampled
``n_boot`` times with replacement (numpy ``default_rng(seed)``: reproducible) and the bounds are
the ``(1-level)/2`` and ``(1+level)/2`` quantiles of the resampled means; the "half-width" is
half the interval's width. Used over test tasks (``evaluator.ci=bootstrap``) and over distinct
users for a paired difference (``metarec compare --ci bootstrap``); never over seeds (a
bootstrap of 2 to 5 values says nothing about the law they come from).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

LEVEL = 0.95
"""The default two-sided confidence level of every interval."""

CI_METHODS = ("normal", "bootstrap")
"""Interval methods over tasks/users: ``"normal"`` is the parametric interval (Student's t with
n − 1 degrees of freedom: the name is kept for config compatibility), ``"bootstrap"`` the
seeded percentile bootstrap."""

PAIRED_METHODS = ("t", "bootstrap")
"""Interval methods of :func:`paired_difference` over distinct users."""

NO_INTERVAL_ONE_SEED = "one distinct seed: no interval over seeds (run seed=0,1,... to get one)"
"""What is printed instead of an interval over seeds when a group has one distinct seed."""


@dataclass(frozen=True)
class Interval:
    """A mean with a two-sided confidence interval.

    Attributes:
        mean: the mean of the finite values (NaN when there are none).
        lo, hi: the interval's bounds (NaN when ``n < 2``: no interval).
        n: how many values the interval is over (tasks, seeds or users).
        method: ``"t"`` or ``"bootstrap"``.
    """

    mean: float
    lo: float
    hi: float
    n: int
    method: str = "t"

    @property
    def half(self) -> float:
        """Half the interval's width (the ``±`` of ``mean ± half``); NaN without an interval."""
        return (self.hi - self.lo) / 2.0


@dataclass(frozen=True)
class PairedDifference(Interval):
    """:class:`Interval` of a paired difference ``group - baseline`` over distinct users.

    Attributes:
        n_users: distinct users paired (``n``: the interval is over them).
        n_seeds: distinct ``(split_hash, seed)`` of the group that entered the pairs.
    """

    n_seeds: int = 0

    @property
    def n_users(self) -> int:
        """Distinct users the interval is over (same as ``n``)."""
        return self.n


def _finite(values: np.ndarray | Sequence[float] | pd.Series) -> np.ndarray:
    """``values`` as a flat float64 array without NaNs."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return v[~np.isnan(v)]


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


@functools.lru_cache(maxsize=1024)
def t_critical(df: int, level: float = LEVEL) -> float:
    """The two-sided critical value ``t_{(1+level)/2, df}`` of Student's t law (12.706 for
    ``df=1`` at 95%). ``df < 1``: NaN (no interval)."""
    _check_level(level)
    if df < 1:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf((1.0 + level) / 2.0, df))


def t_interval(values: np.ndarray | Sequence[float] | pd.Series, level: float = LEVEL) -> Interval:
    """Student's t-interval of the mean of ``values`` (NaNs skipped): ``mean ± t_{n-1} s/sqrt(n)``.

    With n < 2 finite values, ``lo``/``hi`` are NaN (no interval, never a width of 0).
    """
    _check_level(level)
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n)
    half = t_critical(n - 1, level) * float(v.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def mean_ci(values: np.ndarray | Sequence[float] | pd.Series,
            level: float = LEVEL) -> tuple[float, float, int]:
    """``(mean, half-width, n)`` of :func:`t_interval` (half-width NaN when n < 2)."""
    iv = t_interval(values, level)
    return iv.mean, iv.half, iv.n


def bootstrap_ci(values: np.ndarray | Sequence[float] | pd.Series, n_boot: int = 1000,
                 level: float = LEVEL, seed: int = 0) -> tuple[float, float, float, int]:
    """``(mean, lo, hi, n)``: the percentile-bootstrap interval of the mean of ``values``.

    Resamples the finite values ``n_boot`` times with replacement (numpy ``default_rng(seed)``,
    so the interval is reproducible) and takes the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the resampled means. NaN entries are skipped first. With n < 2, lo and hi are NaN.
    """
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    v = _finite(values)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if n < 2:
        return float(v.mean()), float("nan"), float("nan"), n
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, min(n_boot, 4_000_000 // n))  # bound memory at ~32 MB of indices per chunk
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(v.mean()), float(lo), float(hi), n


def bootstrap_interval(values: np.ndarray | Sequence[float] | pd.Series, n_boot: int = 1000,
                       level: float = LEVEL, seed: int = 0) -> Interval:
    """:func:`bootstrap_ci` as an :class:`Interval` (``method="bootstrap"``)."""
    mean, lo, hi, n = bootstrap_ci(values, n_boot=n_boot, level=level, seed=seed)
    return Interval(mean, lo, hi, n, method="bootstrap")


def distinct_seed_means(frame: pd.DataFrame, value: str,
                        seed_keys: Sequence[str] = ("split_hash", "seed")) -> pd.Series:
    """One mean of ``value`` per distinct seed: rows sharing every column of ``seed_keys`` are
    averaged into one (missing key columns are ignored; a missing key value counts as one
    value). Rows whose ``value`` is NaN are dropped first."""
    keys = [k for k in seed_keys if k in frame.columns]
    rows = frame[frame[value].notna()]
    if not keys:
        return rows[value].astype(np.float64).reset_index(drop=True)
    return rows.groupby(keys, dropna=False, sort=True)[value].mean().astype(np.float64)


def seed_interval(frame: pd.DataFrame, value: str,
                  seed_keys: Sequence[str] = ("split_hash", "seed"),
                  level: float = LEVEL) -> Interval:
    """The t-interval over distinct seeds of a group's runs (one row per run in ``frame``).

    Runs sharing ``seed_keys`` are averaged first (:func:`distinct_seed_means`), so the same seed
    twice is one seed; ``n`` is the number of distinct seeds. One distinct seed: no interval.
    """
    return t_interval(distinct_seed_means(frame, value, seed_keys).to_numpy(), level)


def _user_means(rows: pd.DataFrame, value: str, user: list[str], split: str,
                seed: str) -> pd.Series:
    """Per ``(split, *user)``: the mean over distinct seeds of the per-seed mean of ``value``."""
    rows = rows[rows[value].notna()]
    per_seed = rows.groupby([split, seed, *user], dropna=False, sort=False)[value].mean()
    return per_seed.groupby(level=[split, *user], dropna=False, sort=True).mean()


def paired_difference(own: pd.DataFrame, base: pd.DataFrame, value: str,
                      user: Sequence[str] = ("task_id",), split: str = "split_hash",
                      seed: str = "seed", ci: str = "t", n_boot: int = 1000,
                      boot_seed: int = 0, level: float = LEVEL) -> PairedDifference:
    """The paired difference ``own - base`` over distinct users (see the module docstring).

    Args:
        own: per-task rows of the group's runs: columns ``split``, ``seed``, ``user`` and ``value``.
        base: the same for the baseline's runs.
        value: the metric column.
        user: the columns identifying a user (``task_id``, with ``data_checksum`` when known).
        split: the column naming the test set (only users of the same split are paired).
        seed: the training-seed column (averaged over, per user).
        ci: ``"t"`` (Student's t over users) or ``"bootstrap"`` (percentile, over users).
        n_boot, boot_seed: bootstrap resamples and generator seed.
        level: the confidence level.

    Returns:
        A :class:`PairedDifference`: ``mean`` of the per-user differences, the interval over
        them, ``n_users`` and ``n_seeds`` (distinct ``(split, seed)`` of ``own`` that paired).
    """
    if ci not in PAIRED_METHODS:
        raise ValueError(f"ci must be one of {PAIRED_METHODS}, got {ci!r}")
    user = list(user)
    a = _user_means(own, value, user, split, seed)
    b = _user_means(base, value, user, split, seed)
    both = a.index.intersection(b.index)
    d = (a.loc[both] - b.loc[both]).astype(np.float64)
    per_user = d.groupby(level=user, dropna=False).mean() if len(d) else d
    paired_splits = set(both.get_level_values(split)) if len(both) else set()
    seeds = own.loc[own[split].isin(paired_splits) & own[value].notna(), [split, seed]]
    n_seeds = len(seeds.drop_duplicates())
    if ci == "t":
        iv = t_interval(per_user.to_numpy(), level)
    else:
        iv = bootstrap_interval(per_user.to_numpy(), n_boot=n_boot, level=level, seed=boot_seed)
    return PairedDifference(iv.mean, iv.lo, iv.hi, iv.n, method=iv.method, n_seeds=n_seeds)


def clip_to_range(lo: np.ndarray, hi: np.ndarray, lower: float | None,
                  upper: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds clipped to a metric's range ``[lower, upper]`` (None: unbounded)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lower is not None:
        lo, hi = np.maximum(lo, lower), np.maximum(hi, lower)
    if upper is not None:
        lo, hi = np.minimum(lo, upper), np.minimum(hi, upper)
    return lo, hi
