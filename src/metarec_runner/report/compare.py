"""Compare finished runs in an MLflow store: one row per group (e.g. per algorithm), the mean of
the runs' test means with a 95% Student's t-interval over distinct seeds, and a paired
difference to a baseline on the very same test tasks (same ``split_hash``), with a t-interval
(or a bootstrap) over distinct test users. The arithmetic, and a precise statement of what each
interval is, are in :mod:`metarec_runner.evaluate.stats`.

Seeds: a seed is a distinct ``(split_hash, seed)`` pair. Runs of a group that share both (the
same seed run twice) are averaged into one value first and count once; with one distinct seed
a group has no interval over seeds (``ci95`` NaN, ``ci_over="one seed"``), never an interval of 0.

Pairing rule: the group's runs other than the baseline's are paired with the baseline's runs of
the same ``split_hash`` (the same test tasks). On each side separately each user's per-task
value is averaged over the seeds (a seed's runs first averaged), the difference is taken per
user and split, each user's differences are averaged over the splits (split seeds) in which it
was tested, and the interval is formed over the distinct users (``n_users``). A user is its
``task_id``, qualified by the run's data checksum (``tags.data_checksum``) when runs carry one:
data generated per split seed (the toy store) have different users under the same ids. A run
whose ``split_hash`` no baseline run shares is counted as *not paired*: runs on different test
tasks are never compared task by task.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from metarec_runner.evaluate import stats
from metarec_runner.evaluate.metric_specs import UnknownMetric, lower_is_better
from metarec_runner.report.store import (
    PER_TASK_FILE,
    CompareError,
    PerTaskCache,
    available_metrics,
    resolve_column,
)

FEW_SHOT_FILE = "few_shot_per_task.csv"  # per-user results at every k (evaluator.shots)
ALL_SHOTS = "all"  # the k of the main test pass: every support item
SEED_KEYS = ("split_hash", "seed")  # what makes two runs of a group distinct seeds
CHECKSUM_COLUMN = "tags.data_checksum"  # qualifies task ids: the same id in other data is another user


def _metric_name(metric: str) -> str:
    """``test/rmse`` -> ``rmse``."""
    return metric.removeprefix("test/")


COMPARE_CI_METHODS = stats.PAIRED_METHODS
"""``ci`` of :func:`compare_table`: the paired difference's interval over users."""


def _per_task_rows(runs: pd.DataFrame, metric: str,
                   per_task: Callable[[str], pd.DataFrame]) -> pd.DataFrame:
    """The per-task values of ``runs`` in long form: ``split_hash, seed, data_checksum, task_id,
    <metric>`` (one row per run and task)."""
    frames = []
    for _, run in runs.iterrows():
        table = per_task(run["run_id"])
        if metric not in table.columns or "task_id" not in table.columns:
            raise CompareError(f"run {run['run_id']}'s {PER_TASK_FILE} has no {metric!r} column: "
                               "no per-user values to pair")
        rows = table[["task_id", metric]].copy()
        rows["split_hash"], rows["seed"] = run["split_hash"], run["seed"]
        rows["data_checksum"] = run.get(CHECKSUM_COLUMN, pd.NA)
        frames.append(rows)
    columns = ["split_hash", "seed", "data_checksum", "task_id", metric]
    if not frames:
        return pd.DataFrame(columns=columns)
    out = pd.concat(frames, ignore_index=True)[columns]
    out["data_checksum"] = out["data_checksum"].astype(object).where(out["data_checksum"].notna(), "")
    return out


def compare_table(runs: pd.DataFrame, metric: str, group_by: Sequence[str] = ("algo",),
                  baseline: str | None = None,
                  per_task: Callable[[str], pd.DataFrame] | None = None,
                  cache_dir: str | Path | None = None, ci: str = "t", n_boot: int = 1000,
                  level: float = stats.LEVEL) -> pd.DataFrame:
    """One row per group, sorted best first by ``metric`` (its declared direction,
    :mod:`metarec_runner.evaluate.metric_specs`).

    Columns: the group keys; ``n_runs``; ``n_seeds`` (distinct ``(split_hash, seed)``: runs
    sharing both count once); ``mean`` (the mean over distinct seeds of the runs' test means);
    ``ci95`` (half-width of the Student's t-interval over the ``n_seeds`` seed means, n - 1
    degrees of freedom; NaN with one distinct seed: no interval); ``ci_over`` (``"seeds"`` or
    ``"one seed"``). With ``baseline`` (an ``algo``): ``diff`` (mean over distinct users of the
    per-user difference ``group - baseline``, each side first averaged over its seeds),
    ``diff_ci95``, ``diff_ci_lo``, ``diff_ci_hi`` (its interval over users: t, or a percentile
    bootstrap with ``ci="bootstrap"``), ``n_users`` (distinct users paired), ``n_seeds_paired``
    (distinct seeds of the group that entered the pairs), ``unpaired_runs`` (runs whose
    ``split_hash`` no baseline run shares; they add nothing) and ``paired`` (``"yes"``,
    ``"partly"``, ``"no"``, ``"baseline"``).

    Args:
        runs: :func:`collect_runs` output.
        metric: ``rmse`` or ``test/rmse``.
        group_by: tags/params (``algo``, ``model``, ``trainer.max_epochs``, ...).
        baseline: the ``algo`` to pair against.
        per_task: ``run_id -> per_task DataFrame`` (default: download, cached in ``cache_dir``
            or a temporary folder).
        ci: the paired difference's interval over users: ``"t"`` or ``"bootstrap"``.
        n_boot: bootstrap resamples (``ci="bootstrap"``; generator seed 0).
        level: the confidence level of every interval.

    Raises:
        CompareError: no runs, unknown metric, group key or baseline.
    """
    if runs.empty:
        raise CompareError("no runs to compare")
    if ci not in COMPARE_CI_METHODS:
        raise CompareError(f"ci must be one of {', '.join(COMPARE_CI_METHODS)}, got {ci!r}")
    metric = _metric_name(metric)
    col = f"test/{metric}"
    if col not in runs.columns or runs[col].isna().all():
        raise CompareError(f"no run has metric {metric!r}; available: "
                           f"{', '.join(available_metrics(runs)) or 'none'}")
    try:
        lower = lower_is_better(metric)
    except UnknownMetric as err:
        raise CompareError(f"no declared direction for {metric!r}: {err}") from None
    keys = [resolve_column(runs, k) for k in group_by]
    runs = runs[runs[col].notna()]
    base_runs = None
    if baseline is not None:
        base_runs = runs[runs["algo"] == baseline]
        if base_runs.empty:
            algos = ", ".join(sorted(runs["algo"].dropna().unique()))
            raise CompareError(f"no run of baseline algo {baseline!r} has {metric!r}; algos: {algos}")
        if per_task is None:
            per_task = PerTaskCache(runs.attrs.get("tracking_uri") or _default_uri(), cache_dir)
    rows = []
    for group_values, group in runs.groupby(keys, dropna=False, sort=True):
        values = group_values if isinstance(group_values, tuple) else (group_values,)
        row: dict[str, object] = {k: v for k, v in zip(group_by, values, strict=True)}
        over_seeds = stats.seed_interval(group, col, SEED_KEYS, level)
        row["n_runs"] = len(group)
        row["n_seeds"] = over_seeds.n
        row["mean"] = over_seeds.mean
        row["ci95"] = over_seeds.half
        row["ci_over"] = "seeds" if over_seeds.n >= 2 else "one seed"
        if base_runs is not None:
            row.update(_baseline_columns(group, base_runs, metric, baseline, per_task, ci, n_boot,
                                         level))
        rows.append(row)
    table = pd.DataFrame(rows)
    table = table.sort_values("mean", ascending=lower, kind="stable", ignore_index=True)
    table.attrs.update(metric=metric, baseline=baseline, group_by=tuple(group_by),
                       lower_is_better=lower, ci=ci, level=level)
    return table


def _baseline_columns(group: pd.DataFrame, base_runs: pd.DataFrame, metric: str, baseline: str,
                      per_task: Callable[[str], pd.DataFrame], ci: str, n_boot: int,
                      level: float) -> dict[str, object]:
    """The paired-difference columns of one group (see :func:`compare_table`)."""
    nan = float("nan")
    if (group["algo"] == baseline).all():
        return {"diff": nan, "diff_ci95": nan, "diff_ci_lo": nan, "diff_ci_hi": nan,
                "n_users": 0, "n_seeds_paired": 0, "unpaired_runs": 0, "paired": "baseline"}
    own = group[group["algo"] != baseline]  # baseline runs of a mixed group are the reference
    shared = own["split_hash"].notna() & own["split_hash"].isin(set(base_runs["split_hash"].dropna()))
    paired_runs, unpaired = own[shared], int((~shared).sum())
    partners = base_runs[base_runs["split_hash"].isin(set(paired_runs["split_hash"]))]
    if paired_runs.empty:
        return {"diff": nan, "diff_ci95": nan, "diff_ci_lo": nan, "diff_ci_hi": nan,
                "n_users": 0, "n_seeds_paired": 0, "unpaired_runs": unpaired, "paired": "no"}
    own_rows = _per_task_rows(paired_runs, metric, per_task)
    base_rows = _per_task_rows(partners, metric, per_task)
    # one checksum per split (the same test tasks): a run lacking the tag still pairs within it
    both = pd.concat([own_rows, base_rows])
    checksum = both[both["data_checksum"] != ""].groupby("split_hash")["data_checksum"].first()
    for rows in (own_rows, base_rows):
        rows["data_checksum"] = rows["split_hash"].map(checksum).astype(object).fillna("")
    d = stats.paired_difference(own_rows, base_rows, metric, user=("data_checksum", "task_id"),
                                ci=ci, n_boot=n_boot, level=level)
    return {"diff": d.mean, "diff_ci95": d.half, "diff_ci_lo": d.lo, "diff_ci_hi": d.hi,
            "n_users": d.n_users, "n_seeds_paired": d.n_seeds, "unpaired_runs": unpaired,
            "paired": "partly" if unpaired else "yes"}


def _default_uri() -> str:
    from metarec_runner.paths import default_tracking_uri

    return default_tracking_uri()


def _shot_order(k: object) -> float:
    """Sort key of a ``k`` column value: the numbers ascending, then ``all``."""
    return float("inf") if k == ALL_SHOTS else float(k)


def has_shots(runs: pd.DataFrame, metric: str | None = None) -> bool:
    """Whether some run has few-shot results: ``test_k<k>/...`` metrics (``/<metric>`` when
    given) or a non-empty ``evaluator.shots`` param (every metric at every k is then in its
    ``few_shot_per_task.csv``)."""
    suffix = f"/{_metric_name(metric)}" if metric else "/"
    if any(c.startswith("test_k") and c.endswith(suffix) for c in runs.columns):
        return True
    return "params.evaluator.shots" in runs.columns and runs["params.evaluator.shots"].map(_lists_shots).any()


def _lists_shots(value: object) -> bool:
    return isinstance(value, str) and value.strip() not in ("", "[]", "None", "null")


def _shot_means(runs: pd.DataFrame, metric: str,
                per_task: Callable[..., pd.DataFrame] | None) -> dict[int, pd.Series]:
    """Each run's mean ``metric`` at every k: ``test_k<k>/<metric>`` where MLflow has it (the
    headline metrics), else the mean over the run's users at k in its ``few_shot_per_task.csv``
    (what the evaluator's summary is: the mean of the defined per-user values)."""
    pattern = re.compile(rf"^test_k(\d+)/{re.escape(metric)}$")
    shot_cols = {int(m[1]): c for c in runs.columns if (m := pattern.match(c))}
    means: dict[int, dict[object, float]] = {}
    for idx, run in runs.iterrows():
        found = {k: float(run[c]) for k, c in shot_cols.items() if pd.notna(run[c])}
        if not found and per_task is not None and _lists_shots(run.get("params.evaluator.shots")):
            table = per_task(run["run_id"], FEW_SHOT_FILE)
            if metric in table.columns and "shots" in table.columns:
                found = {int(k): float(v) for k, v in table.groupby("shots")[metric].mean().items()
                         if pd.notna(v)}
        for k, v in found.items():
            means.setdefault(k, {})[idx] = v
    return {k: pd.Series(v) for k, v in means.items()}


def expand_shots(runs: pd.DataFrame, metric: str,
                 per_task: Callable[..., pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per (run, k): the runs' few-shot results and their main test pass (``k =
    "all"``) as if each were a run of its own, with a ``k`` column.

    A run's value at k is its ``test_k<k>/<metric>`` (MLflow has the headline metrics), else
    the mean over its users at k in its ``few_shot_per_task.csv``, read through ``per_task``
    (``per_task(run_id, name)``; without it only the logged columns count). The row of shot
    ``k`` has ``run_id`` ``"<run id>@<k>"``, which :func:`shot_loader` reads from the run's
    ``few_shot_per_task.csv``, so paired differences at each k pair the same users at the same k.
    """
    metric = _metric_name(metric)
    col = f"test/{metric}"
    frames = []
    for k, values in sorted(_shot_means(runs, metric, per_task).items()):
        part = runs.loc[values.index].copy()
        part[col] = values
        part["run_id"] = part["run_id"] + f"@{k}"
        part["k"] = str(k)
        frames.append(part)
    main = runs[runs[col].notna()].copy() if col in runs.columns else runs.iloc[0:0].copy()
    main["k"] = ALL_SHOTS
    frames.append(main)
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(runs.attrs)
    return out


def shot_loader(per_task: Callable[..., pd.DataFrame]) -> Callable[[str], pd.DataFrame]:
    """A per-task loader for :func:`expand_shots` rows: ``"<run id>@<k>"`` reads the users of
    shot k from the run's ``few_shot_per_task.csv``; a plain run id its ``per_task.csv``."""
    def load(key: str) -> pd.DataFrame:
        run_id, _, k = key.partition("@")
        if not k:
            return per_task(run_id)
        table = per_task(run_id, FEW_SHOT_FILE)
        return table[table["shots"] == int(k)]

    return load


def shots_table(runs: pd.DataFrame, metric: str, group_by: Sequence[str] = ("algo",),
                baseline: str | None = None, per_task: Callable[..., pd.DataFrame] | None = None,
                cache_dir: str | Path | None = None, ci: str = "t", n_boot: int = 1000,
                level: float = stats.LEVEL) -> pd.DataFrame:
    """:func:`compare_table` at every support size: one row per (k, group), ``k`` first (the
    evaluator's shots, then ``all``), best first within each k. The paired difference to
    ``baseline`` pairs each user at the same k."""
    if per_task is None:
        per_task = PerTaskCache(runs.attrs.get("tracking_uri") or _default_uri(), cache_dir)
    expanded = expand_shots(runs, metric, per_task)
    loader = shot_loader(per_task)
    tables = []
    for k in sorted(expanded["k"].unique(), key=_shot_order):  # baseline paired at the same k
        at_k = expanded[expanded["k"] == k]
        if baseline is not None and not (at_k["algo"] == baseline).any():
            continue  # the baseline was not evaluated at this k
        part = compare_table(at_k, metric, group_by=group_by, baseline=baseline, per_task=loader,
                             ci=ci, n_boot=n_boot, level=level)
        tables.append(part.assign(k=k)[["k", *part.columns]])
    if not tables:
        raise CompareError(f"the baseline {baseline!r} has no results at any k")
    table = pd.concat(tables, ignore_index=True)
    table.attrs.update(tables[0].attrs, group_by=("k", *group_by))
    return table
