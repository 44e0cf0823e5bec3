"""Views of the MLflow UI's runs table that open on what a researcher reads first.

MLflow 3's runs table shows no param or metric column until the reader picks them under
"Columns", and a sweep's children sit collapsed under their parent. Both are the reader's own
view state, kept in the browser; the store cannot change the defaults. What the store can hold is
a *shared view*: an experiment tag ``mlflow.sharedViewState.<key>`` whose value is the view's
JSON, opened by the runs-table URL ``...?viewStateShareKey=<key>`` (the UI's own "Share" button
writes the same tag). metarec writes two:

- ``metarec-runs``, per experiment (when it is first used): the group choices (algo, model,
  dataset), the seeds and the headline test metrics as columns (and ``best/<metric>``, which a
  sweep's parent row carries);
- ``metarec-sweep-<parent id>``, per sweep (when it ends): only the sweep's children, grouped by
  its swept keys other than the seeds (the average over seeds on each group's row), its
  headline metric as a column, best first. The experiment tag ``metarec.latest_sweep_view``
  names the newest, which ``metarec ui`` prints beside the runs table.

The views are JSON of the UI's state (``selectedColumns``, ``searchFilter``, ``orderByKey``,
``orderByAsc``, ``groupBy``), checked against MLflow 3.17's UI in headless Chromium
(``scripts/check_ui_browser.py``). A UI that does not know them opens its default table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

SHARED_VIEW_TAG = "mlflow.sharedViewState."  # the UI's prefix of a shared view's experiment tag
RUNS_VIEW = "metarec-runs"
LATEST_SWEEP_TAG = "metarec.latest_sweep_view"  # experiment tag: the key of the newest sweep view
SEED_KEYS = frozenset({"seed", "split_seed"})  # averaged over, never grouped by
RUN_COLUMNS = ("algo", "model", "dataset", "seed", "split_seed")
HEADLINE_METRICS = ("test/ndcg_at_10", "test/rmse")
WORKFLOW = "workflowType=machine_learning"  # the runs table, not MLflow 3's GenAI views


def column(kind: str, key: str) -> str:
    """The UI's column id: ``params.`algo```, ``metrics.`test/rmse``` (kind: params, metrics,
    tags or attributes)."""
    return f"{kind}.`{key}`"


def runs_view(headline: str | None = None) -> dict[str, Any]:
    """The experiment's view: every run, newest first, with the group choices, the seeds and the
    headline test metrics (``headline``, e.g. ``test/ndcg_at_20`` for a run monitoring
    ``val/ndcg_at_20``, first)."""
    metrics = list(dict.fromkeys([m for m in (headline, *HEADLINE_METRICS) if m]))
    metrics += [f"best/{m}" for m in metrics]  # a sweep parent's row: its best child's value
    return {"selectedColumns": [*(column("params", p) for p in RUN_COLUMNS),
                                *(column("metrics", m) for m in metrics)]}


def sweep_view(parent_run_id: str, swept_keys: Iterable[str], metric: str,
               lower_is_better: bool) -> dict[str, Any]:
    """The sweep's view: its children only (``tags.mlflow.parentRunId``), grouped by the swept
    keys that are not seeds (their average on the group row), with ``test/<metric>`` as a
    column, best first."""
    keys = [key.lstrip("+~") for key in swept_keys]
    grouped = [key for key in keys if key not in SEED_KEYS]
    headline = f"test/{metric}"
    view: dict[str, Any] = {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": column("metrics", headline),
        "orderByAsc": bool(lower_is_better),
        "selectedColumns": [*(column("params", key) for key in keys),
                            *(column("metrics", m) for m in dict.fromkeys([headline, *HEADLINE_METRICS]))],
    }
    if grouped:
        view["groupBy"] = {"aggregateFunction": "average",
                           "groupByKeys": [{"mode": "param", "groupByData": key} for key in grouped]}
    return view


def sweep_view_key(parent_run_id: str) -> str:
    return f"metarec-sweep-{parent_run_id}"


def view_path(experiment_id: str, key: str | None) -> str:
    """The UI's runs-table route (after ``http://host:port/``) opening the shared view ``key``
    (the plain table when None), in machine-learning mode."""
    share = f"viewStateShareKey={key}&" if key else ""
    return f"#/experiments/{experiment_id}/runs?{share}{WORKFLOW}"


def write_view(client: Any, experiment_id: str, key: str, view: dict[str, Any]) -> None:
    """Store ``view`` as the experiment's shared view ``key`` (an ``MlflowClient``)."""
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(view, sort_keys=True))


def ensure_runs_view(client: Any, experiment_id: str, tags: Mapping[str, str] | None) -> None:
    """Write the experiment's ``metarec-runs`` view unless its ``tags`` have one already. Never
    raises: a store that refuses the tag (a server's permissions) still tracks the run, with
    one warning."""
    if SHARED_VIEW_TAG + RUNS_VIEW in (tags or {}):
        return
    try:
        write_view(client, experiment_id, RUNS_VIEW, runs_view())
    except Exception as err:  # noqa: BLE001 - a convenience of the UI, not part of the run
        logging.getLogger(__name__).warning("MLflow UI view %s not written: %s", RUNS_VIEW, err)


def write_sweep_view(client: Any, experiment_id: str, parent_run_id: str, swept_keys: Iterable[str],
                     metric: str, lower_is_better: bool) -> str:
    """Store the sweep's view and mark it the experiment's newest; returns its key."""
    key = sweep_view_key(parent_run_id)
    write_view(client, experiment_id, key, sweep_view(parent_run_id, swept_keys, metric, lower_is_better))
    client.set_experiment_tag(experiment_id, LATEST_SWEEP_TAG, key)
    return key
