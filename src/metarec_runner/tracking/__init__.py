"""Experiment tracking: MLflow runs (buffered metrics, sweep parents) or a no-op tracker.

Importing this package does not import ``mlflow``; the trackers import it on first use.
"""

from metarec_runner.tracking.flatten import flatten_config
from metarec_runner.tracking.lifecycle import Terminated, terminate_as_interrupt
from metarec_runner.tracking.mlflow_tracker import MlflowTracker, NullTracker, SweepParent
from metarec_runner.tracking.sqlite_store import TrackingStoreError

__all__ = ["MlflowTracker", "NullTracker", "SweepParent", "Terminated", "TrackingStoreError",
           "flatten_config", "terminate_as_interrupt"]
