"""Curves over the same test tasks: metric against support size k (few-shot) and against the
number of inner steps (adaptation), each point a full evaluation with its 95% interval."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch

from metarec_runner.errors import ConfigError
from metarec_runner.tasks.taskset import TaskSet

CURVE_COLUMNS = ("metric", "mean", "ci95")


def _rows(summary: dict[str, float], split: str, names: list[str], key: str, value: int) -> list[dict]:
    return [
        {key: value, "metric": m, "mean": summary.get(f"{split}/{m}", float("nan")),
         "ci95": summary.get(f"{split}/{m}_ci95", float("nan"))}
        for m in names if f"{split}/{m}" in summary
    ]


@dataclass
class FewShot:
    """The few-shot curve of one run.

    Attributes:
        curve: one row per (k, metric): ``shots, metric, mean, ci95, n_users, n_dropped``.
        per_task: one row per (k, test user): ``shots, task_id, n_support, <metrics>...``, for
            paired comparisons at each k (``metarec compare`` reads it).
        summary: ``{test_k<k>/<metric>: value, test_k<k>/n_dropped: count}``.
        dropped: ``{k: users left out because their support has fewer than k items}``.
    """

    curve: pd.DataFrame
    per_task: pd.DataFrame
    summary: dict[str, float]
    dropped: dict[int, int] = field(default_factory=dict)


def few_shot_curve(evaluator, algo, tasks: TaskSet, device: torch.device,
                   shots: tuple[int, ...]) -> FewShot:
    """Evaluate ``tasks`` with every support set cut to its first ``k`` items, for each k.

    Support sets are stored in a seeded random order, so the first k items are a random k-subset
    and the supports of one user are nested across k (k-curves are paired per user). ``k = 0``
    is the zero-shot answer (an empty support: the meta-learned initialisation, popularity...).
    A user with fewer than k support items is left out at that k, never silently kept with a
    smaller support: the count is in ``n_dropped`` (and ``test_k<k>/n_dropped``).
    """
    rows: list[dict] = []
    frames: list[pd.DataFrame] = []
    summary: dict[str, float] = {}
    dropped: dict[int, int] = {}
    for k in shots:
        split = f"test_k{k}"
        enough = tasks.support_sizes >= k
        dropped[k] = int((~enough).sum())
        summary[f"{split}/n_dropped"] = float(dropped[k])
        if not bool(enough.any()):
            continue
        result = evaluator.evaluate(algo, tasks.subset(enough).with_support_size(k), split, device)
        summary.update(result.summary)
        for row in _rows(result.summary, split, evaluator.metric_names, "shots", k):
            rows.append({**row, "n_users": int(enough.sum()), "n_dropped": dropped[k]})
        frames.append(result.per_task.assign(shots=k))
    per_task = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(per_task):
        per_task = per_task[["shots", *[c for c in per_task.columns if c != "shots"]]]
    curve = pd.DataFrame(rows, columns=["shots", *CURVE_COLUMNS, "n_users", "n_dropped"])
    return FewShot(curve, per_task, summary, dropped)


@contextmanager
def _eval_steps(algo, steps: int) -> Iterator[None]:
    before = algo.eval_inner_steps
    algo.eval_inner_steps = steps
    try:
        yield
    finally:
        algo.eval_inner_steps = before


def adaptation_curve(evaluator, algo, tasks: TaskSet, device: torch.device,
                     steps: tuple[int, ...]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Evaluate ``tasks`` after each number of inner SGD steps in ``steps`` (0 = no adaptation).

    Returns:
        ``(frame with columns steps, metric, mean, ci95; {test_steps<s>/<metric>: value})``.
    """
    if not hasattr(algo, "eval_inner_steps"):
        raise ConfigError("evaluator.adaptation_steps", f"{type(algo).__name__} takes no inner steps; "
                          "set evaluator.adaptation_steps=[] for this algo")
    rows: list[dict] = []
    summary: dict[str, float] = {}
    for s in steps:
        split = f"test_steps{s}"
        with _eval_steps(algo, s):
            result = evaluator.evaluate(algo, tasks, split, device)
        summary.update(result.summary)
        rows += _rows(result.summary, split, evaluator.metric_names, "steps", s)
    return pd.DataFrame(rows, columns=["steps", *CURVE_COLUMNS]), summary
