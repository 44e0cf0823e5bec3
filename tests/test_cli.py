"""The CLI through a subprocess, as a user runs it; the MLflow store really holds the runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import METAREC

pytestmark = pytest.mark.slow  # every test here starts `metarec` (or python) as a subprocess
TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=2", "trainer.progress=false"]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([*METAREC, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


def _client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{out}/mlflow.db")


def test_help_is_fast_and_lists_commands(tmp_path):
    start = time.perf_counter()
    res = _run(["--help"], tmp_path)
    elapsed = time.perf_counter() - start
    assert res.returncode == 0 and "train" in res.stdout and "ui" in res.stdout
    # lazy imports: neither torch nor mlflow is loaded for --help
    probe = subprocess.run([sys.executable, "-c", "import sys, metarec_runner.cli; "
                            "print('torch' in sys.modules, 'mlflow' in sys.modules, 'hydra' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.split() == ["False", "False", "False"]
    print(f"metarec --help took {elapsed:.2f}s")


def test_the_train_entry_point_imports_no_job_code():
    """A sweep process whose launcher runs the jobs elsewhere never loads torch, MLflow or
    pandas: `metarec train` enters through metarec_runner.cli.train, which imports the job lazily."""
    code = ("import sys, metarec_runner.cli.train; "
            "print(sorted(m for m in ('torch', 'mlflow', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_single_run_is_tracked_with_params_metrics_artifacts(tmp_path):
    out = tmp_path / "outputs"
    res = _run(["train", "+algo=maml", *TINY], tmp_path, METAREC_OUTPUT_DIR=str(out))
    assert res.returncode == 0, res.stderr
    assert "test metrics" in res.stdout and "rmse" in res.stdout
    client = _client(out)
    exp = client.get_experiment_by_name("train/toy")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["algo._target_"] == "metarec_runner.algos.maml.MAML"
    assert run.data.params["algo.inner_lr"] == "0.05"
    assert run.data.tags["algo"] == "maml" and len(run.data.tags["split_hash"]) == 16
    assert "test/rmse" in run.data.metrics and "ci95/test/rmse" in run.data.metrics
    assert run.data.params["algo"] == "maml" and "paths.output_root" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "val/rmse")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_task.csv", "config_resolved.yaml", "metrics.json", "hydra", "metarec.log",
            "test_metrics.json"} <= artifacts
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/overrides.yaml", "hydra/hydra.yaml"} <= hydra_files
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
    assert json.loads(local.read_text())["test/rmse"] == pytest.approx(run.data.metrics["test/rmse"])


def test_two_job_sweep_has_one_parent_with_two_children(tmp_path):
    out = tmp_path / "outputs"
    res = _run(["train", "-m", "algo=maml,global", *TINY], tmp_path, METAREC_OUTPUT_DIR=str(out))
    assert res.returncode == 0, res.stderr
    client = _client(out)
    exp = client.get_experiment_by_name("train/toy")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["algo"] for c in children} == {"maml", "global"}
    assert all(r.info.status == "FINISHED" for r in runs)
    sweep_dirs = list((out / "multiruns").glob("*/*"))
    assert len(sweep_dirs) == 1 and (sweep_dirs[0] / "mlflow_parent.json").exists()
    # the terminal: one line per job, no per-job test table, the comparison at the end
    parent_id = parents[0].info.run_id
    assert "test metrics (mean over test users" not in res.stdout
    jobs = [line for line in res.stdout.splitlines() if line.startswith("job ")]
    assert len(jobs) == 2 and all(re.search(r": test/rmse=\d\.\d{4} ±\d\.\d{4} .*best epoch .* run \w+", j)
                                  for j in jobs), res.stdout
    end = res.stdout[res.stdout.index("test/rmse (lower is better), 2 runs"):]
    assert "│ maml" in end and "│ global" in end
    assert f"sweep parent run {parent_id}" in end and f"metarec compare --sweep {parent_id}" in end
    assert "metarec ui" in end
    assert all((Path(c.data.tags["output_dir"]) / "metarec.log").is_file() for c in children)


def test_missing_algo_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "outputs"
    res = _run(["train", *TINY], tmp_path, METAREC_OUTPUT_DIR=str(out))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no algorithm chosen" in lines[0] and "+algo=<name>" in lines[0]
    assert "maml" in lines[0] and "reptile" in lines[0]
    assert not (out / "runs").exists() and not (out / "mlflow.db").exists()  # not even an empty date folder


def test_unknown_algo_lists_options(tmp_path):
    res = _run(["train", "+algo=not_an_algo", *TINY], tmp_path)
    assert res.returncode != 0
    assert "not_an_algo" in res.stderr and "maml" in res.stderr and "Available options" in res.stderr


@pytest.mark.parametrize("override, needle", [
    ("algo.inner_lr=-0.1", "algo.inner_lr: must be > 0"),
    ("splitter.n_query=100", "splitter.n_query"),
])
def test_bad_values_fail_cleanly_without_a_run(tmp_path, override, needle):
    out = tmp_path / "outputs"
    res = _run(["train", "+algo=maml", *TINY, override], tmp_path, METAREC_OUTPUT_DIR=str(out))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (out / "runs").exists() and not (out / "mlflow.db").exists()  # not even an empty date folder


def test_cfg_job_prints_the_config(tmp_path):
    res = _run(["train", "algo=reptile", "--cfg", "job"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "metarec_runner.algos.reptile.Reptile" in res.stdout


def test_ui_serves_the_store_train_writes_to(tmp_path):
    import socket
    import urllib.request

    out = tmp_path / "outputs"
    assert _run(["train", "+algo=global", *TINY], tmp_path, METAREC_OUTPUT_DIR=str(out)).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*METAREC, "ui", "--port", str(port)], cwd=tmp_path,
                            env={**os.environ, "METAREC_OUTPUT_DIR": str(out)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        first = ""
        for _ in range(200):  # the URL is printed once the server answers, after its start-up log
            first = proc.stdout.readline()
            if first.startswith("runs table: ") or not first:
                break
        exp_id = _client(out).get_experiment_by_name("train/toy").experiment_id
        assert f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs" in first
        body = None
        for _ in range(120):
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=train/toy")
                body = urllib.request.urlopen(req, timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None and exp_id in body
    finally:  # the UI and its server workers form one process group: stop them all
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        time.sleep(1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sweep_with_a_failing_job_runs_the_rest_and_fails_the_parent(tmp_path):
    out = tmp_path / "outputs"
    # job 0 is refused before it can open a run (impossible value); job 1 must still run
    res = _run(["train", "-m", "+algo=global", "algo.meta_optimizer.lr=-1,0.002", *TINY], tmp_path,
               METAREC_OUTPUT_DIR=str(out))
    assert res.returncode != 0
    assert "metarec: error: algo.meta_optimizer" in res.stderr
    client = _client(out)
    runs = client.search_runs([client.get_experiment_by_name("train/toy").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert len(children) == 1 and children[0].info.status == "FINISHED"


def test_monitor_typo_and_empty_validation_fail_before_any_run(tmp_path):
    out = tmp_path / "outputs"
    for override, needle in (("trainer.monitor=val/rmsee", "trainer.monitor"),
                             ("splitter.ratios=[0.9,0,0.1]", "ratios")):
        res = _run(["train", "+algo=maml", *TINY, override], tmp_path, METAREC_OUTPUT_DIR=str(out))
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (out / "runs").exists() and not (out / "mlflow.db").exists()  # not even an empty date folder
