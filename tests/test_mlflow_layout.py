"""The MLflow layout of a run (metarec_runner.tracking.layout): params against tags, the test
metrics' names, the test table; and a real run in a real store laid out that way."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from metarec_runner.launch.sweep_report import job_line, swept_params
from metarec_runner.tracking import layout

MAX_METRICS = 64  # "about 60": 62 on the default toy run (18 metrics + the noise floor)
NAMES = ["rmse", "mae", "ndcg_at_5", "ndcg_at_10"]


def _summary() -> dict[str, float]:
    """A test summary as the evaluator makes it: means, half-widths, references, a curve."""
    out: dict[str, float] = {}
    for i, m in enumerate([*NAMES, "floor_rmse"]):
        out[f"test/{m}"], out[f"test/{m}_ci95"] = 0.5 + i, 0.01 * (i + 1)
    for m in NAMES[2:]:
        for r in ("random", "constant", "oracle"):
            out[f"test/ref/{r}/{m}"], out[f"test/ref/{r}/{m}_ci95"] = 0.1, 0.02
    out["test/ref/constant/rmse"], out["test/ref/constant/rmse_ci95"] = 1.2, 0.05
    out["test/ref/constant/mae"], out["test/ref/constant/mae_ci95"] = 0.9, 0.04
    for m in NAMES:
        out[f"test_k3/{m}"], out[f"test_k3/{m}_ci95"] = 0.7, 0.1
    out["test_k3/n_dropped"] = 2.0
    return out


def test_machine_paths_are_tags_and_choices_are_params() -> None:
    flat = {"paths.output_root": "/o", "logger.tracking_uri": "sqlite:////o/mlflow.db",
            "logger.artifact_location": "/o/mlartifacts", "dataset.data_dir": "/data",
            "splitter.path": "/o/split.parquet", "algo.inner_lr": 0.05, "seed": 1,
            "algo.check_fast_path": False, "dataset.name": "toy"}
    params, tags = layout.split_params(flat)
    assert set(tags) == {"paths.output_root", "logger.tracking_uri", "logger.artifact_location",
                         "dataset.data_dir", "splitter.path"}
    assert params == {"algo.inner_lr": "0.05", "seed": "1", "algo.check_fast_path": "False", "dataset.name": "toy"}
    choices = {"algo": "fomaml", "model": "melu", "dataset": "toy", "splitter": "user_cold_start",
               "evaluator": "all_unseen", "trainer": "default", "experiment": "None"}
    assert layout.choice_params(choices) == {"algo": "fomaml", "model": "melu", "dataset": "toy",
                                             "splitter": "user_cold_start", "evaluator": "all_unseen"}


def test_test_metrics_move_intervals_and_keep_headline_references() -> None:
    headline = layout.headline_metrics(NAMES, "val/rmse")
    assert headline == ["rmse", "ndcg_at_10"]
    out = layout.test_metrics(_summary(), headline)
    assert {k for k in out if k.startswith("test/")} == {f"test/{m}" for m in [*NAMES, "floor_rmse"]}
    assert {k for k in out if k.startswith("ci95/")} == {f"ci95/test/{m}" for m in NAMES}
    assert out["ci95/test/mae"] == pytest.approx(0.02)
    assert {k for k in out if k.startswith("ref/")} == {"ref/constant/rmse", "ref/random/ndcg_at_10"}
    assert {k for k in out if k.startswith("test_k")} == {"test_k3/rmse", "test_k3/ndcg_at_10"}
    assert not [k for k in out if k.endswith("_ci95") or "/ref/" in k]


def test_headline_follows_the_monitor_and_ranking_only_metrics() -> None:
    assert layout.headline_metrics(NAMES, "val/ndcg_at_5") == ["ndcg_at_5", "rmse", "ndcg_at_10"]
    assert layout.headline_metrics(["ndcg_at_5", "recall_at_5"], "val/ndcg_at_5") == ["ndcg_at_5"]
    assert layout.headline_metrics(["recall_at_5"], None) == ["recall_at_5"]


def test_results_table_fills_oracle_and_constant_for_rating_metrics() -> None:
    table = layout.results_table(_summary(), [*NAMES, "floor_rmse"]).set_index("metric")
    assert list(table.columns) == ["mean", "ci95", "random", "constant", "oracle"]
    assert table.loc["rmse", "oracle"] == 0.0 and table.loc["mae", "oracle"] == 0.0
    assert table.loc["rmse", "constant"] == 1.2 and table.loc["mae", "constant"] == 0.9
    assert math.isnan(table.loc["rmse", "random"])  # random scores are no rating predictions
    assert math.isnan(table.loc["floor_rmse", "oracle"])
    assert table.loc["ndcg_at_10", "ci95"] == pytest.approx(0.04)


def test_epoch_metrics_leave_intervals_and_constants_in_the_history() -> None:
    row = {"train/loss": 1.0, "sys/sec_per_outer_step": 0.1, "sys/train_tasks_per_sec": 9.0,
           "val/rmse": 1.0, "val/rmse_ci95": 0.1, "val/floor_rmse": 0.4, "val/floor_rmse_ci95": 0.01}
    assert layout.epoch_metrics(row) == {"train/loss": 1.0, "sys/train_tasks_per_sec": 9.0, "val/rmse": 1.0}


def test_swept_params_are_the_sweep_overrides_and_the_search_space() -> None:
    swept = swept_params(["+algo=maml,global", "seed=0,1", "dataset.n_users=120", "hydra/launcher=joblib"],
                         {"algo.inner_lr": "tag(log, interval(1e-4, 1e-1))", "threads": "1"})
    assert swept == {"algo": "maml,global", "seed": "0,1", "algo.inner_lr": "tag(log, interval(1e-4, 1e-1))"}


def test_job_line_names_the_result_or_the_error(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"best_epoch": 3, "best_val/rmse": 0.91, "test/rmse": 0.9, "test/rmse_ci95": 0.05}))
    line = job_line(2, "maml-melu-toy-s1", tmp_path, None, 12.34, "abc123")
    assert line == ("job 2 maml-melu-toy-s1: test/rmse=0.9000 ±0.0500  best epoch 3 (val/rmse=0.9100)  "
                    "run abc123  12.3 s")
    failed = job_line(0, "x", tmp_path / "absent", ValueError("algo.inner_lr: must be > 0\nmore"), 1.0)
    assert failed == "job 0 x: FAILED (algo.inner_lr: must be > 0)  1.0 s"


# ---------------------------------------------------------------- a real run in a real store

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from metarec_runner.run import compose, train

    store = tmp_path_factory.mktemp("layout")
    uri = f"sqlite:///{store}/mlflow.db"
    result = train(compose("+algo=fomaml", "dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=1",
                           "trainer.progress=false", "logger.log_model=false", f"logger.tracking_uri={uri}",
                           output_dir=store / "run"))
    client = MlflowClient(uri)
    return client, client.get_run(result.run_id), store


def test_a_run_has_choice_params_path_tags_and_few_metrics(run) -> None:
    _, found, _ = run
    params, tags, metrics = found.data.params, found.data.tags, found.data.metrics
    assert params["algo"] == "fomaml" and params["model"] == "melu" and params["evaluator"] == "all_unseen"
    assert params["algo._target_"] == "metarec_runner.algos.maml.MAML"  # the same class as maml: the choice tells
    assert not [k for k in params if k.startswith("paths.") or k in ("logger.tracking_uri", "logger.artifact_location")]
    assert tags["logger.tracking_uri"].startswith("sqlite:///") and "paths.output_root" in tags
    assert len(metrics) <= MAX_METRICS, sorted(metrics)
    assert "test/rmse" in metrics and "ci95/test/rmse" in metrics and "ref/constant/rmse" in metrics
    assert not [k for k in metrics if k.endswith("_ci95") or k.startswith("test/ref/")]


def test_a_run_logs_its_test_table_and_dataset(run, tmp_path: Path) -> None:
    client, found, _ = run
    names = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"test_metrics.json", "test_metrics.csv"} <= names
    table = pd.read_csv(client.download_artifacts(found.info.run_id, "test_metrics.csv", str(tmp_path)))
    row = table.set_index("metric").loc["rmse"]
    assert row["mean"] == pytest.approx(found.data.metrics["test/rmse"])
    assert row["constant"] == pytest.approx(found.data.metrics["ref/constant/rmse"]) and row["oracle"] == 0.0
    (entry,) = found.inputs.dataset_inputs
    assert entry.dataset.name == "toy" and entry.dataset.digest == found.data.tags["data_checksum"]
    assert json.loads(entry.dataset.profile)["users"] == 120
    input_tags = {t.key: t.value for t in entry.tags}
    assert input_tags["mlflow.data.context"] == "user_cold_start"
    assert input_tags["split_hash"] == found.data.tags["split_hash"]
