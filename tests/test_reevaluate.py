"""``metarec evaluate``: a saved model re-scored without retraining, logged as a child run."""

from __future__ import annotations

import pytest
from rich.console import Console

from metarec_runner.checkpoint import CheckpointError
from metarec_runner.errors import ConfigError, MetarecError
from metarec_runner.reevaluate import evaluate_saved
from metarec_runner.run import compose, train

TINY = ("dataset.n_users=120", "dataset.n_items=80", "trainer.progress=false", "trainer.max_epochs=2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store}/mlflow.db"
    result = train(compose("+algo=maml", *TINY, f"logger.tracking_uri={uri}", output_dir=store / "run"))
    return result, uri


def test_same_protocol_reproduces_the_test_metrics_exactly(trained):
    result, uri = trained
    again = evaluate_saved(result.run_id, [], uri, console=Console(quiet=True))
    assert {k: v for k, v in again.summary.items()} == result.test


def test_another_protocol_is_a_child_run_of_the_original(trained):
    from mlflow.tracking import MlflowClient

    result, uri = trained
    overrides = ["evaluator=sampled", "evaluator.n_negatives=20", "evaluator.shots=[0,3]"]
    again = evaluate_saved(result.run_id, overrides, uri, console=Console(quiet=True))
    child = MlflowClient(uri).get_run(again.run_id)
    assert child.data.tags["mlflow.parentRunId"] == result.run_id
    assert child.info.status == "FINISHED"
    assert child.data.params["evaluator.protocol"] == "sampled"
    assert "test/ndcg_at_10" in child.data.metrics and "test_k0/ndcg_at_10" in child.data.metrics
    assert (again.output_dir / "few_shot.csv").is_file()
    assert again.summary["test/rmse"] == result.test["test/rmse"]  # the same model on the same queries


def test_bad_runs_and_overrides_are_one_line(trained, tmp_path):
    result, uri = trained
    with pytest.raises(ConfigError, match=r"model\.embedding_dim: metarec evaluate changes only evaluator"):
        evaluate_saved(result.run_id, ["model.embedding_dim=8"], uri)
    with pytest.raises(MetarecError, match="--run 'nope': no such file or folder, and not an MLflow run id"):
        evaluate_saved("nope", [], uri)
    with pytest.raises(MetarecError, match="no such run in"):
        evaluate_saved("0123456789abcdef0123456789abcdef", [], uri)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        evaluate_saved(str(tmp_path / "absent.pt"), [], uri)
