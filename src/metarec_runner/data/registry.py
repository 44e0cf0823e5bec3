"""The public datasets metarec knows how to download, and where they live on disk.

Every dataset unpacks to ``<data dir>/<registry name>/`` with its files directly inside (the
archive's own top folder, e.g. ``ml-10M100K``, is dropped). The data dir is ``--data-dir``, else
``$METAREC_DATA_DIR``, else ``$XDG_CACHE_HOME/metarec/data`` (default ``~/.cache/metarec/data``).

Checksums are the md5 sums GroupLens publishes next to each zip (``<zip>.md5``). A dataset without
one (the ``ml-latest*`` archives change with every release; HetRec has no published sum) is
refused by the downloader unless ``--allow-unverified`` is passed.

Imports: standard library only (the CLI imports this module inside its commands).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from metarec_runner.errors import ConfigError

_GROUPLENS = "https://files.grouplens.org/datasets"

_ML_RESEARCH_ONLY = (
    "GroupLens research licence: research use only, no commercial use, cite Harper & Konstan "
    "2015; may not be redistributed without permission (terms: README in the dataset folder)"
)
_ML_SAME_TERMS = (
    "GroupLens research licence: research use only, no commercial use, cite Harper & Konstan "
    "2015; redistribution only under the same licence terms (terms: README in the dataset folder)"
)


@dataclass(frozen=True)
class Checksum:
    """A pinned digest of the archive; ``algorithm`` is a :mod:`hashlib` name (``md5``...)."""

    algorithm: str
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


@dataclass(frozen=True)
class DatasetSpec:
    """One downloadable dataset.

    Attributes:
        name: registry name; also the folder under the data dir.
        url: where the publisher serves the archive.
        approx_bytes: archive size in bytes, APPROXIMATE (for display and sanity limits only; the
            transfer itself is checked against the server's Content-Length and the checksum).
        checksum: the publisher's digest of the archive, or None where none is published/known.
        inner_dir: folder inside the archive that holds the files, or None for files at the
            archive's top level.
        files: files that must exist after extraction (a subset of what the archive holds).
        licence: one-line licence note.
        description: one-line description.
    """

    name: str
    url: str
    approx_bytes: int
    checksum: Checksum | None
    inner_dir: str | None
    files: tuple[str, ...]
    licence: str
    description: str


def _ml(name: str, approx_bytes: int, md5: str | None, inner_dir: str, files: tuple[str, ...],
        licence: str, description: str) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        url=f"{_GROUPLENS}/movielens/{name}.zip",
        approx_bytes=approx_bytes,
        checksum=Checksum("md5", md5) if md5 else None,
        inner_dir=inner_dir,
        files=files,
        licence=licence,
        description=description,
    )


_CSV4 = ("ratings.csv", "movies.csv", "tags.csv", "links.csv")
_GENOME = ("genome-scores.csv", "genome-tags.csv")

# md5 sums: GroupLens's `<zip>.md5` sidecars, each quoted identically by several independent
# projects (ml-100k and ml-1m also in shared/data/README.md); none could be re-checked against a
# live download from this machine. ml-latest / ml-latest-small: deliberately None, since "latest"
# archives are re-released under the same URL, so any pinned sum would go stale.
# Sizes: exact byte counts where projects quote them (ml-100k, ml-10m, ml-20m, ml-25m, ml-32m),
# rounded guesses otherwise; the registry treats every size as approximate.
_SPECS = (
    _ml("ml-100k", 4_924_029, "0e33842e24a9c977be4e0107933c0723", "ml-100k",
        ("u.data", "u.item", "u.user"), _ML_RESEARCH_ONLY,
        "MovieLens 100K: 100,000 ratings (1-5) by 943 users on 1,682 movies, with demographics"),
    _ml("ml-1m", 5_917_549, "c4d9eecfca2ab87c1945afe126590906", "ml-1m",
        ("ratings.dat", "movies.dat", "users.dat"), _ML_RESEARCH_ONLY,
        "MovieLens 1M: 1,000,209 ratings (1-5) by 6,040 users on ~3,900 movies, with demographics"),
    _ml("ml-10m", 65_566_137, "ce571fd55effeba0271552578f2648bd", "ml-10M100K",
        ("ratings.dat", "movies.dat", "tags.dat"), _ML_RESEARCH_ONLY,
        "MovieLens 10M: 10 million half-star ratings and 100,000 tags by 72,000 users"),
    _ml("ml-20m", 198_702_078, "cd245b17a1ae2cc31bb14903e1204af3", "ml-20m",
        _CSV4 + _GENOME, _ML_SAME_TERMS,
        "MovieLens 20M: 20 million half-star ratings, 138,000 users, 27,000 movies, tag genome"),
    _ml("ml-25m", 261_978_986, "6b51fb2759a8657d3bfcbfc42b592ada", "ml-25m",
        _CSV4 + _GENOME, _ML_SAME_TERMS,
        "MovieLens 25M: 25 million half-star ratings, 162,000 users, 62,000 movies, tag genome"),
    _ml("ml-32m", 238_950_008, "d472be332d4daa821edc399621853b57", "ml-32m",
        _CSV4, _ML_SAME_TERMS,
        "MovieLens 32M: 32 million half-star ratings by 200,948 users on 87,585 movies"),
    _ml("ml-latest-small", 978_202, None, "ml-latest-small",
        _CSV4, _ML_SAME_TERMS,
        "MovieLens latest small: ~100,000 half-star ratings by 610 users (changes with releases)"),
    _ml("ml-latest", 335_000_000, None, "ml-latest",
        _CSV4, _ML_SAME_TERMS,
        "MovieLens latest full: tens of millions of half-star ratings (changes with releases)"),
    DatasetSpec(
        name="hetrec2011-lastfm-2k",
        url=f"{_GROUPLENS}/hetrec2011/hetrec2011-lastfm-2k.zip",
        approx_bytes=2_600_000,
        # No publisher md5 is known for this zip. One third-party project pins md5
        # 296d61afe4e8632b173fc2dd3be20ce2, but no second source confirms it: not pinned.
        checksum=None,
        inner_dir=None,  # the .dat files sit at the zip's top level (no folder)
        files=("user_artists.dat", "artists.dat", "tags.dat", "user_friends.dat"),
        licence="Last.fm / HetRec 2011: non-commercial use only; cite Last.fm (see readme.txt)",
        description="Last.fm HetRec 2011: 92,834 listening counts by 1,892 users on 17,632 "
                    "artists, friends, tags",
    ),
)

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}
"""Every known dataset by registry name (tests swap entries with :func:`dataclasses.replace`)."""


def names() -> tuple[str, ...]:
    """Registry names, in listing order."""
    return tuple(DATASETS)


def get(name: str) -> DatasetSpec:
    """The spec of ``name``; ConfigError listing the known names when it is unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            "dataset", f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}"
        ) from None


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where datasets live: ``override``, else ``$METAREC_DATA_DIR``, else the XDG cache.

    The XDG cache is ``$XDG_CACHE_HOME/metarec/data`` (``~/.cache/metarec/data`` when the variable
    is unset, empty or relative, as the XDG spec says). The folder is not created here.
    """
    if override:
        return Path(override).expanduser()
    env = os.environ.get("METAREC_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return cache / "metarec" / "data"


def dataset_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The folder of dataset ``name`` under the data dir ``root`` (resolved by :func:`data_dir`)."""
    return data_dir(root) / get(name).name


def missing_files(name: str, root: str | os.PathLike[str] | None = None) -> list[str]:
    """The expected files of ``name`` that are not under ``<root>/<name>/``, in spec order."""
    folder = dataset_dir(name, root)
    return [f for f in get(name).files if not (folder / f).is_file()]


def is_present(name: str, root: str | os.PathLike[str] | None = None) -> bool:
    """True when every expected file of ``name`` exists under ``<root>/<name>/``."""
    return not missing_files(name, root)


def human_size(n_bytes: float) -> str:
    """``4924029`` -> ``"4.7 MiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")
