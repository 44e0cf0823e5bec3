"""Runner behaviour: reproducible on CPU, seeds separated from tasks, divergence fails the run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from metarec_runner.runner import Runner
from tests.helpers import compose, fit_test

TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=3", "trainer.progress=false"]


def _fit_test(*overrides: str):
    return fit_test(compose("logger=none", *TINY, *overrides))


def _numbers(metrics: dict) -> dict:
    """Metrics minus wall-clock timings, NaN made comparable."""
    return {k: ("nan" if v != v else v) for k, v in metrics.items() if not k.startswith("sys/")}


def test_same_seeds_same_numbers_other_seed_same_tasks():
    a_prep, a_fit, a = _fit_test("+algo=maml", "seed=1")
    b_prep, b_fit, b = _fit_test("+algo=maml", "seed=1")
    c_prep, c_fit, c = _fit_test("+algo=maml", "seed=2")
    assert _numbers(a.summary) == _numbers(b.summary)
    assert [_numbers(h) for h in a_fit.history] == [_numbers(h) for h in b_fit.history]
    assert a_prep.splits.split_hash == c_prep.splits.split_hash  # seed does not touch tasks
    assert a.summary["test/rmse"] != c.summary["test/rmse"]
    d_prep, _, _ = _fit_test("+algo=maml", "seed=1", "split_seed=5")
    assert d_prep.splits.split_hash != a_prep.splits.split_hash


def test_model_is_restored_to_its_best_validation_epoch():
    prep, fit, result = _fit_test("+algo=global", "trainer.max_epochs=6")
    vals = [h["val/rmse"] for h in fit.history]
    assert fit.best_value == min(vals) and fit.best_epoch == vals.index(min(vals)) + 1
    again = prep.evaluator.evaluate(prep.algo, prep.splits.val, "val", prep.device)
    assert again.summary["val/rmse"] == pytest.approx(fit.best_value, abs=1e-6)


def test_early_stopping_respects_patience():
    _, fit, _ = _fit_test("+algo=global", "trainer.max_epochs=30", "trainer.patience=0",
                          "algo.meta_optimizer.lr=0.05")
    assert fit.stopped_early and len(fit.history) < 30
    assert len(fit.history) == fit.best_epoch + 1
    _, fit, _ = _fit_test("+algo=global", "trainer.max_epochs=30", "trainer.patience=2",
                          "algo.meta_optimizer.lr=0.05")
    assert fit.stopped_early and len(fit.history) == fit.best_epoch + 2  # two epochs without gain


@pytest.mark.slow
def test_divergence_fails_the_run_in_mlflow(tmp_path):
    out = tmp_path / "outputs"
    res = subprocess.run([sys.executable, "-m", "metarec_runner.cli", "train", "+algo=maml",
                          "algo.inner_lr=1000", *TINY], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "METAREC_OUTPUT_DIR": str(out)}, timeout=300)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("metarec: error: train/loss became nan")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("train/toy").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "nan" in runs[0].data.tags["error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu_within_tolerance():
    _, _, cpu = _fit_test("+algo=maml", "device=cpu", "dtype=float64")
    _, _, gpu = _fit_test("+algo=maml", "device=cuda", "dtype=float64")
    assert gpu.summary["test/rmse"] == pytest.approx(cpu.summary["test/rmse"], abs=1e-6)


class _ScriptedAlgo:
    """An 'algorithm' whose state is the number of meta-steps taken, so the restored state
    names the epoch that model selection kept."""

    fits_once = False

    def __init__(self, steps_per_epoch: int) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.steps = 0
        self.steps_per_epoch = steps_per_epoch

    def meta_step(self, batch) -> dict[str, float]:
        self.steps += 1
        return {"loss": 1.0}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


class _ScriptedEvaluator:
    """Validation results that improve on NDCG every epoch while RMSE is best at epoch 2."""

    NDCG = [0.36, 0.41, 0.47, 0.52, 0.56]
    RMSE = [1.10, 0.80, 0.90, 0.95, 0.99]

    def __init__(self) -> None:
        self.calls = 0

    def evaluate(self, algo, tasks, split, device):
        epoch = self.calls
        self.calls += 1

        class Result:
            summary = {"val/ndcg_at_10": self.NDCG[epoch], "val/rmse": self.RMSE[epoch]}

        return Result()


@pytest.mark.parametrize("monitor, best_epoch", [("val/ndcg_at_10", 5), ("val/rmse", 2)])
def test_model_selection_follows_the_metrics_declared_direction(monitor, best_epoch):
    """ndcg improves every epoch: the last epoch is kept; rmse is lowest at epoch 2: that one."""
    from metarec_runner.runner import TrainerConfig
    from metarec_runner.tasks.taskset import TaskSet

    tasks = TaskSet(torch.arange(4), torch.zeros(4, 2, dtype=torch.long), torch.ones(4),
                    torch.arange(5), torch.zeros(4, 2, dtype=torch.long), torch.ones(4), torch.arange(5))
    algo = _ScriptedAlgo(steps_per_epoch=1)
    config = TrainerConfig(max_epochs=5, meta_batch_size=4, monitor=monitor, patience=5, progress=False)
    runner = Runner(algo, _ScriptedEvaluator(), _NullTracker(), config, torch.device("cpu"), 0,
                    console=Console(quiet=True))
    fit = runner.fit(tasks, tasks)
    assert fit.best_epoch == best_epoch
    assert algo.steps == best_epoch  # the kept state is that epoch's
    scripted = _ScriptedEvaluator.NDCG if "ndcg" in monitor else _ScriptedEvaluator.RMSE
    assert fit.best_value == scripted[best_epoch - 1]


def test_monitor_mode_that_contradicts_the_metric_is_refused():
    from metarec_runner.errors import ConfigError
    from metarec_runner.runner import TrainerConfig

    with pytest.raises(ConfigError, match=r"trainer.monitor_mode: min contradicts trainer.monitor="
                                          r"val/ndcg_at_10 \(higher is better\).*set it to max"):
        TrainerConfig(monitor="val/ndcg_at_10", monitor_mode="min")
    assert TrainerConfig(monitor="val/ndcg_at_10", monitor_mode="max").mode == "max"
    assert TrainerConfig(monitor="val/mae").mode == "min"
    with pytest.raises(ConfigError, match="trainer.monitor: 'val/nope' is not a metric"):
        TrainerConfig(monitor="val/nope")


class _NullTracker:
    def log_metrics(self, metrics, step):
        pass

    def flush(self):
        pass
