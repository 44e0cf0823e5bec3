"""The MLflow UI read in a real headless browser (scripts/check_ui_browser.py), when Chromium is here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_ui_browser.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_ui_browser", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_runs_table_the_sweep_view_and_a_run_page_show_what_a_researcher_reads(tmp_path):
    check = _script()
    if check.browser() is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium): the UI is not checked in a browser here")
    assert check.check(tmp_path) == []
    for shot in ("runs_table.png", "sweep_view.png", "run_page.png"):
        assert (tmp_path / shot).stat().st_size > 10_000
