"""``metarec compare``: runs collected from a real MLflow store, t-intervals over distinct seeds,
paired differences over distinct users, one-seed tables without an interval."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from metarec_runner.evaluate.metric_specs import lower_is_better
from metarec_runner.evaluate.stats import NO_INTERVAL_ONE_SEED
from metarec_runner.report.compare import compare_table
from metarec_runner.report.store import CompareError
from tests.helpers import METAREC, metarec_env

TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=2", "trainer.progress=false"]


def _t_half(values) -> float:
    """scipy's 95% Student's t half-width of the mean of ``values``."""
    values = np.asarray(values, dtype=float)
    lo, hi = sps.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=sps.sem(values))
    return (hi - lo) / 2


# ---------------------------------------------------------------- fast: no MLflow, no subprocess

def _hand_runs() -> pd.DataFrame:
    """Five runs: a (3 seeds), b (1 seed), base (2 seeds); b's split has no baseline partner."""
    return pd.DataFrame({
        "run_id": ["a0", "a1", "a2", "b0", "base0", "base1"],
        "algo": ["a", "a", "a", "b", "base", "base"],
        "seed": pd.array([0, 1, 2, 0, 0, 1], dtype="Int64"),
        "split_hash": ["h1", "h1", "h1", "h2", "h1", "h1"],
        "test/rmse": [1.0, 1.2, 1.4, 0.9, 1.5, 1.7],
        "ci95/test/rmse": [0.1, 0.1, 0.1, 0.05, 0.2, 0.2],
        "test/ndcg_at_5": [0.5, 0.6, 0.7, 0.8, 0.4, 0.4],
    })


PER_TASK = {  # task 3 is missing from a0: only common tasks pair
    "a0": pd.DataFrame({"task_id": [1, 2], "rmse": [1.0, 2.0]}),
    "a1": pd.DataFrame({"task_id": [1, 2, 3], "rmse": [1.5, 2.5, 0.5]}),
    "a2": pd.DataFrame({"task_id": [1, 2, 3], "rmse": [0.0, 0.0, 0.0]}),
    "base0": pd.DataFrame({"task_id": [1, 2, 3], "rmse": [2.0, 2.0, 2.0]}),
    "base1": pd.DataFrame({"task_id": [1, 2, 3], "rmse": [1.0, 3.0, 1.0]}),
}


def test_compare_table_t_interval_over_distinct_seeds():
    table = compare_table(_hand_runs(), "rmse")
    assert list(table["algo"]) == ["b", "a", "base"]  # rmse: lower first
    a = table.set_index("algo").loc["a"]
    assert a["n_runs"] == 3 and a["n_seeds"] == 3 and a["ci_over"] == "seeds"
    assert a["mean"] == pytest.approx(1.2)
    assert a["ci95"] == pytest.approx(_t_half([1.0, 1.2, 1.4]))
    assert a["ci95"] == pytest.approx(sps.t.ppf(0.975, 2) * 0.2 / math.sqrt(3))
    base = table.set_index("algo").loc["base"]
    assert base["ci95"] == pytest.approx(12.7062 * np.std([1.5, 1.7], ddof=1) / math.sqrt(2), rel=1e-4)
    # one distinct seed: no interval over seeds (not the run's own interval over tasks, not 0)
    b = table.set_index("algo").loc["b"]
    assert b["n_runs"] == 1 and b["n_seeds"] == 1 and b["ci_over"] == "one seed"
    assert math.isnan(b["ci95"])
    # higher is better for ndcg: descending (the declared direction, metric_specs)
    assert list(compare_table(_hand_runs(), "test/ndcg_at_5")["algo"]) == ["b", "a", "base"]
    assert lower_is_better("rmse") and lower_is_better("floor_rmse") and not lower_is_better("ndcg_at_5")
    assert lower_is_better("ref/random/mae") and not lower_is_better("test/auc")


def test_same_seed_twice_is_one_seed():
    runs = _hand_runs()
    runs.loc[runs["run_id"] == "base1", "seed"] = 0  # base: seed 0 twice
    base = compare_table(runs, "rmse").set_index("algo").loc["base"]
    assert base["n_runs"] == 2 and base["n_seeds"] == 1 and math.isnan(base["ci95"])
    assert base["mean"] == pytest.approx(1.6) and base["ci_over"] == "one seed"
    # a split seed is a seed too: the same seed on two splits is two replicates
    runs.loc[runs["run_id"] == "base1", "split_hash"] = "h9"
    assert compare_table(runs, "rmse").set_index("algo").loc["base", "n_seeds"] == 2


def test_compare_table_paired_difference_over_distinct_users():
    table = compare_table(_hand_runs(), "rmse", baseline="base", per_task=PER_TASK.__getitem__)
    t = table.set_index("algo")
    # each user averaged over the seeds on each side, then the difference per user
    own = {1: np.mean([1.0, 1.5, 0.0]), 2: np.mean([2.0, 2.5, 0.0]), 3: np.mean([0.5, 0.0])}
    base = {1: np.mean([2.0, 1.0]), 2: np.mean([2.0, 3.0]), 3: np.mean([2.0, 1.0])}
    per_user = np.array([own[u] - base[u] for u in (1, 2, 3)])
    assert t.loc["a", "n_users"] == 3 and t.loc["a", "n_seeds_paired"] == 3  # not 8 (run, task) pairs
    assert t.loc["a", "diff"] == pytest.approx(per_user.mean())
    assert t.loc["a", "diff_ci95"] == pytest.approx(_t_half(per_user))
    assert t.loc["a", "diff_ci_lo"] == pytest.approx(per_user.mean() - _t_half(per_user))
    assert t.loc["a", "paired"] == "yes" and t.loc["a", "unpaired_runs"] == 0
    # b's split_hash h2 has no baseline run: reported as not paired, never compared
    assert t.loc["b", "paired"] == "no" and t.loc["b", "n_users"] == 0 and math.isnan(t.loc["b", "diff"])
    assert t.loc["b", "unpaired_runs"] == 1
    assert t.loc["base", "paired"] == "baseline"
    # the bootstrap over users stays available
    boot = compare_table(_hand_runs(), "rmse", baseline="base", per_task=PER_TASK.__getitem__,
                         ci="bootstrap").set_index("algo").loc["a"]
    assert boot["diff"] == pytest.approx(per_user.mean()) and boot["n_users"] == 3
    assert boot["diff_ci_lo"] <= boot["diff"] <= boot["diff_ci_hi"]
    with pytest.raises(CompareError, match="ci must be one of"):
        compare_table(_hand_runs(), "rmse", ci="normal")


def test_paired_users_are_qualified_by_the_data_checksum():
    """Two split seeds of generated data: task 1 of one split is not task 1 of the other."""
    runs = pd.DataFrame({
        "run_id": ["a0", "a1", "g0", "g1"], "algo": ["a", "a", "g", "g"],
        "seed": pd.array([0, 0, 0, 0], dtype="Int64"), "split_hash": ["s0", "s1", "s0", "s1"],
        "tags.data_checksum": ["c0", "c1", "c0", "c1"], "test/rmse": [1.0, 1.0, 1.5, 1.5]})
    frames = {rid: pd.DataFrame({"task_id": [1, 2], "rmse": [v, v]})
              for rid, v in (("a0", 1.0), ("a1", 2.0), ("g0", 1.5), ("g1", 1.5))}
    row = compare_table(runs, "rmse", baseline="g", per_task=frames.__getitem__).set_index("algo").loc["a"]
    assert row["n_users"] == 4 and row["n_seeds_paired"] == 2
    runs["tags.data_checksum"] = "same"  # the same data: the same two users, their pairs averaged
    row = compare_table(runs, "rmse", baseline="g", per_task=frames.__getitem__).set_index("algo").loc["a"]
    assert row["n_users"] == 2 and row["diff"] == pytest.approx(0.0)
    runs.loc[runs["run_id"] == "g1", "tags.data_checksum"] = None  # a run without the tag still pairs
    row = compare_table(runs, "rmse", baseline="g", per_task=frames.__getitem__).set_index("algo").loc["a"]
    assert row["n_users"] == 2 and row["n_seeds_paired"] == 2


def test_one_seed_table_prints_no_interval_and_says_why(capsys):
    from metarec_runner.cli.compare import _print_table

    runs = _hand_runs()
    runs = runs[runs["run_id"].isin(["a0", "b0", "base0"])]
    table = compare_table(runs, "rmse", baseline="base", per_task=PER_TASK.__getitem__)
    assert (table["n_seeds"] == 1).all() and table["ci95"].isna().all()
    _print_table(table, runs, None)
    out = capsys.readouterr().out
    assert NO_INTERVAL_ONE_SEED in out
    assert "none: 1 seed" in out and "0.0000" not in out  # no interval of 0 printed
    a_line = next(line for line in out.splitlines() if line.startswith("│ a "))
    assert "2 users (1 seed averaged)" in a_line


def test_shots_table_pairs_each_user_at_the_same_k():
    """Two algos x 2 seeds evaluated at k = 0 and 3 and the full support: one row per (k, algo),
    the baseline paired at the same k, users averaged over seeds (hand-computed)."""
    from metarec_runner.report.compare import shots_table

    runs = pd.DataFrame({
        "run_id": ["m0", "m1", "p0", "p1"], "algo": ["m", "m", "pop", "pop"],
        "seed": pd.array([0, 1, 0, 1], dtype="Int64"), "split_hash": ["h"] * 4,
        "test/ndcg_at_10": [0.5, 0.7, 0.2, 0.2],
        "test_k0/ndcg_at_10": [0.1, 0.1, 0.2, 0.2],
        "test_k3/ndcg_at_10": [0.3, 0.5, 0.2, 0.2],
    })
    main = {"m0": [0.4, 0.6], "m1": [0.6, 0.8], "p0": [0.2, 0.2], "p1": [0.2, 0.2]}
    shot = {"m0": {0: [0.1, 0.1], 3: [0.2, 0.4]}, "m1": {0: [0.1, 0.1], 3: [0.4, 0.6]},
            "p0": {0: [0.2, 0.2], 3: [0.2, 0.2]}, "p1": {0: [0.2, 0.2], 3: [0.2, 0.2]}}

    def per_task(run_id, name="per_task.csv"):
        if name == "per_task.csv":
            return pd.DataFrame({"task_id": [1, 2], "ndcg_at_10": main[run_id]})
        rows = [(k, t, v) for k, values in shot[run_id].items() for t, v in zip((1, 2), values, strict=True)]
        return pd.DataFrame(rows, columns=["shots", "task_id", "ndcg_at_10"])

    table = shots_table(runs, "ndcg_at_10", baseline="pop", per_task=per_task)
    assert table[["k", "algo"]].values.tolist() == [
        ["0", "pop"], ["0", "m"], ["3", "m"], ["3", "pop"], ["all", "m"], ["all", "pop"]]
    m = table[table["algo"] == "m"].set_index("k")
    # k=3: user 1 (0.2+0.4)/2 - 0.2 = 0.1, user 2 (0.4+0.6)/2 - 0.2 = 0.3: mean 0.2 over 2 users
    assert m.loc["3", "diff"] == pytest.approx(0.2) and m.loc["3", "n_users"] == 2
    assert m.loc["0", "diff"] == pytest.approx(-0.1)
    assert m.loc["all", "diff"] == pytest.approx(0.4)  # (0.5 - 0.2 + 0.7 - 0.2) / 2
    assert m.loc["3", "mean"] == pytest.approx(0.4) and m.loc["3", "n_seeds"] == 2


def test_shots_of_a_metric_mlflow_does_not_hold_come_from_the_per_user_tables():
    """MLflow holds the headline metrics at each k (test_k<k>/rmse); any other metric at k is the
    mean over the run's users at k in its few_shot_per_task.csv (NaN users left out)."""
    from metarec_runner.report.compare import expand_shots, has_shots, shots_table

    runs = pd.DataFrame({
        "run_id": ["m0", "p0", "x0"], "algo": ["m", "pop", "x"], "seed": pd.array([0, 0, 0], dtype="Int64"),
        "split_hash": ["h"] * 3, "test/recall_at_5": [0.5, 0.2, 0.3], "test_k0/rmse": [1.0, 1.1, math.nan],
        "params.evaluator.shots": ["[0, 3]", "[0, 3]", "[]"]})
    shot = {"m0": {0: [0.1, math.nan], 3: [0.2, 0.4]}, "p0": {0: [0.2, 0.2], 3: [0.1, 0.3]}}
    asked = []

    def per_task(run_id, name="per_task.csv"):
        asked.append((run_id, name))
        assert name == "few_shot_per_task.csv"
        rows = [(k, t, v) for k, values in shot[run_id].items() for t, v in zip((1, 2), values, strict=True)]
        return pd.DataFrame(rows, columns=["shots", "task_id", "recall_at_5"])

    assert has_shots(runs) and has_shots(runs, "recall_at_5") and not has_shots(runs.drop(columns=[
        "params.evaluator.shots", "test_k0/rmse"]))
    expanded = expand_shots(runs, "recall_at_5", per_task).set_index("run_id")
    assert expanded.loc["m0@0", "test/recall_at_5"] == pytest.approx(0.1)  # the NaN user left out
    assert expanded.loc["m0@3", "test/recall_at_5"] == pytest.approx(0.3)
    assert expanded.loc["x0", "k"] == "all" and "x0@0" not in expanded.index  # no shots: not read
    assert ("x0", "few_shot_per_task.csv") not in asked
    logged = expand_shots(runs, "rmse").set_index("run_id")  # the logged headline: no table read
    assert logged.loc["p0@0", "test/rmse"] == pytest.approx(1.1)
    table = shots_table(runs, "recall_at_5", per_task=per_task)
    assert table[["k", "algo"]].values.tolist() == [["0", "pop"], ["0", "m"], ["3", "m"], ["3", "pop"],
                                                   ["all", "m"], ["all", "x"], ["all", "pop"]]


def test_print_compare_table_on_any_console():
    from rich.console import Console

    from metarec_runner.report.tables import print_compare_table

    runs = _hand_runs()
    console = Console(record=True, width=200)
    print_compare_table(console, compare_table(runs, "rmse"), runs, "a note")
    text = console.export_text()
    assert "test/rmse (lower is better), 6 runs" in text and "a note" in text
    assert text.index("│ b ") < text.index("│ a ") < text.index("│ base ")


def test_compare_table_errors_name_the_fix():
    with pytest.raises(CompareError, match="available: ndcg_at_5, rmse"):
        compare_table(_hand_runs(), "mae")
    with pytest.raises(CompareError, match="baseline algo 'nope'"):
        compare_table(_hand_runs(), "rmse", baseline="nope", per_task=PER_TASK.__getitem__)
    with pytest.raises(CompareError, match="cannot group by 'colour'"):
        compare_table(_hand_runs(), "rmse", group_by=("colour",))


@pytest.mark.slow
def test_cli_import_stays_light():
    probe = subprocess.run(
        [sys.executable, "-c", ("import sys, metarec_runner.cli; print(*(m in sys.modules for m in "
                                "('pandas', 'mlflow', 'torch', 'metarec_runner.report.compare')))")],
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
    res = subprocess.run([*METAREC, "train", "-m", "+algo=maml,global", "seed=0,1", "evaluator.shots=[0,2]", *TINY],
                         cwd=root, env=metarec_env(out), capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _uri(out: Path) -> str:
    return f"sqlite:///{out}/mlflow.db"


def _compare(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*METAREC, "compare", *args], cwd=out.parent, env=metarec_env(out),
                          capture_output=True, text=True, check=False, timeout=300)


@pytest.mark.slow
def test_collect_runs_and_group_by_algo(sweep_store):
    from metarec_runner.report.store import collect_runs

    runs = collect_runs(_uri(sweep_store), experiment="train/toy", parent_run_id="latest")
    assert len(runs) == 4 and runs["parent_run_id"].nunique() == 1
    assert sorted(runs["algo"]) == ["global", "global", "maml", "maml"]
    assert sorted(runs["seed"].tolist()) == [0, 0, 1, 1] and runs["split_hash"].nunique() == 1
    assert {"test/rmse", "ci95/test/rmse", "ref/constant/rmse", "model", "dataset", "split_seed",
            "params.algo._target_", "params.algo"} <= set(runs.columns)
    assert not [c for c in runs.columns if c.startswith("test/ref/") or c.endswith("_ci95")]
    assert (runs["status"] == "FINISHED").all()
    # the same runs without the sweep filter (the parent run itself is never a row)
    assert len(collect_runs(_uri(sweep_store))) == 4
    table = compare_table(runs, "rmse", group_by=("algo",))
    assert sorted(table["algo"]) == ["global", "maml"]
    assert (table["n_seeds"] == 2).all() and (table["n_runs"] == 2).all()
    for algo, row in table.set_index("algo").iterrows():
        means = runs.loc[runs["algo"] == algo, "test/rmse"].to_numpy()
        assert row["mean"] == pytest.approx(means.mean())
        assert row["ci95"] == pytest.approx(_t_half(means))  # t with 1 df: 12.71, not 1.96


@pytest.mark.slow
def test_paired_difference_matches_hand_computation(sweep_store, tmp_path):
    from mlflow.tracking import MlflowClient

    from metarec_runner.report.store import collect_runs

    runs = collect_runs(_uri(sweep_store), parent_run_id="latest")
    table = compare_table(runs, "rmse", baseline="global", cache_dir=tmp_path / "cache")
    maml = table.set_index("algo").loc["maml"]

    client = MlflowClient(_uri(sweep_store))
    frames = {}
    for algo in ("maml", "global"):
        for seed in (0, 1):
            run_id = runs.loc[(runs["algo"] == algo) & (runs["seed"] == seed), "run_id"].item()
            dst = tmp_path / "mine" / run_id
            dst.mkdir(parents=True)
            frames[algo, seed] = pd.read_csv(client.download_artifacts(run_id, "per_task.csv", str(dst)))
    users = frames["maml", 0]["task_id"].to_numpy()
    for key, frame in frames.items():  # the same test users in every run
        assert sorted(frame["task_id"]) == sorted(users), key

    def over_seeds(algo: str) -> pd.Series:
        return pd.concat([frames[algo, s].set_index("task_id")["rmse"] for s in (0, 1)],
                         axis=1).mean(axis=1)

    per_user = (over_seeds("maml") - over_seeds("global")).to_numpy()
    assert maml["paired"] == "yes" and maml["n_users"] == len(users) and maml["n_seeds_paired"] == 2
    assert maml["diff"] == pytest.approx(per_user.mean(), abs=1e-12)
    assert maml["diff_ci95"] == pytest.approx(_t_half(per_user))
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
    assert {"n_runs", "n_seeds", "mean", "ci95", "diff", "diff_ci95", "n_users"} <= set(frame.columns)
    assert "n_paired" not in frame.columns
    assert frame["mean"].is_monotonic_decreasing  # ndcg: higher is better, best first
    maml = frame.set_index("algo").loc["maml"]
    assert maml["n_seeds"] == 2 and maml["n_seeds_paired"] == 2
    per_seed = pd.read_csv(io.StringIO(_compare(
        sweep_store, "--sweep", "latest", "--metric", "ndcg_at_5", "--by", "algo,seed",
        "--baseline", "global", "--format", "csv").stdout)).set_index(["algo", "seed"])
    # 2 seeds x U users: U distinct users, the same U as one seed alone pairs
    assert maml["n_users"] == per_seed.loc[("maml", 0), "n_users"] == per_seed.loc[("maml", 1), "n_users"]

    # grouped by seed too: one distinct seed per group, no interval, and the reason says so
    res = _compare(sweep_store, "--sweep", "latest", "--by", "algo,seed", "--baseline", "global")
    assert res.returncode == 0, res.stderr
    assert NO_INTERVAL_ONE_SEED in res.stdout and "none: 1 seed" in res.stdout
    res = _compare(sweep_store, "--sweep", "latest", "--by", "algo,seed", "--format", "csv")
    assert res.returncode == 0 and NO_INTERVAL_ONE_SEED in res.stderr
    assert pd.read_csv(io.StringIO(res.stdout))["ci95"].isna().all()

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


@pytest.mark.slow
def test_cli_shots_read_every_metric_at_every_k(sweep_store):
    """`--shots` for a metric MLflow holds at each k (rmse) and for one only the per-user
    few-shot tables hold (recall_at_5): one row per (k, algo), the baseline paired at each k."""
    for metric in ("rmse", "recall_at_5"):
        res = _compare(sweep_store, "--sweep", "latest", "--shots", "--metric", metric, "--baseline", "global",
                       "--format", "csv")
        assert res.returncode == 0, res.stderr
        frame = pd.read_csv(io.StringIO(res.stdout), dtype={"k": str})
        assert sorted(set(frame["k"])) == ["0", "2", "all"]
        assert (frame.groupby("k")["algo"].apply(sorted) == pd.Series({"0": ["global", "maml"]} | {
            k: ["global", "maml"] for k in ("2", "all")})).all()
        maml = frame[frame["algo"] == "maml"].set_index("k")
        assert (maml["n_seeds"] == 2).all() and (maml["paired"] == "yes").all()


@pytest.mark.slow
def test_cli_errors_without_runs(tmp_path):
    out = tmp_path / "empty"
    res = _compare(out)
    assert res.returncode == 2 and "no MLflow store" in res.stderr
    assert not (out / "mlflow.db").exists()  # compare never creates a store


@pytest.mark.slow
def test_runs_that_scored_no_test_users_are_left_out_with_a_warning(tmp_path: Path) -> None:
    """A study's experiment may also hold its tuning trials (evaluate_test=false): compare
    leaves them out, says so, and compares the runs that were tested; with only untested runs it
    fails with one line that says why."""
    out = tmp_path / "outputs"
    for extra in (["seed=0"], ["seed=1", "evaluate_test=false"]):
        res = subprocess.run([*METAREC, "train", "+algo=popularity", *extra, *TINY], cwd=tmp_path,
                             env=metarec_env(out), capture_output=True, text=True, check=False, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    res = _compare(out, "--experiment", "train/toy", "--metric", "ndcg_at_10", "--format", "csv")
    assert res.returncode == 0, res.stderr
    assert "1 of 2 finished runs scored no test users (evaluate_test=false" in res.stderr
    table = pd.read_csv(io.StringIO(res.stdout))
    assert table["n_runs"].tolist() == [1]
    from metarec_runner.report.store import collect_runs, without_untested

    runs = collect_runs(f"sqlite:///{out}/mlflow.db", experiment="train/toy")
    kept, line = without_untested(runs)
    assert len(runs) == 2 and len(kept) == 1 and kept["seed"].tolist() == [0] and line
    assert without_untested(runs[runs["seed"] == 1])[0].empty
