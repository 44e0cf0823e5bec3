"""``metarec ui``: the MLflow UI on 127.0.0.1, started as a child process and waited for.

The UI (``python -m mlflow ui``, which starts its own uvicorn worker) runs in a process group of
its own; ``metarec ui`` passes SIGINT, SIGTERM and SIGHUP on to that whole group (as SIGTERM,
SIGKILL on a repeat), waits for it and exits with 128 + the signal, so Ctrl+C and ``kill``
stop every process it started. The runs-table URL is
printed only once the server answers HTTP. Standard library only (``metarec --help`` stays fast).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0  # a cold start (imports, database migrations) takes 10-30 s
_POLL_S = 0.5
_QUIET = "ignore:starlette.middleware.wsgi is deprecated:UserWarning"
"""A ``PYTHONWARNINGS`` filter for the StarletteDeprecationWarning (a UserWarning) that MLflow's
FastAPI app triggers on import."""


class UIError(Exception):
    """The UI could not be started or did not answer (one line, with the fix)."""


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when ``host:port`` cannot be bound (another server listens on it). SO_REUSEADDR is
    set, as uvicorn sets it, so connections of a server that just stopped (TIME_WAIT) do not
    count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def ui_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The UI's environment: job execution off (~0.5 GB instead of ~2.4 GB) and the Starlette
    deprecation warning silenced (other warning filters kept)."""
    env = dict(os.environ if base is None else base)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), _QUIET) if w)
    return env


def ui_command(uri: str, port: int) -> list[str]:
    """``python -m mlflow ui`` on ``uri``, 127.0.0.1:``port``, one worker."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST,
            "--port", str(port), "--workers", "1"]


def answers(port: int, timeout: float = 2.0) -> bool:
    """True when ``http://127.0.0.1:port/health`` answers with HTTP 200."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until_ready(proc: subprocess.Popen, port: int, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll the server until it answers; UIError when it exits first or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise UIError(f"the MLflow UI exited with status {code} before answering on "
                          f"{HOST}:{port}; see its messages above")
        if answers(port):
            return
        time.sleep(_POLL_S)
    raise UIError(f"the MLflow UI did not answer on {HOST}:{port} within {timeout:.0f} s; "
                  f"check the store URI and the messages above")


def runs_urls(port: int) -> dict[str, str]:
    """What ``metarec ui`` prints: ``{"runs table": url}``, the most recently updated
    experiment's runs table in machine-learning mode, opening its ``metarec-runs`` view (algo,
    model, dataset, seeds and headline metrics as columns) when it has one, plus ``"latest
    sweep"``, the view of its newest sweep, when one was written (:mod:`..tracking.ui_views`).
    Asked of the running server itself; the experiment list when it lists none."""
    from metarec_runner.tracking import ui_views

    base = f"http://{HOST}:{port}"
    body = json.dumps({"max_results": 1, "order_by": ["last_update_time DESC"]}).encode()
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            found: list[dict[str, Any]] = json.loads(resp.read()).get("experiments") or []
    except (urllib.error.URLError, OSError, ValueError):
        found = []
    if not found:
        return {"runs table": f"{base}/#/experiments"}
    experiment_id = found[0]["experiment_id"]
    tags = {t.get("key"): t.get("value") for t in found[0].get("tags") or []}
    has_runs_view = ui_views.SHARED_VIEW_TAG + ui_views.RUNS_VIEW in tags
    urls = {"runs table": f"{base}/" + ui_views.view_path(
        experiment_id, ui_views.RUNS_VIEW if has_runs_view else None)}
    sweep = tags.get(ui_views.LATEST_SWEEP_TAG)
    if sweep and ui_views.SHARED_VIEW_TAG + sweep in tags:
        urls["latest sweep"] = f"{base}/" + ui_views.view_path(experiment_id, sweep)
    return urls


class _Forwarder:
    """Signal handler: SIGINT, SIGTERM and SIGHUP become SIGTERM for the UI's whole process group
    (SIGKILL on a repeat). SIGTERM because the UI's processes may ignore SIGINT until uvicorn
    installs its handlers (a shell's background job starts with SIGINT ignored); uvicorn shuts
    down gracefully on either. Signals that arrive before the UI starts are kept in
    ``received`` and acted on by :func:`serve`."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.received: list[int] = []

    def __call__(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM if len(self.received) == 1 else signal.SIGKILL)
        except ProcessLookupError:
            pass


def serve(uri: str, port: int, echo: Any, timeout: float = READY_TIMEOUT_S) -> int:
    """Start the UI, print the runs-table URL once it answers, wait for it; the exit status
    (128 + the signal when a signal stopped it).

    Raises UIError when the port is taken (before anything starts) or the UI never answers.
    """
    if port_in_use(port):
        raise UIError(f"port {port} on {HOST} is already in use (another `metarec ui` or MLflow "
                      f"server?); pick a free one with --port, e.g. --port {port + 1}")
    echo(f"starting the MLflow UI for {uri} on {HOST}:{port} ...")
    forward = _Forwarder()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    proc = None
    try:
        proc = forward.proc = subprocess.Popen(ui_command(uri, port), env=ui_env(),
                                               start_new_session=True)
        if forward.received:  # a signal came while it was being started
            return 128 + forward.received[0]
        try:
            wait_until_ready(proc, port, timeout)
        except UIError:
            if forward.received:  # stopped by Ctrl+C or kill while starting: nothing to report
                return 128 + forward.received[0]
            raise
        links = "\n".join(f"{what}: {url}" for what, url in runs_urls(port).items())
        echo(f"MLflow UI for {uri}\n{links}\n(Ctrl+C to stop)")
        code = proc.wait()
    finally:
        if proc is not None:
            _stop(proc)  # the UI's own workers too, whatever ended the wait
        for sig, old in previous.items():
            signal.signal(sig, old)
    if forward.received:
        return 128 + forward.received[0]
    return 128 - code if code < 0 else code


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: still there
        return True
    return True


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop every process of the UI's group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.1)
