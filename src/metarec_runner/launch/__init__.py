"""Sweeps: the Hydra callbacks (the MLflow parent run, threads per job, prewarmed joblib
workers) and the module those workers preload."""
