"""Delimited text tables with line-numbered errors, and the bring-your-own-data loader.

:func:`read_table` is the one reader every loader uses: pandas' C parser over the file's bytes
(read once, so the sha256 checksum comes for free); multi-character separators such as ``::`` are
replaced by an unused byte first. Any problem becomes a one-line :class:`DataError` naming the
file, the line number and the offending text.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from metarec_runner.data.cache import cached, resolve_data_dir
from metarec_runner.data.columns import numeric_column as numeric_column  # re-exported
from metarec_runner.data.columns import text_column as text_column  # re-exported
from metarec_runner.data.columns import timestamp_column
from metarec_runner.data.encode import SideTable, assemble, check_unique
from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError, DataError, require_choice

_SUBSTITUTE = b"\x1f"  # stands in for a multi-character separator (ASCII unit separator)


@dataclass
class SourceFile:
    """One file as read: its bytes (for error messages), checksum and header size."""

    path: Path
    data: bytes
    sha256: str
    sep: str
    header_lines: int = 0

    def line(self, row: int) -> tuple[int, str]:
        """1-based line number and text of data row ``row`` (blank lines skipped, as pandas does)."""
        blank = b" \t".replace(self.sep.encode("latin-1")[:1], b"")
        seen = -self.header_lines - 1
        for n, text in enumerate(self.data.splitlines(), 1):  # \n, \r\n and \r, as pandas
            if text.strip(blank):
                seen += 1
                if seen == row:
                    return n, text.decode("utf-8", "replace")
        return _line_at(self.data, len(self.data)), ""

    def text(self, n: int) -> str:
        """Text of 1-based physical line ``n`` ("" past the end)."""
        lines = self.data.splitlines()
        return lines[n - 1].decode("utf-8", "replace") if 0 < n <= len(lines) else ""

    def where(self, row: int) -> str:
        """``"<path> line N: '<text>'"`` for data row ``row`` (text cut at 80 characters)."""
        if not self.sep:  # a binary (parquet) file
            return f"{self.path} row {row + 1}"
        n, text = self.line(row)
        return f"{self.path} line {n}: {text[:80]!r}"

    def describe(self) -> dict[str, object]:
        """``{"path", "sha256", "bytes"}`` for metadata."""
        return {"path": str(self.path), "sha256": self.sha256, "bytes": len(self.data)}


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _line_at(data: bytes, offset: int) -> int:
    """1-based line of byte ``offset`` (line breaks: \\n, \\r\\n, \\r)."""
    head = data[:offset]
    return head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1


def _decode_check(path: Path, data: bytes, encoding: str) -> None:
    if data.startswith(b"PK\x03\x04"):
        raise DataError(f"{path} is a zip archive, not a text table; extract it first")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path} line {_line_at(data, nul)}: NUL byte; the file is "
                        f"binary, not latin-1/utf-8 text (re-download or re-export it)")
    if encoding.replace("_", "-").lower() in ("utf-8", "utf8", "utf-8-sig") and not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} line {_line_at(data, e.start)}: byte "
                            f"0x{data[e.start]:02x} is not valid UTF-8; the file is not utf-8 "
                            f"(latin-1?): re-save it as UTF-8 or pass its encoding") from None


def _check_header(source: SourceFile, names: Sequence[str]) -> None:
    """DataError unless the file's first line holds ``names`` (case-insensitive)."""
    first = (source.data[:65536].splitlines() or [b""])[0].decode("utf-8", "replace")
    first = first.lstrip("\ufeff")
    try:
        found = [f.strip() for f in next(csv.reader([first], delimiter=source.sep[0]), [])] if (
            len(source.sep) == 1) else first.split(source.sep)
    except csv.Error:
        found = []
    if [f.lower() for f in found] != [c.lower() for c in names]:
        raise DataError(f"{source.path} line 1: header {first[:80]!r} is not "
                        f"{source.sep.join(names)!r}; is this the right file?")


def read_table(path: Path, *, sep: str, names: Sequence[str] | None = None, header: bool = False,
               text: Sequence[str] = (), encoding: str = "utf-8", quoted: bool = False,
               ) -> tuple[pd.DataFrame, SourceFile]:
    """Read a delimited text file.

    Args:
        path: the file.
        sep: field separator (one or more characters, no regex).
        names: column names; with ``header=True`` the file's header must equal them
            (case-insensitively); None = use the header's own names.
        header: the first line is a header.
        text: columns read as strings (tokens such as zip codes keep leading zeros).
        encoding: ``utf-8`` (validated, errors name the line), ``latin-1``, or ``auto``
            (UTF-8 when the file is valid UTF-8, else latin-1).
        quoted: RFC 4180 double-quote quoting (CSV); otherwise quotes are ordinary characters.

    Returns:
        ``(frame, source)``: one row per non-blank data line (frame index = data row number);
        only empty fields are missing (NaN), so tokens like ``NA`` stay text.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} not found; check the path or download the dataset") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    if encoding == "auto":  # UTF-8 when the bytes decode as UTF-8, else latin-1 (never fails)
        encoding = "utf-8" if data.isascii() or _is_utf8(data) else "latin-1"
    _decode_check(path, data, encoding)
    source = SourceFile(path, data, hashlib.sha256(data).hexdigest(), sep, int(header))
    parse = data
    if len(sep) > 1:
        if _SUBSTITUTE in data:
            raise DataError(f"{path}: contains byte 0x1f; not a {sep!r}-separated text file")
        parse, sep = data.replace(sep.encode(encoding), _SUBSTITUTE), _SUBSTITUTE.decode()
    if header and names is not None:
        _check_header(source, names)
    kwargs = {"sep": sep, "header": 0 if header else None, "index_col": False, "engine": "c",
              "keep_default_na": False, "na_values": [""], "encoding": encoding,
              "low_memory": False, "quoting": csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
              "dtype": {c: str for c in text} or None}
    if names is not None:
        kwargs["names"] = list(names)
    try:
        with warnings.catch_warnings():  # pandas only warns when row 1 has too many fields
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(io.BytesIO(parse), **kwargs)
    except pd.errors.ParserWarning:
        n, line = source.line(0)
        raise DataError(f"{path} line {n}: more fields than the {len(names or ())} expected: "
                        f"{line[:80]!r}; fix or remove that line") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; re-download or re-export it") from None
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m is None:
            raise DataError(f"{path}: cannot parse ({str(e).splitlines()[0]}); check the file "
                            f"format (separator {sep!r}, quoting)") from None
        n = int(m.group(2))
        raise DataError(f"{path} line {n}: expected {m.group(1)} fields, saw {m.group(3)}: "
                        f"{source.text(n)[:80]!r}; fix or remove that line") from None
    except (ValueError, OverflowError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse ({str(e).splitlines()[0] if str(e) else e!r}); "
                        f"check the file format") from None
    return frame, source


FEEDBACK = ("explicit", "binary", "log")
_SEPARATORS = {".csv": ",", ".tsv": "\t"}


def resolve_path(path: str | Path, root: Path) -> Path:
    """``path`` (``~`` expanded), relative ones against the data dir ``root``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def read_any(path: Path, sep: str | None, *, key: str, header: bool = True, text: Sequence = (),
             encoding: str = "utf-8") -> tuple[pd.DataFrame, SourceFile]:
    """A ``.parquet`` file, or a delimited one (``sep`` None = inferred from .csv/.tsv)."""
    if sep is None and path.suffix.lower() == ".parquet":
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path} cannot be read ({e.strerror}); check the path") from None
        try:
            frame = pd.read_parquet(io.BytesIO(data))
        except (OSError, ValueError, TypeError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: "
                            f"{str(e)[:120]!r}); re-export it") from None
        return frame.reset_index(drop=True), SourceFile(path, data, hashlib.sha256(data).hexdigest(),
                                                        "")
    if sep is None:
        sep = _SEPARATORS.get(path.suffix.lower())
        if sep is None:
            raise ConfigError(key, f"cannot infer the separator of {path.name} (not .csv, .tsv or "
                              f".parquet); set {key} (e.g. '\\t' or ',')")
    return read_table(path, sep=sep, header=header, text=tuple(text), encoding=encoding,
                      quoted=sep == ",")


def _column(frame: pd.DataFrame, column: object, key: str, path: Path) -> object:
    if column not in frame.columns:
        have = ", ".join(repr(str(c)) for c in frame.columns)
        raise DataError(f"{path} has no column {column!r} (it has {have[:120]}); fix {key} or "
                        f"the file's header")
    return column


def _ids(frame: pd.DataFrame, column: object, src: SourceFile, what: str) -> np.ndarray:
    """Id column as str tokens ``[n]``; DataError on the first missing id."""
    values = frame[column]
    missing = values.isna().to_numpy()
    if missing.any():
        raise DataError(f"{src.where(int(frame.index[np.argmax(missing)]))}: {what} is missing; "
                        f"fix or remove that line")
    return values.astype(str).to_numpy(dtype=object)


def _side_table(spec: Mapping | None, root: Path, key: str, encoding: str,
                ) -> tuple[SideTable | None, SourceFile | None]:
    """``{path, id_column, columns: [...], bags: {column: separator}, sep, max_bag_size}``."""
    if spec is None:
        return None, None
    spec = dict(spec)
    for need in ("path", "id_column"):
        if need not in spec:
            raise ConfigError(f"{key}.{need}", f"missing; {key} needs path and id_column")
    unknown = set(spec) - {"path", "id_column", "columns", "bags", "sep", "max_bag_size"}
    if unknown:
        raise ConfigError(key, f"unknown keys {sorted(unknown)}; use path, id_column, columns, "
                          f"bags, sep, max_bag_size")
    columns, bags = list(spec.get("columns") or []), dict(spec.get("bags") or {})
    path = resolve_path(spec["path"], root)
    frame, src = read_any(path, spec.get("sep"), key=f"{key}.sep",
                          text=[spec["id_column"], *columns, *bags], encoding=encoding)
    for col in (spec["id_column"], *columns, *bags):
        _column(frame, col, f"{key}.columns", path)
    ids = _ids(frame, spec["id_column"], src, "id")
    check_unique(ids, "id", src.where)
    cols = {str(c): text_column(frame, c) for c in columns}
    lists = {str(c): text_column(frame, c).fillna("").str.split(str(s)) for c, s in bags.items()}
    return (ids, cols, lists, spec.get("max_bag_size")), src


def feedback_values(value: np.ndarray, feedback: str, src: SourceFile, rows: pd.Index,
                    ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Apply ``feedback`` to the values ``[n]``: ``(values, fixed scale bounds or None)``."""
    if feedback == "binary":
        return (value > 0).astype(np.float64), (0.0, 1.0)
    if feedback == "log":
        negative = value < 0
        if negative.any():
            raise DataError(f"{src.where(int(rows[np.argmax(negative)]))}: negative weight; "
                            f"feedback=log needs weights >= 0 (use feedback=explicit)")
        return np.log1p(value), None
    return value, None


def _plain(value: object) -> object:
    """Config values (DictConfig/ListConfig included) -> JSON-able dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def load_tabular(name: str, ratings: str, columns: Mapping[str, object], sep: str | None = None,
                 feedback: str = "explicit", user_features: Mapping | None = None,
                 item_features: Mapping | None = None, duplicates: str = "error",
                 min_user_interactions: int = 0, max_user_interactions: int | None = None,
                 min_item_interactions: int = 0, max_item_interactions: int | None = None,
                 rating_scale: str = "raw", header: bool = True, encoding: str = "utf-8",
                 data_dir: str | None = None, cache: bool = True,
                 timestamp_format: str | None = "unix") -> Interactions:
    """Bring-your-own interactions from a delimited or parquet file.

    Args:
        name: dataset name.
        ratings: the interactions file; relative paths resolve against the data dir.
        columns: ``{user, item, rating | weight, timestamp}`` -> column names (0-based positions
            with ``header=false``); ``timestamp`` absent = 0 for every row.
        sep: field separator; None = inferred from the suffix (.csv, .tsv, .parquet).
        feedback: ``explicit`` (the rating as is), ``binary`` (weight > 0 -> 1, else 0; scale
            0..1) or ``log`` (``log1p(weight)``, weights must be >= 0). Without a rating/weight
            column, implicit feedback weighs every row 1.
        user_features, item_features: ``{path, id_column, columns: [...], bags: {column:
            separator}, sep, max_bag_size}``: token columns become categorical features, bag
            columns token bags; ids absent from the file get the token ``<unknown>``.
        duplicates: ``keep_last`` | ``mean`` | ``error`` (after the feedback transform).
        min_/max_user_interactions, min_/max_item_interactions: count filters (items first).
        rating_scale: ``raw`` | ``unit``.
        header: the files have a header row.
        encoding: of the text files (``utf-8``, ``latin-1`` or ``auto``).
        data_dir: root for relative paths (None = ``$METAREC_DATA_DIR``, else the XDG cache).
        cache: use the processed cache.
        timestamp_format: how ``columns.timestamp`` is read: ``unix`` (integer seconds, the
            default), a :func:`datetime.strptime` format such as ``"%Y-%m-%d"`` (or pandas'
            ``"ISO8601"``), or None (integers as seconds, anything else parsed as dates by
            pandas' inference). Dates become integer seconds since 1970-01-01 UTC.

    Returns:
        Interactions over the users and items that keep ratings; ``metadata`` has the files read
        (path, sha256), counts, vocabularies and raw ids (str) by code.
    """
    require_choice("feedback", feedback, FEEDBACK)
    root = resolve_data_dir(data_dir)
    path = resolve_path(ratings, root)
    cols = dict(columns)
    unknown = set(cols) - {"user", "item", "rating", "weight", "timestamp"}
    if unknown or not {"user", "item"} <= set(cols):
        raise ConfigError("columns", f"needs user and item (and optionally rating or weight, "
                          f"timestamp), got {sorted(cols)}")
    if feedback == "explicit" and "rating" not in cols:
        raise ConfigError("columns.rating", "feedback=explicit needs a rating column; or use "
                          "feedback=binary/log with columns.weight for implicit data")
    value_col = cols.get("rating", cols.get("weight"))
    filters = {"min_user_interactions": min_user_interactions,
               "max_user_interactions": max_user_interactions,
               "min_item_interactions": min_item_interactions,
               "max_item_interactions": max_item_interactions}
    files = [path] + [resolve_path(dict(s)["path"], root) for s in (user_features, item_features)
                      if s is not None and "path" in dict(s)]
    args = _plain({"loader": "tabular", "ratings": str(ratings), "columns": cols, "sep": sep,
                   "feedback": feedback, "user_features": user_features, "header": header,
                   "item_features": item_features, "duplicates": duplicates, "filters": filters,
                   "rating_scale": rating_scale, "encoding": encoding,
                   "timestamp_format": timestamp_format})

    def build() -> Interactions:
        frame, src = read_any(path, sep, key="sep", header=header, encoding=encoding,
                              text=[cols["user"], cols["item"]])
        for key, col in cols.items():
            _column(frame, col, f"columns.{key}", path)
        value_key = "columns.rating" if "rating" in cols else "columns.weight"
        value = (numeric_column(frame, value_col, src, integer=False, key=value_key)
                 if value_col is not None else np.ones(len(frame)))
        value, bounds = feedback_values(value, feedback, src, frame.index)
        raw = pd.DataFrame({"user": _ids(frame, cols["user"], src, "user id"),
                            "item": _ids(frame, cols["item"], src, "item id"), "rating": value,
                            "timestamp": timestamp_column(frame, cols["timestamp"], src, timestamp_format)
                            if "timestamp" in cols else np.zeros(len(frame), np.int64)},
                           index=frame.index)
        users, u_src = _side_table(user_features, root, "user_features", encoding)
        items, i_src = _side_table(item_features, root, "item_features", encoding)
        sources = {k: s for k, s in (("ratings", src), ("user_features", u_src),
                                     ("item_features", i_src)) if s is not None}
        return assemble(name, raw, src.where, duplicates=duplicates, filters=filters,
                        rating_scale=rating_scale, bounds=bounds, users=users, items=items,
                        metadata={"source": f"tabular {path.name}", "feedback": feedback,
                                  "files": {k: s.describe() for k, s in sources.items()}})

    return cached(name, root, files, args, build, enabled=cache)
