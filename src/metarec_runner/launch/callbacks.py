"""Hydra callback: one MLflow parent run per sweep, opened before any job starts.

Jobs find the parent through ``<sweep dir>/mlflow_parent.json`` and start their runs as its
children (in the parent's experiment). Creating experiment and parent here, once, also keeps
parallel jobs from racing to create the experiment.

The parent always ends: FINISHED when every job succeeded, FAILED when any job failed (even one
that failed before it could open its own run), KILLED when the sweep process ends without
Hydra's ``on_multirun_end`` (Ctrl+C; Hydra also skips it after a failed job, hence ``atexit``).
Jobs may run in other processes (joblib, Ray, SLURM): there ``on_job_end`` runs in the job's
process, so a failed job also leaves a marker file in the sweep dir that the sweep process reads.
At the end of a sweep the parent gets ``sweep_comparison.png`` and ``.csv``: the children's test
metric (``trainer.monitor``'s) per swept setting, mean and 95% CI over seeds.

:class:`ThreadsPerJob` gives every job of a parallel local launcher (joblib, Ray) one torch
thread (``threads=1`` as a sweep override, logged with the run), so jobs do not oversubscribe
the cores.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)

FAILED_DIR = ".failed_jobs"  # in the sweep dir: one empty file per failed job (any process)
COMPARISON_FILE = "sweep_comparison"  # .png and .csv, logged to the parent run
KSHOT_FILE = "kshot_curve"  # the parent run's k-shot curve (sweeps with evaluator.shots)


class MlflowSweepParent(Callback):
    """Opens the sweep's parent run on multirun start; closes it (FAILED if a child failed) at the end."""

    def __init__(self) -> None:
        self._tracker = None
        self._parent = None
        self._failed_jobs = 0
        self._sweep_dir: Path | None = None
        self._monitor: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Parallel launchers pickle the callbacks into their workers: leave the client behind."""
        return {**self.__dict__, "_tracker": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # lets ${hydra:...} in paths resolve here and in the launcher (hydra.sweep.dir reads
        # paths.output_root), with or without tracking
        HydraConfig.instance().set_config(config)
        logger = config.get("logger")
        if logger is None or not str(logger.get("_target_", "")).endswith("MlflowTracker"):
            return
        from metarec_runner.tracking import MlflowTracker

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_dir = sweep_dir
        self._monitor = str(config.get("trainer", {}).get("monitor", "val/rmse"))
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
            if self._sweep_dir is not None:  # seen by the sweep process when this is a worker
                marker = self._sweep_dir / FAILED_DIR / str(config.hydra.job.get("num", "x"))
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close(None)

    def _any_failed(self) -> bool:
        """Whether a job failed, in this process or in a launcher's worker."""
        markers = self._sweep_dir / FAILED_DIR if self._sweep_dir is not None else None
        return bool(self._failed_jobs) or bool(markers and markers.is_dir() and any(markers.iterdir()))

    def _close_unended(self) -> None:
        self._close("FAILED" if self._any_failed() else "KILLED")

    def _close(self, status: str | None) -> None:
        """End the parent once: with ``status``, or FAILED/FINISHED from the jobs' outcomes."""
        if self._tracker is None or self._parent is None:
            return
        parent, self._parent = self._parent, None
        atexit.unregister(self._close_unended)
        if status is None and self._any_failed():
            status = "FAILED"
        if status != "KILLED":
            self._log_comparison(parent)
        if status is None:
            self._tracker.close_sweep_parent(parent)  # FAILED if a child run failed, else FINISHED
        else:
            self._tracker.end_sweep_parent(parent, status)

    def _log_comparison(self, parent: Any) -> None:
        """Plot and log the children's comparison to the parent run; warn, never raise."""
        if self._sweep_dir is None:
            return
        try:
            path = log_sweep_comparison(parent.tracking_uri, parent.run_id, self._sweep_dir,
                                        (self._monitor or "val/rmse").removeprefix("val/"))
            if path is not None:
                log.info("sweep comparison: %s", path)
        except Exception as err:  # noqa: BLE001 - a plot must never fail the sweep
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("sweep comparison plot skipped: %s", text)


def log_sweep_comparison(tracking_uri: str, parent_run_id: str, out_dir: str | Path,
                         metric: str = "rmse") -> Path | None:
    """Compare a sweep's finished children and log ``sweep_comparison.{png,csv}`` to the parent.

    Children are grouped by the keys the sweep varied (``algo``, ``algo.inner_lr``...; ``algo``
    when none), seeds aggregated (:func:`metarec_runner.report.compare.compare_table`): the
    mean over distinct seeds and its 95% Student's t-interval over them (n_seeds - 1 degrees of
    freedom, :mod:`metarec_runner.evaluate.stats`); a group with one distinct seed has no interval (NaN
    ``ci95``, a bare point in the plot), never one over test tasks passed off as one over seeds.
    ``metric`` falls back to ``rmse`` when the children lack it.

    Returns:
        The PNG written into ``out_dir``, or None when no child finished.
    """
    from mlflow.tracking import MlflowClient

    from metarec_runner.report.compare import compare_table, shots_table
    from metarec_runner.report.plots import plot_comparison, plot_kshot_curve
    from metarec_runner.report.store import available_metrics, collect_runs, swept_keys

    runs = collect_runs(tracking_uri, parent_run_id=parent_run_id)
    if runs.empty:
        return None
    if metric not in available_metrics(runs):
        metric = "rmse"
    table = compare_table(runs, metric, group_by=swept_keys(runs) or ["algo"])
    out = Path(out_dir)
    png = plot_comparison(table, out / f"{COMPARISON_FILE}.png", metric)
    table.to_csv(out / f"{COMPARISON_FILE}.csv", index=False)
    client = MlflowClient(tracking_uri)
    client.log_artifact(parent_run_id, str(png))
    client.log_artifact(parent_run_id, str(out / f"{COMPARISON_FILE}.csv"))
    if any(c.startswith("test_k") and c.endswith(f"/{metric}") for c in runs.columns):
        shots = shots_table(runs, metric, group_by=["algo"])  # the k-shot curve, per algo
        curve = plot_kshot_curve(shots, out / f"{KSHOT_FILE}.png", metric)
        shots.to_csv(out / f"{KSHOT_FILE}.csv", index=False)
        client.log_artifact(parent_run_id, str(curve))
        client.log_artifact(parent_run_id, str(out / f"{KSHOT_FILE}.csv"))
    return png


class ThreadsPerJob(Callback):
    """One torch thread per job (``threads=N`` added to every job's overrides) when the launcher
    runs jobs side by side on one machine; explicit ``threads=...`` on the command line wins.

    Args:
        threads: torch threads per job.
        launchers: launcher class names this applies to (the end of ``hydra.launcher._target_``).
    """

    def __init__(self, threads: int = 1,
                 launchers: tuple[str, ...] | list[str] = ("JoblibLauncher", "RayLauncher")) -> None:
        self.threads, self.launchers = int(threads), tuple(launchers)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = str(config.hydra.launcher.get("_target_", ""))
        if not target.endswith(self.launchers) or config.get("threads") is not None:
            return
        if any(o.lstrip("+~").split("=", 1)[0] == "threads" for o in config.hydra.overrides.task):
            return
        sweeper = config.hydra.sweeper
        if "params" not in sweeper:  # a sweeper without extra per-job params: leave it alone
            return
        params = dict(sweeper.params or {})
        params["threads"] = str(self.threads)
        with read_write(sweeper), open_dict(sweeper):  # Hydra marks its nodes read-only
            sweeper.params = params
        log.info("%s: threads=%d per job", target.rsplit(".", 1)[-1], self.threads)



class PrewarmWorkers(Callback):
    """Joblib launcher: fork the worker processes from a server that has imported, once, what
    every job needs (:mod:`metarec_runner.launch.worker_preload`), instead of letting each
    worker start a fresh interpreter and import torch, MLflow and matplotlib itself.

    On multirun start (before the MLflow parent run is opened) this sets loky's start method to
    ``forkserver`` with that module preloaded and starts the fork server, so its imports run on
    an otherwise idle core while the sweep process prepares; joblib's workers are then forked
    from it, already warm. Other launchers, and platforms without ``forkserver`` (Windows), are
    left alone; jobs themselves are unchanged.

    Args:
        launchers: launcher class names this applies to (the end of ``hydra.launcher._target_``).
    """

    def __init__(self, launchers: tuple[str, ...] | list[str] = ("JoblibLauncher",)) -> None:
        self.launchers = tuple(launchers)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not str(config.hydra.launcher.get("_target_", "")).endswith(self.launchers):
            return
        import multiprocessing
        import sys

        if sys.platform == "win32" or "forkserver" not in multiprocessing.get_all_start_methods():
            return
        from multiprocessing import forkserver

        from joblib.externals.loky.backend.context import set_start_method

        multiprocessing.set_forkserver_preload(["metarec_runner.launch.worker_preload"])
        set_start_method("forkserver", force=True)
        forkserver.ensure_running()  # the server imports in the background from here on
        log.info("PrewarmWorkers: joblib workers fork from a preloaded server")
