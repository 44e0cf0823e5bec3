"""Quiet MLflow's store set-up lines, which would otherwise come before a run's first line, and
its chatter while a run logs its model (signature checks, artifact download bars)."""

from __future__ import annotations

import logging
import os

NOISY_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration", "alembic", "mlflow.pyfunc",
                 "mlflow.models.model")


def quiet_store_logs() -> None:
    """Silence "Creating initial MLflow database tables...", "Updating database tables" and the
    other INFO records of :data:`NOISY_LOGGERS`, and MLflow's artifact progress bars (unless
    ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` is set); warnings and errors still show."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401  (MLflow configures its loggers on import: the levels set here stick)

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
