"""What one evaluation pass reads: its random streams, a task set's prepared batches and a batch's
ranked candidates (used by :class:`metarec_runner.evaluate.evaluator.Evaluator`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarec_runner.evaluate.candidates import Candidates
from metarec_runner.tasks.taskset import TaskBatch


class Streams:
    """The random sources of one evaluation call, seeded afresh at every call (CPU generators:
    the same draws on every device, at every call)."""

    def __init__(self, seed: int) -> None:
        self.relevance = torch.Generator().manual_seed(seed)  # tie_break="random" among true ratings
        self.reference = torch.Generator().manual_seed(seed + 1)  # the random reference scorer
        self.negatives = torch.Generator().manual_seed(seed + 2)  # protocol=sampled's negatives
        self.order = torch.Generator().manual_seed(seed + 3)  # the candidates' order: score ties


@dataclass(frozen=True)
class Part:
    """One batch of a task set as every evaluation call reads it, built once (:meth:`Evaluator._prepare`).

    Attributes:
        users: ``[B]`` task (user) ids; batch: the padded tasks on the model's device and dtype.
        relevant: ``Bool[B, Q]`` relevance of the query items under the evaluator's rule.
        candidates: the full-ranking protocol's candidates (CPU), ``None`` under ``query_only``.
        expected: ``[B, Q]`` Bayes-optimal query predictions, when the data knows them.
    """

    users: torch.Tensor
    batch: TaskBatch
    relevant: torch.Tensor
    candidates: Candidates | None
    expected: torch.Tensor | None


KEEP_PREPARED = 2
"""Task sets whose prepared batches an evaluator keeps (validation and test)."""


@dataclass(frozen=True)
class Ranked:
    """One batch's scored candidates ``[B, C]`` each (on the model's device); ``items`` are
    their item codes."""

    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    relevant: torch.Tensor
    is_query: torch.Tensor
    items: torch.Tensor

    def shuffled(self, generator: torch.Generator) -> Ranked:
        """The same seeded random permutation of every task's candidates applied to each column.

        The metrics sort stably, so after this shuffle ties among scores fall in a random order
        instead of the candidates' position (which under full ranking is the item id order). The
        permutation comes from ``generator`` (CPU), so it is the same on every device and, with
        the generator seeded per evaluation call, at every call.
        """
        keys = torch.rand(self.pred.shape, generator=generator, dtype=torch.float64)
        order = keys.argsort(dim=-1).to(self.pred.device)
        return Ranked(*(c.gather(-1, order) for c in (self.pred, self.target, self.mask,
                                                        self.relevant, self.is_query, self.items)))
