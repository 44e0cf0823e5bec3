"""What `metarec train` tells you on the terminal (and in metarec.log): the run header with the
parameter count, the ETA, the divergence warning, the early-stop line, the test table with its
reference cells, the few-shot summary after it, and no MLflow set-up noise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from metarec_runner.runner import _DivergenceWatch, _duration
from metarec_runner.tracking.joblog import LOG_FILE, JobLog
from tests.helpers import METAREC, metarec_env

TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=3", "trainer.progress=false"]


def _train(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*METAREC, "train", *args, *TINY], cwd=out.parent, env=metarec_env(out),
                          capture_output=True, text=True, check=False, timeout=600)


@pytest.mark.slow
def test_a_diverging_run_warns_once_and_names_the_knob(tmp_path: Path) -> None:
    """Adam at lr 3 on the plain global model: the loss grows far past 30x its first step's."""
    out = tmp_path / "outputs"
    res = _train(out, "+algo=global", "algo.meta_optimizer.lr=3.0", "logger.log_model=false",
                 "evaluator.shots=[0,3]")
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, res.stderr
    assert re.match(r"warning: train/loss is \d+x its first step's .*training is diverging; lower "
                    r"algo\.meta_optimizer\.lr", warnings[0])
    assert re.search(r"GlobalModel on PreferenceEstimator: [\d,]+ parameters", res.stderr)
    assert re.search(r"epoch   1/3 .* s/epoch  ETA \d+s", res.stderr)
    assert "database tables" not in res.stderr + res.stdout  # MLflow's store set-up stays quiet
    # the test table, then the few-shot summary (its progress lines on stderr while it runs)
    table, shots = res.stdout.index("test metrics (mean over test users"), res.stdout.index("few-shot: test users")
    assert table < shots < res.stdout.index("best epoch")
    assert "few-shot 1/2: k=0" in res.stderr and "few-shot 2/2: k=3" in res.stderr
    rmse = next(line for line in res.stdout.splitlines() if line.startswith("│ rmse "))
    cells = [c.strip() for c in rmse.strip("│").split("│")]
    # random, constant, popularity (ranks only: no RMSE), oracle
    assert cells[3] == "" and float(cells[4]) > 0 and cells[5] == "" and cells[6] == "0.0000"
    # every line went to the job log too, which MLflow has
    folder = next(out.glob("runs/*/*/metarec.log")).parent
    log = (folder / "metarec.log").read_text()
    assert warnings[0] in log and "test metrics (mean over test users" in log and "\x1b" not in log
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("train/toy").experiment_id])
    assert "metarec.log" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_store_set_up_lines_are_quiet(tmp_path: Path) -> None:
    """A new store prints none of MLflow's "Creating initial MLflow database tables" lines."""
    code = ("from metarec_runner.tracking import MlflowTracker; "
            f"t = MlflowTracker('sqlite:///{tmp_path}/new.db', 'e'); t.start({{}}); t.finish()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert "database tables" not in res.stderr + res.stdout, res.stderr


@pytest.mark.slow
def test_a_stalled_run_stops_early_with_one_line(tmp_path: Path) -> None:
    """A step size too small to move float32 weights: validation never improves after epoch 1."""
    out = tmp_path / "outputs"
    res = _train(out, "+algo=global", "algo.meta_optimizer.lr=1e-12", "trainer.patience=1", "logger=none",
                 "evaluate_test=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("early stop at epoch 2: no val/rmse improvement for 1 epochs (trainer.patience=1); best epoch 1"
            in res.stderr)
    assert "epoch   3/3" not in res.stderr and "warning:" not in res.stderr


# ---------------------------------------------------------------- fast: the pieces

def test_divergence_is_measured_against_the_first_step_and_warned_once() -> None:
    watch = _DivergenceWatch([])
    first = {"train/loss": 1.0, "train/inner_loss": 2.0}
    assert watch.check(1, {"train/loss": 20.0, "train/inner_loss": 2.0}, first) is None  # 20x: not yet
    line = watch.check(2, {"train/loss": 5.0, "train/inner_loss": 70.0}, first)
    assert line == ("train/inner_loss is 35x its first step's (2 -> 70 at epoch 2): training is diverging; "
                    "lower algo.inner_lr and run again")
    assert watch.check(3, {"train/loss": 500.0}, first) is None  # once per run
    resumed = _DivergenceWatch([{"epoch": 1, "train/loss": 0.5}])  # resuming: the first epoch's mean
    assert "31x its first epoch's" in resumed.check(7, {"train/loss": 15.5}, None)
    assert _DivergenceWatch([]).check(1, {"train/loss": 1e9}, {"train/loss": 0.0}) is None  # no scale


def test_durations_read_as_eta() -> None:
    assert [_duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]


def test_job_log_copies_printed_lines_without_colours_or_progress_redraws(tmp_path: Path) -> None:
    before = sys.stdout, sys.stderr
    log = JobLog(tmp_path).install()
    try:
        print("\x1b[1mrun header\x1b[0m")
        sys.stderr.write("bar 10%\r\x1b[2Kepoch   1/3  train/loss=1.0\nbar 50%")
        sys.stderr.write("\r\x1b[2K\x1b[1A\x1b[2Kearly stop at epoch 2\n")
    finally:
        assert log.close() == tmp_path / LOG_FILE
    assert (sys.stdout, sys.stderr) == before
    lines = [line.split("] ", 1)[1] for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert lines == ["run header", "epoch   1/3  train/loss=1.0", "early stop at epoch 2"]
    assert log.close() is None  # once
