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


# ------------------------------------------------------------------ what the figures say


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, by file name (the PNGs are still written)."""
    from metarec_runner.report import plots_common

    saved = {}
    real = plots_common.save

    def keep(fig, path):
        saved[Path(path).name] = fig
        return real(fig, path)

    monkeypatch.setattr(plots_common, "save", keep)
    return saved


def panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes}


def hlines(ax) -> dict[str, float]:
    """The reference lines across a panel (``axhline``: x from 0 to 1 in axes units): ``{label: y}``."""
    return {line.get_label(): float(line.get_ydata()[0]) for line in ax.get_lines()
            if list(line.get_xdata()) == [0, 1] and len(set(line.get_ydata())) == 1}


def band_y(ax) -> np.ndarray:
    return np.concatenate([c.get_paths()[0].vertices[:, 1] for c in ax.collections
                           if c.get_paths()])


def wide_history(n_metrics: int = 8) -> pd.DataFrame:
    epochs = np.arange(1, 8)
    frame = {"epoch": epochs, "train/loss": 100.0 / epochs ** 3, "val/rmse": 1.0 - 0.01 * epochs,
             "val/rmse_ci95": 2.0, "val/ndcg_at_5": 0.5 + 0.01 * epochs, "val/ndcg_at_5_ci95": 0.9}
    for i in range(n_metrics - 2):
        frame[f"val/recall_at_{i + 1}"] = 0.3 + 0.001 * epochs
    return pd.DataFrame(frame)


def test_learning_curves_title_labels_scale_marker_and_references(tmp_path, figures) -> None:
    title = plots.run_title("maml", "melu", "toy", 3)
    plots.plot_learning_curves(wide_history(), tmp_path / "lc.png", title=title, monitor="val/rmse",
                               floor_rmse=0.8, popularity={"ndcg_at_5": 0.42})
    fig = figures["lc.png"]
    assert fig.get_suptitle() == "learning curves\nalgo maml, model melu, data toy, seed 3"
    by = panels(fig)
    assert len(by) == 9  # the loss and all 8 validation metrics (no cap at 6)
    loss, rmse, ndcg = by["training loss"], by["validation RMSE"], by["validation NDCG@5"]
    assert loss.get_yscale() == "log"  # 100 .. 0.29: spans > 30x
    assert rmse.get_yscale() == "linear"
    assert rmse.get_ylabel() == "RMSE (rating points, lower is better)"
    assert ndcg.get_ylabel() == "NDCG@5 (0 to 1, higher is better)"
    assert "loss" in loss.get_ylabel() and "per rating" in loss.get_ylabel()
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch"
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 7]
        assert ticks and all(float(t).is_integer() for t in ticks)
        marker = [line for line in ax.get_lines() if line.get_label() == "best epoch 7"]
        assert marker and list(marker[0].get_xdata()) == [7, 7]  # val/rmse is lowest at epoch 7
    assert hlines(rmse)["noise floor 0.8"] == pytest.approx(0.8)
    assert not any(k.startswith("noise floor") for k in hlines(ndcg))
    assert hlines(ndcg)["popularity 0.42"] == pytest.approx(0.42)
    assert not any(k.startswith("popularity") for k in hlines(rmse))
    assert band_y(rmse).min() >= 0.0 and band_y(rmse).max() > 2.5  # RMSE: clipped below only
    assert band_y(ndcg).min() >= 0.0 and band_y(ndcg).max() <= 1.0  # NDCG: clipped to [0, 1]


def test_narrow_loss_stays_linear_and_best_epoch_can_be_given(tmp_path, figures) -> None:
    frame = history().assign(**{"val/floor_rmse": 0.6, "val/floor_rmse_ci95": 0.1})
    plots.plot_learning_curves(frame, tmp_path / "lc.png", best_epoch=2)  # loss 1 .. 0.2: 5x
    by = panels(figures["lc.png"])
    assert sorted(by) == ["training loss", "validation NDCG@5", "validation RMSE"]  # no floor panel
    assert hlines(by["validation RMSE"]) == {"noise floor 0.6": pytest.approx(0.6)}
    assert by["training loss"].get_yscale() == "linear"
    assert figures["lc.png"].get_suptitle() == "learning curves"
    assert [line.get_label() for line in by["validation RMSE"].get_lines()].count("best epoch 2") == 1


def test_few_shot_curve_categorical_k_and_references(tmp_path, figures) -> None:
    frame = long_curve("shots")
    frame.loc[frame["metric"] == "ndcg_at_5", "ci95"] = 0.9
    plots.plot_few_shot_curve(frame, tmp_path / "fs.png", title="algo maml",
                              full_support={"rmse": 0.9, "ndcg_at_5": 0.6},
                              no_adaptation={"rmse": 1.3})
    fig = figures["fs.png"]
    assert fig.get_suptitle() == "test metrics vs support size k\nalgo maml"
    by = panels(fig)
    rmse, ndcg = by["test RMSE vs support size k"], by["test NDCG@5 vs support size k"]
    assert [t.get_text() for t in rmse.get_xticklabels()] == ["k=0", "k=1", "k=2", "k=5", "k=10"]
    curve = [line for line in rmse.get_lines() if line.get_label() == "rmse"][0]
    assert list(curve.get_xdata()) == [0, 1, 2, 3, 4]  # evenly spaced categories, not 0..10
    assert hlines(rmse) == {"full support 0.9": pytest.approx(0.9), "no adaptation 1.3": pytest.approx(1.3)}
    assert hlines(ndcg) == {"full support 0.6": pytest.approx(0.6)}
    assert band_y(ndcg).min() >= 0.0 and band_y(ndcg).max() <= 1.0


def test_support_size_plot_is_titled_observational_and_clipped(tmp_path, figures) -> None:
    frame = by_support().assign(ndcg_at_5_ci95=[0.9, 0.9, 0.9], floor_rmse=[0.5, 0.6, 0.7])
    plots.plot_few_shot_curve(frame, tmp_path / "ss.png", title="algo maml, seed 0", floor_rmse=0.7)
    fig = figures["ss.png"]
    assert fig.get_suptitle() == "test metrics by support size (observational, not controlled)\nalgo maml, seed 0"
    by = panels(fig)
    ndcg = by["test NDCG@5 by support size (observational)"]
    rmse = by["test RMSE by support size (observational)"]
    segments = np.concatenate([seg for c in ndcg.collections for seg in c.get_segments()])
    assert segments[:, 1].min() >= 0.0 and segments[:, 1].max() <= 1.0  # 0.4 ± 0.9 -> [0, 1]
    assert hlines(rmse)["noise floor 0.7"] == pytest.approx(0.7)
    assert len(by) == 2  # rmse and ndcg_at_5; floor_rmse is a line on the RMSE panel, not a panel
    own = [line for line in rmse.get_lines() if line.get_label() == "noise floor (these users)"]
    assert list(own[0].get_ydata()) == [0.5, 0.6, 0.7]
    assert ndcg.get_ylabel().startswith("NDCG@5 (0 to 1")


def test_adaptation_curve_integer_steps_and_title(tmp_path, figures) -> None:
    plots.plot_adaptation_curve(long_curve("steps"), tmp_path / "ad.png", title="algo maml")
    fig = figures["ad.png"]
    assert fig.get_suptitle() == "query metrics vs inner steps\nalgo maml"
    rmse = panels(fig)["query RMSE vs inner steps"]
    assert all(float(t).is_integer() for t in rmse.get_xticks())
    assert rmse.get_ylabel() == "RMSE (rating points, lower is better)"


def test_sweep_comparison_title_width_baseline_and_t_intervals(tmp_path, figures) -> None:
    table = pd.DataFrame({"algo": ["maml", "global", "reptile"], "n_runs": [3, 3, 1],
                          "n_seeds": [3, 3, 1], "mean": [0.05, 0.5, 0.3], "std": [0.1, 0.02, np.nan]})
    plots.plot_comparison(table, tmp_path / "cmp.png", "ndcg_at_10", sweep="sw1", dataset="ml-100k",
                          baseline="global")
    fig = figures["cmp.png"]
    ax = fig.axes[0]
    assert ax.get_title() == "test NDCG@10 by algo: sweep sw1, data ml-100k"
    assert fig.get_figwidth() >= 12
    assert "Student-t" in ax.get_xlabel()
    base = [line for line in ax.get_lines() if line.get_label().startswith("baseline global")]
    assert base and list(base[0].get_xdata()) == [0.5, 0.5]
    bars = {float(seg[0][1]): (float(seg[0][0]), float(seg[1][0]))
            for c in ax.collections for seg in c.get_segments()}
    t2 = 4.302653  # t_{0.975} with 2 degrees of freedom: three seeds
    assert set(bars) == {2.0, 1.0}  # maml at the top, then global; reptile (one seed) has none
    assert bars[2.0] == (0.0, pytest.approx(0.05 + t2 * 0.1 / np.sqrt(3), rel=1e-5))  # clipped at 0
    assert bars[1.0] == (pytest.approx(0.5 - t2 * 0.02 / np.sqrt(3), rel=1e-5),
                         pytest.approx(0.5 + t2 * 0.02 / np.sqrt(3), rel=1e-5))
    assert "no CI" in [t.get_text() for t in ax.get_yticklabels()][2]  # reptile: one seed


def test_log_run_plots_titles_every_plot_with_the_run(tmp_path, figures) -> None:
    long_curve("steps").to_csv(tmp_path / "adaptation.csv", index=False)
    long_curve("shots").to_csv(tmp_path / "few_shot.csv", index=False)
    plots.log_run_plots(RecordingTracker(), tmp_path, history(), by_support(), algo="maml",
                        model="melu", dataset="toy", seed=1, monitor="val/rmse",
                        summary={"test/rmse": 0.95, "test/floor_rmse": 0.75,
                                 "test/ref/popularity/ndcg_at_5": 0.3})
    assert sorted(figures) == ["adaptation_curve.png", "few_shot_curve.png", "learning_curves.png",
                               "support_size.png"]
    for fig in figures.values():
        assert fig.get_suptitle().endswith("\nalgo maml, model melu, data toy, seed 1")
    few = panels(figures["few_shot_curve.png"])
    assert hlines(few["test RMSE vs support size k"]) == {
        "noise floor 0.75": pytest.approx(0.75), "full support 0.95": pytest.approx(0.95),
        "no adaptation 1": pytest.approx(1.0)}  # the adaptation curve at 0 steps
    assert "popularity 0.3" in hlines(few["test NDCG@5 vs support size k"])
