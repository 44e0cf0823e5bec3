"""MovieLens loaders (ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-32m, ml-latest-small, ml-latest).

Three file formats: ``100k`` (``u.data`` tab-separated, ``u.user``/``u.item`` ``|``-separated),
``dat`` (``ratings.dat``/``users.dat``/``movies.dat``, ``::``-separated; ml-10m has no users.dat)
and ``csv`` (``ratings.csv``/``movies.csv`` with headers and quoted titles). Side files in
``|``/``::`` format are UTF-8 when they decode as such, else latin-1 (``u.item``, ml-1m's
``movies.dat``); the CSV files must be UTF-8.

Features. Users (100k, 1m): ``age`` (the raw value as a token, not bucketed), ``gender``,
``occupation``, ``zip`` (the raw string). Items: ``year`` (from the title's trailing ``(YYYY)``; for
100k from the release date, falling back to the title), ``genres`` as a bag (every genre the file
names is a token, including 100k's ``unknown`` flag and the CSVs' ``(no genres listed)``), and
``title`` words as a bag (title without its year, lower-cased, split on whitespace, at most
``max_title_tokens`` words). Missing values are the token :data:`~encode.UNKNOWN`. Items are every
movie of the movies file (rated or not); users are every user of the users file, else every
user with a rating. Ratings are sorted by (user, timestamp, item).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from metarec_runner.data import cache as cache_mod
from metarec_runner.data.encode import (
    UNKNOWN,
    apply_duplicates,
    bag_array,
    categorical,
    check_unique,
    dense_codes,
    lookup_codes,
    scale_ratings,
    sort_order,
)
from metarec_runner.data.interactions import Interactions
from metarec_runner.data.tabular import SourceFile, numeric_column, read_table, text_column
from metarec_runner.errors import ConfigError, DataError, require_choice

FORMATS = {"ml-100k": "100k", "ml-1m": "dat", "ml-10m": "dat", "ml-20m": "csv", "ml-25m": "csv",
           "ml-32m": "csv", "ml-latest-small": "csv", "ml-latest": "csv"}
"""Dataset name -> file format."""

FILES = {"100k": ("u.data", "u.user", "u.item"), "dat": ("ratings.dat", "users.dat", "movies.dat"),
         "csv": ("ratings.csv", None, "movies.csv")}
"""Format -> (ratings, users or None, movies) file names."""

FOLDERS = {"ml-10m": ("ml-10m", "ml-10M100K")}
"""Folder names accepted besides the dataset name (the zip's own top folder)."""

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
"""The 19 genre flags of ``u.item``, in file order (as in ``u.genre``)."""

USER_FIELDS = ("age", "gender", "occupation", "zip")
_TITLE_YEAR = re.compile(r"\s*\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)\s*$")


def _format(fmt: str) -> str:
    require_choice("fmt", fmt, tuple(FILES))
    return fmt


def parse_ratings(path: Path, fmt: str) -> tuple[pd.DataFrame, SourceFile]:
    """Ratings file -> frame ``[n, 4]``: user, item (int64 raw ids), rating (float64), timestamp
    (int64); index = data row number."""
    if _format(fmt) == "csv":
        frame, src = read_table(path, sep=",", header=True, quoted=True,
                                names=("userId", "movieId", "rating", "timestamp"))
    else:
        frame, src = read_table(path, sep="\t" if fmt == "100k" else "::", encoding="auto",
                                names=("userId", "movieId", "rating", "timestamp"))
    out = pd.DataFrame({
        "user": numeric_column(frame, "userId", src, integer=True, what="user id"),
        "item": numeric_column(frame, "movieId", src, integer=True, what="movie id"),
        "rating": numeric_column(frame, "rating", src, integer=False),
        "timestamp": numeric_column(frame, "timestamp", src, integer=True)}, index=frame.index)
    return out, src


def parse_users(path: Path, fmt: str) -> tuple[pd.DataFrame, SourceFile]:
    """``u.user`` (fmt ``100k``) or ``users.dat`` (``dat``) -> frame: user (int64 raw id), age,
    gender, occupation, zip (str tokens or None); index = data row number."""
    names = (("user", "age", "gender", "occupation", "zip") if _format(fmt) == "100k"
             else ("user", "gender", "age", "occupation", "zip"))
    if fmt == "csv":
        raise ConfigError("fmt", "the csv MovieLens releases have no users file")
    frame, src = read_table(path, sep="|" if fmt == "100k" else "::", names=names,
                            text=USER_FIELDS, encoding="auto")
    out = pd.DataFrame({"user": numeric_column(frame, "user", src, integer=True, what="user id")},
                       index=frame.index)
    for col in USER_FIELDS:
        out[col] = text_column(frame, col)
    return out, src


def _split_title(title: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Titles -> (title without the trailing year, year token or None)."""
    title = title.fillna("")
    year = title.str.extract(_TITLE_YEAR, expand=False)
    return title.str.replace(_TITLE_YEAR, "", regex=True), year.astype(object).where(year.notna(), None)


def _titled(title: pd.Series, year: pd.Series) -> list[str]:
    """``Title (year)`` per movie, as MovieLens prints it (``Title`` when the year is unknown)."""
    return [f"{t} ({y})" if isinstance(y, str) and y else str(t) for t, y in zip(title, year, strict=True)]


def parse_movies(path: Path, fmt: str) -> tuple[pd.DataFrame, SourceFile]:
    """``u.item`` / ``movies.dat`` / ``movies.csv`` -> frame: item (int64 raw id), title (str,
    without the year), year (str token or None), genres (list of str); index = data row number."""
    if _format(fmt) == "100k":
        names = ("item", "title", "release", "video", "url", *ML100K_GENRES)
        frame, src = read_table(path, sep="|", names=names, text=("title", "release", "video", "url"),
                                encoding="auto")
        flags = np.stack([numeric_column(frame, g, src, integer=True, what=f"genre flag {g}")
                          for g in ML100K_GENRES], axis=1)
        rows, cols = np.nonzero(flags)
        flat = pd.Series(np.asarray(ML100K_GENRES, dtype=object)[cols], index=frame.index[rows])
        genres = flat.groupby(level=0).agg(list).reindex(frame.index)
        release = frame["release"].astype(object).where(frame["release"].notna(), "")
        year = release.str.extract(r"(\d{4})\s*$", expand=False)
        title, title_year = _split_title(text_column(frame, "title"))
        year = year.astype(object).where(year.notna(), title_year)
    else:
        if fmt == "csv":
            frame, src = read_table(path, sep=",", header=True, quoted=True, text=("title", "genres"),
                                    names=("movieId", "title", "genres"))
        else:
            frame, src = read_table(path, sep="::", names=("movieId", "title", "genres"),
                                    text=("title", "genres"), encoding="auto")
        frame = frame.rename(columns={"movieId": "item"})
        title, year = _split_title(text_column(frame, "title"))
        genres = text_column(frame, "genres").fillna("").str.split("|")
    out = pd.DataFrame({"item": numeric_column(frame, "item", src, integer=True, what="movie id"),
                        "title": title, "year": year, "genres": genres}, index=frame.index)
    return out, src


def _folder(name: str, root: Path) -> Path:
    folders = FOLDERS.get(name, (name,))
    for candidate in [root / f for f in folders] + [root / name / f for f in folders[1:]]:
        if candidate.is_dir():
            return candidate
    raise DataError(f"{name}: folder {root / name} not found; run `metarec data download {name}` "
                    f"or point data_dir / METAREC_DATA_DIR at the folder that holds {name}/")


def _files(name: str, folder: Path) -> dict[str, Path]:
    """Existing source files by role; DataError naming the first missing one and the fix."""
    roles = dict(zip(("ratings", "users", "items"), FILES[FORMATS[name]], strict=True))
    if name == "ml-10m":  # the only `dat` release without users.dat
        roles["users"] = None
    files = {role: folder / f for role, f in roles.items() if f is not None}
    for path in files.values():
        if not path.is_file():
            present = sorted(p.name for p in files.values() if p.is_file())
            there = f" ({', '.join(present)} {'is' if len(present) == 1 else 'are'} there)" if present else ""
            raise DataError(f"{name}: {path.name} is missing from {folder}{there}; copy it from the "
                            f"official {name} archive or run `metarec data download {name}`")
    return files


def _check_args(duplicates: str, rating_scale: str, title_tokens: bool, max_title_tokens: int,
                cache: bool) -> None:
    require_choice("duplicates", duplicates, ("keep_last", "mean", "error"))
    require_choice("rating_scale", rating_scale, ("raw", "unit"))
    for key, value in (("title_tokens", title_tokens), ("cache", cache)):
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
    if isinstance(max_title_tokens, bool) or not isinstance(max_title_tokens, int) or max_title_tokens < 1:
        raise ConfigError("max_title_tokens", f"must be an integer >= 1, got {max_title_tokens!r}")


def load_movielens(name: str, data_dir: str | None = None, rating_scale: str = "raw",
                   duplicates: str = "error", title_tokens: bool = True,
                   max_title_tokens: int = 16, cache: bool = True) -> Interactions:
    """Load a MovieLens release from ``<data_dir>/<name>/`` (see the module docstring).

    Args:
        name: one of :data:`FORMATS`.
        data_dir: folder holding the dataset folders; None = ``$METAREC_DATA_DIR``, else
            ``$XDG_CACHE_HOME/metarec/data``.
        rating_scale: ``raw`` or ``unit`` (``(r - min) / (max - min)`` over the observed ratings).
        duplicates: repeated (user, movie) pairs: ``keep_last`` | ``mean`` | ``error``.
        title_tokens: add the ``title`` bag (title words).
        max_title_tokens: cap on title words per movie (the bag's width).
        cache: read/write the processed cache (:mod:`metarec_runner.data.cache`).

    Returns:
        Interactions: ratings (user, item, rating float32, timestamp), user features age,
        gender, occupation, zip (100k, 1m; none otherwise), item feature ``year``, item bags
        ``genres`` and ``title``. ``metadata`` holds the files read (path, sha256, bytes), counts,
        vocabularies and the raw ids (``raw_user_ids``/``raw_item_ids``, by code).
    """
    require_choice("name", name, tuple(FORMATS))
    _check_args(duplicates, rating_scale, title_tokens, max_title_tokens, cache)
    root = cache_mod.resolve_data_dir(data_dir)
    files = _files(name, _folder(name, root))
    args = {"loader": "movielens", "rating_scale": rating_scale, "duplicates": duplicates,
            "title_tokens": title_tokens, "max_title_tokens": max_title_tokens}
    return cache_mod.cached(name, root, list(files.values()), args, lambda: _build(
        name, files, rating_scale, duplicates, title_tokens, max_title_tokens), enabled=cache)


def _build(name: str, files: dict[str, Path], rating_scale: str, duplicates: str,
           title_tokens: bool, max_title_tokens: int) -> Interactions:
    fmt = FORMATS[name]
    ratings, r_src = parse_ratings(files["ratings"], fmt)
    if len(ratings) == 0:
        raise DataError(f"{r_src.path} has no ratings; re-download {name}")
    movies, m_src = parse_movies(files["items"], fmt)
    sources = {"ratings": r_src, "items": m_src}
    check_unique(movies["item"].to_numpy(), "movie id", m_src.where)
    item_codes, item_ids = dense_codes(movies["item"].to_numpy())
    movies = movies.iloc[np.argsort(item_codes)].reset_index(drop=True)
    fix = f"the files must come from one {name} release; re-download it"
    item = lookup_codes(ratings["item"].to_numpy(), item_ids, "movie id", r_src.where, fix)
    users = None
    if "users" in files:
        users, sources["users"] = parse_users(files["users"], fmt)
        check_unique(users["user"].to_numpy(), "user id", sources["users"].where)
        user_codes, user_ids = dense_codes(users["user"].to_numpy())
        users = users.iloc[np.argsort(user_codes)].reset_index(drop=True)
        user = lookup_codes(ratings["user"].to_numpy(), user_ids, "user id", r_src.where, fix)
    else:
        user, user_ids = dense_codes(ratings["user"].to_numpy())
    frame = pd.DataFrame({"user": user, "item": item, "rating": ratings["rating"].to_numpy(),
                          "timestamp": ratings["timestamp"].to_numpy()}, index=ratings.index)
    frame, n_dup = apply_duplicates(frame, duplicates, user_ids, item_ids, r_src.where)
    rating, scale, scale_meta = scale_ratings(frame["rating"].to_numpy(np.float64), rating_scale)
    cols = {c: frame[c].to_numpy(np.int64) for c in ("user", "item", "timestamp")}
    order = sort_order(cols["user"], cols["timestamp"], cols["item"])
    frame = pd.DataFrame({"user": cols["user"][order], "item": cols["item"][order],
                          "rating": rating[order], "timestamp": cols["timestamp"][order]})

    cards: dict[str, int] = {}
    vocab: dict[str, list[str]] = {}
    user_features = pd.DataFrame(index=pd.RangeIndex(len(user_ids)))
    for col in USER_FIELDS if users is not None else ():
        user_features[col], vocab[col] = categorical(users[col])
    item_features = pd.DataFrame(index=pd.RangeIndex(len(item_ids)))
    item_features["year"], vocab["year"] = categorical(movies["year"])
    item_bags = {}
    item_bags["genres"], vocab["genres"] = bag_array(movies["genres"], len(item_ids))
    if title_tokens:
        words = movies["title"].str.lower().str.split()
        item_bags["title"], vocab["title"] = bag_array(words, len(item_ids), max_title_tokens)
    cards = {k: len(v) for k, v in vocab.items()}
    metadata = {
        "source": f"MovieLens {name}", "format": fmt, "unknown_token": UNKNOWN,
        "files": {role: src.describe() for role, src in sources.items()},
        "counts": {"ratings": len(frame), "users": len(user_ids), "items": len(item_ids),
                   "rated_users": int(frame["user"].nunique()),
                   "rated_items": int(frame["item"].nunique()), "duplicates_removed": n_dup},
        **scale_meta, "vocab": vocab, "raw_user_ids": user_ids.astype(np.int64),
        "raw_item_ids": item_ids.astype(np.int64),
        "item_titles": np.asarray(_titled(movies["title"], movies["year"]), dtype=str)}
    return Interactions(name=name, ratings=frame, user_features=user_features,
                        item_features=item_features, cardinalities=cards, item_bags=item_bags,
                        rating_scale=scale, metadata=metadata)
