"""Plots as MLflow artifacts: every plot writes a real PNG; a failing plot never fails a run."""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarec_runner.report import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_width: int = 100, min_height: int = 100) -> tuple[int, int]:
    """A PNG file (magic bytes, an IHDR chunk first, a sane size) ending with IEND; no PIL."""
    data = Path(path).read_bytes()
    assert len(data) > 1000, f"{path} is only {len(data)} bytes"
    assert data[:8] == PNG_MAGIC, f"{path} does not start with the PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_width and height >= min_height, (width, height)
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND", "no IEND chunk at the end: truncated"
    return width, height


def history() -> pd.DataFrame:
    epochs = np.arange(1, 6)
    return pd.DataFrame({
        "epoch": epochs, "train/loss": 1.0 / epochs, "train/inner_loss": 1.2 / epochs,
        "sys/sec_per_outer_step": 0.1, "val/rmse": 1.0 - 0.01 * epochs, "val/rmse_ci95": 0.05,
        "val/ndcg_at_5": 0.5 + 0.01 * epochs, "val/ndcg_at_5_ci95": 0.03,
        "val/best_rmse": 0.95,
    })


def by_support() -> pd.DataFrame:
    return pd.DataFrame({"support_size": ["<=5", "6-10", ">40"], "tasks": [3, 10, 7],
                         "rmse": [1.2, 1.0, 0.9], "rmse_ci95": [0.3, 0.1, 0.05],
                         "ndcg_at_5": [0.4, 0.5, 0.6], "ndcg_at_5_ci95": [0.1, 0.05, 0.05]})


def long_curve(x: str) -> pd.DataFrame:
    rows = [{x: k, "metric": m, "mean": base + 0.01 * k, "ci95": 0.02}
            for m, base in (("rmse", 1.0), ("ndcg_at_5", 0.5)) for k in (0, 1, 2, 5, 10)]
    return pd.DataFrame(rows)


def test_learning_curves_png(tmp_path: Path) -> None:
    path = plots.plot_learning_curves(history(), tmp_path / "lc.png")
    assert path == tmp_path / "lc.png"
    width, height = assert_png(path)
    assert width > height  # a loss panel and two val panels side by side


def test_few_shot_curve_from_both_tables(tmp_path: Path) -> None:
    assert_png(plots.plot_few_shot_curve(by_support(), tmp_path / "buckets.png"))
    assert_png(plots.plot_few_shot_curve(long_curve("shots"), tmp_path / "shots.png"))
    only = plots.plot_few_shot_curve(by_support(), tmp_path / "rmse.png", metrics=["rmse"])
    assert assert_png(only)[0] < assert_png(tmp_path / "buckets.png")[0]  # one panel, not two


def test_adaptation_curve_png(tmp_path: Path) -> None:
    assert_png(plots.plot_adaptation_curve(long_curve("steps"), tmp_path / "sub" / "ad.png"))


def test_comparison_png_and_labels(tmp_path: Path) -> None:
    table = pd.DataFrame({"algo": ["maml", "global"], "seed_note": ["x", "y"], "n_runs": [2, 2],
                          "mean": [1.0, 1.1], "ci95": [0.02, float("nan")]})
    table.attrs.update(group_by=("algo",), lower_is_better=True)
    assert_png(plots.plot_comparison(table, tmp_path / "cmp.png", "rmse"))
    # no attrs: the columns before n_runs name the groups
    assert_png(plots.plot_comparison(pd.DataFrame(table), tmp_path / "cmp2.png", "rmse"))


def test_comparison_bars_are_the_t_intervals_clipped_to_the_metric_range(tmp_path: Path) -> None:
    from metarec_runner.report.compare import compare_table

    runs = pd.DataFrame({
        "run_id": ["a0", "a1", "b0", "c0", "c1"], "algo": ["a", "a", "b", "c", "c"],
        "seed": pd.array([0, 1, 0, 0, 1], dtype="Int64"), "split_hash": ["h"] * 5,
        "test/ndcg_at_5": [0.05, 0.15, 0.5, 0.9, 0.99], "test/rmse": [0.1, 0.3, 1.0, 1.0, 1.1]})
    table = compare_table(runs, "ndcg_at_5")
    _, lo, hi = plots.comparison_bars(table, "ndcg_at_5")
    t = table.set_index("algo")
    assert t.loc["a", "ci95"] == pytest.approx(12.7062 * np.std([0.05, 0.15], ddof=1) / np.sqrt(2),
                                               rel=1e-4)
    rows = {algo: i for i, algo in enumerate(table["algo"])}
    assert lo[rows["a"]] == 0.0 and hi[rows["a"]] == pytest.approx(0.1 + t.loc["a", "ci95"])
    assert hi[rows["c"]] == 1.0 and lo[rows["c"]] == pytest.approx(0.945 - t.loc["c", "ci95"])
    assert np.isnan(lo[rows["b"]]) and np.isnan(hi[rows["b"]])  # one seed: no bar at all
    assert_png(plots.plot_comparison(table, tmp_path / "ndcg.png", "ndcg_at_5"))
    # rmse: bounded below by 0 only
    table = compare_table(runs, "rmse")
    _, lo, hi = plots.comparison_bars(table, "rmse")
    i = list(table["algo"]).index("a")
    assert lo[i] == 0.0 and hi[i] == pytest.approx(0.2 + table.loc[i, "ci95"]) and hi[i] > 1.0
    assert_png(plots.plot_comparison(table, tmp_path / "rmse.png", "rmse"))
    # a column that names no declared metric: not clipped
    _, lo, _ = plots.comparison_bars(table, "something")
    assert lo[i] == pytest.approx(0.2 - table.loc[i, "ci95"])


@pytest.mark.parametrize("draw, frame", [
    (plots.plot_learning_curves, pd.DataFrame()),
    (plots.plot_learning_curves, pd.DataFrame({"loss": [1.0]})),
    (plots.plot_few_shot_curve, pd.DataFrame({"x": [1]})),
    (plots.plot_adaptation_curve, pd.DataFrame({"steps": [0], "mean": [1.0]})),
])
def test_bad_frames_raise_value_error(draw, frame, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        draw(frame, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


class RecordingTracker:
    """Records log_artifacts calls; optionally fails like an unreachable store."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Path, str | None]] = []
        self.fail = fail

    def log_artifacts(self, directory, artifact_path=None) -> None:
        if self.fail:
            raise ConnectionError("store down\nsecond line")
        self.calls.append((Path(directory), artifact_path))


def test_log_run_plots_writes_and_logs(tmp_path: Path) -> None:
    long_curve("steps").to_csv(tmp_path / "adaptation.csv", index=False)
    long_curve("shots").to_csv(tmp_path / "few_shot.csv", index=False)
    tracker = RecordingTracker()
    written = plots.log_run_plots(tracker, tmp_path, history(), by_support())
    assert sorted(p.name for p in written) == ["adaptation_curve.png", "few_shot_curve.png",
                                               "learning_curves.png", "support_size.png"]
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert_png(path)
    assert tracker.calls == [(tmp_path / "plots", "plots")]


def test_log_run_plots_never_raises(tmp_path: Path, caplog) -> None:
    (tmp_path / "adaptation.csv").write_text("not,a\ncurve,at all\n")
    tracker = RecordingTracker()
    with caplog.at_level(logging.WARNING, logger="metarec_runner.report.plots"):
        written = plots.log_run_plots(tracker, tmp_path, pd.DataFrame(), by_support())
    assert [p.name for p in written] == ["support_size.png"]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("learning_curves.png skipped" in w for w in warnings)
    assert any("adaptation_curve.png skipped" in w for w in warnings)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metarec_runner.report.plots"):
        plots.log_run_plots(RecordingTracker(fail=True), tmp_path, history(), None)
    assert any("not logged" in r.getMessage() and "store down" in r.getMessage()
               and "second line" not in r.getMessage() for r in caplog.records)
    assert plots.log_run_plots(tracker, tmp_path / "none", None, None) == []


@pytest.mark.slow
def test_plots_module_does_not_import_matplotlib() -> None:
    code = ("import sys, metarec_runner.report.plots; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_headless_without_display(tmp_path: Path) -> None:
    """No DISPLAY, an interactive MPLBACKEND set: the Agg canvas is used regardless."""
    code = ("import pandas as pd; from metarec_runner.report import plots; "
            f"plots.plot_comparison(pd.DataFrame({{'algo': ['a'], 'n_runs': [1], 'mean': [1.0], "
            f"'ci95': [0.1]}}), r'{tmp_path / 'c.png'}', 'rmse')")
    env = {"PATH": "/usr/bin:/bin", "MPLBACKEND": "TkAgg", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_png(tmp_path / "c.png")
