"""Evaluation: the protocol's rules, per-task metrics, reference scorers, confidence intervals,
per-task tables; :mod:`~metarec_runner.evaluate.evaluator` runs them as one pass."""
