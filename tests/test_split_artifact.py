"""A run's tasks are an MLflow artifact (split.parquet) that a later run reloads exactly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import METAREC, metarec_env

TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=1", "trainer.progress=false"]


def _run(args: list[str], cwd: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*METAREC, *args], cwd=cwd, env=metarec_env(out), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_split_artifact_reloads_to_the_same_tasks(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "outputs"
    # the toy data follows split_seed unless pinned: pin it, so only the tasks can differ
    first = _run(["train", "+algo=global", *TINY, "dataset.seed=0", "split_seed=3"], tmp_path, out)
    assert first.returncode == 0, first.stderr
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("train/toy")
    (run,) = client.search_runs([exp.experiment_id])
    assert "split.parquet" in {a.path for a in client.list_artifacts(run.info.run_id)}
    saved = Path(client.download_artifacts(run.info.run_id, "split.parquet", str(tmp_path)))
    # split_seed=0 would make other tasks: the saved file wins, with the same hash
    second = _run(["train", "+algo=global", *TINY, "dataset.seed=0", "splitter=saved",
                   f"splitter.path={saved}"], tmp_path, out)
    assert second.returncode == 0, second.stderr
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].data.tags["split_hash"] == run.data.tags["split_hash"]
    assert runs[0].data.tags["choice.splitter"] == "saved"
    other = _run(["train", "+algo=global", *TINY, "dataset.seed=1", "splitter=saved",
                  f"splitter.path={saved}"], tmp_path, out)
    assert other.returncode != 0 and "checksum" in other.stderr and len(other.stderr.strip().splitlines()) == 1
