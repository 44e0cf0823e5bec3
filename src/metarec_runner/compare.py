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

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from metarec_runner.errors import MetarecError
from metarec_runner.evaluate import stats
from metarec_runner.evaluate.metric_specs import UnknownMetric, lower_is_better  # re-exported

PARENT_TAG = "mlflow.parentRunId"
SWEEP_PREFIX = "sweep:"
CORE_TAGS = ("algo", "model", "dataset", "splitter", "split_hash", "protocol")
PER_TASK_FILE = "per_task.csv"
OVERRIDE_PREFIX = "override."  # collect_runs' columns of each job's own command-line overrides
AGGREGATED_KEYS = ("seed",)  # swept keys that are aggregated over (CIs over seeds), never grouped by
SEED_KEYS = ("split_hash", "seed")  # what makes two runs of a group distinct seeds
CHECKSUM_COLUMN = "tags.data_checksum"  # qualifies task ids: the same id in other data is another user
_OVERRIDE_START = re.compile(r" (?=[+~]{0,2}[\w./@-]+=)")  # where the next `key=` begins


class CompareError(MetarecError):
    """Nothing (or nothing sensible) to compare: unknown experiment, metric, group key, baseline."""


def _metric_name(metric: str) -> str:
    """``test/rmse`` -> ``rmse``."""
    return metric.removeprefix("test/")


def _client(tracking_uri: str):
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):]
        if path and path != ":memory:" and not Path(path).is_file():
            # MlflowClient would silently create an empty store here
            raise CompareError(f"no MLflow store at {path}; run `metarec train` first or pass "
                               "--tracking-uri")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _search_all(client, experiment_ids: list[str], filter_string: str = "",
                order_by: list[str] | None = None, max_total: int | None = None) -> list:
    """Every run matching ``filter_string`` (``search_runs`` paginated, 1000 a page)."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY,
                                  max_results=1000, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (max_total is not None and len(runs) >= max_total):
            return runs


def _experiment_ids(client, experiment: str | None) -> list[str]:
    from mlflow.entities import ViewType

    exps = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    if experiment is None:
        return [e.experiment_id for e in exps]
    for e in exps:
        if e.name == experiment or e.experiment_id == experiment:
            return [e.experiment_id]
    names = ", ".join(sorted(e.name for e in exps)) or "none"
    raise CompareError(f"unknown experiment {experiment!r}; experiments in this store: {names}")


def latest_sweep(client, experiment_ids: list[str]) -> str:
    """The run id of the most recently started sweep parent (run name ``sweep:<time>``)."""
    parents = _search_all(client, experiment_ids, f"attributes.run_name LIKE '{SWEEP_PREFIX}%'",
                          order_by=["attributes.start_time DESC"], max_total=1)
    if not parents:
        raise CompareError("no sweep in this store (sweeps come from `metarec train -m ...`)")
    return parents[0].info.run_id


def _to_int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return pd.NA


def collect_runs(tracking_uri: str | None = None, experiment: str | None = None,
                 parent_run_id: str | None = None, status: str | None = "FINISHED") -> pd.DataFrame:
    """One row per run: ``run_id, run_name, experiment_id, parent_run_id, status, algo, model,
    dataset, splitter, split_hash, protocol, seed, split_seed``, every test metric
    (``test/<metric>``, ``test/<metric>_ci95``), then ``tags.<key>`` and ``params.<key>`` for all
    other tags and params, and ``override.<key>`` for each of the job's own command-line overrides
    (for grouping by any of them; :func:`swept_keys` finds the ones a sweep varied).

    Args:
        tracking_uri: the store (default :func:`metarec_runner.paths.default_tracking_uri`).
        experiment: experiment name (or id); None: every active experiment.
        parent_run_id: only the child runs of this sweep parent; ``"latest"``: of the most
            recently started sweep (in ``experiment`` when given).
        status: keep runs with this status (None: all). Sweep parents are never included.

    Raises:
        CompareError: unknown experiment or sweep, or no store at a sqlite path.
    """
    if tracking_uri is None:
        from metarec_runner.paths import default_tracking_uri

        tracking_uri = default_tracking_uri()
    client = _client(tracking_uri)
    exp_ids = _experiment_ids(client, experiment)
    filters = []
    if parent_run_id is not None:
        if parent_run_id == "latest":
            parent_run_id = latest_sweep(client, exp_ids)
        else:
            from mlflow.exceptions import MlflowException

            try:
                parent = client.get_run(parent_run_id)
            except MlflowException:
                raise CompareError(f"no run {parent_run_id!r} in {tracking_uri}") from None
            if experiment is None:
                exp_ids = [parent.info.experiment_id]
        filters.append(f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    if status is not None:
        filters.append(f"attributes.status = '{status}'")
    runs = _search_all(client, exp_ids, " AND ".join(filters), order_by=["attributes.start_time ASC"]) \
        if exp_ids else []
    rows = []
    for r in runs:
        tags, params = r.data.tags, r.data.params
        if "algo" not in tags:  # a sweep parent or a run not made by metarec
            continue
        row = {"run_id": r.info.run_id, "run_name": tags.get("mlflow.runName", r.info.run_name),
               "experiment_id": r.info.experiment_id, "parent_run_id": tags.get(PARENT_TAG),
               "status": r.info.status}
        row.update({k: tags.get(k) for k in CORE_TAGS})
        row["seed"], row["split_seed"] = _to_int(params.get("seed")), _to_int(params.get("split_seed"))
        row.update({k: float(v) for k, v in sorted(r.data.metrics.items()) if k.startswith("test/")})
        row.update({f"tags.{k}": v for k, v in sorted(tags.items())
                    if k not in CORE_TAGS and not k.startswith("mlflow.")})
        row.update({f"params.{k}": v for k, v in sorted(params.items())})
        row.update({OVERRIDE_PREFIX + k: v for k, v in parse_overrides(tags.get("overrides", "")).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:  # metric columns first, after the core columns
        fixed = ["run_id", "run_name", "experiment_id", "parent_run_id", "status", *CORE_TAGS,
                 "seed", "split_seed"]
        metric_cols = sorted(c for c in frame.columns if c.startswith("test/"))
        rest = [c for c in frame.columns if c not in fixed and c not in metric_cols]
        frame = frame[fixed + metric_cols + rest]
        frame["seed"] = frame["seed"].astype("Int64")
        frame["split_seed"] = frame["split_seed"].astype("Int64")
    frame.attrs["tracking_uri"] = tracking_uri
    frame.attrs["parent_run_id"] = parent_run_id
    return frame


def available_metrics(runs: pd.DataFrame) -> list[str]:
    """Test metric names some run has (``rmse``, ``mae``, ...), without the ``_ci*`` columns."""
    return sorted(c[len("test/"):] for c in runs.columns
                  if c.startswith("test/") and not c.endswith(("_ci95", "_ci_lo", "_ci_hi"))
                  and runs[c].notna().any())


def parse_overrides(text: str) -> dict[str, str]:
    """A job's ``overrides`` tag (``+algo=maml seed=1 algo.inner_lr=0.01``) as ``{key: value}``.

    ``+``/``++``/``~`` prefixes are dropped (``+algo=maml`` -> ``algo: maml``); values may hold
    spaces (``evaluator.ks=[5, 10]``).
    """
    out: dict[str, str] = {}
    for part in _OVERRIDE_START.split(text.strip()) if text and text.strip() else []:
        key, sep, value = part.partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def swept_keys(runs: pd.DataFrame, aggregate: Sequence[str] = AGGREGATED_KEYS) -> list[str]:
    """The override keys whose value differs between the runs (e.g. ``algo``, ``algo.inner_lr``),
    in command-line order, without ``aggregate`` (``seed``: aggregated over, not grouped by).

    Reads the ``override.<key>`` columns :func:`collect_runs` makes from each job's overrides.
    """
    keys = []
    for col in runs.columns:
        key = col[len(OVERRIDE_PREFIX):]
        if col.startswith(OVERRIDE_PREFIX) and key not in aggregate \
                and runs[col].fillna("<unset>").nunique() > 1:
            keys.append(key)
    return keys


def resolve_column(runs: pd.DataFrame, key: str) -> str:
    """The column for a group key: ``key`` itself, else ``tags.<key>``, ``params.<key>``, else
    the job's own override ``override.<key>`` (e.g. ``experiment``)."""
    for col in (key, f"tags.{key}", f"params.{key}", OVERRIDE_PREFIX + key):
        if col in runs.columns:
            return col
    known = sorted({c.split(".", 1)[1] if c.startswith(("tags.", "params.", OVERRIDE_PREFIX)) else c
                    for c in runs.columns if not c.startswith("test/")})
    raise CompareError(f"cannot group by {key!r}: no such tag or param; e.g. "
                       f"{', '.join(k for k in known[:40])}")


class PerTaskCache:
    """Downloads ``per_task.csv`` of a run once, into a temporary folder (removed at exit)."""

    def __init__(self, tracking_uri: str, cache_dir: str | Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        if cache_dir is None:
            cache_dir = tempfile.mkdtemp(prefix="metarec-compare-")
            atexit.register(shutil.rmtree, cache_dir, True)
        self.dir = Path(cache_dir)
        self._frames: dict[str, pd.DataFrame] = {}
        self._client_obj = None

    def __call__(self, run_id: str) -> pd.DataFrame:
        if run_id not in self._frames:
            dst = self.dir / run_id
            path = dst / PER_TASK_FILE
            if not path.is_file():
                if self._client_obj is None:
                    # one progress bar per downloaded table would bury the comparison on stderr
                    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
                    self._client_obj = _client(self.tracking_uri)
                dst.mkdir(parents=True, exist_ok=True)
                try:
                    path = Path(self._client_obj.download_artifacts(run_id, PER_TASK_FILE, str(dst)))
                except Exception as e:  # noqa: BLE001 - a run without the artifact
                    raise CompareError(f"run {run_id} has no readable {PER_TASK_FILE} artifact "
                                       f"({str(e).strip().splitlines()[0] if str(e).strip() else e!r})") from None
            self._frames[run_id] = pd.read_csv(path)
        return self._frames[run_id]


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
        row: dict[str, object] = {k: v for k, v in zip(group_by, values)}
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
