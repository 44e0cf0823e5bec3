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

Guards: when every task's candidates are all relevant (ranking metrics could not depend on the
scores) the run is refused before training starts, and again at evaluation; a single such task
is left out of the ranking means (NaN, counted in the per-task table's ``ranking_trivial``)
just as a task without relevant items is; NaN or infinite scores
raise :class:`~metarec_runner.errors.TrainingError`, which ends the MLflow run as FAILED.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.evaluate import metrics as M
from metarec_runner.evaluate.candidates import PROTOCOLS, Catalog, build_candidates, check_protocol
from metarec_runner.evaluate.metric_specs import METRIC_SPECS, metric_columns
from metarec_runner.evaluate.summary import CI_METHODS, by_support_size, summarize
from metarec_runner.tasks.taskset import TaskSet


@dataclass
class EvalResult:
    """Per-task table (one row per task) and its summary ``{split/metric: value}``."""

    per_task: pd.DataFrame
    summary: dict[str, float]
    by_support: pd.DataFrame


METRICS = tuple(METRIC_SPECS)
"""Metric names the evaluator knows (declared in :mod:`metarec_runner.evaluate.metric_specs`)."""
_TRIVIAL_AT_K = ("recall", "hit", "precision")
"""Metrics that stop depending on the scores when k >= the number of candidates."""
_BINARY_AT_K = {
    "ndcg": M.ndcg_at_k,
    "recall": M.recall_at_k,
    "precision": M.precision_at_k,
    "hit": M.hit_rate_at_k,
    "mrr": M.mrr_at_k,
}


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
        check_protocol(protocol, n_negatives)
        if not ks or any(int(k) < 1 for k in ks):
            raise ConfigError("ks", f"must be a non-empty list of positive cut-offs, got {list(ks)}")
        metrics = [str(m) for m in metrics]
        unknown = [m for m in metrics if m not in METRICS]
        if not metrics or unknown or len(set(metrics)) != len(metrics):
            raise ConfigError(
                "evaluator.metrics", f"must be a non-empty list of distinct names from {list(METRICS)}, got {metrics}"
            )
        if relevance not in M.RELEVANCE_RULES:
            raise ConfigError("evaluator.relevance", f"must be one of {list(M.RELEVANCE_RULES)}, got {relevance!r}")
        if int(top_n) < 1:
            raise ConfigError("evaluator.top_n", f"must be >= 1, got {top_n}")
        if tie_break not in M.TIE_BREAKS:
            raise ConfigError("evaluator.tie_break", f"must be one of {list(M.TIE_BREAKS)}, got {tie_break!r}")
        if graded_gain not in M.GAINS:
            raise ConfigError("evaluator.graded_gain", f"must be one of {list(M.GAINS)}, got {graded_gain!r}")
        if ci not in CI_METHODS:
            raise ConfigError("evaluator.ci", f"must be one of {list(CI_METHODS)}, got {ci!r}")
        if int(n_boot) < 1:
            raise ConfigError("evaluator.n_boot", f"must be >= 1, got {n_boot}")
        if any(int(k) < 1 for k in shots):
            raise ConfigError("evaluator.shots", f"support sizes must be >= 1, got {list(shots)}")
        if any(int(k) < 0 for k in adaptation_steps):
            raise ConfigError("evaluator.adaptation_steps", f"inner steps must be >= 0, got {list(adaptation_steps)}")
        self.shots = tuple(int(k) for k in shots)
        self.adaptation_steps = tuple(int(k) for k in adaptation_steps)
        self.protocol = str(protocol)
        self.n_negatives = int(n_negatives)
        self.catalog: Catalog | None = None
        self.rating_mean = 0.0
        self.ks = tuple(int(k) for k in ks)
        self.threshold = float(relevance_threshold)
        self.batch_size = int(batch_size)
        self.metrics = tuple(metrics)
        self.relevance = str(relevance)
        self.top_n = int(top_n)
        self.tie_break = str(tie_break)
        self.graded_gain = str(graded_gain)
        self.ci = str(ci)
        self.n_boot = int(n_boot)
        self.seed = int(seed)
        self.references = bool(references)
        self.metric_names = metric_columns(self.metrics, self.ks)

    def bind(self, catalog: Catalog, rating_mean: float | None = None) -> Evaluator:
        """Give the evaluator the catalog that full-ranking protocols draw candidates from, and
        the meta-train mean rating (the constant reference's prediction)."""
        self.catalog = catalog
        if rating_mean is not None:
            self.rating_mean = float(rating_mean)
        return self

    def check_tasks(self, tasks: TaskSet, split: str) -> None:
        """Refuse settings the tasks of ``split`` make meaningless, before anything is trained.

        - full-ranking protocols need user tasks (a candidate set is one user's unseen items);
        - cut-offs k >= the smallest candidate set for recall, hit and precision, and
          ``relevance="top_n"`` with ``top_n`` >= the smallest query set;
        - every task's candidates all relevant (checked on the query sets under ``query_only``;
          under the other protocols unrated items are never relevant).
        """
        if len(tasks) == 0:
            return
        if self.protocol != "query_only":
            if tasks.task_kind != "user":
                raise ConfigError(
                    "evaluator.protocol",
                    f"protocol={self.protocol} ranks each user's unseen items, but the {split} tasks are "
                    f"{tasks.task_kind}s; use evaluator=query_only with this splitter",
                )
            if self.catalog is None:
                raise ConfigError("evaluator.protocol", f"protocol={self.protocol} needs the catalog "
                                  "(Evaluator.bind(Catalog.from_interactions(data)))")
        min_query = int(tasks.query_sizes.min())
        if self.protocol == "query_only":
            min_candidates = min_query
        elif self.protocol == "sampled":
            min_candidates = min_query + self.n_negatives
        else:  # unrated items plus the query; support items are rated (or excluded) too
            unrated = self.catalog.n_items - self.catalog.rated_counts(tasks.task_ids)
            min_candidates = int((unrated + tasks.query_sizes).min())
        trivial = [m for m in self.metrics if m in _TRIVIAL_AT_K]
        bad = [k for k in self.ks if k >= min_candidates] if trivial else []
        if bad:
            raise ConfigError(
                "evaluator.ks",
                f"cut-offs {bad} are >= the smallest candidate set ({min_candidates} items, protocol="
                f"{self.protocol}): {', '.join(trivial)}@k would not depend on the ranking; use cut-offs "
                f"below {min_candidates}, raise splitter.n_query or use another protocol",
            )
        if self.protocol == "query_only" and self.relevance == "top_n" and self.top_n >= min_query:
            raise ConfigError(
                "evaluator.top_n",
                f"top_n={self.top_n} is >= the smallest query set ({min_query} items): every query item "
                f"would be relevant; use top_n below {min_query} or raise splitter.n_query",
            )
        full = tasks.batch(torch.arange(len(tasks)))
        relevant = self.relevant(full.query_y, full.query_mask, torch.Generator().manual_seed(self.seed))
        self._refuse_no_relevant(relevant, split)
        if self.protocol == "query_only":
            self._refuse_all_relevant(relevant, full.query_mask, tasks.task_ids, split)

    def check_query_size(self, min_query: int) -> None:
        """Query-only cut-off checks for a smallest query set of ``min_query`` items (kept for
        callers without a TaskSet; :meth:`check_tasks` does this and more)."""
        trivial = [m for m in self.metrics if m in _TRIVIAL_AT_K]
        bad = [k for k in self.ks if k >= min_query] if trivial else []
        if bad:
            raise ConfigError(
                "evaluator.ks",
                f"cut-offs {bad} are >= the smallest query set ({min_query} items): {', '.join(trivial)}@k "
                f"would not depend on the ranking; use cut-offs below {min_query} or raise splitter.n_query",
            )
        if self.relevance == "top_n" and self.top_n >= min_query:
            raise ConfigError(
                "evaluator.top_n",
                f"top_n={self.top_n} is >= the smallest query set ({min_query} items): every query item "
                f"would be relevant; use top_n below {min_query} or raise splitter.n_query",
            )

    def _refuse_no_relevant(self, relevant: torch.Tensor, split: str) -> None:
        """Raise if no task has a relevant item: every ranking metric would be undefined."""
        if relevant.numel() and not bool(relevant.any()):
            rule = (f"rating >= relevance_threshold={self.threshold:g}" if self.relevance == "threshold"
                    else f"top_n={self.top_n}")
            raise ConfigError(
                "evaluator.relevance_threshold",
                f"no {split} task has a relevant query item under {rule}: every ranking metric would be "
                "undefined; lower evaluator.relevance_threshold to the data's scale (e.g. 1 for 0/1 "
                "labels, 0.75 for ratings rescaled to [0, 1]) or use evaluator.relevance=top_n",
            )

    def _refuse_all_relevant(self, relevant: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor,
                             split: str) -> None:
        """Raise if every task's candidates are exactly its relevant items (the protocol cannot
        tell scores apart); single such tasks are only left out of the ranking means."""
        trivial = _ranking_trivial(relevant, mask)
        if len(trivial) and bool(trivial.all()):
            raise ConfigError(
                "evaluator.protocol",
                f"every {split} task (e.g. task id {int(task_ids[0])}) has every candidate relevant under "
                f"protocol={self.protocol} with relevance={self.relevance}: ranking metrics would not "
                "depend on the scores; use evaluator=all_unseen or sampled, relevance=top_n, or a "
                "higher relevance_threshold",
            )

    def relevant(self, target: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary relevance ``Bool[B, Q]`` of query items under this evaluator's rule."""
        return M.relevance(
            target, mask, self.relevance, threshold=self.threshold, top_n=self.top_n, tie=self.tie_break,
            generator=generator,
        )

    @staticmethod
    def _check_finite(pred: torch.Tensor, mask: torch.Tensor) -> None:
        if not torch.isfinite(pred[mask]).all():
            raise TrainingError(
                "the model produced NaN or infinite scores; the run is invalid "
                "(lower the learning rates, e.g. algo.inner_lr or algo.meta_optimizer.lr)"
            )

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
        self._check_finite(pred, mask)
        if relevant is None:
            if generator is None and self.tie_break == "random":
                generator = torch.Generator().manual_seed(self.seed)
            relevant = self.relevant(target, mask, generator)
        out: dict[str, torch.Tensor] = {}
        for m in self.metrics:
            if m == "rmse":
                if rating:
                    out["rmse"] = M.rmse(pred, target, mask)
            elif m == "mae":
                if rating:
                    out["mae"] = M.mae(pred, target, mask)
            elif m == "auc":
                out["auc"] = M.auc(pred, target, mask, relevant=relevant)
            elif m == "graded_ndcg":
                for k in self.ks:
                    out[f"graded_ndcg_at_{k}"] = M.graded_ndcg_at_k(pred, target, mask, k, gain=self.graded_gain)
            else:
                for k in self.ks:
                    out[f"{m}_at_{k}"] = _BINARY_AT_K[m](pred, target, mask, k, relevant=relevant)
        return out

    def _score_candidates(self, scorer, cands, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Scores ``[B, C]`` of every candidate, predicted in column chunks of bounded size."""
        b, c = cands.items.shape
        width = max(1, _MAX_ROWS // max(b, 1))
        parts = []
        for start in range(0, c, width):
            stop = min(start + width, c)
            parts.append(scorer.predict(cands.rows(self.catalog, start, stop).to(device)).to(dtype))
        return torch.cat(parts, 1)

    def evaluate(self, algo, tasks: TaskSet, split: str, device: torch.device) -> EvalResult:
        """Adapt ``algo`` on every task of ``tasks``, score the query items and rank the candidates.

        Returns per-task rows (task id, support/query/candidate/relevant counts, metrics, and the
        Bayes-optimal ``floor_rmse`` when the data knows it) plus ``{split/metric,
        split/metric_ci95}`` (and ``_ci_lo``/``_ci_hi`` with ``ci="bootstrap"``).
        """
        if len(tasks) == 0:
            raise ConfigError("splitter.ratios", f"the {split} split has no tasks; give it a larger share")
        self.check_tasks(tasks, split)
        algo.model.eval()
        columns: dict[str, list] = {"task_id": [], "n_support": [], "n_query": [], "n_candidates": [],
                                    "n_relevant": [], "ranking_trivial": []}
        values: dict[str, list[torch.Tensor]] = {}
        dtype = next(algo.model.parameters()).dtype
        generator = torch.Generator().manual_seed(self.seed)  # same random tie-break every call
        negatives = torch.Generator().manual_seed(self.seed + 2)  # same sampled negatives every call
        references = self.references and split == "test"
        ref_gen = torch.Generator().manual_seed(self.seed + 1)  # the random reference scorer
        score_ties = torch.Generator().manual_seed(self.seed + 3)  # same candidate order every call
        ratings = bool(getattr(algo, "predicts_ratings", True))
        for start in range(0, len(tasks), self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, len(tasks)))
            cpu_batch = tasks.batch(idx)
            batch = cpu_batch.to(device, dtype)
            scorer = algo.adapt(batch)
            pred_q = scorer.predict(batch.query_x)
            self._check_finite(pred_q, batch.query_mask)
            rel_q = self.relevant(batch.query_y, batch.query_mask, generator)
            if self.protocol == "query_only":
                pred, target, mask, relevant = pred_q, batch.query_y, batch.query_mask, rel_q
                is_query = mask
            else:
                cands = build_candidates(
                    self.protocol, self.catalog, tasks.task_ids[idx], cpu_batch.query_x[..., -1],
                    batch.query_y.cpu(), batch.query_mask.cpu(), rel_q.cpu(), self.n_negatives, negatives,
                    cpu_batch.support_x[..., -1], cpu_batch.support_mask,
                )
                pred = self._score_candidates(scorer, cands, device, dtype)
                target, mask = cands.target.to(device, dtype), cands.mask.to(device)
                relevant, is_query = cands.relevant.to(device), cands.is_query.to(device)
            self._check_finite(pred, mask)
            pred, target, mask, relevant, is_query = _shuffle_candidates(
                score_ties, pred, target, mask, relevant, is_query)
            trivial = _ranking_trivial(relevant, mask)
            found = self.task_metrics(pred, target, mask, relevant=relevant, rating=False)
            if references:
                found.update(self.reference_metrics(target, mask, relevant, is_query, ref_gen))
            for name in found:  # a ranking of all-relevant candidates says nothing: leave it out
                found[name] = found[name].masked_fill(trivial, float("nan"))
            for name, rating_metric in (("rmse", M.rmse), ("mae", M.mae)):
                if name not in self.metrics:
                    continue  # rating metrics: every query item counts
                if ratings:
                    found[name] = rating_metric(pred_q, batch.query_y, batch.query_mask)
                if references:
                    constant = torch.full_like(pred_q, self.rating_mean)
                    found[f"ref/constant/{name}"] = rating_metric(constant, batch.query_y, batch.query_mask)
            expected = tasks.query_expected_batch(idx)
            if expected is not None:
                found["floor_rmse"] = M.rmse(expected.to(device, dtype), batch.query_y, batch.query_mask)
            for name, v in found.items():
                values.setdefault(name, []).append(v.detach().cpu())
            columns["task_id"].append(tasks.task_ids[idx])
            columns["n_support"].append(batch.support_mask.sum(-1).cpu())
            columns["n_query"].append(batch.query_mask.sum(-1).cpu())
            columns["n_candidates"].append(mask.sum(-1).cpu())
            columns["n_relevant"].append(relevant.sum(-1).cpu())
            columns["ranking_trivial"].append(trivial.cpu())
        frame = pd.DataFrame({k: torch.cat(v).numpy() for k, v in columns.items()})
        if len(frame) and bool(frame["ranking_trivial"].all()):
            self._refuse_all_relevant(torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool),
                                      tasks.task_ids, split)
        for name, v in values.items():
            frame[name] = torch.cat(v).double().numpy()
        names = [m for m in [*self.metric_names, "floor_rmse"] if m in frame.columns]
        # a ranking-only scorer reports no rating metric, not a meaningless one
        summary = summarize(frame, names, split, ci=self.ci, n_boot=self.n_boot, seed=self.seed)
        ref_names = [c for c in frame.columns if c.startswith("ref/")]
        summary.update(summarize(frame, ref_names, split, ci=self.ci, n_boot=self.n_boot, seed=self.seed))
        return EvalResult(frame, summary, by_support_size(frame, names))

    def reference_metrics(self, target: torch.Tensor, mask: torch.Tensor, relevant: torch.Tensor,
                          is_query: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Ranking metrics ``[B]`` of the random, constant and oracle scorers on the same
        candidates, as ``ref/<scorer>/<metric>``. The constant's ties are broken by the caller's
        random candidate order (:func:`_shuffle_candidates`), so it scores the expectation of a
        random ranking, not the catalog's id order. The oracle ranks the relevant items first (ties
        among true ratings exactly as relevance broke them), then the other query items by true
        rating, then every other candidate. Under query-only candidates these are
        the numbers a model must be read against: with tied ratings a constant score can sit well
        above random."""
        lowest = target.masked_fill(~is_query, float("inf")).amin().clamp(max=0.0) - 1.0
        scorers = {
            "random": torch.rand(target.shape, generator=generator).to(target),
            "constant": torch.full_like(target, self.rating_mean),
            "oracle": torch.where(is_query, target, lowest.expand_as(target))
            + relevant.to(target.dtype) * (target.abs().amax() - lowest + 1.0),
        }
        out: dict[str, torch.Tensor] = {}
        for name, pred in scorers.items():
            for metric, v in self.task_metrics(pred, target, mask, relevant=relevant, rating=False).items():
                out[f"ref/{name}/{metric}"] = v
        return out


def _shuffle_candidates(generator: torch.Generator, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same seeded random permutation of the candidates of every task applied to each of
    ``columns`` (``[B, C]`` each).

    The metrics sort stably, so after this shuffle ties among scores fall in a random order
    instead of the candidates' position (which under full ranking is the item id order). The
    permutation comes from ``generator`` (CPU), so it is the same on every device and, with the
    generator seeded per evaluation call, at every call.
    """
    first = columns[0]
    keys = torch.rand(first.shape, generator=generator, dtype=torch.float64)
    order = keys.argsort(dim=-1).to(first.device)
    return tuple(c.gather(-1, order) for c in columns)


def _ranking_trivial(relevant: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Bool[B]``: tasks whose valid candidates are all relevant (any ranking scores the same)."""
    return (relevant == mask).all(-1) & mask.any(-1)


QueryEvaluator = Evaluator
"""The name of :class:`Evaluator` before it ranked more than the query items."""

_MAX_ROWS = 1 << 17
"""Candidate rows scored per model call (bounds memory under full ranking)."""
