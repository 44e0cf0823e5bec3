"""Hydra callback: one MLflow parent run per sweep, opened before any job starts.

Jobs find the parent through ``<sweep dir>/mlflow_parent.json`` and start their runs as its
children (in the parent's experiment). Creating experiment and parent here, once, also keeps
parallel jobs from racing to create the experiment.
"""

from __future__ import annotations

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

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._tracker is not None and self._parent is not None:
            self._tracker.close_sweep_parent(self._parent)
