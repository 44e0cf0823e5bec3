"""Shared fixtures: small synthetic task sets, composed configs, isolated output folders."""

from __future__ import annotations

import functools

import pytest
import torch

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.tasks.taskset import TaskSet


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Every test writes runs and MLflow stores under its own tmp folder."""
    monkeypatch.setenv("METAREC_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


def random_taskset(schema: FeatureSchema, n_tasks: int, support: tuple[int, int],
                   query: tuple[int, int], seed: int = 0) -> TaskSet:
    """Tasks with random feature rows and ratings in [1, 5], ragged support/query sizes."""
    g = torch.Generator().manual_seed(seed)
    s_sizes = torch.randint(support[0], support[1] + 1, (n_tasks,), generator=g)
    q_sizes = torch.randint(query[0], query[1] + 1, (n_tasks,), generator=g)

    def rows(n: int) -> torch.Tensor:  # one column per token slot (a bag field spans several)
        cols = [torch.randint(0, c, (n,), generator=g)
                for c, w in zip(schema.cardinalities, schema.widths) for _ in range(w)]
        return torch.stack(cols, 1)

    def offsets(sizes: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n_tasks + 1, dtype=torch.long)
        out[1:] = torch.cumsum(sizes, 0)
        return out

    ns, nq = int(s_sizes.sum()), int(q_sizes.sum())
    return TaskSet(torch.arange(n_tasks), rows(ns), 1 + 4 * torch.rand(ns, generator=g),
                   offsets(s_sizes), rows(nq), 1 + 4 * torch.rand(nq, generator=g), offsets(q_sizes))


SMALL_SCHEMA = FeatureSchema(("a", "b", "c", "user_id", "item_id"), (3, 5, 7, 20, 30))


@pytest.fixture
def small_schema() -> FeatureSchema:
    return SMALL_SCHEMA


@pytest.fixture
def sgd():
    return functools.partial(torch.optim.SGD, lr=0.1)
