"""metarec's shared views of the MLflow UI's runs table (tracking/ui_views.py), in a real store."""

from __future__ import annotations

import json
from pathlib import Path

from metarec_runner.tracking import MlflowTracker, ui_views


def _view(client, experiment_id: str, key: str) -> dict:
    return json.loads(client.get_experiment(experiment_id).tags[ui_views.SHARED_VIEW_TAG + key])


def test_the_sweep_view_groups_its_children_by_the_swept_keys_but_not_the_seeds():
    view = ui_views.sweep_view("p1", ["+algo", "split_seed", "seed"], "ndcg_at_10", lower_is_better=False)
    assert view["searchFilter"] == "tags.`mlflow.parentRunId` = 'p1'"  # its children only
    assert view["orderByKey"] == "metrics.`test/ndcg_at_10`" and view["orderByAsc"] is False
    assert view["groupBy"] == {"aggregateFunction": "average",
                               "groupByKeys": [{"mode": "param", "groupByData": "algo"}]}
    assert view["selectedColumns"][:4] == ["params.`algo`", "params.`split_seed`", "params.`seed`",
                                           "metrics.`test/ndcg_at_10`"]
    rmse = ui_views.sweep_view("p1", ["seed"], "rmse", lower_is_better=True)
    assert rmse["orderByAsc"] is True and "groupBy" not in rmse  # a seed-only sweep: no groups
    assert ui_views.view_path("7", "k") == "#/experiments/7/runs?viewStateShareKey=k&workflowType=machine_learning"
    assert ui_views.view_path("7", None) == "#/experiments/7/runs?workflowType=machine_learning"


def test_a_tracked_run_gives_its_experiment_the_runs_view_once(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, "views")
    tracker.start({"algo": "maml"})
    tracker.finish()
    client = MlflowClient(uri)
    view = _view(client, tracker.experiment_id, ui_views.RUNS_VIEW)
    assert view["selectedColumns"][:3] == ["params.`algo`", "params.`model`", "params.`dataset`"]
    assert "metrics.`test/ndcg_at_10`" in view["selectedColumns"]
    assert "metrics.`best/test/ndcg_at_10`" in view["selectedColumns"]  # a sweep parent's row
    # a reader's own version of the view (the UI's Share button, same key) is never overwritten
    edited = {"selectedColumns": ["params.`algo`"]}
    ui_views.write_view(client, tracker.experiment_id, ui_views.RUNS_VIEW, edited)
    second = MlflowTracker(uri, "views")
    second.start({"algo": "global"})
    second.finish()
    assert _view(client, tracker.experiment_id, ui_views.RUNS_VIEW) == edited


def test_a_store_refusing_the_view_still_tracks(caplog):
    class Refusing:
        def set_experiment_tag(self, *args):
            raise PermissionError("read-only experiment")

    ui_views.ensure_runs_view(Refusing(), "1", {})
    assert "MLflow UI view metarec-runs not written: read-only experiment" in caplog.text
