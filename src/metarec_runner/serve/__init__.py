"""Serving a trained model: new users' recommendations from a saved checkpoint.

- :func:`load` (``metarec_runner.load``): a run id, ``latest``, a run folder or a ``best.pt`` ->
  a :class:`Recommender` (``recommend``, ``adapt`` -> :class:`AdaptedUser` with ``score`` and
  ``topk``); :mod:`.recommender`.
- :mod:`.vocab`: raw ids, titles and user features -> codes (how a new user's row is filled).
- :mod:`.support`: a user's ratings checked and collated as a TaskBatch.
- :mod:`.locate`: which ``best.pt`` a run spec names.
- :mod:`.pyfunc`: the model as an MLflow pyfunc model (``mlflow models serve``).

Imported on first use (``metarec --help`` and ``import metarec_runner`` stay light).
"""

from __future__ import annotations

from typing import Any

_API = {"load": "recommender", "Recommender": "recommender", "AdaptedUser": "recommender",
        "ServeError": "vocab", "Vocabulary": "vocab", "Support": "support", "log_pyfunc_model": "pyfunc"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"metarec_runner.serve.{_API[name]}"), name)
    raise AttributeError(f"module 'metarec_runner.serve' has no attribute {name!r}")
