"""A new user's support set: raw ratings checked, mapped to item codes, and collated as a TaskBatch.

:func:`parse_support` turns a table of ``item,rating`` (or ``title,rating``) rows into a
:class:`Support` (item codes, ratings, the unknown items it skipped), refusing in one line what
cannot be a rating; :func:`support_batch` builds the one-user :class:`TaskBatch` a saved
algorithm adapts to (one task per pseudo-user of :meth:`Vocabulary.user_columns`, each with the
same support). :func:`read_ratings_csv` and :func:`parse_user_features` read the command line's
inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metarec_runner.evaluate.candidates import Catalog
from metarec_runner.serve.vocab import ServeError, Vocabulary, raw_key
from metarec_runner.tasks.taskset import TaskBatch

ITEM_COLUMNS = ("item", "title")
"""Either names the rated items: raw item ids, or titles where the dataset has them."""


@dataclass(frozen=True)
class Support:
    """A new user's ratings in model codes.

    Attributes:
        items: ``[S]`` int64 item codes (distinct; a repeated item keeps its last rating).
        ratings: ``[S]`` float64 ratings, within the dataset's rating scale.
        unknown: the raw ids (or titles) the model does not know, skipped, in input order.
    """

    items: np.ndarray
    ratings: np.ndarray
    unknown: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.items.shape[0])


def as_frame(ratings: Any) -> pd.DataFrame:
    """A frame of ratings from a DataFrame, a ``{item: rating}`` mapping, ``[(item, rating)]``
    pairs or None (no ratings)."""
    if ratings is None:
        return pd.DataFrame({"item": pd.Series(dtype=object), "rating": pd.Series(dtype=float)})
    if isinstance(ratings, pd.DataFrame):
        return ratings
    if isinstance(ratings, Mapping):
        return pd.DataFrame({"item": list(ratings), "rating": list(ratings.values())})
    rows = list(ratings)
    if rows and not all(isinstance(r, (tuple, list)) and len(r) == 2 for r in rows):
        raise ServeError("ratings: give a DataFrame with item,rating columns, a {item: rating} dict "
                         "or (item, rating) pairs")
    return pd.DataFrame(rows, columns=["item", "rating"])


def parse_support(ratings: Any, vocab: Vocabulary, source: str = "ratings") -> Support:
    """Check and encode a new user's ratings.

    Args:
        ratings: see :func:`as_frame`; columns ``item`` or ``title``, and ``rating``.
        vocab: the model's vocabulary.
        source: what to name in messages (the CSV path).

    Raises:
        ServeError: unknown or missing columns, a non-numeric rating, or a rating outside the
            dataset's scale (one line naming ``source``, the row and the fix).
    """
    frame = as_frame(ratings)
    columns = [str(c).strip() for c in frame.columns]
    frame = frame.set_axis(columns, axis=1)
    by = [c for c in ITEM_COLUMNS if c in columns]
    allowed = {*ITEM_COLUMNS, "rating"}
    unknown_cols = [c for c in columns if c not in allowed]
    if unknown_cols or len(by) > 1 or (len(frame) and (not by or "rating" not in columns)):
        found = ", ".join(columns) if columns else "none"
        raise ServeError(f"{source}: columns must be item,rating (or title,rating), found {found}; "
                         "rename the columns (one row per rated item)")
    lo, hi = vocab.rating_scale
    if len(frame) == 0:
        return Support(np.zeros(0, np.int64), np.zeros(0, np.float64))
    values = pd.to_numeric(frame["rating"], errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        row = int(bad[0])
        raise ServeError(f"{source}: row {row + 1}: rating {frame['rating'].iat[row]!r} is not a number "
                         f"({len(bad)} such rows); give numeric ratings in [{lo:g}, {hi:g}]")
    out = np.flatnonzero((values < lo) | (values > hi))
    if len(out):
        row = int(out[0])
        raise ServeError(f"{source}: row {row + 1}: rating {values[row]:g} is outside this model's rating "
                         f"scale [{lo:g}, {hi:g}] ({len(out)} such rows); rescale the ratings")
    names = frame[by[0]]
    codes = vocab.item_codes(names.tolist(), by=by[0])
    unknown = [raw_key(v) for v, c in zip(names.tolist(), codes, strict=True) if c < 0]
    keep = codes >= 0
    codes, values = codes[keep], values[keep]
    last = ~pd.Series(codes).duplicated(keep="last").to_numpy()  # a repeated item: its last rating
    return Support(codes[last], values[last], unknown)


def support_batch(item_rows: torch.Tensor, support: Support, user_columns: torch.Tensor,
                  user_id_column: int, dtype: torch.dtype = torch.float32) -> TaskBatch:
    """The new user's tasks: one per pseudo-user, each with the same support and an empty query.

    Args:
        item_rows: ``[V, C]`` every item's feature row (for user code 0, from the checkpoint).
        support: the user's ratings in codes (``S`` items).
        user_columns: ``[K, Cu]`` the user columns of each pseudo-user
            (:meth:`Vocabulary.user_columns`).
        user_id_column: the row column of ``user_id`` (set to 0, see :mod:`~metarec_runner.serve.vocab`).
        dtype: the ratings' dtype (the model's).

    Returns:
        TaskBatch with ``support_x [K, S, C]``, ``support_y [K, S]``, ``support_mask [K, S]``
        (all True) and an empty query ``[K, 0, C]``.
    """
    k = user_columns.shape[0]
    items = torch.as_tensor(support.items, dtype=torch.long)
    rows = user_rows(item_rows[items], user_columns, user_id_column)  # [K, S, C]
    y = torch.as_tensor(support.ratings, dtype=dtype).expand(k, -1).contiguous()
    mask = torch.ones(k, len(support), dtype=torch.bool)
    width = item_rows.shape[1]
    return TaskBatch(rows, y, mask, torch.zeros(k, 0, width, dtype=torch.long), torch.zeros(k, 0, dtype=dtype),
                     torch.zeros(k, 0, dtype=torch.bool), torch.arange(k))


def user_rows(rows: torch.Tensor, user_columns: torch.Tensor, user_id_column: int) -> torch.Tensor:
    """Item rows ``[L, C]`` for each pseudo-user: ``[K, L, C]`` with the user columns
    ``0..Cu-1`` replaced by ``user_columns [K, Cu]`` and ``user_id`` set to the pseudo-user's
    index ``0..K-1`` (no shipped model reads ``user_id``; a ranking loss's negatives are drawn
    per user code, see :func:`serving_catalog`)."""
    k, cu = user_columns.shape
    out = rows.unsqueeze(0).repeat(k, 1, 1)
    out[..., :cu] = user_columns.unsqueeze(1)
    out[..., user_id_column] = torch.arange(k).unsqueeze(1)
    return out


def serving_catalog(item_rows: torch.Tensor, user_columns: torch.Tensor, user_id_column: int) -> Catalog:
    """The catalog a ranking-trained algorithm draws its adaptation negatives from when serving:
    every item, no known ratings (only the new user's own support items are excluded), and rows
    for pseudo-user ``k`` built from ``user_columns[k]`` (``[K, Cu]``)."""
    def feature_rows(users: np.ndarray, items: np.ndarray) -> torch.Tensor:
        rows = item_rows[torch.as_tensor(items, dtype=torch.long)].clone()
        k = torch.as_tensor(users, dtype=torch.long)
        rows[:, : user_columns.shape[1]] = user_columns[k]
        rows[:, user_id_column] = k
        return rows

    empty = torch.zeros(0, dtype=torch.long)
    no_ratings = torch.zeros(user_columns.shape[0] + 1, dtype=torch.long)  # K pseudo-users, none rated
    return Catalog(int(item_rows.shape[0]), no_ratings, empty, feature_rows)


def read_ratings_csv(path: str | Path) -> pd.DataFrame:
    """A user's ratings file (CSV with a header): every column read as text, so ids stay exact;
    an empty file is an empty table (no ratings: the zero-shot answer)."""
    path = Path(path)
    if not path.is_file():
        raise ServeError(f"{path}: no such ratings file; give a CSV with item,rating columns")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        return as_frame(None)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ServeError(f"{path}: not a readable CSV ({first[:200]}); write item,rating rows with a "
                         "header line") from None


def parse_user_features(text: str | None) -> dict[str, str]:
    """``"age=25,gender=F"`` -> ``{"age": "25", "gender": "F"}`` (a bag as ``genres=a|b``)."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ServeError(f"--user-features: {part.strip()!r} is not key=value; write e.g. "
                             "age=25,gender=F")
        out[key.strip()] = value.strip()
    return out


def batch_from_ratings(ratings: Any, vocabulary: Mapping[str, Any] | Vocabulary, item_rows: torch.Tensor,
                       user_features: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32,
                       samples: int = 32) -> TaskBatch:
    """A new user's raw ratings as the TaskBatch a saved algorithm adapts to (unknown items
    skipped): :func:`parse_support`, :meth:`Vocabulary.user_columns`, :func:`support_batch`.

    Args:
        ratings: see :func:`as_frame`.
        vocabulary: a checkpoint's ``meta["vocabulary"]`` (or a :class:`Vocabulary`).
        item_rows: ``[V, C]`` the checkpoint's ``item_rows``.
        user_features, samples: see :meth:`Vocabulary.user_columns`.

    Returns:
        TaskBatch of ``K`` tasks (``K = 1`` unless user features are marginalised), support ``[K, S, C]``.
    """
    vocab = vocabulary if isinstance(vocabulary, Vocabulary) else Vocabulary(vocabulary)
    columns = vocab.user_columns(user_features, samples)
    return support_batch(item_rows, parse_support(ratings, vocab), columns, vocab.user_id_column, dtype)
