"""metarec: meta-learning for cold-start recommendation, config-driven on Hydra + MLflow.

The Python API (imported on first use, so ``import metarec_runner`` stays light):

- :func:`compose` and :func:`train`: build the config ``metarec train`` would, and run it.
- :func:`load`: a trained model (run id, ``latest``, run folder or ``best.pt``) as a
  :class:`~metarec_runner.serve.recommender.Recommender` for new users.
"""

from __future__ import annotations

from typing import Any

_API = {"compose": "metarec_runner.run", "train": "metarec_runner.run", "TrainResult": "metarec_runner.run",
        "load": "metarec_runner.serve.recommender"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'metarec_runner' has no attribute {name!r}")
