"""What a sweep tells you: one line per job while it runs, and at the end the comparison of its
children, logged to the parent run (table, plot, markdown description, best child) and printed
with the commands that look further.

Used by :class:`metarec_runner.launch.callbacks.MlflowSweepParent`. Only the sweep process's
light imports are at module level (no torch, pandas or MLflow).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPARISON_FILE = "sweep_comparison"  # .png, .csv and .json (MLflow's table), logged to the parent run
KSHOT_FILE = "kshot_curve"  # the parent run's k-shot curve (sweeps with evaluator.shots)
BEST_METRIC_PREFIX = "best/"  # the parent's metric best/test/<metric>: the best child's value


def swept_params(overrides: Sequence[str], sweeper_params: dict | None = None) -> dict[str, str]:
    """The keys a sweep varies, with their values as given: ``{"algo": "maml,global", "seed":
    "0,1"}`` from the command line's sweep overrides and the sweeper's own search space
    (``hydra.sweeper.params``, e.g. Optuna's ``interval(...)``). Fixed values are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = list(overrides) + [f"{k}={v}" for k, v in (sweeper_params or {}).items()]
    out: dict[str, str] = {}
    parser = OverridesParser.create()
    for line in lines:
        try:
            parsed = parser.parse_overrides([line])[0]
        except Exception:  # noqa: BLE001 - Hydra has already accepted it; keep it as written
            continue
        if parsed.is_sweep_override():
            out.setdefault(parsed.key_or_group, parsed.input_line.split("=", 1)[1])
    return out


def job_line(num: object, name: str, out_dir: Path, failed: BaseException | None, seconds: float,
             run_id: str | None = None) -> str:
    """One line for a finished job: its test headline (``metrics.json`` in its folder), the best
    epoch, the MLflow run id, the time; or the first line of its error."""
    head = f"job {num} {name}"
    if failed is not None:
        text = str(failed).strip().splitlines()
        return f"{head}: FAILED ({text[0] if text else type(failed).__name__})  {seconds:.1f} s"
    path = out_dir / "metrics.json"
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{head}: done  {seconds:.1f} s  ({path.name} not written)"
    parts = []
    for key in ("test/rmse", "test/ndcg_at_10"):
        if isinstance(found.get(key), int | float) and math.isfinite(found[key]):
            ci = found.get(f"{key}_ci95")
            parts.append(f"{key}={found[key]:.4f}" + (f" ±{ci:.4f}" if isinstance(ci, int | float)
                                                      and math.isfinite(ci) else ""))
    best = next(((k, v) for k, v in found.items() if k.startswith("best_val/")), None)
    if best is not None and isinstance(best[1], int | float):
        parts.append(f"best epoch {found.get('best_epoch')} ({best[0][5:]}={best[1]:.4f})")
    if run_id:
        parts.append(f"run {run_id}")
    return f"{head}: " + "  ".join(parts) + f"  {seconds:.1f} s"


@dataclass
class SweepReport:
    """The end of a sweep: the comparison table, its runs, the plot and the best child."""

    table: Any  # pandas.DataFrame (compare_table)
    runs: Any  # pandas.DataFrame (collect_runs)
    metric: str
    png: Path
    best_run_id: str | None
    best_run_name: str | None
    best_value: float
    note: str
    view: str | None = None  # the UI route of the sweep's shared view (tracking/ui_views.py)


def _markdown(table, columns: Sequence[str]) -> str:
    """``table[columns]`` as a markdown table (numbers to 4 decimals, NaN blank)."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for _, row in table.iterrows()]
    return "\n".join(lines)


def report_sweep(tracking_uri: str, parent_run_id: str, out_dir: str | Path, metric: str = "rmse",
                 overrides: str = "") -> SweepReport | None:
    """Compare a sweep's finished children and log it all to the parent run: the table
    (``sweep_comparison.csv`` and MLflow's table ``sweep_comparison.json``), the plot
    (``sweep_comparison.png``, and the k-shot curve with ``evaluator.shots``), a markdown
    description (``mlflow.note.content``), the best child (tags ``best_run_id``,
    ``best_run_name``, metric ``best/test/<metric>``). ``metric`` falls back to ``rmse`` when the
    children lack it. Returns None when no child finished."""
    from mlflow.tracking import MlflowClient

    from metarec_runner.evaluate.metric_specs import lower_is_better
    from metarec_runner.report.compare import compare_table, has_shots, shots_table
    from metarec_runner.report.plots import plot_comparison, plot_kshot_curve
    from metarec_runner.report.store import available_metrics, collect_runs, swept_keys

    runs = collect_runs(tracking_uri, parent_run_id=parent_run_id)
    if runs.empty:
        return None
    if metric not in available_metrics(runs):
        metric = "rmse"
    group_by = swept_keys(runs) or ["algo"]
    table = compare_table(runs, metric, group_by=group_by)
    out = Path(out_dir)
    png = plot_comparison(table, out / f"{COMPARISON_FILE}.png", metric)
    table.to_csv(out / f"{COMPARISON_FILE}.csv", index=False)
    client = MlflowClient(tracking_uri)
    client.log_artifact(parent_run_id, str(png))
    client.log_artifact(parent_run_id, str(out / f"{COMPARISON_FILE}.csv"))
    client.log_table(parent_run_id, table.reset_index(drop=True), f"{COMPARISON_FILE}.json")
    if has_shots(runs, metric):
        shots = shots_table(runs, metric, group_by=["algo"])  # the k-shot curve, per algo
        curve = plot_kshot_curve(shots, out / f"{KSHOT_FILE}.png", metric)
        shots.to_csv(out / f"{KSHOT_FILE}.csv", index=False)
        client.log_artifact(parent_run_id, str(curve))
        client.log_artifact(parent_run_id, str(out / f"{KSHOT_FILE}.csv"))
    col = f"test/{metric}"
    scored = runs[runs[col].notna()] if col in runs.columns else runs.iloc[0:0]
    best_id = best_name = None
    best_value = math.nan
    if len(scored):
        best = scored.loc[scored[col].idxmin() if lower_is_better(metric) else scored[col].idxmax()]
        best_id, best_name, best_value = str(best["run_id"]), str(best["run_name"]), float(best[col])
    columns = [*group_by, "n_runs", "n_seeds", "mean", "ci95"]
    note = "\n\n".join(filter(None, [
        f"**Sweep** `metarec train -m {overrides}`: {len(runs)} finished runs, test/{metric} per "
        f"{', '.join(group_by)} (mean over distinct seeds, 95% Student-t interval over them).",
        _markdown(table, [c for c in columns if c in table.columns]),
        f"Best test/{metric} ({'lowest' if lower_is_better(metric) else 'highest'}): `{best_name}` "
        f"(`{best_id}`), {best_value:.4f} (a report of the test users, "
        "not a model selection: select on validation)." if best_id else "",
        f"Compare: `metarec compare --sweep {parent_run_id}`; browse: `metarec ui`."]))
    tags = {"mlflow.note.content": note}
    if best_id:
        tags.update({"best_run_id": best_id, "best_run_name": best_name})
        client.log_metric(parent_run_id, f"{BEST_METRIC_PREFIX}test/{metric}", best_value)
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    view = _write_sweep_view(client, parent_run_id, group_by, runs, metric)
    return SweepReport(table, runs, metric, png, best_id, best_name, best_value, note, view)


def _write_sweep_view(client: Any, parent_run_id: str, group_by: Sequence[str], runs: Any,
                      metric: str) -> str | None:
    """The sweep's shared view in the MLflow UI (its children grouped by ``group_by``, the seeds
    and ``test/<metric>`` as columns); its route, or None when the store refused it."""
    from metarec_runner.evaluate.metric_specs import lower_is_better
    from metarec_runner.report.store import AGGREGATED_KEYS, OVERRIDE_PREFIX
    from metarec_runner.tracking import ui_views

    seeds = [key for key in AGGREGATED_KEYS if OVERRIDE_PREFIX + key in runs.columns]
    try:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        key = ui_views.write_sweep_view(client, experiment_id, parent_run_id, [*group_by, *seeds],
                                        metric, lower_is_better(metric))
    except Exception as err:  # noqa: BLE001 - a convenience of the UI; the comparison is logged
        log.warning("MLflow UI view of the sweep not written: %s", err)
        return None
    return ui_views.view_path(experiment_id, key)


def print_sweep_end(report: SweepReport | None, parent_run_id: str, failed: bool) -> None:
    """The end of a sweep on the terminal: the comparison table, the parent run, what to run next."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console = Console(soft_wrap=True, width=200)
    if report is not None:
        from metarec_runner.report.tables import print_compare_table

        print_compare_table(console, report.table, report.runs, None)
        if report.best_run_id:
            from metarec_runner.evaluate.metric_specs import lower_is_better

            which = "lowest" if lower_is_better(report.metric) else "highest"
            console.print(f"best test/{report.metric} ({which}): {report.best_run_name} ({report.best_run_id}), "
                          f"{report.best_value:.4f} (a report of the test users, not a model selection: "
                          "select on validation)", highlight=False)
    console.print(f"sweep parent run {parent_run_id}{' (FAILED: a job failed)' if failed else ''}",
                  highlight=False)
    console.print(f"compare: metarec compare --sweep {parent_run_id}    browse: metarec ui", highlight=False)
    if report is not None and report.view:
        console.print(f"  (its 'latest sweep' link, {report.view} on the UI's address, opens this sweep's "
                      "runs grouped by the swept keys)", highlight=False)
