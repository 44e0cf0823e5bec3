"""The run lifecycle through ``metarec train``: kill -9 and resume ends where an uninterrupted run
does, in the same MLflow run; SIGTERM ends a run KILLED with its last.pt kept."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from metarec_runner.checkpoint import LAST, CheckpointError, load_checkpoint
from tests.helpers import METAREC, metarec_env

pytestmark = pytest.mark.slow

SETTINGS = ["+algo=maml", "trainer.max_epochs=6", "trainer.patience=10", "trainer.progress=false", "seed=4"]


def _start(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*METAREC, "train", *args], cwd=out.parent, env=metarec_env(out),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_epoch(out: Path, proc: subprocess.Popen, epoch: int, timeout: float = 300) -> Path:
    """The run folder once its last.pt holds ``epoch`` or later (polled; the write is atomic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in out.glob(f"runs/*/*/{LAST}"):
            try:
                if load_checkpoint(path).epoch >= epoch:
                    return path.parent
            except CheckpointError:  # pragma: no cover - only a complete file is ever visible
                raise
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    raise AssertionError(f"no last.pt with epoch {epoch} within {timeout} s")


def _store(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{out}/mlflow.db")


def _only_run(client):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_kill_9_then_resume_ends_exactly_where_an_uninterrupted_run_ends(tmp_path):
    whole_out, cut_out = tmp_path / "whole" / "outputs", tmp_path / "cut" / "outputs"
    for out in (whole_out, cut_out):
        out.mkdir(parents=True)
    whole = subprocess.run([*METAREC, "train", *SETTINGS], cwd=whole_out.parent, env=metarec_env(whole_out),
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]

    proc = _start(cut_out, *SETTINGS)
    folder = _wait_for_epoch(cut_out, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = load_checkpoint(folder / LAST).epoch
    assert 2 <= killed_at < 6
    client = _store(cut_out)
    ghost = _only_run(client)
    assert ghost.info.status == "RUNNING"  # nobody ended it: the process died

    resumed = subprocess.run([*METAREC, "train", *SETTINGS, f"trainer.resume={ghost.info.run_id}"],
                             cwd=cut_out.parent, env=metarec_env(cut_out), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {killed_at}" in resumed.stderr

    run = _only_run(client)  # the same run, continued
    assert run.info.run_id == ghost.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # every epoch once
    whole_dir = next(whole_out.glob("runs/*/*/metrics.json")).parent
    resumed_dir = Path(run.data.tags["output_dir"])
    a = json.loads((whole_dir / "metrics.json").read_text())
    b = json.loads((resumed_dir / "metrics.json").read_text())
    assert a == b
    whole_run = _only_run(_store(whole_out))
    assert {k: v for k, v in run.data.metrics.items() if not k.startswith("sys/")} == {
        k: v for k, v in whole_run.data.metrics.items() if not k.startswith("sys/")}


def test_sigterm_ends_the_run_killed_and_keeps_last_pt(tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    proc = _start(out, *SETTINGS, "trainer.max_epochs=200")
    folder = _wait_for_epoch(out, proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    run = _only_run(_store(out))
    assert run.info.status == "KILLED" and run.info.end_time is not None, err[-2000:]
    assert load_checkpoint(folder / LAST).epoch >= 1
