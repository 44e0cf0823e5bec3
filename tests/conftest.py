"""Shared fixtures: small synthetic task sets, composed configs, isolated output folders.

The builders themselves live in tests/helpers.py (import them from there); they are re-exported
here for the modules that import ``SMALL_SCHEMA`` and ``random_taskset`` from ``tests.conftest``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.tasks.synthetic import random_taskset  # noqa: F401 (re-exported for tests)
from tests.helpers import SMALL_SCHEMA, compose, tiny_batch, tiny_model  # noqa: F401 (re-exported)


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Every test writes runs and MLflow stores under its own tmp folder."""
    monkeypatch.setenv("METAREC_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


@pytest.fixture
def compose_cfg():
    """:func:`tests.helpers.compose`: ``compose_cfg("+algo=maml", "logger=none")`` is the project's
    config with those overrides (``hydra=True`` keeps the hydra node)."""
    return compose


@pytest.fixture
def small_schema() -> FeatureSchema:
    return SMALL_SCHEMA


@pytest.fixture
def sgd():
    return functools.partial(torch.optim.SGD, lr=0.1)
