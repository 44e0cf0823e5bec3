"""Read a tiny sweep in the MLflow UI through a real headless browser, as a researcher would.

Trains a 2-job sweep (maml and popularity on the toy catalog) into a fresh store, starts
`metarec ui` on 127.0.0.1, and loads two pages in headless Chromium:

- the runs table at the URL `metarec ui` prints: it must open in machine-learning mode ("Model
  training"), show the sweep's parent run with its 2 children (3 matching runs), and have the
  `algo` param and the headline metric `test/ndcg_at_10` as columns (metarec's shared view,
  `tracking/ui_views.py`: MLflow 3's own default table has neither);
- the "latest sweep" URL it prints: only the sweep's 2 children, one group row per algo;
- the maml child's page: its params must show `algo`, its metrics the headline `test/ndcg_at_10`,
  and its inputs the dataset (logged with `mlflow.log_input`).

Screenshots of the three pages are saved. Usage::

    python scripts/check_ui_browser.py [OUT_DIR]      # exit 0 when every check holds; needs chromium

`tests/test_ui_browser.py` runs it when Chromium is installed and skips with the reason when not.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=2", "trainer.progress=false",
        "logger.log_model=false"]


def browser() -> str | None:
    """The first headless-capable Chromium on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _render(chrome: str, url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran (and a screenshot of it)."""
    flags = [chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--window-size=1600,1000", "--virtual-time-budget=25000"]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=False)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                          check=False).stdout


def check(out: Path) -> list[str]:
    """Run the sweep, the UI and the browser; returns the failed checks (empty: all hold)."""
    chrome = browser()
    if chrome is None:
        return ["no Chromium on PATH (apt-get install chromium)"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env["METAREC_OUTPUT_DIR"] = str(out / "outputs")
    metarec = [sys.executable, "-m", "metarec_runner.cli"]
    sweep = subprocess.run([*metarec, "train", "-m", "+algo=maml,popularity", *TINY], cwd=out, env=env,
                           capture_output=True, text=True, timeout=600, check=False)
    if sweep.returncode != 0:
        return [f"the sweep failed: {sweep.stderr[-500:]}"]
    port = _free_port()
    ui = subprocess.Popen([*metarec, "ui", "--port", str(port)], cwd=out, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    failed: list[str] = []
    try:
        urls: dict[str, str] = {}
        deadline = time.monotonic() + 240
        while "(Ctrl+C to stop)" not in urls and time.monotonic() < deadline:
            line = ui.stdout.readline()
            if not line:
                break
            what, sep, url = line.strip().partition(": http")
            urls[what if sep else line.strip()] = "http" + url
        if "runs table" not in urls:
            return ["metarec ui printed no runs-table URL"]
        if "latest sweep" not in urls:
            failed.append("metarec ui printed no 'latest sweep' URL")
        pages = {"runs table": ("runs_table.png", (
            ("Model registry", "machine-learning mode's navigation"),
            ("sweep:", "the sweep's parent run"),
            ("3 matching runs", "the parent and its 2 children"),
            (">algo<", "the algo param's column"),
            (">test/ndcg_at_10<", "the headline metric's column")))}
        if "latest sweep" in urls:
            pages["latest sweep"] = ("sweep_view.png", (
                ("2 matching runs", "the sweep's 2 children only"),
                ("Group: maml", "maml's group row"), ("Group: popularity", "popularity's group row"),
                (">test/ndcg_at_10<", "the headline metric's column")))
        for what, (shot, needles) in pages.items():
            dom = _render(chrome, urls[what], out / shot)
            text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())  # the visible text
            for needle, meaning in needles:
                if needle not in (dom if needle.startswith(">") else text):
                    failed.append(f"{what}: {meaning} ({needle!r}) not shown")
            if "Evaluation runs" in text:  # the GenAI mode's navigation
                failed.append(f"{what}: opened in GenAI mode")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{out / 'outputs' / 'mlflow.db'}")
        exp = client.get_experiment_by_name("train/toy")
        maml = client.search_runs([exp.experiment_id], "attributes.run_name = 'maml-melu-toy-s0'")[0]
        page = f"#/experiments/{exp.experiment_id}/runs/{maml.info.run_id}?workflowType=machine_learning"
        run = _render(chrome, f"http://127.0.0.1:{port}/{page}", out / "run_page.png")
        for needle, what in ((">algo<", "the algo param"), ("test/ndcg_at_10", "the headline metric"),
                             (">toy<", "the dataset input")):
            if needle not in run:
                failed.append(f"run page: {what} ({needle!r}) not shown")
        if "Evaluation runs" in run:
            failed.append("run page: opened in GenAI mode")
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)
            try:
                ui.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
    return failed


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="metarec-ui-"))
    out.mkdir(parents=True, exist_ok=True)
    failed = check(out)
    for line in failed:
        print(f"FAILED: {line}")
    shots = ", ".join(str(out / name) for name in ("runs_table.png", "sweep_view.png", "run_page.png"))
    print(f"screenshots: {shots}" if not failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
