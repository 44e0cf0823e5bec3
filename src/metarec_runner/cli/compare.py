"""``metarec compare``: a table of finished runs grouped by algorithm (or any tag/param): the mean
with a Student's t-interval over distinct seeds, and a paired difference to a baseline on
identical test tasks with an interval over distinct test users
(:mod:`metarec_runner.evaluate.stats` says what each interval is).

Only stdlib and typer are imported at module level (``metarec --help`` stays fast); pandas,
mlflow and rich are imported inside the command.
"""

from __future__ import annotations

import sys

import typer


def _fail(message: str) -> None:
    typer.echo(f"metarec: error: {message}", err=True)
    raise typer.Exit(2)



def compare(
    experiment: str = typer.Option(None, help="Experiment name, e.g. train/toy (default: all)."),
    sweep: str = typer.Option(None, "--sweep", "--parent",
                              help="A sweep's parent run id, or 'latest': compare its children."),
    metric: str = typer.Option("rmse", help="Test metric to compare (rmse, mae, ndcg_at_5, ...)."),
    baseline: str = typer.Option(None, help="Algo to pair against on identical test tasks."),
    by: str = typer.Option(None, help="Comma-separated tags/params/override keys to group by "
                           "(default: with --sweep the keys the sweep varied, seeds aggregated; "
                           "else algo)."),
    format: str = typer.Option("table", help="table|csv"),
    ci: str = typer.Option("t", help="The paired difference's interval over users: t (Student's, "
                           "n_users-1 df) | bootstrap (percentile, seeded). Over seeds: always t."),
    tracking_uri: str = typer.Option(None, help="Store to read (default: the one `train` writes to)."),
    shots: bool = typer.Option(False, "--shots", help="One row per (k, group): the few-shot "
                               "results (evaluator.shots) and the full support (k=all), the "
                               "baseline paired at the same k."),
) -> None:
    """Compare finished runs: mean test metric per algo with a 95% Student's t-interval over
    distinct seeds (none with one seed), and the paired difference to --baseline over the same
    test users (same split_hash; each user averaged over seeds, the interval over users)."""
    if format not in ("table", "csv"):
        _fail(f"--format must be table or csv, got {format!r}")
    if ci not in ("t", "bootstrap"):
        _fail(f"--ci must be t or bootstrap, got {ci!r}")
    group_by = [k.strip() for k in by.split(",") if k.strip()] if by is not None else []
    if by is not None and not group_by:
        _fail("--by needs at least one tag or param, e.g. --by algo")
    from metarec_runner.paths import default_tracking_uri
    from metarec_runner.report.compare import compare_table, shots_table
    from metarec_runner.report.store import (
        CompareError,
        collect_runs,
        run_warnings,
        swept_keys,
        without_untested,
    )

    uri = tracking_uri or default_tracking_uri()
    try:
        runs, untested = without_untested(collect_runs(uri, experiment=experiment, parent_run_id=sweep))
        every = collect_runs(uri, experiment=experiment, parent_run_id=sweep, status=None)
        for line in [*run_warnings(runs, every), *filter(None, [untested])]:
            typer.echo(f"metarec: warning: {line}", err=True)
        if runs.empty:
            where = f"sweep {sweep}" if sweep else (f"experiment {experiment!r}" if experiment else uri)
            _fail(f"no finished runs with test metrics in {where}" if untested else f"no finished runs in {where}")
        note = None
        if not group_by:  # a sweep: its varied keys; otherwise per algorithm
            group_by = (swept_keys(runs) if sweep else []) or ["algo"]
            if sweep:
                note = f"grouped by the swept keys ({', '.join(group_by)}), aggregated over seeds"
        if runs["dataset"].nunique() > 1 and "dataset" not in group_by:
            group_by = ["dataset", *group_by]
            note = "; ".join(filter(None, [note, "runs span several datasets: grouped by dataset too"]))
        if shots:
            group_by = ["algo" if k == "coldstart" else k for k in group_by]
            table = shots_table(runs, metric, group_by=group_by, baseline=baseline, ci=ci)
        else:
            table = compare_table(runs, metric, group_by=group_by, baseline=baseline, ci=ci)
    except CompareError as err:
        _fail(str(err))
    if format == "csv":
        table.to_csv(sys.stdout, index=False)
        if (table["n_seeds"] < 2).any():  # stdout stays a clean CSV
            from metarec_runner.report.tables import one_seed_note

            typer.echo(one_seed_note(table), err=True)
        return
    _print_table(table, runs, note)



def _print_table(table, runs, note: str | None) -> None:
    """The table on stdout (200 columns wide when piped)."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(soft_wrap=True, width=200)
    from metarec_runner.report.tables import print_compare_table

    print_compare_table(console, table, runs, note)
