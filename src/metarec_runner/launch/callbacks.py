"""Hydra callback: one MLflow parent run per sweep, opened before any job starts.

Jobs find the parent through ``<sweep dir>/mlflow_parent.json`` and start their runs as its
children (in the parent's experiment). Creating experiment and parent here, once, also keeps
parallel jobs from racing to create the experiment.

The parent always ends: FINISHED when every job succeeded, FAILED when any job failed (even one
that failed before it could open its own run), KILLED when the sweep process ends without
Hydra's ``on_multirun_end`` (Ctrl+C; Hydra also skips it after a failed job, hence ``atexit``).
Jobs may run in other processes (joblib, Ray, SLURM): there ``on_job_end`` runs in the job's
process, so a failed job also leaves a marker file in the sweep dir that the sweep process reads.
The parent carries the swept keys as params (``algo: maml,global``); at the end of a sweep it
gets ``sweep_comparison.png``, ``.csv`` and ``.json`` (MLflow's table): the children's test
metric (``trainer.monitor``'s) per swept setting, mean and 95% CI over seeds, a markdown
description and the best child (:mod:`metarec_runner.launch.sweep_report`); the sweep process
prints that table, the parent run id and the commands to look further.

Every job (single runs too) copies what it prints into ``metarec.log`` in its folder and logs
it to its MLflow run (:mod:`metarec_runner.tracking.joblog`); in a sweep each job ends with one
line (its test headline, best epoch, run id) instead of its full test table.

:class:`ThreadsPerJob` gives every job of a parallel local launcher (joblib, Ray) one torch
thread (``threads=1`` as a sweep override, logged with the run), so jobs do not oversubscribe
the cores.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from metarec_runner.launch.sweep_report import COMPARISON_FILE, KSHOT_FILE  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

FAILED_DIR = ".failed_jobs"  # in the sweep dir: one empty file per failed job (any process)


def shares_terminal(config: DictConfig) -> bool:
    """Whether this job prints to a terminal that other jobs of the sweep print to at the same
    time: a multirun on the joblib launcher with more than one worker, or on local Ray (SLURM and
    submitit jobs write to files of their own; the basic launcher runs one job at a time)."""
    from hydra.types import RunMode

    hydra_cfg = config.get("hydra")
    if hydra_cfg is None or hydra_cfg.get("mode") != RunMode.MULTIRUN:
        return False
    launcher = hydra_cfg.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        return launcher.get("n_jobs", -1) != 1
    return target.endswith("RayLauncher")


class MlflowSweepParent(Callback):
    """Opens the sweep's parent run on multirun start; closes it (FAILED if a child failed) at the end."""

    def __init__(self) -> None:
        self._tracker = None
        self._parent = None
        self._failed_jobs = 0
        self._sweep_dir: Path | None = None
        self._monitor: str | None = None
        self._overrides = ""
        self._job_log = None  # the running job's JobLog (in the job's process)
        self._job_start = 0.0

    def __getstate__(self) -> dict[str, Any]:
        """Parallel launchers pickle the callbacks into their workers: leave the client behind."""
        return {**self.__dict__, "_tracker": None, "_job_log": None}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Copy the job's printed lines into ``metarec.log`` in its folder (:mod:`.joblog`)."""
        from metarec_runner.tracking.joblog import JobLog

        self._job_start = time.perf_counter()
        prefix = f"[job {config.hydra.job.get('num', '?')}] " if shares_terminal(config) else ""
        try:
            self._job_log = JobLog(config.hydra.runtime.output_dir, terminal_prefix=prefix).install()
        except OSError as err:  # a read-only folder: the job runs without its log file
            log.warning("metarec.log not written: %s", err)

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
        from metarec_runner.launch.sweep_report import swept_params

        overrides = " ".join(config.hydra.overrides.task)
        self._overrides = overrides
        space = config.hydra.sweeper.get("params")
        swept = swept_params(list(config.hydra.overrides.task),
                             OmegaConf.to_container(space, resolve=False) if space is not None else {})
        self._parent = self._tracker.open_sweep_parent(
            sweep_dir, run_name=f"sweep:{sweep_dir.name}",
            tags={"sweep_overrides": overrides, "sweep_dir": str(sweep_dir), "swept_keys": ",".join(swept)},
            params=swept,
        )
        atexit.register(self._close_unended)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        failed = getattr(job_return, "status", None) == JobStatus.FAILED
        if failed:
            self._failed_jobs += 1
            if self._sweep_dir is not None:  # seen by the sweep process when this is a worker
                marker = self._sweep_dir / FAILED_DIR / str(config.hydra.job.get("num", "x"))
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
        try:
            if config.hydra.mode == RunMode.MULTIRUN:  # one line per job (in the job's own process)
                self._print_job_line(config, job_return, failed)
        finally:
            if self._job_log is not None:
                self._job_log.close()  # after the job's line: it is in metarec.log too
                self._job_log = None

    def _print_job_line(self, config: DictConfig, job_return: Any, failed: bool) -> None:
        from metarec_runner.launch.sweep_report import job_line

        error = getattr(job_return, "_return_value", None) if failed else None  # return_value re-raises
        if failed and not isinstance(error, BaseException):
            error = RuntimeError("failed")
        run = self._job_log.run if self._job_log is not None else None
        with self._job_log.unprefixed() if self._job_log is not None else contextlib.nullcontext():
            print(job_line(config.hydra.job.get("num", "?"), str(OmegaConf.select(config, "run_name", default="")),
                           Path(config.hydra.runtime.output_dir), error, time.perf_counter() - self._job_start,
                           run[1] if run else None), flush=True)

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
            self._log_comparison(parent, failed=status == "FAILED" or self._any_failed())
        if status is None:
            self._tracker.close_sweep_parent(parent)  # FAILED if a child run failed, else FINISHED
        else:
            self._tracker.end_sweep_parent(parent, status)

    def _log_comparison(self, parent: Any, failed: bool = False) -> None:
        """Log the children's comparison to the parent run and print it with the parent run id
        and what to run next; warn, never raise."""
        if self._sweep_dir is None:
            return
        from metarec_runner.launch.sweep_report import print_sweep_end, report_sweep

        report = None
        try:
            report = report_sweep(parent.tracking_uri, parent.run_id, self._sweep_dir,
                                  (self._monitor or "val/rmse").removeprefix("val/"), self._overrides)
            if report is not None:
                log.info("sweep comparison: %s", report.png)
        except Exception as err:  # noqa: BLE001 - a plot must never fail the sweep
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("sweep comparison plot skipped: %s", text)
        try:
            print_sweep_end(report, parent.run_id, failed)
        except Exception as err:  # noqa: BLE001 - the terminal summary must never fail the sweep
            log.warning("sweep summary not printed: %s", err)


def log_sweep_comparison(tracking_uri: str, parent_run_id: str, out_dir: str | Path,
                         metric: str = "rmse") -> Path | None:
    """Compare a sweep's finished children and log the comparison to the parent
    (:func:`metarec_runner.launch.sweep_report.report_sweep`).

    Children are grouped by the keys the sweep varied (``algo``, ``algo.inner_lr``...; ``algo``
    when none), seeds aggregated (:func:`metarec_runner.report.compare.compare_table`): the
    mean over distinct seeds and its 95% Student's t-interval over them (n_seeds - 1 degrees of
    freedom, :mod:`metarec_runner.evaluate.stats`); a group with one distinct seed has no interval (NaN
    ``ci95``, a bare point in the plot), never one over test tasks passed off as one over seeds.
    ``metric`` falls back to ``rmse`` when the children lack it.

    Returns:
        The PNG written into ``out_dir``, or None when no child finished.
    """
    from metarec_runner.launch.sweep_report import report_sweep

    report = report_sweep(tracking_uri, parent_run_id, out_dir, metric)
    return report.png if report is not None else None


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
