"""`metarec ui`: a taken port is refused before anything starts; the URL is printed only once
the server answers, opens the runs table in machine-learning mode, and Ctrl+C stops every
process the UI started."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metarec_runner.cli import ui
from metarec_runner.cli.app import app
from tests.helpers import METAREC, free_port


def test_a_port_in_use_is_one_line_and_nothing_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert ui.port_in_use(port)
        res = CliRunner().invoke(app, ["ui", "--port", str(port), "--tracking-uri",
                                       f"sqlite:///{tmp_path}/mlflow.db"])
    assert res.exit_code == 2
    assert res.stdout == ""  # not even "starting ..."
    assert res.stderr.count("\n") == 1
    assert f"port {port} on 127.0.0.1 is already in use" in res.stderr and "--port" in res.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not ui.port_in_use(port)  # closed again: free


def test_ui_environment_keeps_other_warning_filters() -> None:
    env = ui.ui_env({"PYTHONWARNINGS": "error::ResourceWarning", "PATH": "/bin"})
    assert env["PYTHONWARNINGS"] == f"error::ResourceWarning,{ui._QUIET}"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false" and env["PATH"] == "/bin"
    assert ui.ui_env({})["PYTHONWARNINGS"] == ui._QUIET


@pytest.mark.slow
def test_the_starlette_warning_is_silenced() -> None:
    code = "import mlflow.server.fastapi_app"
    base = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    loud = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True,
                          timeout=180, check=True)
    quiet = subprocess.run([sys.executable, "-c", code], env=ui.ui_env(base), capture_output=True,
                           text=True, timeout=180, check=True)
    assert "StarletteDeprecationWarning" in loud.stderr  # the noise exists without the filter
    assert "StarletteDeprecationWarning" not in quiet.stderr


def ui_processes(port: int) -> list[str]:
    """Command lines of running processes serving ``port`` with MLflow (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(args).decode("utf-8", "replace")
        if "mlflow" in text and f"--port {port} " in text + " " and "metarec ui" not in text:
            found.append(text)
    return found


def start_ui(tmp_path: Path, port: int) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen([*METAREC, "ui", "--port", str(port), "--tracking-uri",
                             f"sqlite:///{tmp_path}/mlflow.db"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines


@pytest.mark.slow
def test_ctrl_c_while_starting_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    proc, lines = start_ui(tmp_path, port)
    try:
        first = lines.get(timeout=120)
        assert first is not None and first.startswith("starting the MLflow UI")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 130  # 128 + SIGINT, whether or not it had answered yet
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert ui_processes(port) == []
    assert not ui.port_in_use(port)


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


@pytest.mark.slow
def test_ui_prints_the_runs_table_once_it_answers_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from metarec_runner.tracking import ui_views

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("newest")
    ui_views.ensure_runs_view(client, exp, {})  # as a metarec run and a sweep write them
    ui_views.write_sweep_view(client, exp, "0123abcd", ["algo", "seed"], "rmse", True)
    port = free_port()
    proc, lines = start_ui(tmp_path, port)
    seen, urls = [], {}
    try:
        while "latest sweep" not in urls:
            line = lines.get(timeout=240)  # bounded: a cold start takes 10-30 s
            assert line is not None, "metarec ui ended before printing the URLs:\n" + "".join(seen)
            seen.append(line)
            for what in ("runs table", "latest sweep"):
                if line.startswith(f"{what}: "):
                    urls[what] = line.split(": ", 1)[1].strip()
        url = urls["runs table"]
        base = f"http://127.0.0.1:{port}/#/experiments/{exp}/runs?viewStateShareKey="
        assert url == base + "metarec-runs&workflowType=machine_learning"
        assert urls["latest sweep"] == base + "metarec-sweep-0123abcd&workflowType=machine_learning"
        # printed only after the server answered: its health check is logged before the URL
        assert any("GET /health" in s and "200" in s for s in seen), "".join(seen)
        with urllib.request.urlopen(url, timeout=30) as resp:  # the fragment stays client-side
            assert resp.status == 200
            assert "<html" in resp.read(4096).decode("utf-8", "replace").lower()
        assert ui_processes(port)  # the UI's own processes, in their own process group
        proc.send_signal(signal.SIGINT)  # Ctrl+C reaches metarec, which forwards it to the UI
        assert proc.wait(timeout=90) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    while (line := lines.get(timeout=30)) is not None:
        seen.append(line)
    assert ui_processes(port) == [], "the UI's processes outlived metarec ui"
    assert not ui.port_in_use(port)
    with pytest.raises(ConnectionRefusedError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    assert "StarletteDeprecationWarning" not in "".join(seen)
