"""Evaluator: adapt on each task's support set, then rank candidates and score the query items.

Rating metrics (MAE, RMSE) are always computed on the task's query items, whose ratings are
known. Ranking metrics (NDCG@k, graded NDCG@k, Recall@k, Precision@k, HR@k, MRR@k, AUC) rank the
candidates of the chosen protocol (:mod:`metarec_runner.evaluate.candidates`): ``all_unseen``
(every item the user did not rate outside the query: the realistic default), ``sampled`` (the
query items plus ``n_negatives`` never-rated items) or ``query_only`` (the query items alone,
as older papers and the RecBole-MetaRec peer do). Binary relevance comes from
:func:`metarec_runner.evaluate.metrics.relevance` on the query items: ``rating >=
relevance_threshold`` or the ``top_n`` highest query ratings with an explicit tie rule.

Ties in the *scores* are broken by a seeded random permutation of every task's candidates (the
same permutation at every evaluation call), never by candidate position or item id: a scorer
that ties everything (the constant reference) then gets the expected value of a random order,
whatever order the catalog's ids happen to have. Ties among *true ratings* under
``relevance="top_n"`` keep their documented rule (``tie_break``), which reproduces the peer.

Rating metrics are reported only for algorithms that predict ratings
(``algo.predicts_ratings``; popularity and the random scorer do not). The constant reference
predicts the meta-train mean rating, so its RMSE/MAE are the "global mean" rating baseline.

One pass per call (:meth:`Evaluator.evaluate`), a batch of tasks at a time: adapt, then build
the candidates and their relevance (:mod:`~metarec_runner.evaluate.protocol`,
:mod:`~metarec_runner.evaluate.candidates`), score them once, put them in the seeded random
order, and let the metrics (:class:`~metarec_runner.evaluate.metrics.MetricSet`) and the
reference scorers (:mod:`~metarec_runner.evaluate.references`) read those same scores into the
per-task table (:class:`~metarec_runner.evaluate.summary.TaskTable`).

Guards: when every task's candidates are all relevant (ranking metrics could not depend on the
scores) the run is refused before training starts, and again at evaluation; a single such task
is left out of the ranking means (NaN, counted in the per-task table's ``ranking_trivial``)
just as a task without relevant items is; NaN or infinite scores
raise :class:`~metarec_runner.errors.TrainingError`, which ends the MLflow run as FAILED.
"""


from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from metarec_runner.errors import ConfigError
from metarec_runner.evaluate import protocol as P
from metarec_runner.evaluate import references as R
from metarec_runner.evaluate.candidates import PROTOCOLS, Candidates, Catalog, build_candidates
from metarec_runner.evaluate.metric_specs import METRIC_SPECS
from metarec_runner.evaluate.metrics import MetricSet, check_finite, rmse
from metarec_runner.evaluate.ranked import KEEP_PREPARED, Part, Ranked, Streams
from metarec_runner.evaluate.summary import CI_METHODS, TaskTable, by_support_size, summarize
from metarec_runner.tasks.taskset import TaskSet

__all__ = ["CI_METHODS", "METRICS", "PROTOCOLS", "EvalResult", "Evaluator", "QueryEvaluator"]


@dataclass
class EvalResult:
    """Per-task table (one row per task) and its summary ``{split/metric: value}``."""

    per_task: pd.DataFrame
    summary: dict[str, float]
    by_support: pd.DataFrame


METRICS = tuple(METRIC_SPECS)
"""Metric names the evaluator knows (declared in :mod:`metarec_runner.evaluate.metric_specs`)."""


class Evaluator:
    """Scores adapted models under one evaluation protocol.

    Args:
        protocol: candidates to rank: ``"all_unseen"``, ``"sampled"`` or ``"query_only"``
            (see :mod:`metarec_runner.evaluate.candidates`). The first two need user tasks and
            a :class:`Catalog` (:meth:`bind`).
        n_negatives: ``protocol="sampled"``: never-rated items drawn per task (seeded by ``seed``).
        ks: cut-offs for the ``*_at_k`` metrics; for recall, hit and precision each must be below
            the query size, or the metric would not depend on the ranking (Recall@k = 1 when k >=
            the number of candidates).
        relevance_threshold: ratings at or above it count as relevant (``relevance="threshold"``).
        batch_size: tasks adapted at once during evaluation.
        metrics: names from :data:`METRICS`; columns are ``<name>_at_<k>`` (MLflow rejects '@'),
            and ``rmse``, ``mae``, ``auc`` without a cut-off.
        relevance: ``"threshold"`` or ``"top_n"`` (the ``top_n`` highest true ratings per task).
        top_n: relevant items per task under ``relevance="top_n"``; must be below the query size.
        tie_break: ties among true ratings at the ``top_n`` cut: ``"position"`` (earlier query
            position), ``"random"`` (seeded by ``seed``) or ``"topk"`` (literal ``torch.topk``,
            backend-dependent). Ties among predicted scores are always broken by a seeded
            random permutation of the candidates.
        graded_gain: gains of ``graded_ndcg``: ``"exp"`` (``2**rating - 1``) or ``"linear"``.
        ci: confidence intervals of the summary: ``"normal"`` or ``"bootstrap"`` (over tasks).
        references: on the test split, also score the random, constant and oracle scorers on the
            same candidates (``test/ref/<scorer>/<metric>``), so every report carries them. The
            oracle scores query items by their true rating and other candidates below all.
        n_boot: bootstrap resamples for ``ci="bootstrap"``.
        seed: seeds the random tie-break (per evaluation call), the sampled negatives and the
            bootstrap.
        shots: after the test pass, test again with every support set cut to its first k items
            for each k (the few-shot curve, :func:`metarec_runner.evaluate.curves.few_shot_curve`).
        adaptation_steps: after the test pass, test again with each number of inner steps (the
            adaptation curve; gradient-based algorithms only).

    The flat keys are grouped into three checked, frozen rules: :attr:`ranking`
    (:class:`~metarec_runner.evaluate.protocol.RankingProtocol`: protocol, n_negatives),
    :attr:`rule` (:class:`~metarec_runner.evaluate.protocol.Relevance`: relevance,
    relevance_threshold, top_n, tie_break) and :attr:`scoring`
    (:class:`~metarec_runner.evaluate.metrics.MetricSet`: metrics, ks, graded_gain).
    """

    def __init__(
        self,
        protocol: str = "all_unseen",
        n_negatives: int = 100,
        ks: Sequence[int] = (3, 5),
        relevance_threshold: float = 4.0,
        batch_size: int = 256,
        metrics: Sequence[str] = ("rmse", "mae", "ndcg", "recall"),
        relevance: str = "threshold",
        top_n: int = 5,
        tie_break: str = "position",
        graded_gain: str = "exp",
        ci: str = "normal",
        references: bool = True,
        n_boot: int = 1000,
        seed: int = 0,
        shots: Sequence[int] = (),
        adaptation_steps: Sequence[int] = (),
    ) -> None:
        self.ranking = P.RankingProtocol(protocol, n_negatives)
        self.scoring = MetricSet.of(metrics, ks, graded_gain)
        self.rule = P.Relevance(relevance, relevance_threshold, top_n, tie_break)
        if ci not in CI_METHODS:
            raise ConfigError("evaluator.ci", f"must be one of {list(CI_METHODS)}, got {ci!r}")
        if int(n_boot) < 1:
            raise ConfigError("evaluator.n_boot", f"must be >= 1, got {n_boot}")
        if any(int(k) < 0 for k in shots):
            raise ConfigError("evaluator.shots", f"support sizes must be >= 0 (0 = zero-shot), got {list(shots)}")
        if any(int(k) < 0 for k in adaptation_steps):
            raise ConfigError("evaluator.adaptation_steps", f"inner steps must be >= 0, got {list(adaptation_steps)}")
        self.ci, self.n_boot, self.seed = str(ci), int(n_boot), int(seed)
        self.batch_size = int(batch_size)
        self.references = bool(references)
        self.shots = tuple(int(k) for k in shots)
        self.adaptation_steps = tuple(int(k) for k in adaptation_steps)
        self.catalog: Catalog | None = None
        self.rating_mean = 0.0
        self.item_counts: torch.Tensor | None = None  # [V] meta-train interactions per item
        self._prepared: OrderedDict[tuple, tuple[weakref.ref, list[Part]]] = OrderedDict()

    @property
    def protocol(self) -> str:
        """The protocol's name (``evaluator.protocol``)."""
        return self.ranking.name

    @property
    def threshold(self) -> float:
        """``evaluator.relevance_threshold``."""
        return self.rule.threshold

    @property
    def metric_names(self) -> list[str]:
        """The per-task metric columns, in order (``rmse``, ``ndcg_at_5``, ...)."""
        return self.scoring.columns

    def bind(self, catalog: Catalog, rating_mean: float | None = None,
             item_counts: torch.Tensor | None = None) -> Evaluator:
        """Give the evaluator the catalog that full-ranking protocols draw candidates from, the
        meta-train mean rating (the constant reference's prediction) and the meta-train item
        counts ``[V]`` (the popularity reference's scores)."""
        self.catalog = catalog
        self._prepared.clear()
        if rating_mean is not None:
            self.rating_mean = float(rating_mean)
        if item_counts is not None:
            self.item_counts = item_counts.to(torch.float64)
        return self

    def check_tasks(self, tasks: TaskSet, split: str) -> None:
        """Refuse settings the tasks of ``split`` make meaningless, before anything is trained
        (:func:`metarec_runner.evaluate.protocol.check_tasks`)."""
        P.check_tasks(tasks, split, self.ranking, self.rule, self.scoring, self.catalog, self.seed)

    def check_query_size(self, min_query: int) -> None:
        """Query-only cut-off checks for a smallest query set of ``min_query`` items
        (:func:`metarec_runner.evaluate.protocol.check_query_size`)."""
        P.check_query_size(min_query, self.rule, self.scoring)

    def relevant(self, target: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary relevance ``Bool[B, Q]`` of query items under this evaluator's rule."""
        return self.rule.of(target, mask, generator)

    def task_metrics(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
        relevant: torch.Tensor | None = None, rating: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Every metric per task (``[B]`` each) for padded scores ``[B, C]`` of candidates.

        Args:
            pred, target, mask: scores, true ratings (0 where unknown) and valid candidates.
            generator: drives ``tie_break="random"``; ``None`` gives a fresh one seeded with ``seed``.
            relevant: ``Bool[B, C]`` precomputed relevance; ``None`` = this evaluator's rule on
                ``target`` (the candidates are the query items).
            rating: also compute RMSE and MAE (only meaningful when the candidates are the
                query items).
        """
        check_finite(pred, mask)
        if relevant is None:
            if generator is None and self.rule.tie_break == "random":
                generator = torch.Generator().manual_seed(self.seed)
            relevant = self.relevant(target, mask, generator)
        return self.scoring.per_task(pred, target, mask, relevant, rating=rating)

    def evaluate(self, algo, tasks: TaskSet, split: str, device: torch.device) -> EvalResult:
        """Adapt ``algo`` on every task of ``tasks``, score the query items and rank the candidates.

        Returns per-task rows (task id, support/query/candidate/relevant counts, metrics, and the
        Bayes-optimal ``floor_rmse`` when the data knows it) plus ``{split/metric,
        split/metric_ci95}`` (and ``_ci_lo``/``_ci_hi`` with ``ci="bootstrap"``).
        """
        if len(tasks) == 0:
            raise ConfigError("splitter.ratios", f"the {split} split has no tasks; give it a larger share")
        algo.model.eval()
        dtype = next(algo.model.parameters()).dtype
        streams = Streams(self.seed)  # the same draws at every call
        references = self.references and split == "test"
        ratings = bool(getattr(algo, "predicts_ratings", True))
        table = TaskTable()
        for part in self._prepare(tasks, split, device, dtype):
            batch = part.batch
            scorer = algo.adapt(batch)
            pred_q = scorer.predict(batch.query_x)
            check_finite(pred_q, batch.query_mask)
            ranked = self._rank(scorer, part, pred_q, streams)
            trivial = P.ranking_trivial(ranked.relevant, ranked.mask)
            found = self._ranking_metrics(ranked, trivial, streams.reference if references else None)
            q_y, q_mask = batch.query_y, batch.query_mask  # rating metrics: every query item counts
            if ratings:  # a ranking-only scorer reports no rating metric, not a meaningless one
                found.update(self.scoring.rating(pred_q, q_y, q_mask))
            if references:
                found.update(R.rating_metrics(self.scoring, q_y, q_mask, self.rating_mean))
            if part.expected is not None:
                found["floor_rmse"] = rmse(part.expected, q_y, q_mask)
            table.add({"task_id": part.users, "n_support": batch.support_mask.sum(-1),
                       "n_query": q_mask.sum(-1), "n_candidates": ranked.mask.sum(-1),
                       "n_relevant": ranked.relevant.sum(-1), "ranking_trivial": trivial}, found)
        frame = table.frame()
        P.refuse_all_trivial(torch.tensor(frame["ranking_trivial"].to_numpy()), tasks.task_ids,
                             split, self.ranking, self.rule)
        names = [m for m in [*self.metric_names, "floor_rmse"] if m in frame.columns]
        ref_names = [c for c in frame.columns if c.startswith("ref/")]
        summary = {}
        for columns in (names, ref_names):
            summary.update(summarize(frame, columns, split, ci=self.ci, n_boot=self.n_boot, seed=self.seed))
        return EvalResult(frame, summary, by_support_size(frame, names))

    def _ranking_metrics(self, ranked: Ranked, trivial: torch.Tensor,
                         reference: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The ranking metrics ``[B]`` of the scored candidates and, with a ``reference``
        generator, those of the reference scorers on the same candidates; NaN for ``trivial``
        tasks (a ranking of all-relevant candidates says nothing)."""
        found = self.scoring.per_task(ranked.pred, ranked.target, ranked.mask, ranked.relevant,
                                      rating=False)
        if reference is not None:
            popularity = None
            if self.item_counts is not None:
                counts = self.item_counts.to(ranked.target.device)
                popularity = counts[ranked.items.clamp(0, len(counts) - 1)]
            found.update(R.reference_metrics(self.scoring, ranked.target, ranked.mask,
                                             ranked.relevant, ranked.is_query, reference,
                                             self.rating_mean, popularity))
        return {name: v.masked_fill(trivial, float("nan")) for name, v in found.items()}

    def _prepare(self, tasks: TaskSet, split: str, device: torch.device, dtype: torch.dtype) -> list[Part]:
        """The task set's batches with their candidates and relevance, built once per task set
        (and device and dtype) and reused at every later call: validation builds them at the
        first epoch only. The two most recent task sets are kept (validation and test)."""
        key = (id(tasks), str(device), dtype)
        hit = self._prepared.get(key)
        if hit is not None and hit[0]() is tasks:
            self._prepared.move_to_end(key)
            return hit[1]
        self.check_tasks(tasks, split)
        streams = Streams(self.seed)  # relevance and negatives: the draws of a fresh call
        parts = []
        for start in range(0, len(tasks), self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, len(tasks)))
            cpu_batch = tasks.batch(idx)
            batch = cpu_batch.to(device, dtype)
            relevant = self.relevant(batch.query_y, batch.query_mask, streams.relevance)
            cands = None
            if self.ranking.full_ranking:
                cands = build_candidates(
                    self.protocol, self.catalog, tasks.task_ids[idx], cpu_batch.query_x[..., -1],
                    batch.query_y.cpu(), batch.query_mask.cpu(), relevant.cpu(), self.ranking.n_negatives,
                    streams.negatives, cpu_batch.support_x[..., -1], cpu_batch.support_mask,
                )
            expected = tasks.query_expected_batch(idx)
            parts.append(Part(tasks.task_ids[idx], batch, relevant, cands,
                               None if expected is None else expected.to(device, dtype)))
        self._prepared[key] = (weakref.ref(tasks), parts)
        while len(self._prepared) > KEEP_PREPARED:
            self._prepared.popitem(last=False)
        return parts

    def _rank(self, scorer, part: Part, pred_q: torch.Tensor, streams: Streams) -> Ranked:
        """The batch's candidates and their scores, in the seeded random order that breaks ties
        among scores. Under ``query_only`` the candidates are the query items (scored already:
        ``pred_q``); else they come from the catalog and are scored here."""
        batch = part.batch
        if part.candidates is None:
            ranked = Ranked(pred_q, batch.query_y, batch.query_mask, part.relevant, batch.query_mask,
                             batch.query_x[..., -1])
        else:
            cands = part.candidates
            device, dtype = batch.query_y.device, batch.query_y.dtype
            ranked = Ranked(self._score_candidates(scorer, cands, device, dtype),
                             cands.target.to(device, dtype), cands.mask.to(device),
                             cands.relevant.to(device), cands.is_query.to(device), cands.items.to(device))
        check_finite(ranked.pred, ranked.mask)
        return ranked.shuffled(streams.order)

    def _score_candidates(self, scorer, cands: Candidates, device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
        """Scores ``[B, C]`` of every candidate, predicted in column chunks of bounded size."""
        b, c = cands.items.shape
        width = max(1, _MAX_ROWS // max(b, 1))
        parts = []
        for start in range(0, c, width):
            stop = min(start + width, c)
            parts.append(scorer.predict(cands.rows(self.catalog, start, stop).to(device)).to(dtype))
        return torch.cat(parts, 1)


QueryEvaluator = Evaluator
"""The name of :class:`Evaluator` before it ranked more than the query items."""

_MAX_ROWS = 1 << 17
"""Candidate rows scored per model call (bounds memory under full ranking)."""
