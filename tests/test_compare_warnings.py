"""``metarec compare`` says which runs it left out (unfinished) and which count once (identical)."""

from __future__ import annotations

import pandas as pd

from metarec_runner.report.store import run_warnings


def _runs(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def test_unfinished_runs_are_reported_with_their_status():
    every = _runs([{"status": "FINISHED", "run_name": "a"}, {"status": "RUNNING", "run_name": "b"},
                   {"status": "RUNNING", "run_name": "c"}, {"status": "FAILED", "run_name": "d"}])
    finished = every[every["status"] == "FINISHED"]
    [line] = run_warnings(finished, every)
    assert line.startswith("3 of 4 runs are not finished (1 FAILED, 2 RUNNING)")


def test_runs_identical_but_for_their_name_are_reported_and_distinct_ones_are_not():
    base = {"status": "FINISHED", "split_hash": "h1", "seed": 0, "params.algo": "maml", "params.inner_lr": "0.1",
            "params.only_some": float("nan")}  # a param some runs lack: NaN in the table
    finished = _runs([{**base, "run_name": "x", "params.run_name": "x"},
                      {**base, "run_name": "y", "params.run_name": "y"},
                      {**base, "run_name": "z", "params.run_name": "z", "seed": 1}])
    [line] = run_warnings(finished, finished)
    assert line.startswith("2 runs are identical in everything but their name (x, y)")
    assert run_warnings(finished.iloc[1:], finished.iloc[1:]) == []


def test_no_runs_at_all_gives_no_warning():
    empty = pd.DataFrame()
    assert run_warnings(empty, empty) == []
