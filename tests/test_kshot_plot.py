"""The sweep's k-shot curve: one line per algo over categorical k, bands clipped to the range."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from metarec_runner.report import plots, plots_common


def test_kshot_curve_orders_k_and_clips_bands(tmp_path: Path, monkeypatch) -> None:
    table = pd.DataFrame({
        "k": ["0", "3", "all", "0", "3", "all"],
        "algo": ["a"] * 3 + ["b"] * 3,
        "mean": [0.05, 0.2, 0.3, 0.1, 0.1, 0.1],
        "ci95": [0.2, 0.01, 0.01, math.nan, math.nan, math.nan],  # b: one seed, no band
    })
    saved = {}
    real_save = plots_common.save

    def keep(fig, path):
        saved["fig"] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots_common, "save", keep)
    path = plots.plot_kshot_curve(table, tmp_path / "kshot.png", "ndcg_at_10", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = saved["fig"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["k=0", "k=3", "k=all"]
    assert ax.get_title() == "t" and "ndcg_at_10" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["a"].get_xdata()) == [0, 1, 2]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() >= 0.0  # 0.05 - 0.2 is clipped to NDCG's lower bound
    assert "NDCG@10 (0 to 1, higher is better)" in ax.get_ylabel()


def test_kshot_default_title_names_the_sweep_and_dataset(tmp_path: Path, monkeypatch) -> None:
    table = pd.DataFrame({"k": ["1", "all"], "algo": ["a", "a"], "mean": [0.1, 0.2],
                          "ci95": [0.01, 0.01]})
    saved = {}
    monkeypatch.setattr(plots_common, "save", lambda fig, path: saved.setdefault("fig", fig) and path)
    plots.plot_kshot_curve(table, tmp_path / "k.png", "ndcg_at_10", sweep="coldstart", dataset="ml-100k")
    title = saved["fig"].axes[0].get_title()
    assert "ndcg_at_10 by support size, 1 algos" in title and "sweep coldstart, data ml-100k" in title
