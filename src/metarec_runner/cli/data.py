"""``metarec data ...``: list, download and inspect the public datasets.

Module-level imports are the standard library and typer only (``metarec --help`` stays fast);
the registry, the downloader and the loaders are imported inside the commands.
"""

from __future__ import annotations

from typing import Any, NoReturn

import typer

data_app = typer.Typer(
    help="Public datasets: list them, download them (verified, unpacked safely), inspect them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DATA_DIR_HELP = "Data dir (default: $METAREC_DATA_DIR, else $XDG_CACHE_HOME/metarec/data)."


def _fail(err: Exception) -> NoReturn:
    """Print a one-line error on stderr and exit with status 2."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@data_app.command("list")
def list_datasets(
    data_dir: str = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
) -> None:
    """Every known dataset: approximate archive size, verified or not, present or not."""
    from metarec_runner.data.registry import DATASETS, human_size, is_present
    from metarec_runner.data.registry import data_dir as resolve

    root = resolve(data_dir)
    typer.echo(f"data dir: {root}")
    width = max(len(n) for n in DATASETS)
    typer.echo(f"{'name':<{width}}  {'size (approx)':>13}  {'checksum':<10}  {'status':<7}  "
               f"description")
    for spec in DATASETS.values():
        checked = "pinned" if spec.checksum else "unpinned"
        status = "present" if is_present(spec.name, root) else "-"
        typer.echo(f"{spec.name:<{width}}  {human_size(spec.approx_bytes):>13}  {checked:<10}  "
                   f"{status:<7}  {spec.description}")


@data_app.command("download")
def download_dataset(
    name: str = typer.Argument(..., help="Dataset name (see `metarec data list`)."),
    data_dir: str = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
    url: str = typer.Option(None, "--url", help="Mirror URL or local archive path; the pinned "
                            "checksum still applies."),
    force: bool = typer.Option(False, "--force", help="Download again even if present."),
    allow_unverified: bool = typer.Option(
        False, "--allow-unverified", help="Accept an archive that has no pinned checksum."),
    retries: int = typer.Option(3, "--retries", min=1, help="Transfer attempts in all."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Download NAME, verify it, unpack it into <data dir>/NAME and print that folder."""
    from metarec_runner.data.download import download
    from metarec_runner.data.registry import data_dir as resolve
    from metarec_runner.data.registry import is_present
    from metarec_runner.errors import ConfigError, DataError

    try:
        root = resolve(data_dir)
        if not force and is_present(name, root):
            typer.echo(f"{name} is already present (use --force to download it again)", err=True)
        path = download(name, root=root, url=url, force=force, allow_unverified=allow_unverified,
                        retries=retries, progress=progress)
    except (ConfigError, DataError) as e:
        _fail(e)
    typer.echo(str(path))


@data_app.command("info")
def info(
    name: str = typer.Argument(..., help="Dataset name (see `metarec data list`)."),
    data_dir: str = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
) -> None:
    """Load NAME from the data dir and print its users, items, interactions and features."""
    from metarec_runner.data.registry import data_dir as resolve
    from metarec_runner.data.registry import get, is_present
    from metarec_runner.errors import ConfigError, DataError

    try:
        spec = get(name)
        root = resolve(data_dir)
        if not is_present(spec.name, root):
            raise DataError(f"{spec.name} is not under {root}; run `metarec data download "
                            f"{spec.name}` first (or pass --data-dir)")
        summary = _load(spec.name, root).summary()
    except (ConfigError, DataError) as e:
        _fail(e)
    typer.echo(f"{spec.name}: {spec.description}")
    typer.echo(f"folder: {root / spec.name}")
    typer.echo(f"licence: {spec.licence}")
    for line in _summary_lines(summary):
        typer.echo(line)


TABULAR_ARGS: dict[str, dict[str, Any]] = {
    "hetrec2011-lastfm-2k": {
        "ratings": "hetrec2011-lastfm-2k/user_artists.dat",
        "columns": {"user": "userID", "item": "artistID", "weight": "weight"},
        "sep": "\t",
        "header": True,
        "feedback": "log",  # listening counts: heavy-tailed implicit feedback, log1p-scaled
    },
}
"""``load_tabular`` arguments of the registry datasets that are not MovieLens."""


def _load(name: str, root: Any) -> Any:
    """The dataset as an ``Interactions`` object, through its loader (imported here, lazily)."""
    from metarec_runner.errors import DataError

    try:
        if name.startswith("ml-"):
            from metarec_runner.data.movielens import load_movielens

            return load_movielens(name, data_dir=root)
        from metarec_runner.data.tabular import load_tabular

        return load_tabular(name, data_dir=root, **TABULAR_ARGS[name])
    except ImportError as e:
        raise DataError(f"{name}: its loader is not available in this install ({e})") from None


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    """``Interactions.summary()`` as ``key: value`` lines."""
    users, items, n = summary.get("users"), summary.get("items"), summary.get("interactions")
    lines = [f"users: {users}", f"items: {items}", f"interactions: {n}"]
    if users and items and n:
        lines.append(f"density: {n / (users * items):.4%}")
    lo, hi = summary.get("rating_min"), summary.get("rating_max")
    lines.append(f"rating scale: {_num(lo)} .. {_num(hi)}")
    for kind in ("user", "item"):
        feats = summary.get(f"{kind}_features") or []
        lines.append(f"{kind} features: {', '.join(map(str, feats)) or '(none)'}")
    if "checksum" in summary:
        lines.append(f"content checksum: {summary['checksum']}")
    return lines


def _num(value: Any) -> str:
    """``1.0`` -> ``1``, ``0.6931471805599453`` -> ``0.693147``; anything else as ``str``."""
    return f"{value:g}" if isinstance(value, float) else str(value)
