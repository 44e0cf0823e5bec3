"""Tests of metarec_runner.tracking against a real sqlite MLflow store (one per module)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from metarec_runner.errors import MetarecError
from metarec_runner.tracking import MlflowTracker, NullTracker, SweepParent, flatten_config
from metarec_runner.tracking.lifecycle import HEARTBEAT_S, HEARTBEAT_TAG, Heartbeat

EXPERIMENT = "test-tracking"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One sqlite DB and artifact root shared by the module (migrations take seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return {"uri": f"sqlite:///{root}/mlflow.db", "artifacts": str(root / "artifacts")}


@pytest.fixture(scope="module")
def client(store: dict[str, str]):
    """A fresh MlflowClient reading the store, independent of the trackers."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store["uri"])


def make_tracker(store: dict[str, str], run_name: str | None = None) -> MlflowTracker:
    return MlflowTracker(store["uri"], EXPERIMENT, run_name=run_name,
                         artifact_location=store["artifacts"])


# --- flatten_config -------------------------------------------------------------------------


def test_flatten_nested_lists_none_and_private_keys() -> None:
    cfg = {"algo": {"_target_": "x.Maml", "meta_optimizer": {"lr": 0.001}, "inner_steps": 5},
           "evaluate": {"ks": [5, 10], "seed": None}, "name": "run", "empty": {}}
    assert flatten_config(cfg) == {
        "algo._target_": "x.Maml",
        "algo.meta_optimizer.lr": "0.001",
        "algo.inner_steps": "5",
        "evaluate.ks": "[5, 10]",
        "evaluate.seed": "None",
        "name": "run",
        "empty": "{}",
    }
    assert flatten_config({"lr": 1}, prefix="algo") == {"algo.lr": "1"}


def test_flatten_truncates_to_max_len() -> None:
    flat = flatten_config({"long": "x" * 600, "exact": "y" * 500})
    assert len(flat["long"]) == 500 and flat["long"].endswith("...")
    assert flat["long"][:497] == "x" * 497
    assert flat["exact"] == "y" * 500
    assert flatten_config({"a": "abcdef"}, max_len=5) == {"a": "ab..."}


# --- runs -----------------------------------------------------------------------------------


def test_params_chunked_tags_and_run_name(store, client) -> None:
    params = {f"group{g}": {f"p{i}": i * 0.5 for i in range(50 * g, 50 * g + 50)}
              for g in range(5)}  # 250 params: three log_batch calls
    params["group0"]["long"] = "z" * 700
    tracker = make_tracker(store, run_name="params-run")
    run_id = tracker.start(params, tags={"stage": "test", "seed": "3"})
    tracker.finish()

    run = client.get_run(run_id)
    expected = flatten_config(params)
    assert len(expected) == 251
    assert run.data.params == expected
    assert run.data.params["group4.p249"] == "124.5"
    assert run.data.tags["stage"] == "test" and run.data.tags["seed"] == "3"
    assert run.data.tags["mlflow.runName"] == "params-run"
    assert run.info.run_name == "params-run"
    assert run.info.status == "FINISHED"
    assert tracker.experiment_id == run.info.experiment_id
    assert client.get_experiment(tracker.experiment_id).name == EXPERIMENT
    assert tracker.run_url_hint == (
        f"experiment {EXPERIMENT} (id {tracker.experiment_id}), run {run_id}")


def test_metrics_are_buffered_until_flush(store, client) -> None:
    tracker = make_tracker(store)
    run_id = tracker.start({"lr": 0.1})
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "recall_at_10": step / 10}, step=step)
    assert client.get_run(run_id).data.metrics == {}
    assert client.get_metric_history(run_id, "loss") == []

    tracker.finish()
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    recall = sorted(client.get_metric_history(run_id, "recall_at_10"), key=lambda m: m.step)
    assert [m.value for m in recall] == [0.0, 0.1, 0.2]


def test_flush_chunks_more_than_1000_metrics(store, client) -> None:
    tracker = make_tracker(store)
    run_id = tracker.start({})
    for step in range(1200):
        tracker.log_metrics({"step_loss": float(step)}, step=step)
    tracker.flush()
    tracker.flush()  # empty buffer: no-op
    assert len(client.get_metric_history(run_id, "step_loss")) == 1200
    tracker.finish()


def test_metric_names_mlflow_rejects_fail_early(store) -> None:
    tracker = make_tracker(store)
    for bad in ("recall@10", "a//b", "/loss", ".."):
        with pytest.raises(ValueError, match="rejected by MLflow"):
            tracker.log_metrics({bad: 0.5}, step=0)
    tracker.log_metrics({"eval/recall_at_10": 0.5, "ndcg:10": 0.1}, step=0)


def test_artifacts_text_table_and_directory(store, client, tmp_path: Path) -> None:
    tracker = make_tracker(store)
    run_id = tracker.start({})
    tracker.log_text("lr: 0.1\n", "config/resolved.yaml")
    frame = pd.DataFrame({"k": [5, 10], "recall": [0.25, 0.5]})
    tracker.log_table(frame, "eval/scores.csv")
    src = tmp_path / "outputs"
    src.mkdir()
    (src / "a.txt").write_text("A")
    (src / "b.json").write_text('{"b": 1}')
    tracker.log_artifacts(src, "outputs")
    single = tmp_path / "model.txt"
    single.write_text("weights")
    tracker.log_artifact(single)
    tracker.finish()

    assert {f.path for f in client.list_artifacts(run_id)} == {
        "config", "eval", "outputs", "model.txt"}
    assert {f.path for f in client.list_artifacts(run_id, "outputs")} == {
        "outputs/a.txt", "outputs/b.json"}
    dst = tmp_path / "download"
    dst.mkdir()
    text = Path(client.download_artifacts(run_id, "config/resolved.yaml", str(dst)))
    assert text.read_text() == "lr: 0.1\n"
    table = pd.read_csv(client.download_artifacts(run_id, "eval/scores.csv", str(dst)))
    pd.testing.assert_frame_equal(table, frame)
    outputs = Path(client.download_artifacts(run_id, "outputs", str(dst)))
    assert (outputs / "a.txt").read_text() == "A"
    assert json.loads((outputs / "b.json").read_text()) == {"b": 1}
    artifact_uri = client.get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith(Path(store["artifacts"]).as_uri())


def test_ui_table_dataset_input_and_params_of_another_run(store, client, tmp_path: Path) -> None:
    """MLflow's own table artifact, a dataset input without data, params logged to a parent."""
    parent = make_tracker(store).open_sweep_parent(tmp_path / "sweep", "sweep:t", params={"algo": "maml,global"})
    assert client.get_run(parent.run_id).data.params == {"algo": "maml,global"}
    tracker = make_tracker(store)
    run_id = tracker.start({"a": 1})
    tracker.log_params_to(parent.run_id, {"seed": "0,1"})
    frame = pd.DataFrame({"metric": ["rmse", "mae"], "mean": [0.9, 0.7]})
    tracker.log_ui_table(frame, "test_metrics.json")
    tracker.log_dataset("toy", "ab" * 30, context="user_cold_start", source={"loader": "toy"},
                        profile={"ratings": 10}, tags={"split_hash": "h1"})
    tracker.finish()
    run = client.get_run(run_id)
    (entry,) = run.inputs.dataset_inputs
    assert entry.dataset.name == "toy" and entry.dataset.digest == ("ab" * 30)[:36]  # the store's limit
    assert json.loads(entry.dataset.profile) == {"ratings": 10} and entry.dataset.source_type == "code"
    assert {t.key: t.value for t in entry.tags} == {"mlflow.data.context": "user_cold_start", "split_hash": "h1"}
    table = json.loads(Path(client.download_artifacts(run_id, "test_metrics.json", str(tmp_path))).read_text())
    assert table["columns"] == ["metric", "mean"] and table["data"] == [["rmse", 0.9], ["mae", 0.7]]
    assert client.get_run(parent.run_id).data.params == {"algo": "maml,global", "seed": "0,1"}


def test_finish_failed_and_twice(store, client) -> None:
    tracker = make_tracker(store)
    run_id = tracker.start({})
    tracker.log_metrics({"loss": 2.0}, step=0)
    tracker.finish("FAILED")
    tracker.finish("FAILED")
    tracker.finish()  # already finished: status stays FAILED
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"loss": 2.0}
    with pytest.raises(ValueError, match="status"):
        tracker.finish("DONE")


def test_start_twice_and_use_before_start_raise(store) -> None:
    tracker = make_tracker(store)
    with pytest.raises(RuntimeError, match="start"):
        tracker.set_tags({"a": "b"})
    tracker.finish()  # never started: nothing to end
    tracker.start({})
    with pytest.raises(RuntimeError, match="already started"):
        tracker.start({})
    tracker.set_tags({"outcome": "ok"})
    tracker.finish()


# --- liveness: pid, host, heartbeat --------------------------------------------------------


def test_run_starts_with_pid_host_and_heartbeat(store, client) -> None:
    tracker = make_tracker(store)
    run_id = tracker.start({}, tags={"metarec.pid": "overwritten"})
    run = client.get_run(run_id)
    assert run.data.tags["metarec.pid"] == str(os.getpid())
    assert run.data.tags["metarec.host"] == socket.gethostname()
    beat = float(run.data.tags["metarec.heartbeat"])
    assert beat * 1000 <= run.info.start_time + 1  # written with the run, before MLflow stamped it
    assert tracker._beats[run_id].running  # the daemon thread beats while the run is open
    tracker.finish()
    assert tracker._beats == {}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_flush_writes_the_heartbeat_when_due_in_the_same_batch(store, client) -> None:
    tracker = make_tracker(store)
    run_id = tracker.start({})
    beat = tracker._beats[run_id]
    beat.stop()  # only flush() beats in this test
    first = client.get_run(run_id).data.tags[HEARTBEAT_TAG]
    clock = [2_000_000_000.0]
    beat._clock = lambda: clock[0]
    beat._last = clock[0]
    tracker.flush()  # nothing buffered, no beat due: no write
    assert client.get_run(run_id).data.tags[HEARTBEAT_TAG] == first
    clock[0] += HEARTBEAT_S
    tracker.flush()  # nothing buffered, but a beat is due
    assert client.get_run(run_id).data.tags[HEARTBEAT_TAG] == "2000000030.000"
    clock[0] += HEARTBEAT_S - 1
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.flush()  # metrics only: the last beat is recent
    assert client.get_run(run_id).data.tags[HEARTBEAT_TAG] == "2000000030.000"
    clock[0] += 1
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.flush()
    run = client.get_run(run_id)
    assert run.data.tags[HEARTBEAT_TAG] == "2000000060.000" and run.data.metrics["loss"] == 0.5
    tracker.finish()


def test_heartbeat_thread_beats_and_stops() -> None:
    written, enough = [], threading.Event()

    def write(value: str) -> None:
        written.append(float(value))
        if len(written) >= 2:
            enough.set()

    beat = Heartbeat(write, interval_s=0.03)
    beat.start()
    assert enough.wait(60), "the heartbeat thread wrote fewer than two beats"
    beat.stop()
    assert not beat.running
    assert written == sorted(written)


def test_heartbeat_write_errors_are_swallowed() -> None:
    def broken(value: str) -> None:
        raise OSError("store gone")

    beat = Heartbeat(broken, interval_s=0.0)
    assert beat.beat() is False  # due, written, failed: the run goes on
    assert Heartbeat(broken, interval_s=3600).beat() is False  # not due: not even tried


def test_sweep_parent_has_liveness_tags_and_its_heartbeat_ends(store, client, tmp_path: Path) -> None:
    opener = MlflowTracker(store["uri"], "test-sweep-live", artifact_location=store["artifacts"])
    parent = opener.open_sweep_parent(tmp_path, "sweep")
    tags = client.get_run(parent.run_id).data.tags
    assert tags["metarec.pid"] == str(os.getpid()) and "metarec.heartbeat" in tags
    assert opener._beats[parent.run_id].running
    opener.end_sweep_parent(parent, "KILLED")
    assert opener._beats == {}
    assert client.get_run(parent.run_id).info.status == "KILLED"


def test_resume_reopens_the_run_with_this_process_liveness(store, client) -> None:
    first = make_tracker(store)
    run_id = first.start({"lr": 0.1})
    first.log_metrics({"loss": 1.0}, step=0)
    first.finish("KILLED")
    client.set_tag(run_id, "metarec.pid", "999999999")  # as if written by a process now gone

    again = make_tracker(store)
    assert again.resume(run_id) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["metarec.pid"] == str(os.getpid())
    assert again.experiment_id == run.info.experiment_id and again._beats[run_id].running
    again.log_metrics({"loss": 0.5}, step=1)
    again.finish()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1]
    with pytest.raises(RuntimeError, match="already started"):
        again.resume(run_id)
    with pytest.raises(MetarecError, match="no MLflow run 'nope'"):
        make_tracker(store).resume("nope")


# --- sweeps ---------------------------------------------------------------------------------


def run_sweep(store, client, sweep_dir: Path, child_statuses: list[str]) -> str:
    """Open a parent, run one child per status, close the parent; return the parent's status."""
    opener = MlflowTracker(store["uri"], "test-sweep", artifact_location=store["artifacts"])
    opened = opener.open_sweep_parent(sweep_dir, "sweep", tags={"kind": "sweep"})
    record = json.loads((sweep_dir / "mlflow_parent.json").read_text())
    assert record == {"run_id": opened.run_id, "experiment_id": opened.experiment_id,
                      "tracking_uri": store["uri"]}
    assert not list(sweep_dir.glob("*.tmp"))

    parent = MlflowTracker.read_sweep_parent(sweep_dir)
    assert parent == opened
    for i, status in enumerate(child_statuses):
        child = MlflowTracker(store["uri"], "ignored-by-children", run_name=f"job{i}")
        run_id = child.start({"job": i}, parent=parent)
        assert child.experiment_id == parent.experiment_id
        child.finish(status)
        run = client.get_run(run_id)
        assert run.info.experiment_id == parent.experiment_id
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.data.tags["mlflow.runName"] == f"job{i}"
    assert client.get_experiment_by_name("ignored-by-children") is None

    opener.close_sweep_parent(parent)
    run = client.get_run(parent.run_id)
    assert run.data.tags["mlflow.runName"] == "sweep" and run.data.tags["kind"] == "sweep"
    return run.info.status


def test_sweep_parent_finished(store, client, tmp_path: Path) -> None:
    assert run_sweep(store, client, tmp_path / "ok", ["FINISHED", "FINISHED"]) == "FINISHED"


def test_sweep_parent_failed_when_a_child_failed(store, client, tmp_path: Path) -> None:
    assert run_sweep(store, client, tmp_path / "bad", ["FINISHED", "FAILED"]) == "FAILED"


def test_read_sweep_parent_missing_and_malformed(tmp_path: Path) -> None:
    assert MlflowTracker.read_sweep_parent(tmp_path) is None
    (tmp_path / "mlflow_parent.json").write_text("{not json")
    with pytest.raises(MetarecError, match="mlflow_parent.json"):
        MlflowTracker.read_sweep_parent(tmp_path)


def test_child_with_parent_in_other_store_is_refused(store, tmp_path: Path) -> None:
    parent = SweepParent("abc", "1", f"sqlite:///{tmp_path}/other.db")
    with pytest.raises(MetarecError, match="one tracking URI"):
        make_tracker(store).start({}, parent=parent)


def test_relative_sqlite_uri_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = MlflowTracker("sqlite:///mlruns.db", "x")
    assert tracker.tracking_uri == f"sqlite:///{tmp_path}/mlruns.db"
    with pytest.raises(MetarecError, match="empty"):
        MlflowTracker("", "x")


# --- NullTracker and import cost -------------------------------------------------------------


def test_null_tracker_does_nothing(tmp_path: Path) -> None:
    null = NullTracker()
    assert null.start({"a": 1}, tags={"t": "v"}) == ""
    null.log_metrics({"loss": 1.0}, step=0)
    null.flush()
    null.set_tags({"a": "b"})
    null.log_text("x", "x.txt")
    null.log_table(pd.DataFrame({"a": [1]}), "a.csv")
    null.log_ui_table(pd.DataFrame({"a": [1]}), "a.json")
    null.log_dataset("toy", "d", "ctx", {"loader": "x"})
    null.log_artifact(tmp_path)
    null.log_artifacts(tmp_path)
    assert null.open_sweep_parent(tmp_path, "sweep") is None
    assert NullTracker.read_sweep_parent(tmp_path) is None
    null.close_sweep_parent(None)
    null.finish("FAILED")
    assert null.run_id is None and isinstance(null.run_url_hint, str)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_import_does_not_import_mlflow() -> None:
    code = "import metarec_runner.tracking, sys; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
