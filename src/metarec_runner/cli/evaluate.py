"""``metarec evaluate --run <id|latest|path> [overrides...]``: re-evaluate a saved model under another
protocol without retraining (:mod:`metarec_runner.reevaluate`). Stdlib and typer only at module level."""

from __future__ import annotations

import typer


def evaluate(
    ctx: typer.Context,
    run: str = typer.Option(..., "--run", help="A run id, 'latest' (the newest finished run), a run folder "
                            "or a best.pt path."),
    tracking_uri: str = typer.Option(None, help="Store of the run (default: the one `train` writes to)."),
) -> None:
    """Re-evaluate a trained run's best.pt, e.g. `metarec evaluate --run latest evaluator=sampled
    'evaluator.shots=[0,1,3,5]'`; the results go into a child run of the original."""
    from metarec_runner.errors import MetarecError

    try:
        from metarec_runner.reevaluate import evaluate_saved

        evaluate_saved(run, list(ctx.args), tracking_uri)
    except MetarecError as err:
        typer.echo(f"metarec: error: {err}", err=True)
        raise typer.Exit(2) from None
