"""A run tracked to a real `mlflow server` on a loopback port, checked through its REST API.

The server proxies artifacts (``--serve-artifacts`` into a tmp folder), as a shared team server
would; it is killed in teardown. Skipped with the reason when it cannot start within 60 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import METAREC, free_port, metarec_env, stop_group, wait_until_answers

TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=1", "trainer.progress=false"]
START_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict[str, object]]:
    """``{"uri": http://127.0.0.1:PORT, "artifacts": <server-side artifact folder>}``."""

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, f"{uri}/health", START_TIMEOUT_S, root / "server.log", "mlflow server")
        yield {"uri": uri, "artifacts": root / "artifacts"}
    finally:
        stop_group(proc)  # the server and its uvicorn worker
        log.close()


def _train(tmp_path: Path, uri: str, *extra: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*METAREC, "train", "+algo=global", f"logger.tracking_uri={uri}", *TINY,
                           *extra], cwd=tmp_path, env=metarec_env(tmp_path / "outputs", **extra_env),
                          capture_output=True, text=True, check=False, timeout=600)


def _only_run(uri: str, experiment: str) -> dict:
    """The single run of ``experiment``, as the REST API returns it."""
    import requests

    exp = requests.get(f"{uri}/api/2.0/mlflow/experiments/get-by-name",
                       params={"experiment_name": experiment}, timeout=10)
    assert exp.ok, exp.text
    exp_id = exp.json()["experiment"]["experiment_id"]
    found = requests.post(f"{uri}/api/2.0/mlflow/runs/search",
                          json={"experiment_ids": [exp_id], "max_results": 10}, timeout=10)
    assert found.ok, found.text
    runs = found.json()["runs"]
    assert len(runs) == 1, runs
    return runs[0]


def _check_run_through_server(uri: str, artifact_root: Path, tmp_path: Path, experiment: str) -> None:
    import requests
    from mlflow.tracking import MlflowClient

    run = _only_run(uri, experiment)
    info, data = run["info"], run["data"]
    assert info["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["trainer.max_epochs"] == "1" and params["seed"] == "0"
    metrics = {m["key"]: m["value"] for m in data["metrics"]}
    assert {"test/rmse", "val/rmse", "train/loss"} <= set(metrics)
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["algo"] == "global"

    # artifacts live on the server: listed and downloaded through its REST API
    assert info["artifact_uri"].startswith("mlflow-artifacts:"), info["artifact_uri"]
    listed = requests.get(f"{uri}/api/2.0/mlflow/artifacts/list",
                          params={"run_id": info["run_id"]}, timeout=10)
    assert listed.ok, listed.text
    names = {f["path"] for f in listed.json()["files"]}
    assert {"per_task.csv", "metrics.json", "history.csv", "plots", "hydra"} <= names
    client = MlflowClient(uri)
    dst = tmp_path / "download"
    dst.mkdir()
    per_task = Path(client.download_artifacts(info["run_id"], "per_task.csv", str(dst)))
    assert "task_id" in per_task.read_text().splitlines()[0].split(",")
    png = Path(client.download_artifacts(info["run_id"], "plots/learning_curves.png", str(dst)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = [p for p in artifact_root.rglob("per_task.csv") if info["run_id"] in p.parts]
    assert len(stored) == 1, "the server did not store the artifacts itself"


@pytest.mark.slow
def test_run_tracked_to_remote_server(server, tmp_path: Path) -> None:
    """Artifacts stored by the server (the experiment's artifact root is the server's)."""
    res = _train(tmp_path, server["uri"], "logger.artifact_location=null",
                 "task_name=remote_proxied")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_run_through_server(server["uri"], server["artifacts"], tmp_path, "remote_proxied/toy")
    assert not (tmp_path / "outputs" / "mlartifacts").exists()  # nothing written beside the client


@pytest.mark.slow
def test_default_config_stores_artifacts_on_the_server(server, tmp_path: Path) -> None:
    res = _train(tmp_path, server["uri"], "task_name=remote_default")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_run_through_server(server["uri"], server["artifacts"], tmp_path, "remote_default/toy")


@pytest.mark.slow
def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    res = _train(tmp_path, f"http://127.0.0.1:{free_port()}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                 MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    assert res.returncode != 0
    lines = [line for line in res.stderr.strip().splitlines() if line.startswith("metarec: error")]
    assert len(lines) == 1 and "logger.tracking_uri" in lines[0], res.stderr[-2000:]
