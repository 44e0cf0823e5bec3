"""The rules of an evaluation: which candidates are ranked, which of them are relevant, and the
settings those rules make meaningless.

:class:`RankingProtocol` names the candidates (``all_unseen``, ``sampled``, ``query_only``;
:mod:`metarec_runner.evaluate.candidates` builds them) and :class:`Relevance` decides which
query items count as relevant (:func:`metarec_runner.evaluate.metrics.relevance`). Both are
checked when built, from the flat ``evaluator.*`` keys.

:func:`check_tasks` refuses, before anything is trained, what a task set makes meaningless:
full ranking of tasks that are not users, cut-offs that reach the smallest candidate set (where
Recall@k, HR@k and Precision@k stop depending on the scores), ``top_n`` that makes every query
item relevant, a split without any relevant item, and (under ``query_only``) tasks whose
candidates are all relevant. :func:`ranking_trivial` marks single such tasks, which the
evaluator leaves out of the ranking means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metarec_runner.errors import ConfigError
from metarec_runner.evaluate import metrics as M
from metarec_runner.evaluate.candidates import Catalog, check_protocol

if TYPE_CHECKING:
    from metarec_runner.evaluate.metrics import MetricSet
    from metarec_runner.tasks.taskset import TaskSet

TRIVIAL_AT_K = ("recall", "hit", "precision")
"""Metrics that stop depending on the scores when k >= the number of candidates."""


@dataclass(frozen=True)
class RankingProtocol:
    """Which candidates each task ranks (``evaluator.protocol``, ``evaluator.n_negatives``).

    Attributes:
        name: ``"all_unseen"``, ``"sampled"`` or ``"query_only"``.
        n_negatives: ``sampled``: never-rated items drawn per task.
    """

    name: str = "all_unseen"
    n_negatives: int = 100

    def __post_init__(self) -> None:
        check_protocol(self.name, self.n_negatives)
        object.__setattr__(self, "name", str(self.name))
        object.__setattr__(self, "n_negatives", int(self.n_negatives))

    @property
    def full_ranking(self) -> bool:
        """Whether candidates come from the catalog (every protocol but ``query_only``)."""
        return self.name != "query_only"

    def min_candidates(self, tasks: TaskSet, catalog: Catalog | None) -> int:
        """The size of the smallest candidate set of ``tasks``."""
        min_query = int(tasks.query_sizes.min())
        if self.name == "query_only":
            return min_query
        if self.name == "sampled":
            return min_query + self.n_negatives
        # unrated items plus the query; support items are rated (or excluded) too
        unrated = catalog.n_items - catalog.rated_counts(tasks.task_ids)
        return int((unrated + tasks.query_sizes).min())


@dataclass(frozen=True)
class Relevance:
    """Which query items are relevant (``evaluator.relevance``, ``relevance_threshold``,
    ``top_n``, ``tie_break``): ``rating >= threshold``, or the ``top_n`` highest query ratings
    with ties at the cut broken by ``tie_break``."""

    rule: str = "threshold"
    threshold: float = 4.0
    top_n: int = 5
    tie_break: str = "position"

    def __post_init__(self) -> None:
        if self.rule not in M.RELEVANCE_RULES:
            raise ConfigError("evaluator.relevance",
                              f"must be one of {list(M.RELEVANCE_RULES)}, got {self.rule!r}")
        if int(self.top_n) < 1:
            raise ConfigError("evaluator.top_n", f"must be >= 1, got {self.top_n}")
        if self.tie_break not in M.TIE_BREAKS:
            raise ConfigError("evaluator.tie_break",
                              f"must be one of {list(M.TIE_BREAKS)}, got {self.tie_break!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "top_n", int(self.top_n))

    def of(self, target: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Binary relevance ``Bool[B, Q]`` of query items with true ratings ``target``."""
        return M.relevance(target, mask, self.rule, threshold=self.threshold, top_n=self.top_n,
                           tie=self.tie_break, generator=generator)

    def describe(self) -> str:
        """The rule in the words of its config keys."""
        if self.rule == "threshold":
            return f"rating >= relevance_threshold={self.threshold:g}"
        return f"top_n={self.top_n}"


def check_tasks(tasks: TaskSet, split: str, protocol: RankingProtocol, relevance: Relevance,
                metrics: MetricSet, catalog: Catalog | None, seed: int = 0) -> None:
    """Refuse settings the tasks of ``split`` make meaningless, before anything is trained.

    - full-ranking protocols need user tasks (a candidate set is one user's unseen items) and
      the catalog;
    - cut-offs k >= the smallest candidate set for recall, hit and precision, and
      ``relevance="top_n"`` with ``top_n`` >= the smallest query set;
    - no task with a relevant item; every task's candidates all relevant (checked on the query
      sets under ``query_only``; under the other protocols unrated items are never relevant).
    """
    if len(tasks) == 0:
        return
    if protocol.full_ranking:
        if tasks.task_kind != "user":
            raise ConfigError(
                "evaluator.protocol",
                f"protocol={protocol.name} ranks each user's unseen items, but the {split} tasks are "
                f"{tasks.task_kind}s; use evaluator=query_only with this splitter",
            )
        if catalog is None:
            raise ConfigError("evaluator.protocol", f"protocol={protocol.name} needs the catalog "
                              "(Evaluator.bind(Catalog.from_interactions(data)))")
    min_candidates = protocol.min_candidates(tasks, catalog)
    what = f"the smallest candidate set ({min_candidates} items, protocol={protocol.name})"
    _refuse_trivial_cutoffs(metrics, min_candidates, what,
                            ", raise splitter.n_query or use another protocol")
    min_query = int(tasks.query_sizes.min())
    if not protocol.full_ranking and relevance.rule == "top_n":
        _refuse_top_n(relevance, min_query)
    full = tasks.batch(torch.arange(len(tasks)))
    relevant = relevance.of(full.query_y, full.query_mask, torch.Generator().manual_seed(seed))
    refuse_no_relevant(relevant, relevance, split)
    if not protocol.full_ranking:
        refuse_all_trivial(ranking_trivial(relevant, full.query_mask), tasks.task_ids, split,
                           protocol, relevance)


def check_query_size(min_query: int, relevance: Relevance, metrics: MetricSet) -> None:
    """Query-only cut-off checks for a smallest query set of ``min_query`` items (for callers
    without a TaskSet; :func:`check_tasks` does this and more)."""
    _refuse_trivial_cutoffs(metrics, min_query, f"the smallest query set ({min_query} items)",
                            " or raise splitter.n_query")
    if relevance.rule == "top_n":
        _refuse_top_n(relevance, min_query)


def _refuse_trivial_cutoffs(metrics: MetricSet, smallest: int, what: str, advice: str) -> None:
    trivial = [m for m in metrics.names if m in TRIVIAL_AT_K]
    bad = [k for k in metrics.ks if k >= smallest] if trivial else []
    if bad:
        raise ConfigError(
            "evaluator.ks",
            f"cut-offs {bad} are >= {what}: {', '.join(trivial)}@k would not depend on the "
            f"ranking; use cut-offs below {smallest}{advice}",
        )


def _refuse_top_n(relevance: Relevance, min_query: int) -> None:
    if relevance.top_n >= min_query:
        raise ConfigError(
            "evaluator.top_n",
            f"top_n={relevance.top_n} is >= the smallest query set ({min_query} items): every query "
            f"item would be relevant; use top_n below {min_query} or raise splitter.n_query",
        )


def refuse_no_relevant(relevant: Tensor, relevance: Relevance, split: str) -> None:
    """Raise if no task has a relevant item: every ranking metric would be undefined."""
    if relevant.numel() and not bool(relevant.any()):
        raise ConfigError(
            "evaluator.relevance_threshold",
            f"no {split} task has a relevant query item under {relevance.describe()}: every ranking "
            "metric would be undefined; lower evaluator.relevance_threshold to the data's scale "
            "(e.g. 1 for 0/1 labels, 0.75 for ratings rescaled to [0, 1]) or use "
            "evaluator.relevance=top_n",
        )


def refuse_all_trivial(trivial: Tensor, task_ids: Tensor, split: str, protocol: RankingProtocol,
                       relevance: Relevance) -> None:
    """Raise if every task's candidates are exactly its relevant items (``trivial``, ``Bool[B]``
    from :func:`ranking_trivial`): the protocol cannot tell scores apart. Single such tasks are
    only left out of the ranking means."""
    if len(trivial) and bool(trivial.all()):
        raise ConfigError(
            "evaluator.protocol",
            f"every {split} task (e.g. task id {int(task_ids[0])}) has every candidate relevant under "
            f"protocol={protocol.name} with relevance={relevance.rule}: ranking metrics would not "
            "depend on the scores; use evaluator=all_unseen or sampled, relevance=top_n, or a "
            "higher relevance_threshold",
        )


def ranking_trivial(relevant: Tensor, mask: Tensor) -> Tensor:
    """``Bool[B]``: tasks whose valid candidates are all relevant (any ranking scores the same)."""
    return (relevant == mask).all(-1) & mask.any(-1)
