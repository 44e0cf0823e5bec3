"""Random task sets with ragged support and query sizes, for tests and benchmarks."""

from __future__ import annotations

import torch

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.tasks.taskset import TaskSet


def random_taskset(schema: FeatureSchema, n_tasks: int, support: tuple[int, int],
                   query: tuple[int, int], seed: int = 0) -> TaskSet:
    """Tasks with uniformly random feature rows (one column per token slot, so a bag field spans
    several) and ratings uniform in [1, 5]; support and query sizes uniform in the given
    inclusive ranges. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    s_sizes = torch.randint(support[0], support[1] + 1, (n_tasks,), generator=g)
    q_sizes = torch.randint(query[0], query[1] + 1, (n_tasks,), generator=g)

    def rows(n: int) -> torch.Tensor:
        cols = [torch.randint(0, c, (n,), generator=g)
                for c, w in zip(schema.cardinalities, schema.widths, strict=True) for _ in range(w)]
        return torch.stack(cols, 1)

    def offsets(sizes: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n_tasks + 1, dtype=torch.long)
        out[1:] = torch.cumsum(sizes, 0)
        return out

    ns, nq = int(s_sizes.sum()), int(q_sizes.sum())
    return TaskSet(torch.arange(n_tasks), rows(ns), 1 + 4 * torch.rand(ns, generator=g),
                   offsets(s_sizes), rows(nq), 1 + 4 * torch.rand(nq, generator=g), offsets(q_sizes))
