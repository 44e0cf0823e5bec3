"""``metarec recommend``: top-N items for you (a new user) from a trained run and a ratings CSV.

::

    metarec recommend --run latest --ratings my_ratings.csv -n 10 --user-features age=25,gender=F

The CSV has a header and the columns ``item,rating`` (raw item ids of the model's dataset) or
``title,rating``; the items you rated are never recommended back. Unknown items are reported
(a count and examples, on stderr) and skipped. Without ``--ratings`` (or with an empty file) the
answer is the zero-shot one, from the user features alone. Bad input stops with one line naming
the file or value and the fix, exit code 2, and nothing on stdout.

Only stdlib and typer are imported at module level (``metarec --help`` stays fast); torch,
pandas and MLflow are imported inside the command.
"""

from __future__ import annotations

import dataclasses
import json
import math

import typer

FORMATS = ("table", "csv", "json")


def _fail(message: object) -> None:
    typer.echo(f"metarec: error: {message}", err=True)
    raise typer.Exit(2)


def recommend(
    run: str = typer.Option("latest", "--run", help="A run id, 'latest' (the newest finished run with a "
                            "best.pt), a run folder, or a best.pt path."),
    ratings: str = typer.Option(None, "--ratings", help="CSV with a header: item,rating (or title,rating); "
                                "omitted or empty = no ratings (the zero-shot answer)."),
    n: int = typer.Option(10, "-n", "--n", help="How many items to recommend."),
    user_features: str = typer.Option(None, "--user-features", help="Your side features, e.g. "
                                      "age=25,gender=F (a bag as genres=a|b)."),
    format: str = typer.Option("table", "--format", help="table|csv|json (csv/json columns: rank,item,title,score)."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="Store of run ids (default: the one "
                                     "`train` writes to)."),
) -> None:
    """Recommend items to a new user: adapt a trained model to your ratings, rank the catalog."""
    if format not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if n < 1:
        _fail(f"-n must be >= 1, got {n}")
    from metarec_runner.errors import MetarecError
    from metarec_runner.serve.recommender import load
    from metarec_runner.serve.support import as_frame, parse_user_features, read_ratings_csv

    try:
        features = parse_user_features(user_features)
        frame = read_ratings_csv(ratings) if ratings else as_frame(None)
        rec = load(run, tracking_uri)
        rec.vocab.user_columns(features, rec.samples)  # every input is checked before anything is printed
        support = rec.support(frame, source=ratings or "ratings")
        if support.unknown:
            examples = ", ".join(repr(u) for u in support.unknown[:5])
            more = ", ..." if len(support.unknown) > 5 else ""
            typer.echo(f"metarec: {len(support.unknown)} unknown item(s) in {ratings} skipped (not in the "
                       f"model's catalog): {examples}{more}", err=True)
        user = rec.adapt(dataclasses.replace(support, unknown=[]), user_features=features)
        top = user.topk(n)
    except MetarecError as err:
        _fail(err)
    top["title"] = top["title"].fillna("")
    if format == "csv":
        typer.echo(top.to_csv(index=False, float_format="%.6f"), nl=False)
    elif format == "json":
        rows = [{"rank": int(r.rank), "item": str(r.item), "title": str(r.title), "score": float(r.score)}
                for r in top.itertuples(index=False)]
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(_heading(rec, len(support), features))
        shown = top if top["title"].astype(bool).any() else top.drop(columns="title")
        typer.echo(shown.to_string(index=False, formatters={"score": lambda v: f"{v:.4f}"}))


def _heading(rec, n_ratings: int, features: dict[str, str]) -> str:
    """``top 10 for a new user with 4 ratings (maml/melu on ml-100k, run 1a2b...; val/rmse 0.97)``."""
    meta = rec.meta
    choices = meta.get("choices") or {}
    what = "/".join(str(choices[k]) for k in ("algo", "model") if k in choices) or meta.get("algo_class", "?")
    best = meta.get("best_value")
    score = f"; {meta.get('monitor')} {best:.4f}" if isinstance(best, (int, float)) and math.isfinite(best) else ""
    given = f", features {', '.join(f'{k}={v}' for k, v in features.items())}" if features else ""
    return (f"top items for a new user with {n_ratings} rating(s){given} ({what} on {meta.get('dataset', '?')}, "
            f"run {meta.get('run_id') or rec.path}{score}):")
