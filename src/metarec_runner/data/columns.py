"""Typed columns of a loaded table: numbers, tokens and timestamps, with errors that name the line
(one bad row) or the column (a column of the wrong type, which no line edit fixes).

Every function takes the frame :func:`metarec_runner.data.tabular.read_table` (or ``read_any``)
returned and its :class:`~metarec_runner.data.tabular.SourceFile`, so errors can quote the line.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from metarec_runner.data.encode import show
from metarec_runner.errors import DataError


class SourceFile(Protocol):
    """What the column checks need of a file as read (:class:`metarec_runner.data.tabular.SourceFile`):
    its path, and where a data row is (``"<path> line N: '<text>'"``)."""

    path: Path

    def where(self, row: int) -> str: ...

SHOWN_BAD_VALUES = 3  # bad values quoted by a whole-column error


def column_label(column: object, key: str | None) -> str:
    """``"column 'when' (columns.timestamp)"``; header-less files name the position
    (``"column 3 (columns.timestamp)"``)."""
    name = f"column {column}" if isinstance(column, int) else f"column {str(column)!r}"
    return f"{name} ({key})" if key else name


def _column_error(source: SourceFile, frame: pd.DataFrame, column: object, bad: np.ndarray,
                  expected: str, key: str | None, fix: str) -> DataError:
    """A whole-column type error: the column, how many values fail, the first few of them."""
    values = frame[column]
    shown = ", ".join(show(v) for v in values[bad].head(SHOWN_BAD_VALUES).tolist())
    return DataError(f"{source.path}: {column_label(column, key)} is not {expected}: "
                     f"{int(bad.sum())} of {len(values)} values fail, first {shown}; {fix}")


def is_whole_column(bad: np.ndarray, missing: np.ndarray) -> bool:
    """True when a column is of the wrong type rather than a few lines being wrong: at least two
    present values fail and they are at least half of the present values."""
    wrong = bad & ~missing
    present = int((~missing).sum())
    return int(wrong.sum()) >= 2 and 2 * int(wrong.sum()) >= present


def numeric_column(frame: pd.DataFrame, column: str, source: SourceFile, *, integer: bool,
                   what: str | None = None, key: str | None = None,
                   fix: str | None = None) -> np.ndarray:
    """Column ``column`` as int64 (``integer``) or float64 ``[n]``; DataError on the first row that
    is missing, not a number, not finite, or (``integer``) not a whole number within +-2**53.

    With ``key`` (the config key that chose the column, e.g. ``columns.rating``) a column whose
    values mostly fail (:func:`is_whole_column`) is reported as a column of the wrong type, with
    its first bad values and ``fix``, instead of as its first line.
    """
    what = what or column
    values = frame[column]
    if values.dtype.kind in "ib" or (values.dtype.kind == "u" and values.max() < 2**63):
        return values.to_numpy(np.int64 if integer else np.float64)
    if values.dtype.kind == "f":
        number = values.to_numpy(np.float64)
    else:
        number = pd.to_numeric(values.astype(object), errors="coerce").astype(np.float64).to_numpy()
    bad = ~np.isfinite(number)
    if integer:
        bad |= (np.abs(number) >= 2.0**53) | (number != np.round(number))
    if bad.any():
        expected = "an integer" if integer else "a finite number"
        if key is not None and is_whole_column(bad, values.isna().to_numpy()):
            raise _column_error(source, frame, column, bad, "integer" if integer else "numeric",
                                key, fix or f"map {key} to a numeric column")
        row = int(np.argmax(bad))
        value = values.iloc[row]
        problem = "is missing" if pd.isna(value) else f"{show(value)} is not {expected}"
        raise DataError(f"{source.where(int(frame.index[row]))}: {what} {problem}; "
                        f"fix or remove that line")
    return number.astype(np.int64) if integer else number


def text_column(frame: pd.DataFrame, column: str) -> pd.Series:
    """Column ``column`` as an object series of str, missing values as None (index kept)."""
    values = frame[column]
    return values.astype(object).where(values.notna(), None)


_DATE_FIX = ("set timestamp_format to the column's date format (e.g. '%Y-%m-%d' or "
             "'%Y-%m-%d %H:%M:%S'), or null to let pandas infer it")


def timestamp_column(frame: pd.DataFrame, column: object, source: SourceFile,
                     timestamp_format: str | None, *, key: str = "columns.timestamp") -> np.ndarray:
    """Column ``column`` as int64 seconds since 1970-01-01 UTC ``[n]``.

    Args:
        frame, column, source: the table, the column and its file (for errors).
        timestamp_format: ``"unix"``: integer seconds as they are (a column of dates is an
            error that says to set the format); a :func:`datetime.strptime` format such as
            ``"%Y-%m-%d"`` (or pandas' ``"ISO8601"`` / ``"mixed"``): every value parsed with it;
            None: integer columns as seconds, any other column parsed as dates by pandas'
            inference. Dates without a zone are taken as UTC; dates with one are converted. A
            datetime column (parquet) is converted whatever the format.
        key: the config key that chose the column (for errors).
    """
    values = frame[column]
    if pd.api.types.is_datetime64_any_dtype(values):  # a parquet datetime column, any format
        if values.isna().any():
            row = int(np.argmax(values.isna().to_numpy()))
            raise DataError(f"{source.where(int(frame.index[row]))}: timestamp is missing; "
                            f"fix or remove that line")
        return _seconds(pd.to_datetime(values, utc=True))
    if timestamp_format == "unix":
        return numeric_column(frame, column, source, integer=True, what="timestamp", key=key,
                              fix=f"if these are dates, {_DATE_FIX}")
    if timestamp_format is None and values.dtype.kind in "iub":
        return numeric_column(frame, column, source, integer=True, what="timestamp", key=key)
    text = values.astype(object).where(values.notna(), None)
    text = text.map(lambda v: v if v is None or isinstance(v, str) else str(v))
    with warnings.catch_warnings():  # "could not infer format": the bad values are reported below
        warnings.simplefilter("ignore", UserWarning)
        parsed = pd.to_datetime(text, format=timestamp_format, errors="coerce", utc=True)
    missing = values.isna().to_numpy()
    bad = parsed.isna().to_numpy()
    if bad.any():
        wanted = f"dates in the format {timestamp_format!r}" if timestamp_format else "dates"
        if is_whole_column(bad, missing):
            raise _column_error(source, frame, column, bad & ~missing, wanted, key, _DATE_FIX)
        row = int(np.argmax(bad))
        in_format = f" in the format {timestamp_format!r}" if timestamp_format else ""
        problem = "is missing" if missing[row] else f"{show(values.iloc[row])} is not a date{in_format}"
        raise DataError(f"{source.where(int(frame.index[row]))}: timestamp {problem}; "
                        f"fix or remove that line")
    return _seconds(parsed)


def _seconds(parsed: pd.Series) -> np.ndarray:
    """UTC datetimes -> int64 whole seconds since the epoch (floored)."""
    delta = parsed - pd.Timestamp(0, tz="UTC")
    return (delta // pd.Timedelta(seconds=1)).to_numpy(np.int64)
