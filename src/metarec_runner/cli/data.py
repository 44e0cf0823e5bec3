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
    """Every known dataset: approximate archive size, verified or not, present, partial (its
    folder lacks files: `metarec data info NAME` names them) or absent."""
    from metarec_runner.data.registry import DATASETS, human_size, missing_files
    from metarec_runner.data.registry import data_dir as resolve

    root = resolve(data_dir)
    typer.echo(f"data dir: {root}")
    width = max(len(n) for n in DATASETS)
    typer.echo(f"{'name':<{width}}  {'size (approx)':>13}  {'checksum':<10}  {'status':<7}  "
               f"description")
    for spec in DATASETS.values():
        checked = "pinned" if spec.checksum else "unpinned"
        missing = missing_files(spec.name, root)
        status = "-" if not (root / spec.name).is_dir() else "partial" if missing else "present"
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


@data_app.command("info", context_settings={"allow_extra_args": True,
                                            "ignore_unknown_options": True})
def info(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A registry name (`metarec data list`), a dataset config "
                               "option (`metarec list`, or your own with hydra.searchpath=[...]) "
                               "or a dataset YAML file; then any `dataset.key=value` overrides."),
    data_dir: str = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
) -> None:
    """Load a dataset and print its users, items, interactions, rating scale, features and
    checksum: `metarec data info ml-1m`, `metarec data info recbole_atomic dataset.folder=x`,
    `metarec data info ./my_ratings.yaml`."""
    from metarec_runner.errors import ConfigError, DataError

    overrides = list(ctx.args)
    try:
        header, summary = _describe(name, data_dir, overrides)
    except (ConfigError, DataError) as e:
        _fail(e)
    for line in [*header, *_summary_lines(summary)]:
        typer.echo(line)


def _describe(name: str, data_dir: str | None, overrides: list[str]) -> tuple[list[str], dict]:
    """``(header lines, Interactions.summary())`` of a registry name, a YAML file or a config
    option (tried in that order; a value with a path separator or a .yaml suffix is a file)."""
    from metarec_runner.data.registry import DATASETS
    from metarec_runner.errors import ConfigError

    if _looks_like_path(name):
        return _describe_config(name, data_dir, overrides, yaml_path=name)
    if name in DATASETS:
        if overrides:
            raise ConfigError("overrides", f"{' '.join(overrides)!r}: a registry name takes no "
                              f"overrides; pass a dataset config instead (e.g. `metarec data info "
                              f"movielens_100k dataset.rating_scale=unit`)")
        return _describe_registry(name, data_dir)
    return _describe_config(name, data_dir, overrides)


def _looks_like_path(name: str) -> bool:
    return name.lower().endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def _describe_registry(name: str, data_dir: str | None) -> tuple[list[str], dict]:
    """A registry dataset from ``<data dir>/<name>/``; DataError naming any missing file."""
    from metarec_runner.data.registry import data_dir as resolve
    from metarec_runner.data.registry import get, missing_files
    from metarec_runner.errors import DataError

    spec = get(name)
    root = resolve(data_dir)
    folder = root / spec.name
    if not folder.is_dir():
        raise DataError(f"{spec.name} is not under {root}; run `metarec data download "
                        f"{spec.name}` first (or pass --data-dir)")
    missing = missing_files(spec.name, root)
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}; run `metarec data download "
                        f"{spec.name}` (it replaces the folder), or copy {' and '.join(missing)} "
                        f"from the publisher's archive ({spec.url}) into {folder}")
    summary = _load(spec.name, root).summary()
    return [f"{spec.name}: {spec.description}", f"folder: {folder}",
            f"licence: {spec.licence}"], summary


def _describe_config(name: str, data_dir: str | None, overrides: list[str],
                     yaml_path: str | None = None) -> tuple[list[str], dict]:
    """A dataset config (an option of the ``dataset`` group, or a YAML file), built as
    ``metarec train dataset=...`` builds it; ``--data-dir`` sets ``dataset.data_dir``."""
    from metarec_runner.errors import ConfigError

    if yaml_path is None:
        cfg = _compose(name, overrides)
    else:  # dataset.* overrides apply to the file's keys, the rest (hydra.searchpath...) to the config
        own = [o for o in overrides if o.lstrip("+").startswith("dataset.")]
        cfg = _with_yaml(_compose(None, [o for o in overrides if o not in own]), yaml_path, own)
    node = cfg.dataset
    if data_dir is not None:
        if "data_dir" not in node:
            raise ConfigError("--data-dir", f"the dataset config {name!r} has no data_dir key; "
                              f"drop --data-dir")
        node.data_dir = data_dir
    target = str(node.get("_target_", "?"))
    data = _instantiate(node, target)
    where = f"config: {yaml_path}" if yaml_path else f"config: dataset={name}"
    return [f"{data.name}: built by {target}", where], data.summary()


def _compose(option: str | None, overrides: list[str]) -> Any:
    """The project's config with ``dataset=option`` (None: the default dataset) and overrides;
    Hydra's composition errors become one ConfigError line."""
    import warnings

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from metarec_runner.cli.train import hydra_error_line
    from metarec_runner.errors import ConfigError
    from metarec_runner.paths import conf_dir, group_options

    args = ([f"dataset={option}"] if option else []) + list(overrides)
    try:
        with warnings.catch_warnings():  # Hydra warns about a searchpath folder that is absent
            warnings.simplefilter("ignore", UserWarning)
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                cfg = compose(config_name="config", overrides=args)
    except HydraException as e:
        line = hydra_error_line(e)
        if option and line.startswith("dataset: no option"):
            from metarec_runner.data.registry import names

            raise ConfigError("dataset", f"unknown dataset {option!r}: not a registry name "
                              f"({', '.join(names())}), not a dataset config option "
                              f"({', '.join(group_options('dataset'))}; add your own with "
                              f"hydra.searchpath=[file:///path/to/conf]) and not a .yaml file; "
                              f"check the spelling") from None
        key, _, rest = line.partition(": ")
        raise (ConfigError(key, rest) if rest else ConfigError("overrides", line)) from None
    OmegaConf.set_struct(cfg, False)  # a user's YAML may bring keys the default dataset lacks
    return cfg


def _with_yaml(cfg: Any, path: str, overrides: list[str]) -> Any:
    """``cfg`` with its ``dataset`` node replaced by the YAML file at ``path`` (so interpolations
    such as ``${oc.env:...}`` or ``${split_seed}`` resolve against the whole config), then the
    ``dataset.key=value`` ``overrides`` applied (values parsed as YAML)."""
    from pathlib import Path

    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from metarec_runner.errors import ConfigError

    file = Path(path).expanduser()
    try:
        node = OmegaConf.load(file)
    except FileNotFoundError:
        raise ConfigError(path, "no such file; check the path (or name a config option, e.g. "
                          "`metarec data info movielens_100k`)") from None
    except OSError as e:
        raise ConfigError(path, f"cannot be read ({e.strerror}); check its permissions") from None
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())[:160]
        raise ConfigError(path, f"not valid YAML ({detail}); fix the file") from None
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        raise ConfigError(path, "not a dataset config: it needs a mapping with _target_ (e.g. "
                          "`_target_: metarec_runner.data.tabular.load_tabular`, see "
                          "docs/generic_loader.md)")
    cfg.dataset = node
    for override in overrides:
        key, eq, value = override.lstrip("+").partition("=")
        if not eq:
            raise ConfigError(override, "not a key=value override; write e.g. dataset.sep=','")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        OmegaConf.update(cfg, key, parsed, force_add=True)
    return cfg


def _instantiate(node: Any, target: str) -> Any:
    """``hydra.utils.instantiate(node)``; the loader's own errors come out as they are, anything
    else as one ConfigError naming the target."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    from metarec_runner.errors import ConfigError, MetarecError

    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause.under("dataset") from None
        if isinstance(cause, MetarecError):
            raise cause from None
        detail = " ".join(str(cause or e).split())[:200]
        raise ConfigError("dataset", f"cannot build {target}: {detail}; fix the dataset config") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "dataset"
        detail = " ".join(str(e).split("\n")[0].split())[:200]
        raise ConfigError(str(key), f"cannot be resolved ({detail}); fix the dataset config") from None
    except ConfigError as e:
        raise e.under("dataset") from None
    except TypeError as e:
        raise ConfigError("dataset", f"cannot build {target}: {e}; fix the dataset config") from None


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
