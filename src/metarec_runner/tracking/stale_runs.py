"""Runs left RUNNING by a process that died, found and ended KILLED (``metarec runs clean``).

A run is stale when it is still RUNNING and

- it was written from this host (its ``metarec.host`` tag) and its process (``metarec.pid``)
  is gone: ``os.kill(pid, 0)`` raises ``ProcessLookupError``, or the process is a zombie;
  a live pid keeps the run, however old its heartbeat;
- or it comes from another host, or has no pid tag, and its ``metarec.heartbeat`` is older than
  ``stale_after`` seconds (a run without a heartbeat, from before metarec wrote one or not from
  metarec, counts from its start time).

A stale run is ended KILLED with the tag ``metarec.killed_reason`` saying why; its end time is
its last heartbeat (when it was last known alive; never before its start), or now when it has none. See
:mod:`metarec_runner.tracking.lifecycle` for how runs write these tags.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarec_runner.tracking.lifecycle import HEARTBEAT_TAG, HOST_TAG, PID_TAG
from metarec_runner.tracking.sqlite_store import RetryingClient, TrackingStoreError, sqlite_path

REASON_TAG = "metarec.killed_reason"
STALE_AFTER_S = 600.0  # default: a heartbeat this old (another host's run) means its process died


@dataclass(frozen=True)
class StaleRun:
    """A RUNNING run whose process is gone, and why metarec thinks so."""

    run_id: str
    experiment: str
    run_name: str
    reason: str
    end_time_ms: int  # the run's last sign of life, or the time it was found


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (exited, not yet reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:  # Linux: the state field follows the parenthesised command name
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def stale_reason(tags: dict[str, str], start_time_ms: int, now: float, host: str,
                 stale_after: float) -> tuple[str, int] | None:
    """Why a RUNNING run with ``tags`` is stale, and its end time in ms; None when it is not.

    Args:
        tags: the run's tags.
        start_time_ms: the run's start time.
        now: the current unix time in seconds.
        host: this host's name (``socket.gethostname()``).
        stale_after: the age in seconds past which another host's heartbeat means a dead run.
    """
    beat = _number(tags.get(HEARTBEAT_TAG))
    end_ms = max(int(beat * 1000), start_time_ms) if beat is not None else int(now * 1000)
    pid = _number(tags.get(PID_TAG))
    run_host = tags.get(HOST_TAG)
    if run_host == host and pid is not None:
        if pid_alive(int(pid)):
            return None
        return f"process {int(pid)} on {host} is gone", end_ms
    last = beat if beat is not None else start_time_ms / 1000
    age = now - last
    if age <= stale_after:
        return None
    origin = f"on {run_host}" if run_host else "from an unknown host"
    if beat is None:
        return f"no heartbeat, started {age:.0f} s ago ({origin})", end_ms
    return f"no heartbeat for {age:.0f} s ({origin})", end_ms


def open_client(tracking_uri: str) -> Any:
    """A retrying ``MlflowClient`` for an existing store.

    Raises:
        TrackingStoreError: a sqlite URI whose file does not exist (MLflow would create it).
    """
    path = sqlite_path(tracking_uri)
    if path is not None and not path.is_file():
        raise TrackingStoreError(f"no MLflow store at {path}; pass --tracking-uri with an existing store")
    if path is not None and not _has_runs_table(path):  # MLflow would create its tables in it
        raise TrackingStoreError(f"{path} is not an MLflow store (no runs table); pass --tracking-uri "
                                 "with an existing store")
    from mlflow.tracking import MlflowClient

    return RetryingClient(MlflowClient(tracking_uri=tracking_uri), tracking_uri)


def _has_runs_table(path: Path) -> bool:
    """Whether the sqlite file ``path`` has MLflow's ``runs`` table (read-only check)."""
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'"
                              ).fetchone() is not None
    except sqlite3.DatabaseError:  # not a sqlite file at all
        return False


def running_runs(client: Any) -> list[Any]:
    """Every RUNNING run of every active experiment (``search_runs`` paginated)."""
    from mlflow.entities import ViewType

    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    runs, token = [], None
    while exp_ids:
        page = client.search_runs(exp_ids, "attributes.status = 'RUNNING'", ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        if not (token := page.token):
            break
    return runs


def find_stale_runs(client: Any, stale_after: float = STALE_AFTER_S, now: float | None = None,
                    host: str | None = None) -> tuple[list[StaleRun], int]:
    """The stale runs among the store's RUNNING runs, and how many runs are RUNNING."""
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    names: dict[str, str] = {}
    stale = []
    runs = running_runs(client)
    for run in runs:
        found = stale_reason(run.data.tags, run.info.start_time or 0, now, host, stale_after)
        if found is None:
            continue
        exp_id = run.info.experiment_id
        if exp_id not in names:
            names[exp_id] = client.get_experiment(exp_id).name
        stale.append(StaleRun(run.info.run_id, names[exp_id], run.info.run_name or "", *found))
    return stale, len(runs)


def mark_killed(client: Any, run: StaleRun) -> bool:
    """End ``run`` KILLED with its reason tag; False when it ended meanwhile (left as it is)."""
    if client.get_run(run.run_id).info.status != "RUNNING":
        return False
    client.set_tag(run.run_id, REASON_TAG, run.reason)
    client.set_terminated(run.run_id, "KILLED", end_time=run.end_time_ms)
    return True


def clean_runs(tracking_uri: str, stale_after: float = STALE_AFTER_S,
               dry_run: bool = False) -> tuple[list[StaleRun], int]:
    """End the store's stale runs KILLED (none with ``dry_run``).

    Returns:
        The runs ended (with ``dry_run``: the runs that would be), and how many were RUNNING.

    Raises:
        TrackingStoreError: no store at a sqlite path, or the store stayed busy.
    """
    if stale_after < 0:
        raise ValueError(f"stale_after must be >= 0, got {stale_after}")
    client = open_client(tracking_uri)
    stale, running = find_stale_runs(client, stale_after)
    if dry_run:
        return stale, running
    return [run for run in stale if mark_killed(client, run)], running
