"""``metarec compare``: runs collected from a real MLflow store, CI arithmetic, paired differences."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarec_runner.compare import CompareError, compare_table, lower_is_better
from metarec_runner.evaluate.summary import Z_95

METAREC = [sys.executable, "-m", "metarec_runner.cli"]
TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=2", "trainer.progress=false"]


def _env(out: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env["METAREC_OUTPUT_DIR"] = str(out)
    return env


# ---------------------------------------------------------------- fast: no MLflow, no subprocess

def _hand_runs() -> pd.DataFrame:
    """Five runs: a (3 seeds), b (1 seed), base (2 seeds); b's split has no baseline partner."""
    return pd.DataFrame({
        "run_id": ["a0", "a1", "a2", "b0", "base0", "base1"],
        "algo": ["a", "a", "a", "b", "base", "base"],
        "seed": pd.array([0, 1, 2, 0, 0, 1], dtype="Int64"),
        "split_hash": ["h1", "h1", "h1", "h2", "h1", "h1"],
        "test/rmse": [1.0, 1.2, 1.4, 0.9, 1.5, 1.7],
        "test/rmse_ci95": [0.1, 0.1, 0.1, 0.05, 0.2, 0.2],
        "test/ndcg_at_5": [0.5, 0.6, 0.7, 0.8, 0.4, 0.4],
    })


PER_TASK = {  # task 3 is missing from a0: only common tasks pair
    "a0": pd.DataFrame({"task_id": [1, 2], "rmse": [1.0, 2.0]}),
    "a1": pd.DataFrame({"task_id": [1, 2, 3], "rmse": [1.5, 2.5, 0.5]}),
    "a2": pd.DataFrame({"task_id": [1, 2, 3], "rmse": [0.0, 0.0, 0.0]}),
    "base0": pd.DataFrame({"task_id": [1, 2, 3], "rmse": [2.0, 2.0, 2.0]}),
    "base1": pd.DataFrame({"task_id": [1, 2, 3], "rmse": [1.0, 3.0, 1.0]}),
}


def test_compare_table_ci_over_runs_and_single_run_ci():
    table = compare_table(_hand_runs(), "rmse")
    assert list(table["algo"]) == ["b", "a", "base"]  # rmse: lower first
    a = table.set_index("algo").loc["a"]
    vals = np.array([1.0, 1.2, 1.4])
    assert a["n_runs"] == 3 and a["n_seeds"] == 3 and a["ci_over"] == "runs"
    assert a["mean"] == pytest.approx(1.2)
    assert a["ci95"] == pytest.approx(Z_95 * vals.std(ddof=1) / math.sqrt(3))
    assert a["ci95"] == pytest.approx(1.959963984540054 * 0.2 / math.sqrt(3))
    b = table.set_index("algo").loc["b"]
    assert b["n_runs"] == 1 and b["ci_over"] == "tasks" and b["ci95"] == pytest.approx(0.05)
    base = table.set_index("algo").loc["base"]
    assert base["ci95"] == pytest.approx(Z_95 * np.std([1.5, 1.7], ddof=1) / math.sqrt(2))
    # higher is better for ndcg: descending
    assert list(compare_table(_hand_runs(), "test/ndcg_at_5")["algo"]) == ["b", "a", "base"]
    assert lower_is_better("rmse") and lower_is_better("floor_rmse") and not lower_is_better("ndcg_at_5")


def test_compare_table_paired_difference_by_seed_and_fallback():
    table = compare_table(_hand_runs(), "rmse", baseline="base", per_task=PER_TASK.__getitem__)
    t = table.set_index("algo")
    # a0 <-> base0 (seed 0), a1 <-> base1 (seed 1), a2 (seed 2) <-> mean of base0, base1 per task
    expected = np.array([1.0 - 2.0, 2.0 - 2.0,                 # a0 - base0, tasks 1, 2
                         1.5 - 1.0, 2.5 - 3.0, 0.5 - 1.0,      # a1 - base1
                         0.0 - 1.5, 0.0 - 2.5, 0.0 - 1.5])     # a2 - mean(base0, base1)
    assert t.loc["a", "n_paired"] == len(expected)
    assert t.loc["a", "diff"] == pytest.approx(expected.mean())
    assert t.loc["a", "diff_ci95"] == pytest.approx(Z_95 * expected.std(ddof=1) / math.sqrt(len(expected)))
    assert t.loc["a", "paired"] == "yes" and t.loc["a", "unpaired_runs"] == 0
    # b's split_hash h2 has no baseline run: reported as not paired, never compared
    assert t.loc["b", "paired"] == "no" and t.loc["b", "n_paired"] == 0 and math.isnan(t.loc["b", "diff"])
    assert t.loc["b", "unpaired_runs"] == 1
    assert t.loc["base", "paired"] == "baseline"


def test_compare_table_errors_name_the_fix():
    with pytest.raises(CompareError, match="available: ndcg_at_5, rmse"):
        compare_table(_hand_runs(), "mae")
    with pytest.raises(CompareError, match="baseline algo 'nope'"):
        compare_table(_hand_runs(), "rmse", baseline="nope", per_task=PER_TASK.__getitem__)
    with pytest.raises(CompareError, match="cannot group by 'colour'"):
        compare_table(_hand_runs(), "rmse", group_by=("colour",))


def test_cli_import_stays_light():
    probe = subprocess.run(
        [sys.executable, "-c", ("import sys, metarec_runner.cli; print(*(m in sys.modules for m in "
                                "('pandas', 'mlflow', 'torch', 'metarec_runner.compare')))")],
        capture_output=True, text=True, check=False, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["False", "False", "False", "False"]
    res = subprocess.run([*METAREC, "compare", "--help"], capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 0 and "--baseline" in res.stdout


# ---------------------------------------------------------------- slow: a real sweep in MLflow

@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory) -> Path:
    """A real sqlite store with one sweep: maml and global, seeds 0 and 1 (4 child runs)."""
    root = tmp_path_factory.mktemp("compare")
    out = root / "outputs"
    res = subprocess.run([*METAREC, "train", "-m", "+algo=maml,global", "seed=0,1", *TINY],
                         cwd=root, env=_env(out), capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _uri(out: Path) -> str:
    return f"sqlite:///{out}/mlflow.db"


def _compare(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*METAREC, "compare", *args], cwd=out.parent, env=_env(out),
                          capture_output=True, text=True, check=False, timeout=300)


@pytest.mark.slow
def test_collect_runs_and_group_by_algo(sweep_store):
    from metarec_runner.compare import collect_runs

    runs = collect_runs(_uri(sweep_store), experiment="train/toy", parent_run_id="latest")
    assert len(runs) == 4 and runs["parent_run_id"].nunique() == 1
    assert sorted(runs["algo"]) == ["global", "global", "maml", "maml"]
    assert sorted(runs["seed"].tolist()) == [0, 0, 1, 1] and runs["split_hash"].nunique() == 1
    assert {"test/rmse", "test/rmse_ci95", "model", "dataset", "split_seed",
            "params.algo._target_"} <= set(runs.columns)
    assert (runs["status"] == "FINISHED").all()
    # the same runs without the sweep filter (the parent run itself is never a row)
    assert len(collect_runs(_uri(sweep_store))) == 4
    table = compare_table(runs, "rmse", group_by=("algo",))
    assert sorted(table["algo"]) == ["global", "maml"]
    assert (table["n_seeds"] == 2).all() and (table["n_runs"] == 2).all()
    for algo, row in table.set_index("algo").iterrows():
        means = runs.loc[runs["algo"] == algo, "test/rmse"].to_numpy()
        assert row["mean"] == pytest.approx(means.mean())
        assert row["ci95"] == pytest.approx(Z_95 * means.std(ddof=1) / math.sqrt(2))


@pytest.mark.slow
def test_paired_difference_matches_hand_computation(sweep_store, tmp_path):
    from mlflow.tracking import MlflowClient

    from metarec_runner.compare import collect_runs

    runs = collect_runs(_uri(sweep_store), parent_run_id="latest")
    table = compare_table(runs, "rmse", baseline="global", cache_dir=tmp_path / "cache")
    maml = table.set_index("algo").loc["maml"]

    client = MlflowClient(_uri(sweep_store))
    diffs = []
    for seed in (0, 1):
        frames = {}
        for algo in ("maml", "global"):
            run_id = runs.loc[(runs["algo"] == algo) & (runs["seed"] == seed), "run_id"].item()
            dst = tmp_path / "mine" / run_id
            dst.mkdir(parents=True)
            frames[algo] = pd.read_csv(client.download_artifacts(run_id, "per_task.csv", str(dst)))
        joined = frames["maml"].merge(frames["global"], on="task_id", suffixes=("_m", "_g"))
        assert len(joined) == len(frames["maml"])  # the same test users
        diffs.append((joined["rmse_m"] - joined["rmse_g"]).to_numpy())
    pooled = np.concatenate(diffs)
    assert maml["paired"] == "yes" and maml["n_paired"] == len(pooled)
    assert maml["diff"] == pytest.approx(pooled.mean(), abs=1e-12)
    assert maml["diff_ci95"] == pytest.approx(Z_95 * pooled.std(ddof=1) / math.sqrt(len(pooled)))
    # the difference of means equals the mean difference here (all tasks paired, no NaNs)
    mean_gap = (runs.loc[runs["algo"] == "maml", "test/rmse"].mean()
                - runs.loc[runs["algo"] == "global", "test/rmse"].mean())
    assert maml["diff"] == pytest.approx(mean_gap, abs=1e-9)
    assert table.set_index("algo").loc["global", "paired"] == "baseline"


@pytest.mark.slow
def test_cli_table_csv_and_errors(sweep_store):
    res = _compare(sweep_store, "--sweep", "latest", "--metric", "rmse", "--baseline", "global")
    assert res.returncode == 0, res.stderr
    assert "maml" in res.stdout and "global" in res.stdout and "Δ vs global" in res.stdout

    res = _compare(sweep_store, "--experiment", "train/toy", "--metric", "ndcg_at_5",
                   "--baseline", "global", "--format", "csv")
    assert res.returncode == 0, res.stderr
    frame = pd.read_csv(io.StringIO(res.stdout))
    assert sorted(frame["algo"]) == ["global", "maml"]
    assert {"n_runs", "n_seeds", "mean", "ci95", "diff", "diff_ci95", "n_paired"} <= set(frame.columns)
    assert frame["mean"].is_monotonic_decreasing  # ndcg: higher is better, best first

    res = _compare(sweep_store, "--sweep", "latest", "--metric", "nope")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "available:" in lines[0]
    assert "rmse" in lines[0] and "mae" in lines[0]

    res = _compare(sweep_store, "--experiment", "no/such")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "unknown experiment 'no/such'" in res.stderr and "train/toy" in res.stderr

    res = _compare(sweep_store, "--experiment", "Default")  # exists, holds no runs
    assert res.returncode == 2 and res.stderr.strip() == "metarec: error: no finished runs in experiment 'Default'"


def test_cli_errors_without_runs(tmp_path):
    out = tmp_path / "empty"
    res = _compare(out)
    assert res.returncode == 2 and "no MLflow store" in res.stderr
    assert not (out / "mlflow.db").exists()  # compare never creates a store
