"""Sweeps at scale: the joblib launcher (one MLflow parent, its children from worker processes,
one torch thread per job), the Optuna preset, the Ray and SLURM presets, `metarec compare` on a
whole sweep, and the comparison plot on the parent run."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from metarec_runner.launch.callbacks import FAILED_DIR, ThreadsPerJob
from metarec_runner.report.store import parse_overrides, swept_keys
from tests.helpers import METAREC, compose, metarec_env

TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=1", "trainer.progress=false"]
RUN_ARTIFACTS = {"config_resolved.yaml", "metrics.json", "per_task.csv", "by_support_size.csv",
                 "history.csv", "hydra", "plots", "metarec.log", "test_metrics.csv", "test_metrics.json"}
MAX_METRICS = 64  # about 60 metric keys per child run (62 with the default evaluator)


def _metarec(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*METAREC, *args], cwd=out.parent, env=metarec_env(out), capture_output=True,
                          text=True, check=False, timeout=timeout)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _sweep(client, out: Path):
    """(parent run, its child runs) of the only sweep in ``out``'s store."""
    from mlflow.entities import ViewType

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "",
                              ViewType.ALL, max_results=1000)
    parents = [r for r in runs if r.info.run_name.startswith("sweep:")]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == len(children) + 1, "runs outside the sweep"
    return parent, children


# ---------------------------------------------------------------- fast

def test_parse_overrides_and_swept_keys() -> None:
    assert parse_overrides("+algo=maml seed=1 evaluator.ks=[5, 10] ++x=a b ~y=1") == {
        "algo": "maml", "seed": "1", "evaluator.ks": "[5, 10]", "x": "a b", "y": "1"}
    assert parse_overrides("") == {} and parse_overrides("  ") == {}
    runs = pd.DataFrame({"override.algo": ["maml", "maml", "global", "global"],
                         "override.seed": ["0", "1", "0", "1"],
                         "override.threads": ["1"] * 4,
                         "override.algo.inner_lr": ["0.1", "0.1", None, None]})
    assert swept_keys(runs) == ["algo", "algo.inner_lr"]  # seed aggregated, threads constant
    assert swept_keys(runs, aggregate=()) == ["algo", "seed", "algo.inner_lr"]


def test_joblib_launcher_gets_one_thread_per_job() -> None:
    cfg = compose("hydra/launcher=joblib", "+algo=maml", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    ThreadsPerJob().on_multirun_start(cfg)
    assert dict(cfg.hydra.sweeper.params) == {"threads": "1"}

    explicit = compose("hydra/launcher=joblib", "+algo=maml", "threads=2", hydra=True)
    ThreadsPerJob().on_multirun_start(explicit)
    assert explicit.hydra.sweeper.params is None  # the user's threads=2 stays

    basic = compose("+algo=maml", hydra=True)
    ThreadsPerJob().on_multirun_start(basic)
    assert basic.hydra.sweeper.params is None  # sequential jobs keep torch's default


@pytest.mark.skipif(not _has("hydra_plugins.hydra_submitit_launcher"),
                    reason="hydra-submitit-launcher not installed (pip install 'metarec-runner[slurm]')")
def test_slurm_preset_composes() -> None:
    cfg = compose("hydra/launcher=slurm", "+algo=maml", "hydra.launcher.partition=gpu", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.cpus_per_task == 4 and launcher.timeout_min == 240


@pytest.mark.skipif(not _has("hydra_plugins.hydra_ray_launcher"),
                    reason="hydra-ray-launcher not installed (pip install 'metarec-runner[ray]')")
def test_ray_preset_composes_with_one_thread_per_job() -> None:
    cfg = compose("hydra/launcher=ray_local", "+algo=maml", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("RayLauncher")
    assert cfg.hydra.launcher.ray.remote.num_cpus == 1
    ThreadsPerJob().on_multirun_start(cfg)
    assert dict(cfg.hydra.sweeper.params) == {"threads": "1"}


@pytest.mark.skipif(not _has("hydra_plugins.hydra_optuna_sweeper"),
                    reason="hydra-optuna-sweeper not installed (pip install 'metarec-runner[optuna]')")
def test_optuna_preset_composes() -> None:
    cfg = compose("+hparams_search=maml_optuna", hydra=True)
    assert cfg.algo._target_.endswith("MAML")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.trainer.monitor_mode is None
    # the direction follows the monitored metric's declaration, never a separate knob
    cfg = compose("+hparams_search=maml_optuna", "trainer.monitor=val/ndcg_at_5", hydra=True)
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"algo.inner_lr", "algo.meta_optimizer.lr",
                                             "algo.inner_steps"}


# ---------------------------------------------------------------- slow: real sweeps

@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory) -> Path:
    """A 4-job joblib sweep (maml, global x seeds 0, 1), 4 at once (n_jobs=4), into one sqlite store."""
    out = tmp_path_factory.mktemp("joblib") / "outputs"
    res = _metarec(out, "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                   "+algo=maml,global", "seed=0,1", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "JoblibLauncher: threads=1 per job" in res.stdout + res.stderr
    (out / "sweep_stdout.txt").write_text(res.stdout)
    (out / "sweep_stderr.txt").write_text(res.stderr)
    return out


@pytest.mark.slow
def test_joblib_sweep_one_parent_four_finished_children(joblib_sweep: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{joblib_sweep}/mlflow.db")
    parent, children = _sweep(client, joblib_sweep)
    assert parent.info.status == "FINISHED"
    assert len(children) == 4
    assert sorted((c.data.tags["algo"], c.data.params["seed"]) for c in children) == [
        ("global", "0"), ("global", "1"), ("maml", "0"), ("maml", "1")]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.info.experiment_id == parent.info.experiment_id
        assert child.data.params["threads"] == "1"  # one torch thread per parallel job
        assert child.data.params["trainer.max_epochs"] == "1"
        assert "test/rmse" in child.data.metrics and "val/rmse" in child.data.metrics
        assert child.data.params["algo"] == child.data.tags["algo"]  # the swept group is a param
        assert len(child.data.metrics) <= MAX_METRICS, sorted(child.data.metrics)
        assert "ci95/test/rmse" in child.data.metrics and not any("_ci95" in k for k in child.data.metrics)
        assert not [k for k in child.data.params if k.startswith("paths.")]
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 1
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert RUN_ARTIFACTS <= names, RUN_ARTIFACTS - names
        pngs = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert {"plots/learning_curves.png", "plots/support_size.png"} <= pngs
    # every job wrote its own folder; the parent got the comparison of the children
    assert len({c.data.tags["output_dir"] for c in children}) == 4
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent_files == {"sweep_comparison.png", "sweep_comparison.csv", "sweep_comparison.json"}
    dst = tmp_path / "dl"
    dst.mkdir()
    png = Path(client.download_artifacts(parent.info.run_id, "sweep_comparison.png", str(dst)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "sweep_comparison.csv", str(dst)))
    assert sorted(table["algo"]) == ["global", "maml"] and (table["n_runs"] == 2).all()
    for algo, row in table.set_index("algo").iterrows():
        means = [c.data.metrics["test/rmse"] for c in children if c.data.tags["algo"] == algo]
        assert row["mean"] == pytest.approx(sum(means) / 2)


@pytest.mark.slow
def test_sweep_parent_carries_swept_params_table_note_and_best_child(joblib_sweep: Path, tmp_path: Path) -> None:
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{joblib_sweep}/mlflow.db")
    parent, children = _sweep(client, joblib_sweep)
    assert parent.data.params == {"algo": "maml,global", "seed": "0,1"}  # the swept keys, as given
    assert parent.data.tags["swept_keys"] == "algo,seed"
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep_comparison.json",
                                                      str(tmp_path))).read_text())
    assert table["columns"][:3] == ["algo", "n_runs", "n_seeds"]
    assert sorted(row[0] for row in table["data"]) == ["global", "maml"]
    best = min(children, key=lambda c: c.data.metrics["test/rmse"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best_run_name"] == best.info.run_name
    assert parent.data.metrics["best/test/rmse"] == pytest.approx(best.data.metrics["test/rmse"])
    note = parent.data.tags["mlflow.note.content"]
    assert "| algo | n_runs | n_seeds | mean | ci95 |" in note and best.info.run_id in note
    assert f"metarec compare --sweep {parent.info.run_id}" in note
    # the terminal: one line per job (from the workers), the comparison and the hints at the end
    stdout = (joblib_sweep / "sweep_stdout.txt").read_text()
    assert "test metrics (mean over test users" not in stdout
    jobs = sorted(line for line in stdout.splitlines() if line.startswith("job "))
    assert [j.split(":")[0] for j in jobs] == [f"job {i} {n}" for i, n in enumerate(
        ["maml-melu-toy-s0", "maml-melu-toy-s1", "global-melu-toy-s0", "global-melu-toy-s1"])], stdout
    end = stdout[stdout.index("test/rmse (lower is better), 4 runs"):]
    assert f"sweep parent run {parent.info.run_id}" in end and f"metarec compare --sweep {parent.info.run_id}" in end
    assert f"best test/rmse (lowest): {best.info.run_name} ({best.info.run_id})" in end
    assert "metarec ui" in end


@pytest.mark.slow
def test_compare_whole_sweep_by_parent_id(joblib_sweep: Path) -> None:
    from mlflow.tracking import MlflowClient

    parent, _ = _sweep(MlflowClient(f"sqlite:///{joblib_sweep}/mlflow.db"), joblib_sweep)
    res = _metarec(joblib_sweep, "compare", "--parent", parent.info.run_id, "--format", "csv",
                   timeout=300)
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(io.StringIO(res.stdout))
    assert list(table.columns[:3]) == ["algo", "n_runs", "n_seeds"]  # grouped by the swept key only
    assert sorted(table["algo"]) == ["global", "maml"]
    assert (table["n_runs"] == 2).all() and (table["n_seeds"] == 2).all()
    res = _metarec(joblib_sweep, "compare", "--sweep", "latest", "--baseline", "global", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "grouped by the swept keys (algo), aggregated over seeds" in res.stdout
    assert "Δ vs global" in res.stdout


@pytest.mark.slow
def test_parallel_jobs_prefix_their_terminal_lines(joblib_sweep: Path) -> None:
    """Jobs running side by side print to one terminal: each of their lines starts with its job
    number, the one-line job summary needs none, and metarec.log keeps the lines unprefixed."""
    stdout = (joblib_sweep / "sweep_stdout.txt").read_text().splitlines()
    stderr = (joblib_sweep / "sweep_stderr.txt").read_text().splitlines()  # progress goes there
    epoch_lines = [line for line in stderr if re.search(r"epoch\s+1/1", line)]
    assert len(epoch_lines) == 4
    assert sorted(re.match(r"\[job (\d)\] epoch", line)[1] for line in epoch_lines) == ["0", "1", "2", "3"]
    summaries = [line for line in stdout if re.match(r"job \d ", line)]
    assert sorted(line[4] for line in summaries) == ["0", "1", "2", "3"]
    for job_dir in joblib_sweep.glob("multiruns/*/*/[0-3]_*"):
        num = job_dir.name.split("_", 1)[0]
        logged = (job_dir / "metarec.log").read_text()
        assert re.search(r"\] epoch\s+1/1", logged) and "[job " not in logged
        assert f"job {num} " in logged


@pytest.mark.slow
def test_joblib_sweep_with_a_failing_job_fails_the_parent(tmp_path: Path) -> None:
    """The failing job runs in a worker process: the parent still learns about it."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "outputs"
    res = _metarec(out, "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "+algo=maml", "algo.inner_lr=0.05,-0.1", *TINY)
    assert res.returncode != 0
    assert "algo.inner_lr: must be > 0" in res.stderr
    parent, children = _sweep(MlflowClient(f"sqlite:///{out}/mlflow.db"), out)
    assert parent.info.status == "FAILED"
    assert [c.info.status for c in children] == ["FINISHED"]  # the bad job never opened a run
    markers = list(out.glob(f"multiruns/*/*/{FAILED_DIR}/*"))
    assert [m.name for m in markers] == ["1"]


@pytest.mark.slow
@pytest.mark.skipif(not _has("hydra_plugins.hydra_optuna_sweeper"),
                    reason="hydra-optuna-sweeper not installed (pip install 'metarec-runner[optuna]')")
def test_optuna_four_trials_under_one_parent(tmp_path: Path) -> None:
    import yaml
    from mlflow.tracking import MlflowClient

    out = tmp_path / "outputs"
    res = _metarec(out, "train", "-m", "+hparams_search=maml_optuna", "hydra.sweeper.n_trials=4",
                   "hydra.sweeper.n_jobs=2", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    parent, children = _sweep(client, out)
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    tried = {(c.data.params["algo.inner_lr"], c.data.params["algo.inner_steps"]) for c in children}
    assert len(tried) == 4  # four distinct trials
    for c in children:
        assert 0.005 <= float(c.data.params["algo.inner_lr"]) <= 0.5
        assert c.data.params["algo.inner_steps"] in {"1", "2", "3", "5"}
    result = yaml.safe_load(next(out.glob("multiruns/*/*/optimization_results.yaml")).read_text())
    best = min(c.data.metrics["val/best_rmse"] for c in children)
    assert result["best_value"] == pytest.approx(best)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "sweep_comparison.png", "sweep_comparison.csv", "sweep_comparison.json"}
    # the search space is what this sweep varies: the parent's params
    assert set(parent.data.params) == {"algo.inner_lr", "algo.meta_optimizer.lr", "algo.inner_steps"}
    assert "interval" in parent.data.params["algo.inner_lr"]


def _job_process_facts() -> tuple[int, bool]:
    """(parent pid, whether the preload module was in memory before this call)."""
    return os.getppid(), "metarec_runner.launch.worker_preload" in sys.modules


def test_joblib_workers_fork_from_a_preloaded_server() -> None:
    """PrewarmWorkers: joblib's workers are children of the fork server (not of the sweep
    process) and start with torch, MLflow, matplotlib and the job module already imported."""
    if "forkserver" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("this platform has no forkserver start method")
    from joblib import Parallel, delayed
    from joblib.externals.loky.backend.context import get_start_method, set_start_method

    from metarec_runner.launch.callbacks import PrewarmWorkers

    cfg = compose("hydra/launcher=joblib", "+algo=maml", hydra=True)
    assert "metarec_runner.launch.worker_preload" not in sys.modules  # nothing loaded here
    try:
        PrewarmWorkers().on_multirun_start(cfg)
        assert get_start_method() == "forkserver"
        facts = Parallel(n_jobs=2, backend="loky")(delayed(_job_process_facts)() for _ in range(4))
    finally:
        set_start_method(None, force=True)  # later tests get loky's default again
    assert all(preloaded for _, preloaded in facts)
    assert all(ppid != os.getpid() for ppid, _ in facts)


def test_prewarm_leaves_other_launchers_alone() -> None:
    from joblib.externals.loky.backend.context import get_start_method

    from metarec_runner.launch.callbacks import PrewarmWorkers

    before = get_start_method()
    PrewarmWorkers().on_multirun_start(compose("+algo=maml", hydra=True))  # the basic (sequential) launcher
    assert get_start_method() == before


_EDIT_MID_SWEEP = """
import os, pathlib, sys
from metarec_runner.cli import train
from metarec_runner.cli.app import app
live = pathlib.Path(os.environ["METAREC_CONF_DIR"])
original = train.train_job
def job_then_break_the_live_configs(cfg):
    result = original(cfg)
    (live / "trainer" / "default.yaml").write_text("max_epochs: [unclosed\\n")  # unparsable
    (live / "algo" / "popularity.yaml").unlink(missing_ok=True)
    return result
train.train_job = job_then_break_the_live_configs
app(sys.argv[1:], prog_name="metarec")
"""


def test_a_config_edit_during_a_sweep_leaves_its_jobs_alone(tmp_path: Path) -> None:
    """Every job of ``metarec train -m`` composes from the configs as they were when the sweep
    started: after job 0 the live conf/ gets a broken YAML file and loses the swept algo's file,
    and job 1 still runs (it failed before, and so did long studies whose conf/ was edited)."""
    from metarec_runner.paths import conf_dir

    live = tmp_path / "conf"
    shutil.copytree(conf_dir(), live, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "outputs"
    (tmp_path / "driver.py").write_text(_EDIT_MID_SWEEP)
    res = subprocess.run([sys.executable, str(tmp_path / "driver.py"), "train", "-m", "+algo=popularity",
                          "logger=none", "seed=0,1", *TINY], cwd=tmp_path, capture_output=True, text=True,
                         env=metarec_env(out, METAREC_CONF_DIR=str(live)), check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = sorted(p.name for p in (out / "multiruns").glob("*/*/*") if (p / "metrics.json").is_file())
    assert [j.split("_")[0] for j in jobs] == ["0", "1"]
    assert not (live / "algo" / "popularity.yaml").exists()  # the edits did happen
    assert not list(Path(tempfile.gettempdir()).glob("metarec-conf-*/conf/algo/popularity.yaml"))  # copy removed


@pytest.mark.slow
def test_sweep_without_tracking_runs_every_job(tmp_path: Path) -> None:
    """``logger=none`` in a multirun: no parent run, and the sweep folder still resolves."""
    out = tmp_path / "outputs"
    res = _metarec(out, "train", "-m", "+algo=global", "logger=none", "seed=0,1", "trainer.max_epochs=1",
                   "trainer.progress=false", "dataset.n_users=120", "dataset.n_items=80")
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = sorted(p.name for p in (out / "multiruns").glob("*/*/*") if p.is_dir())
    assert [j.split("_")[0] for j in jobs] == ["0", "1"]
    assert not (out / "mlflow.db").exists()


@pytest.mark.slow
def test_a_sweep_leaves_its_view_in_the_ui(joblib_sweep: Path) -> None:
    """The sweep's shared view (tracking/ui_views.py): its children, grouped by algo, test/rmse
    best first; the experiment names it as its newest, and the sweep's last lines point to it."""
    import json

    from mlflow.tracking import MlflowClient

    from metarec_runner.tracking import ui_views

    client = MlflowClient(f"sqlite:///{joblib_sweep}/mlflow.db")
    parent, children = _sweep(client, joblib_sweep)
    tags = client.get_experiment(parent.info.experiment_id).tags
    key = tags[ui_views.LATEST_SWEEP_TAG]
    assert key == f"metarec-sweep-{parent.info.run_id}"
    view = json.loads(tags[ui_views.SHARED_VIEW_TAG + key])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    found = client.search_runs([parent.info.experiment_id], view["searchFilter"].replace("`", ""))
    assert sorted(r.info.run_id for r in found) == sorted(c.info.run_id for c in children)
    assert view["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "algo"}]
    assert view["orderByKey"] == "metrics.`test/rmse`" and view["orderByAsc"] is True
    assert {"params.`algo`", "params.`seed`", "metrics.`test/rmse`"} <= set(view["selectedColumns"])
    stdout = (joblib_sweep / "sweep_stdout.txt").read_text()
    assert ui_views.view_path(parent.info.experiment_id, key) in stdout
