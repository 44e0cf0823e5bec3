"""QueryEvaluator: adapt on each test task's support set, score its query items.

Protocol: the candidates are the task's own query items; rating metrics are MAE and RMSE per
task; ranking metrics (NDCG@k, graded NDCG@k, Recall@k, Precision@k, HR@k, MRR@k, AUC) use
binary relevance from :func:`metarec_runner.evaluate.metrics.relevance`: ``rating >=
relevance_threshold`` (``relevance: threshold``) or the ``top_n`` highest true ratings of each
task (``relevance: top_n``; the RecBole-MetaRec peer protocol is ``top_n: 5`` over 10 query items
with ``tie_break: position``). The full protocol family (all-unseen and sampled candidates,
reference scorers) comes with the cold-start protocol work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.evaluate import metrics as M
from metarec_runner.evaluate.summary import CI_METHODS, by_support_size, summarize
from metarec_runner.tasks.taskset import TaskSet


@dataclass
class EvalResult:
    """Per-task table (one row per task) and its summary ``{split/metric: value}``."""

    per_task: pd.DataFrame
    summary: dict[str, float]
    by_support: pd.DataFrame


METRICS = ("rmse", "mae", "ndcg", "graded_ndcg", "recall", "precision", "hit", "mrr", "auc")
"""Metric names the evaluator knows; all but rmse, mae and auc are computed at every cut-off."""
_NO_CUTOFF = ("rmse", "mae", "auc")
_TRIVIAL_AT_K = ("recall", "hit", "precision")
"""Metrics that stop depending on the scores when k >= the number of candidates."""
_BINARY_AT_K = {
    "ndcg": M.ndcg_at_k,
    "recall": M.recall_at_k,
    "precision": M.precision_at_k,
    "hit": M.hit_rate_at_k,
    "mrr": M.mrr_at_k,
}


class QueryEvaluator:
    """Scores adapted models on the query items of each task.

    Args:
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
            backend-dependent). Ties among predicted scores are always broken by position.
        graded_gain: gains of ``graded_ndcg``: ``"exp"`` (``2**rating - 1``) or ``"linear"``.
        ci: confidence intervals of the summary: ``"normal"`` or ``"bootstrap"`` (over tasks).
        references: on the test split, also score the random, constant and oracle scorers on the
            same query items (``test/ref/<scorer>/<metric>``), so every report carries them.
        n_boot: bootstrap resamples for ``ci="bootstrap"``.
        seed: seeds the random tie-break (per evaluation call) and the bootstrap.
    """

    protocol = "query_only"

    def __init__(
        self,
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
    ) -> None:
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
        self.metric_names = [
            name for m in self.metrics for name in ([m] if m in _NO_CUTOFF else [f"{m}_at_{k}" for k in self.ks])
        ]

    def check_query_size(self, min_query: int) -> None:
        """Refuse settings that make ranking trivial for the smallest query set: cut-offs k >=
        it for recall, hit and precision, and (``relevance="top_n"``) ``top_n`` >= it, which
        would make every query item relevant."""
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

    def relevant(self, target: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary relevance ``Bool[B, Q]`` under this evaluator's rule."""
        return M.relevance(
            target, mask, self.relevance, threshold=self.threshold, top_n=self.top_n, tie=self.tie_break,
            generator=generator,
        )

    def task_metrics(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Every metric per task (``[B]`` each) for padded predictions ``[B, Q]``.

        ``generator`` drives ``tie_break="random"``; ``None`` gives a fresh one seeded with ``seed``.
        """
        if not torch.isfinite(pred[mask]).all():
            raise TrainingError(
                "the model produced NaN or infinite scores on query items; the run is invalid "
                "(lower the learning rates, e.g. algo.inner_lr or algo.meta_optimizer.lr)"
            )
        if generator is None and self.tie_break == "random":
            generator = torch.Generator().manual_seed(self.seed)
        relevant = self.relevant(target, mask, generator)
        out: dict[str, torch.Tensor] = {}
        for m in self.metrics:
            if m == "rmse":
                out["rmse"] = M.rmse(pred, target, mask)
            elif m == "mae":
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

    def evaluate(self, algo, tasks: TaskSet, split: str, device: torch.device) -> EvalResult:
        """Adapt ``algo`` on every task of ``tasks`` and score the query items.

        Returns per-task rows (task id, support/query sizes, metrics, and the Bayes-optimal
        ``floor_rmse`` when the data knows it) plus ``{split/metric, split/metric_ci95}`` (and
        ``_ci_lo``/``_ci_hi`` with ``ci="bootstrap"``).
        """
        algo.model.eval()
        columns: dict[str, list] = {"task_id": [], "n_support": [], "n_query": []}
        values: dict[str, list[torch.Tensor]] = {}
        dtype = next(algo.model.parameters()).dtype
        generator = torch.Generator().manual_seed(self.seed)  # same random tie-break every call
        references = self.references and split == "test"
        ref_gen = torch.Generator().manual_seed(self.seed + 1)  # the random reference scorer
        for start in range(0, len(tasks), self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, len(tasks)))
            batch = tasks.batch(idx).to(device, dtype)
            scorer = algo.adapt(batch)
            pred = scorer.predict(batch.query_x)
            found = self.task_metrics(pred, batch.query_y, batch.query_mask, generator)
            if references:
                found.update(self.reference_metrics(batch.query_y, batch.query_mask, ref_gen))
            expected = tasks.query_expected_batch(idx)
            if expected is not None:
                found["floor_rmse"] = M.rmse(expected.to(device, dtype), batch.query_y, batch.query_mask)
            for name, v in found.items():
                values.setdefault(name, []).append(v.detach().cpu())
            columns["task_id"].append(tasks.task_ids[idx])
            columns["n_support"].append(batch.support_mask.sum(-1).cpu())
            columns["n_query"].append(batch.query_mask.sum(-1).cpu())
        frame = pd.DataFrame({k: torch.cat(v).numpy() for k, v in columns.items()})
        for name, v in values.items():
            frame[name] = torch.cat(v).double().numpy()
        names = [m for m in [*self.metric_names, "floor_rmse"] if m in frame.columns]
        summary = summarize(frame, names, split, ci=self.ci, n_boot=self.n_boot, seed=self.seed)
        ref_names = [c for c in frame.columns if c.startswith("ref/")]
        summary.update(summarize(frame, ref_names, split, ci=self.ci, n_boot=self.n_boot, seed=self.seed))
        return EvalResult(frame, summary, by_support_size(frame, names))

    def reference_metrics(self, target: torch.Tensor, mask: torch.Tensor,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Ranking metrics ``[B]`` of the random, constant and oracle scorers on the same query
        items, as ``ref/<scorer>/<metric>`` (rating metrics are left out: they mean nothing for
        these scorers). Under query-only candidates these are the numbers a model must be read
        against: with tied ratings a constant score can sit well above random."""
        scorers = {
            "random": torch.rand(target.shape, generator=generator).to(target),
            "constant": torch.zeros_like(target),
            "oracle": target,
        }
        out: dict[str, torch.Tensor] = {}
        for name, pred in scorers.items():
            for metric, v in self.task_metrics(pred, target, mask).items():
                if metric not in ("rmse", "mae"):
                    out[f"ref/{name}/{metric}"] = v
        return out
