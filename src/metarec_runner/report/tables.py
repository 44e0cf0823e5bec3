"""The comparison table as ``metarec compare`` and the end of a sweep print it: one row per group,
the mean with its interval over seeds, the paired difference to the baseline over users, and
the notes that say what each interval is."""

from __future__ import annotations

import math


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    try:
        if isinstance(value, float) and math.isnan(value):
            return "-"
    except TypeError:
        pass
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if digits < 0 else f"{value:.{digits}f}"
    return str(value)


def one_seed_note(table) -> str:
    """Why some (or all) rows have no interval over seeds."""
    from metarec_runner.evaluate.stats import NO_INTERVAL_ONE_SEED

    single = int((table["n_seeds"] < 2).sum())
    if single == len(table):
        return NO_INTERVAL_ONE_SEED
    return f"{single} of {len(table)} groups have {NO_INTERVAL_ONE_SEED}"


def print_compare_table(console, table, runs, note: str | None) -> None:
    """A comparison table (:func:`metarec_runner.report.compare.compare_table` or
    ``shots_table``) on ``console``, with the notes that say what its intervals are."""
    from rich.table import Table

    metric, baseline = table.attrs["metric"], table.attrs["baseline"]
    direction = "lower" if table.attrs["lower_is_better"] else "higher"
    sweep = runs.attrs.get("parent_run_id")
    title = f"test/{metric} ({direction} is better), {len(runs)} runs" + (f", sweep {sweep}" if sweep else "")
    out = Table(title=title)
    group_by = list(table.attrs["group_by"])
    for key in group_by:
        out.add_column(key)
    out.add_column("runs", justify="right")
    out.add_column("seeds", justify="right")
    out.add_column(metric, justify="right")
    out.add_column("±95% CI", justify="right")
    out.add_column("CI over", justify="left")
    if baseline is not None:
        out.add_column(f"Δ vs {baseline}", justify="right")
        out.add_column("±95% CI", justify="right")
        out.add_column("paired over", justify="right")
    for _, row in table.iterrows():
        cells = [str(row[k]) for k in group_by]
        n_seeds = int(row["n_seeds"])
        over = f"seeds, t({n_seeds - 1} df)" if n_seeds >= 2 else "none: 1 seed"
        cells += [str(row["n_runs"]), str(n_seeds), _fmt(row["mean"]),
                  _fmt(row["ci95"]) if n_seeds >= 2 else "", over]
        if baseline is not None:
            if row["paired"] == "baseline":
                cells += ["(baseline)", "", ""]
            elif row["paired"] == "no":
                cells += ["not paired", "", f"0 ({row['unpaired_runs']} runs: other split)"]
            else:
                seeds = int(row["n_seeds_paired"])
                paired = f"{row['n_users']} users ({seeds} seed{'s' if seeds != 1 else ''} averaged)"
                if row["unpaired_runs"]:
                    paired += f", {row['unpaired_runs']} runs not paired: other split"
                cells += [f"{row['diff']:+.4f}", _fmt(row["diff_ci95"]), paired]
        out.add_row(*cells)
    console.print(out)
    notes = [("±95% CI over seeds: Student's t with n_seeds - 1 df over the distinct seeds' test "
              "means (a seed run twice counts once).")]
    if baseline is not None:
        law = ("a percentile bootstrap" if table.attrs.get("ci") == "bootstrap"
               else "Student's t with n_users - 1 df")
        notes.append(f"Δ = group - {baseline} per test user on the same split: each user averaged "
                     f"over the seeds on each side, then {law} over the distinct users.")
    if (table["n_seeds"] < 2).any():
        notes.append(one_seed_note(table))
    if note:
        notes.append(note)
    for line in notes:
        console.print(line, highlight=False)
