"""Parallel writers into one sqlite MLflow store: the store is created once under a file lock,
busy answers are retried, experiments are created race-free, and no run is lost
(:mod:`metarec_runner.tracking.sqlite_store`)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from metarec_runner.tracking import MlflowTracker, sqlite_store
from metarec_runner.tracking.sqlite_store import (
    RETRIES,
    RetryingClient,
    TrackingStoreError,
    ensure_store,
    file_lock,
    is_busy_error,
    retrying,
    sqlite_path,
)
from tests.helpers import METAREC, metarec_env

N_WRITERS = 4
STEPS = 3
START_WAIT_S = 120  # how long writers wait for the others to be ready (a loaded machine)

# One writer: imports first, then waits for the test's go file, so all writers hit the store at once.
WRITER = textwrap.dedent("""
    import os, sys, time
    from metarec_runner.tracking import MlflowTracker
    uri, name, ready, go = sys.argv[1:5]
    open(ready, "w").close()
    deadline = time.monotonic() + {wait}
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no go file")
        time.sleep(0.01)
    tracker = MlflowTracker(uri, "parallel", run_name=name)
    tracker.start({{"writer": name}}, tags={{"algo": "writer"}})
    for step in range({steps}):
        tracker.log_metrics({{"loss": float(step), "step_value": step * 10.0}}, step=step)
        tracker.flush()
    tracker.finish()
    print(os.getpid())
""").format(wait=START_WAIT_S, steps=STEPS)


@pytest.fixture(autouse=True)
def _fresh_ready_cache(monkeypatch):
    """Each test sees a process that has prepared no store yet."""
    monkeypatch.setattr(sqlite_store, "_ready", set())


# ---------------------------------------------------------------- fast: the pieces


def test_sqlite_path() -> None:
    assert sqlite_path("sqlite:////abs/mlflow.db") == Path("/abs/mlflow.db")
    assert sqlite_path("sqlite:///rel.db?timeout=5") == Path("rel.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("http://host:5000") is None
    assert sqlite_path("postgresql://u@h/db") is None


def test_busy_errors_are_recognised_through_the_chain() -> None:
    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("INTERNAL_ERROR: store failed") from inner
    except RuntimeError as outer:
        assert is_busy_error(outer)
    assert is_busy_error(sqlite3.OperationalError("Database table is locked: runs"))
    assert not is_busy_error(sqlite3.OperationalError("no such table: runs"))
    assert not is_busy_error(ValueError("locked out"))


def test_retrying_retries_busy_calls_then_succeeds(monkeypatch) -> None:
    monkeypatch.setattr(sqlite_store.time, "sleep", lambda s: None)
    calls = []

    def flaky(x: int, *, y: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return x + y

    assert retrying(flaky, 1, y=2, what="sqlite:///x.db") == 3
    assert len(calls) == 3


def test_retrying_gives_up_with_one_line_naming_the_store(monkeypatch) -> None:
    monkeypatch.setattr(sqlite_store.time, "sleep", lambda s: None)
    calls = []

    def log_batch() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(TrackingStoreError, match=r"sqlite:///x\.db stayed locked.*log_batch") as info:
        retrying(log_batch, what="sqlite:///x.db")
    assert len(calls) == RETRIES
    assert "\n" not in str(info.value) and "tracking server" in str(info.value)


def test_retrying_passes_other_errors_at_once() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise KeyError("no such run")

    with pytest.raises(KeyError):
        retrying(broken)
    assert calls == [1]


def test_retrying_client_wraps_methods_only(monkeypatch) -> None:
    monkeypatch.setattr(sqlite_store.time, "sleep", lambda s: None)

    class Client:
        tracking_uri = "sqlite:///c.db"
        failures = 1

        def get_run(self, run_id: str) -> str:
            if self.failures:
                self.failures -= 1
                raise sqlite3.OperationalError("database is locked")
            return f"run {run_id}"

    client = RetryingClient(Client(), "sqlite:///c.db")
    assert client.tracking_uri == "sqlite:///c.db"
    assert client.get_run("r1") == "run r1"
    assert client.get_run.__name__ == "get_run"
    with pytest.raises(AttributeError):
        client._private  # noqa: B018 - the attribute access is the test


def test_file_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    lock = tmp_path / "mlflow.db.lock"
    with file_lock(lock):
        with pytest.raises(TrackingStoreError, match="another process is still creating"):
            with file_lock(lock, timeout=0.05):
                pass
    with file_lock(lock, timeout=0.05):  # released: free again
        pass
    assert lock.is_file()  # kept: removing it would race processes waiting on it


def test_ensure_store_creates_a_new_store_once(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path}/sub/mlflow.db"
    opened = []
    real_open = sqlite_store._open_store
    monkeypatch.setattr(sqlite_store, "_open_store", lambda u: (opened.append(u), real_open(u)))
    ensure_store(uri)
    ensure_store(uri)
    assert opened == [uri]
    tables = {r[0] for r in sqlite3.connect(tmp_path / "sub" / "mlflow.db").execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"experiments", "runs", "metrics", "tags", "alembic_version"} <= tables
    assert (tmp_path / "sub" / "mlflow.db.lock").is_file()
    ensure_store("http://127.0.0.1:1")  # not sqlite: left to MLflow, nothing opened
    assert opened == [uri]


def test_experiment_created_by_a_racing_process_is_read(tmp_path: Path) -> None:
    """Both saw no experiment; the other created it first: this tracker joins that one."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ensure_store(uri)
    exp_id = MlflowClient(uri).create_experiment("raced")
    tracker = MlflowTracker(uri, "raced")
    real, seen = tracker._client, []

    class LateClient:
        """The real client, except that the first lookup misses (the other process was faster)."""

        def __getattr__(self, name: str):
            return getattr(real, name)

        def get_experiment_by_name(self, name: str):
            seen.append(name)
            return None if len(seen) == 1 else real.get_experiment_by_name(name)

    tracker._client_obj = LateClient()
    run_id = tracker.start({})
    tracker.finish()
    assert tracker.experiment_id == exp_id and seen == ["raced", "raced"]
    assert MlflowClient(uri).get_run(run_id).info.experiment_id == exp_id


# ---------------------------------------------------------------- slow: real parallel processes


def _run_writers(tmp_path: Path, uri: str, n: int = N_WRITERS) -> list[int]:
    """Start ``n`` writer processes, release them together, return their pids (all must succeed)."""
    go = tmp_path / "go"
    procs, ready = [], []
    for i in range(n):
        ready.append(tmp_path / f"ready{i}")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, f"w{i}", str(ready[-1]), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=metarec_env(tmp_path / "out")))
    deadline = time.monotonic() + START_WAIT_S
    while not all(r.exists() for r in ready) and time.monotonic() < deadline \
            and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    go.touch()
    pids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        pids.append(int(out.split()[-1]))
    return pids


def _assert_all_runs(uri: str, pids: list[int]) -> None:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = [e for e in client.search_experiments(view_type=ViewType.ALL) if e.name == "parallel"]
    assert len(exps) == 1  # one experiment, however many processes raced to create it
    runs = client.search_runs([exps[0].experiment_id], "", ViewType.ALL, max_results=1000)
    assert len(runs) == len(pids)
    assert sorted(r.info.run_name for r in runs) == sorted(f"w{i}" for i in range(len(pids)))
    assert sorted(int(r.data.tags["metarec.pid"]) for r in runs) == sorted(pids)
    for run in runs:
        assert run.info.status == "FINISHED" and run.info.end_time is not None
        assert run.data.params == {"writer": run.info.run_name}
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(STEPS)]
        assert run.data.metrics["step_value"] == (STEPS - 1) * 10.0


@pytest.mark.slow
def test_parallel_writers_into_a_new_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    assert not (tmp_path / "store").exists()
    _assert_all_runs(uri, _run_writers(tmp_path, uri))


@pytest.mark.slow
def test_parallel_writers_into_an_existing_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # an existing store (without the experiment)
    assert (tmp_path / "mlflow.db").is_file()
    _assert_all_runs(uri, _run_writers(tmp_path, uri))


TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=1", "trainer.progress=false"]


@pytest.mark.slow
def test_parallel_metarec_train_into_a_new_store(tmp_path: Path) -> None:
    """The issue's case: independent `metarec train` processes started at once, one new store."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    out = tmp_path / "outputs"
    env = {**metarec_env(out), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*METAREC, "train", "+algo=global", f"seed={i}", "threads=1", *TINY],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(N_WRITERS)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "",
                              ViewType.ALL, max_results=1000)
    assert len(runs) == N_WRITERS
    assert sorted(r.data.params["seed"] for r in runs) == [str(i) for i in range(N_WRITERS)]
    assert len({int(r.data.tags["metarec.pid"]) for r in runs}) == N_WRITERS
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "test/rmse" in run.data.metrics and "val/rmse" in run.data.metrics
