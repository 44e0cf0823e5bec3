"""Curves over the same test tasks: metric against support size k (few-shot) and against the
number of inner steps (adaptation), each point a full evaluation with its 95% interval."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


def few_shot_curve(evaluator, algo, tasks: TaskSet, device: torch.device,
                   shots: tuple[int, ...]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Evaluate ``tasks`` with every support set cut to its first ``k`` items, for each k.

    Support sets are stored in a seeded random order, so the first k items are a random k-subset;
    tasks with fewer than k support items keep all of theirs (see ``n_support`` per task).

    Returns:
        ``(frame with columns shots, metric, mean, ci95; {test_k<k>/<metric>: value})``.
    """
    rows: list[dict] = []
    summary: dict[str, float] = {}
    for k in shots:
        split = f"test_k{k}"
        result = evaluator.evaluate(algo, tasks.with_support_size(k), split, device)
        summary.update(result.summary)
        rows += _rows(result.summary, split, evaluator.metric_names, "shots", k)
    return pd.DataFrame(rows, columns=["shots", *CURVE_COLUMNS]), summary


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
