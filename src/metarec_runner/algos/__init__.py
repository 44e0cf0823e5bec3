"""Meta-learning algorithms and non-meta baselines on one batched functional core."""
