"""Builders the test modules share: the composed project config, a tiny preference model and
float64 meta-batches of random tasks, a quiet fit-then-test of a composed config, and the
command and environment of a ``metarec`` child process.

Import them with ``from tests.helpers import ...``; conftest.py re-exports them and wraps
:func:`compose` as the ``compose_cfg`` fixture.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig
from rich.console import Console

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.models.preference import PreferenceEstimator
from metarec_runner.paths import conf_dir
from metarec_runner.run import Prepared
from metarec_runner.runner import Runner
from metarec_runner.tasks.synthetic import random_taskset
from metarec_runner.tasks.taskset import TaskBatch

SMALL_SCHEMA = FeatureSchema(("a", "b", "c", "user_id", "item_id"), (3, 5, 7, 20, 30))
METAREC = [sys.executable, "-m", "metarec_runner.cli"]  # `metarec`, run by this interpreter


def compose(*overrides: str, hydra: bool = False) -> DictConfig:
    """The project's ``config`` with ``overrides``, as ``metarec train`` composes it (nothing is
    built or run). ``hydra=True`` keeps the ``hydra`` node (launcher, sweeper, callbacks)."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides),
                             return_hydra_config=hydra)


def tiny_model(seed: int = 0, *, schema: FeatureSchema = SMALL_SCHEMA, embedding_dim: int = 4,
               hidden: tuple[int, ...] = (8, 6)) -> PreferenceEstimator:
    """A float64 MeLU-style preference estimator, seeded (rating mean 3)."""
    torch.manual_seed(seed)
    return PreferenceEstimator(schema, embedding_dim=embedding_dim, hidden=hidden,
                               rating_mean=3.0).double()


def binarize(batch: TaskBatch) -> TaskBatch:
    """``batch`` with 0/1 labels (rating > 3 is 1); padded rows stay 0."""
    return dataclasses.replace(batch, support_y=(batch.support_y > 3).double() * batch.support_mask,
                               query_y=(batch.query_y > 3).double() * batch.query_mask)


def tiny_batch(n_tasks: int = 6, seed: int = 1, *, schema: FeatureSchema = SMALL_SCHEMA,
               support: tuple[int, int] = (2, 9), query: tuple[int, int] = (1, 5),
               binary: bool = False) -> TaskBatch:
    """All ``n_tasks`` random tasks (support and query sizes uniform in the inclusive ranges) as
    one float64 CPU meta-batch; ``binary`` makes the labels 0/1 (see :func:`binarize`)."""
    tasks = random_taskset(schema, n_tasks, support=support, query=query, seed=seed)
    batch = tasks.batch(torch.arange(n_tasks)).to("cpu", torch.float64)
    return binarize(batch) if binary else batch


def quiet_runner(prep: Prepared, seed: int) -> Runner:
    """The runner ``metarec train`` builds for ``prep``, printing nothing."""
    return Runner(prep.algo, prep.evaluator, prep.tracker, prep.trainer, prep.device, seed,
                  console=Console(quiet=True))


def fit_test(cfg: DictConfig):
    """Prepare ``cfg``, meta-train on its train split (validating on val), score the test split:
    ``(prepared, fit result, test result)``."""
    prep = Prepared(cfg)
    runner = quiet_runner(prep, cfg.seed)
    fit = runner.fit(prep.splits.train, prep.splits.val)
    return prep, fit, runner.test(prep.splits.test)


def metarec_env(out: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a ``metarec`` child writing its runs and MLflow store under
    ``out``, with no tracking URI or run id inherited; ``extra`` variables are added."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env["METAREC_OUTPUT_DIR"] = str(out)
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(proc, url: str, timeout_s: float, log: Path, what: str) -> None:
    """Poll ``url`` until it answers HTTP 200; skip the test (with the tail of ``log``) when the
    server process ``proc`` exits first or ``timeout_s`` passes: a server that cannot start in
    this environment is not the behaviour under test."""
    import time

    import pytest
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.skip(f"{what} exited with {proc.returncode}: {log.read_text()[-300:]}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.skip(f"{what} did not answer on {url} within {timeout_s:.0f} s")
        time.sleep(0.5)


def tracked_run(out: Path, *overrides: str) -> dict:
    """Train ``overrides`` in-process into the MLflow store under ``out`` (nothing inherited from
    the environment): ``{"run_id", "best", "folder", "uri", "out"}``."""
    import pytest

    import metarec_runner

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAREC_OUTPUT_DIR", str(out))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        result = metarec_runner.train(metarec_runner.compose(*overrides))
    assert result.checkpoint is not None and result.run_id
    return {"run_id": result.run_id, "best": result.checkpoint, "folder": result.output_dir,
            "uri": f"sqlite:///{out}/mlflow.db", "out": out}


def stop_group(proc) -> None:
    """End a server started with ``start_new_session=True`` and everything it spawned (uvicorn
    workers): SIGTERM to its process group, SIGKILL if it has not exited 20 s later."""
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
