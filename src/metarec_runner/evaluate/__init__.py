"""Evaluation: per-task metrics, confidence intervals, per-task tables."""
