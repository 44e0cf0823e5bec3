"""QueryEvaluator: adapt on each test task's support set, score its query items.

Protocol (issue 2's scope): the candidates are the task's own query items; rating metrics are
MAE and RMSE per task; ranking metrics are NDCG@k and Recall@k with relevance
``rating >= relevance_threshold``. The full protocol family (all-unseen and sampled candidates,
reference scorers) comes with the cold-start protocol work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.evaluate import metrics as M
from metarec_runner.evaluate.summary import by_support_size, summarize
from metarec_runner.tasks.taskset import TaskSet


@dataclass
class EvalResult:
    """Per-task table (one row per task) and its summary ``{split/metric: value}``."""

    per_task: pd.DataFrame
    summary: dict[str, float]
    by_support: pd.DataFrame


class QueryEvaluator:
    """Scores adapted models on the query items of each task.

    Args:
        ks: cut-offs for NDCG@k and Recall@k; each must be below the query size, or ranking
            would be trivial (Recall@k = 1 when k >= the number of candidates).
        relevance_threshold: ratings at or above it count as relevant.
        batch_size: tasks adapted at once during evaluation.
    """

    protocol = "query_only"

    def __init__(
        self, ks: Sequence[int] = (3, 5), relevance_threshold: float = 4.0, batch_size: int = 256
    ) -> None:
        if not ks or any(int(k) < 1 for k in ks):
            raise ConfigError("ks", f"must be a non-empty list of positive cut-offs, got {list(ks)}")
        self.ks = tuple(int(k) for k in ks)
        self.threshold = float(relevance_threshold)
        self.batch_size = int(batch_size)
        self.metric_names = ["rmse", "mae"] + [f"{m}_at_{k}" for m in ("ndcg", "recall") for k in self.ks]

    def check_query_size(self, min_query: int) -> None:
        """Refuse cut-offs that make ranking trivial for the smallest query set."""
        bad = [k for k in self.ks if k >= min_query]
        if bad:
            raise ConfigError(
                "evaluator.ks",
                f"cut-offs {bad} are >= the smallest query set ({min_query} items): Recall@k "
                f"would be 1 by construction; use cut-offs below {min_query} or raise splitter.n_query",
            )

    def task_metrics(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every metric per task (``[B]`` each) for padded predictions ``[B, Q]``."""
        if not torch.isfinite(pred[mask]).all():
            raise TrainingError(
                "the model produced NaN or infinite scores on query items; the run is invalid "
                "(lower the learning rates, e.g. algo.inner_lr or algo.meta_optimizer.lr)"
            )
        out = {"rmse": M.rmse(pred, target, mask), "mae": M.mae(pred, target, mask)}
        for k in self.ks:
            out[f"ndcg_at_{k}"] = M.ndcg_at_k(pred, target, mask, k, self.threshold)
            out[f"recall_at_{k}"] = M.recall_at_k(pred, target, mask, k, self.threshold)
        return out

    def evaluate(self, algo, tasks: TaskSet, split: str, device: torch.device) -> EvalResult:
        """Adapt ``algo`` on every task of ``tasks`` and score the query items.

        Returns per-task rows (task id, support/query sizes, metrics, and the Bayes-optimal
        ``floor_rmse`` when the data knows it) plus ``{split/metric, split/metric_ci95}``.
        """
        algo.model.eval()
        columns: dict[str, list] = {"task_id": [], "n_support": [], "n_query": []}
        values: dict[str, list[torch.Tensor]] = {}
        dtype = next(algo.model.parameters()).dtype
        for start in range(0, len(tasks), self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, len(tasks)))
            batch = tasks.batch(idx).to(device, dtype)
            scorer = algo.adapt(batch)
            pred = scorer.predict(batch.query_x)
            found = self.task_metrics(pred, batch.query_y, batch.query_mask)
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
        summary = summarize(frame, names, split)
        return EvalResult(frame, summary, by_support_size(frame, names))
