"""Hydra callback: one MLflow parent run per sweep, opened before any job starts.

Jobs find the parent through ``<sweep dir>/mlflow_parent.json`` and start their runs as its
children (in the parent's experiment). Creating experiment and parent here, once, also keeps
parallel jobs from racing to create the experiment.

The parent always ends: FINISHED when every job succeeded, FAILED when any job failed (even one
that failed before it could open its own run), KILLED when the sweep process ends without
Hydra's ``on_multirun_end`` (Ctrl+C; Hydra also skips it after a failed job, hence ``atexit``).
"""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class MlflowSweepParent(Callback):
    """Opens the sweep's parent run on multirun start; closes it (FAILED if a child failed) at the end."""

    def __init__(self) -> None:
        self._tracker = None
        self._parent = None
        self._failed_jobs = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        logger = config.get("logger")
        if logger is None or not str(logger.get("_target_", "")).endswith("MlflowTracker"):
            return
        HydraConfig.instance().set_config(config)  # lets ${hydra:...} in paths resolve here
        from metarec_runner.tracking import MlflowTracker

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._tracker = MlflowTracker(logger.tracking_uri, logger.experiment,
                                      artifact_location=logger.get("artifact_location"))
        overrides = " ".join(config.hydra.overrides.task)
        self._parent = self._tracker.open_sweep_parent(
            sweep_dir, run_name=f"sweep:{sweep_dir.name}",
            tags={"sweep_overrides": overrides, "sweep_dir": str(sweep_dir)},
        )
        atexit.register(self._close_unended)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if getattr(job_return, "status", None) == JobStatus.FAILED:
            self._failed_jobs += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close(None)

    def _close_unended(self) -> None:
        self._close("FAILED" if self._failed_jobs else "KILLED")

    def _close(self, status: str | None) -> None:
        """End the parent once: with ``status``, or FAILED/FINISHED from the jobs' outcomes."""
        if self._tracker is None or self._parent is None:
            return
        parent, self._parent = self._parent, None
        atexit.unregister(self._close_unended)
        if status is None and self._failed_jobs:
            status = "FAILED"
        if status is None:
            self._tracker.close_sweep_parent(parent)  # FAILED if a child run failed, else FINISHED
        else:
            self._tracker.end_sweep_parent(parent, status)
