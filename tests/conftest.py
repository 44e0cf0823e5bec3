"""Shared fixtures: small synthetic task sets, composed configs, isolated output folders."""

from __future__ import annotations

import functools

import pytest
import torch

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.tasks.synthetic import random_taskset  # noqa: F401 (re-exported for tests)


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Every test writes runs and MLflow stores under its own tmp folder."""
    monkeypatch.setenv("METAREC_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


SMALL_SCHEMA = FeatureSchema(("a", "b", "c", "user_id", "item_id"), (3, 5, 7, 20, 30))


@pytest.fixture
def small_schema() -> FeatureSchema:
    return SMALL_SCHEMA


@pytest.fixture
def sgd():
    return functools.partial(torch.optim.SGD, lr=0.1)
