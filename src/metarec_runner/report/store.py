"""The MLflow store, read: finished metarec runs as one data frame, sweeps, per-task tables.

:func:`collect_runs` turns a store's runs (an experiment's, or a sweep parent's children) into
one row per run: the core tags, every test metric, every other tag and param, and each job's own
command-line overrides (:func:`parse_overrides`), so tables can group by any of them
(:func:`resolve_column`; :func:`swept_keys` finds the keys a sweep varied). :class:`PerTaskCache`
downloads a run's ``per_task.csv`` once. :mod:`metarec_runner.report.compare` builds the
comparison tables from these.

``mlflow`` is imported inside the functions that talk to the store.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from metarec_runner.errors import MetarecError

PARENT_TAG = "mlflow.parentRunId"
SWEEP_PREFIX = "sweep:"
CORE_TAGS = ("algo", "model", "dataset", "splitter", "split_hash", "protocol")
PER_TASK_FILE = "per_task.csv"
OVERRIDE_PREFIX = "override."  # collect_runs' columns of each job's own command-line overrides
# the MLflow layout (metarec_runner.tracking.layout): the test means, their intervals
# (ci95/test/<m>), the headline references (ref/<scorer>/<m>), the curves' headline metrics
TEST_PREFIXES = ("test/", "test_k", "test_steps", "ci95/", "ref/")
AGGREGATED_KEYS = ("seed", "split_seed")  # swept keys aggregated over (CIs over seeds), never grouped by
_OVERRIDE_START = re.compile(r" (?=[+~]{0,2}[\w./@-]+=)")  # where the next `key=` begins


class CompareError(MetarecError):
    """Nothing (or nothing sensible) to compare: unknown experiment, metric, group key, baseline."""


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
    (``test/<metric>``, ``ci95/test/<metric>``, ``ref/<scorer>/<metric>``, ``test_k<k>/<metric>``),
    then ``tags.<key>`` and ``params.<key>`` for all
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
        row.update({k: float(v) for k, v in sorted(r.data.metrics.items()) if k.startswith(TEST_PREFIXES)})
        row.update({f"tags.{k}": v for k, v in sorted(tags.items())
                    if k not in CORE_TAGS and not k.startswith("mlflow.")})
        row.update({f"params.{k}": v for k, v in sorted(params.items())})
        row.update({OVERRIDE_PREFIX + k: v for k, v in parse_overrides(tags.get("overrides", "")).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:  # metric columns first, after the core columns
        fixed = ["run_id", "run_name", "experiment_id", "parent_run_id", "status", *CORE_TAGS,
                 "seed", "split_seed"]
        metric_cols = sorted(c for c in frame.columns if c.startswith(TEST_PREFIXES))
        rest = [c for c in frame.columns if c not in fixed and c not in metric_cols]
        frame = frame[fixed + metric_cols + rest]
        frame["seed"] = frame["seed"].astype("Int64")
        frame["split_seed"] = frame["split_seed"].astype("Int64")
    frame.attrs["tracking_uri"] = tracking_uri
    frame.attrs["parent_run_id"] = parent_run_id
    return frame


def available_metrics(runs: pd.DataFrame) -> list[str]:
    """Test metric names some run has (``rmse``, ``mae``, ...): the ``test/<metric>`` columns
    (without the ``_ci*`` and ``test/ref/`` columns of runs logged before ``ci95/`` and ``ref/``)."""
    return sorted(c[len("test/"):] for c in runs.columns
                  if c.startswith("test/") and not c.startswith("test/ref/")
                  and not c.endswith(("_ci95", "_ci_lo", "_ci_hi")) and runs[c].notna().any())


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
                    for c in runs.columns if not c.startswith(TEST_PREFIXES)})
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

    def __call__(self, run_id: str, name: str = PER_TASK_FILE) -> pd.DataFrame:
        """The run's per-user table ``name`` (``per_task.csv``, or ``few_shot_per_task.csv``)."""
        key = f"{run_id}/{name}"
        if key not in self._frames:
            dst = self.dir / run_id
            path = dst / name
            if not path.is_file():
                if self._client_obj is None:
                    # one progress bar per downloaded table would bury the comparison on stderr
                    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
                    self._client_obj = _client(self.tracking_uri)
                dst.mkdir(parents=True, exist_ok=True)
                try:
                    path = Path(self._client_obj.download_artifacts(run_id, name, str(dst)))
                except Exception as e:  # noqa: BLE001 - a run without the artifact
                    raise CompareError(f"run {run_id} has no readable {name} artifact "
                                       f"({str(e).strip().splitlines()[0] if str(e).strip() else e!r})") from None
            self._frames[key] = pd.read_csv(path)
        return self._frames[key]


def without_untested(runs: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """``(runs that scored test users, a warning line or None)``: a run with no test metric at
    all (``evaluate_test=false``: a tuning trial, which a study's experiment may hold beside the
    study's runs) has nothing to compare and is left out, said in the line."""
    tested_cols = [c for c in runs.columns if c.startswith(TEST_PREFIXES)]
    if runs.empty:
        return runs, None
    untested = runs[tested_cols].isna().all(axis=1) if tested_cols else pd.Series(True, index=runs.index)
    if not untested.any():
        return runs, None
    line = (f"{int(untested.sum())} of {len(runs)} finished runs scored no test users (evaluate_test=false, "
            "e.g. the trials of a +hparams_search) and are left out")
    kept = runs[~untested]
    kept.attrs.update(runs.attrs)
    return kept, line


def run_warnings(finished: pd.DataFrame, every: pd.DataFrame) -> list[str]:
    """What a reader of a comparison must know about the runs it left out or counts once.

    Args:
        finished: the FINISHED runs being compared (:func:`collect_runs`).
        every: the same selection with any status (``collect_runs(..., status=None)``).

    Returns:
        One line per problem: runs not finished (still RUNNING, FAILED, KILLED), and groups of
        runs identical in everything but their name (same params, split hash and seed), which
        count as one seed.
    """
    lines: list[str] = []
    if every.empty or "status" not in every.columns:
        return lines
    pending = every[every["status"] != "FINISHED"]
    if len(pending):
        counts = ", ".join(f"{n} {s}" for s, n in pending["status"].value_counts().sort_index().items())
        lines.append(f"{len(pending)} of {len(every)} runs are not finished ({counts}) and are left out; "
                     "compare again when the sweep has ended (`metarec runs clean` ends dead RUNNING runs)")
    params = sorted(c for c in finished.columns if c.startswith("params.") and not c.endswith("run_name"))
    if params and len(finished) > 1:
        keys = finished[[*params, "split_hash", "seed"]].map(str).agg("\x1f".join, axis=1)
        for _, group in finished.groupby(keys):
            if len(group) > 1:
                names = ", ".join(sorted(group["run_name"].astype(str)))
                lines.append(f"{len(group)} runs are identical in everything but their name ({names}): the same "
                             "config, split and seed, counted as one seed")
    return lines
