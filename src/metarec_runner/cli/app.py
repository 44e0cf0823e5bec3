"""``metarec`` command line: a thin typer shell over the Hydra app.

``metarec train ...`` hands its arguments to the ``@hydra.main`` function unchanged (so ``-m``,
``--cfg job``, ``hydra/launcher=...`` all work), except that ``algo=x`` becomes ``+algo=x``.
Heavy imports (torch, hydra, mlflow) happen inside the commands, so ``metarec --help`` is fast.
"""

from __future__ import annotations

import re
import sys

import typer

from metarec_runner.cli.compare import compare  # stdlib + typer only: --help stays fast
from metarec_runner.cli.data import data_app  # stdlib + typer only: --help stays fast
from metarec_runner.cli.evaluate import evaluate  # stdlib + typer only: --help stays fast
from metarec_runner.cli.recommend import recommend  # stdlib + typer only: --help stays fast
from metarec_runner.cli.runs import runs_app  # stdlib + typer only: --help stays fast

app = typer.Typer(
    help="Meta-learning for cold-start recommendation: config-driven experiments on Hydra + MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_PLAIN_ALGO = re.compile(r"^algo=")


def normalize_overrides(args: list[str]) -> list[str]:
    """Accept ``algo=maml`` as well as ``+algo=maml`` (``algo`` is not in the defaults list)."""
    return ["+" + a if _PLAIN_ALGO.match(a) else a for a in args]


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                      "help_option_names": []},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Meta-train and test: `metarec train +algo=maml key=value ...` (`-m` for sweeps,
    `--help` for Hydra's help with every config group)."""
    sys.argv = ["metarec train", *normalize_overrides(list(ctx.args))]
    from metarec_runner.cli.train import main

    main()


@app.command("list")
def list_options() -> None:
    """Show the options of every config group (`+algo=<option>`, `dataset=<option>`, ...)."""
    from metarec_runner.paths import conf_dir, group_options

    root = conf_dir()
    for group in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
        prefix = "+" if group == "algo" else ""
        typer.echo(f"{prefix}{group}: {', '.join(group_options(group))}")


@app.command()
def ui(
    port: int = typer.Option(5000, help="Port to listen on (127.0.0.1 only)."),
    tracking_uri: str = typer.Option(None, help="Store to browse (default: the one `train` writes to)."),
) -> None:
    """Start the MLflow UI on the store `metarec train` writes to, on 127.0.0.1; print the runs
    table's URL once it answers (Ctrl+C stops it)."""
    from metarec_runner.cli.ui import UIError, serve
    from metarec_runner.paths import default_tracking_uri

    def echo(text: str) -> None:
        typer.echo(text)
        sys.stdout.flush()

    try:
        code = serve(tracking_uri or default_tracking_uri(), port, echo)
    except UIError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")
app.command("compare")(compare)
app.command("evaluate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(evaluate)
app.command("recommend")(recommend)
