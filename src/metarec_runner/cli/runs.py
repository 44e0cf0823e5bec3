"""``metarec runs``: tidy an MLflow store's runs (``metarec runs clean``).

Only stdlib and typer are imported at module level (``metarec --help`` stays fast); mlflow and
the store logic (:mod:`metarec_runner.tracking.stale_runs`) are imported inside the command.
"""

from __future__ import annotations

import typer

runs_app = typer.Typer(help="Tidy the runs of an MLflow store (`metarec runs clean`).",
                       no_args_is_help=True, add_completion=False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@runs_app.command()
def clean(
    tracking_uri: str = typer.Option(None, help="Store to clean (default: the one `train` writes to)."),
    stale_after: float = typer.Option(600.0, min=0.0, help="Seconds without a heartbeat after which "
                                      "another host's RUNNING run counts as dead."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs that would be ended; change nothing."),
) -> None:
    """End KILLED the RUNNING runs whose process died: on this host its pid is gone; from
    another host its heartbeat is older than --stale-after. One line per run, then the total."""
    from metarec_runner.errors import MetarecError
    from metarec_runner.paths import default_tracking_uri
    from metarec_runner.tracking.stale_runs import clean_runs

    uri = tracking_uri or default_tracking_uri()
    try:
        cleaned, running = clean_runs(uri, stale_after=stale_after, dry_run=dry_run)
    except MetarecError as err:
        typer.echo(f"metarec: error: {err}", err=True)
        raise typer.Exit(2) from None
    except Exception as err:  # noqa: BLE001 - an unreadable store: one line, not a traceback
        typer.echo(f"metarec: error: cannot read the MLflow store {uri}: {_first_line(err)}", err=True)
        raise typer.Exit(2) from None
    verb = "would end" if dry_run else "KILLED"
    for run in cleaned:
        typer.echo(f"{verb} {run.run_id} {run.experiment}/{run.run_name}: {run.reason}")
    done = "would be ended" if dry_run else "ended KILLED"
    typer.echo(f"{len(cleaned)} of {running} RUNNING run(s) {done} in {uri}")
