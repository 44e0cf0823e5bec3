"""Encoding helpers shared by the dataset loaders.

Raw ids -> dense codes (the raw ids are returned, sorted in *natural* order: integer-like tokens
numerically, then the rest as text), token columns -> codes plus vocabulary, token lists ->
padded bag arrays, the duplicate (user, item) policy, interaction-count filters and rating
scaling. Everything is vectorised (pandas/numpy); no per-row Python loops on the happy path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError, DataError, require_choice

UNKNOWN = "<unknown>"
"""Token of a missing categorical value (an empty field, an item absent from a features file)."""

DUPLICATE_POLICIES = ("keep_last", "mean", "error")
RATING_SCALES = ("raw", "unit")


def show(value: object) -> str:
    """``repr`` of a raw value for messages (numpy scalars as plain Python numbers)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def natural_order(values: np.ndarray) -> np.ndarray:
    """Permutation sorting ``values`` naturally: numbers (or integer-like strings) by value first,
    then the other strings lexicographically. ``values``: 1-d array (int, float or str/object)."""
    if values.dtype.kind in "iuf":
        return np.argsort(values, kind="stable")
    text = pd.Series(values, dtype=object).astype(str)
    as_int = pd.to_numeric(text.where(text.str.fullmatch(r"[+-]?\d{1,15}")), errors="coerce")
    numeric = as_int.notna().to_numpy()
    return np.lexsort((text.to_numpy(dtype=object), as_int.fillna(0).to_numpy(), ~numeric))


def dense_codes(raw: np.ndarray | pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Re-index ``raw`` ids (``[n]``) to dense codes.

    Returns:
        ``(codes, ids)``: int64 ``[n]`` codes in ``0..k-1`` and the ``k`` distinct raw ids in
        natural order, so ``ids[codes] == raw``.
    """
    codes, uniques = pd.factorize(pd.Series(raw), sort=False)
    uniques = np.asarray(uniques)
    order = natural_order(uniques)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[codes], uniques[order]


def lookup_codes(raw: np.ndarray, ids: np.ndarray, what: str, where: Callable[[int], str],
                 fix: str) -> np.ndarray:
    """Codes of ``raw`` values (``[n]``) in the id array ``ids``; DataError on the first unknown.

    Args:
        what: e.g. ``"user"``, used in the message.
        where: row number -> ``"<file> line N: '<text>'"``.
        fix: how to repair the data, appended to the message.
    """
    codes = pd.Index(ids).get_indexer(pd.Series(raw))
    missing = np.flatnonzero(codes < 0)
    if len(missing):
        row = int(missing[0])
        raise DataError(f"{where(row)}: {what} {show(raw[row])} is unknown "
                        f"({len(missing)} such rows); {fix}")
    return codes.astype(np.int64)


def check_unique(ids: np.ndarray, what: str, where: Callable[[int], str]) -> None:
    """DataError naming the first repeated id of a side file (``ids``: ``[n]``, file order)."""
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        row = int(np.argmax(dup))
        raise DataError(f"{where(row)}: {what} {show(ids[row])} appears twice; keep one row per {what}")


def categorical(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Token column (``[n]``, missing = NaN/None) -> int64 codes ``[n]`` and the vocabulary.

    Tokens are compared as strings; a missing value becomes :data:`UNKNOWN`. The vocabulary is in
    natural order, so the same token set always gives the same codes.
    """
    text = pd.Series(values, dtype=object).where(pd.notna(values), UNKNOWN).astype(str)
    codes, vocab = dense_codes(text.to_numpy(dtype=object))
    return codes, [str(v) for v in vocab]


def bag_array(tokens: pd.Series, n_rows: int, max_width: int | None = None,
              ) -> tuple[np.ndarray, list[str]]:
    """Lists of tokens -> a padded bag array.

    Args:
        tokens: series indexed by row ``0..n_rows-1``; each value a list of str (or NaN/empty).
        n_rows: rows of the result.
        max_width: keep at most this many tokens per row (the first ones); None = no cap.

    Returns:
        ``(bags, vocab)``: int64 ``[n_rows, width]`` with ``width = max(1, min(longest row,
        max_width))``, padded with -1 (token order kept, repeats kept), and the vocabulary of the
        tokens that were kept, in natural order.
    """
    flat = tokens.explode()
    flat = flat[flat.notna()].astype(str)
    flat = flat[flat != ""]
    rows = flat.index.to_numpy(dtype=np.int64)
    pos = flat.groupby(level=0, sort=False).cumcount().to_numpy()
    if max_width is not None:
        keep = pos < max_width
        rows, pos, flat = rows[keep], pos[keep], flat[keep]
    codes, vocab = dense_codes(flat.to_numpy(dtype=object))
    width = max(1, int(pos.max()) + 1 if len(pos) else 0)
    out = np.full((n_rows, width), -1, dtype=np.int64)
    out[rows, pos] = codes
    return out, [str(v) for v in vocab]


def apply_duplicates(ratings: pd.DataFrame, policy: str, user_ids: np.ndarray,
                     item_ids: np.ndarray, where: Callable[[int], str]) -> tuple[pd.DataFrame, int]:
    """Resolve repeated (user, item) pairs.

    Args:
        ratings: columns user, item (int64 codes), rating, timestamp; index = row number in the
            source file (used by ``where``).
        policy: ``keep_last`` (the latest timestamp wins; ties: the later row), ``mean`` (mean
            rating, latest timestamp) or ``error`` (DataError naming the first repeated pair).
        user_ids, item_ids: raw ids by code, for the message.

    Returns:
        ``(ratings, n_removed)``; the frame is unchanged when there are no duplicates.
    """
    require_choice("duplicates", policy, DUPLICATE_POLICIES)
    key = ratings["user"].to_numpy() * (int(ratings["item"].max()) + 1) + ratings["item"].to_numpy()
    ordered = np.sort(key)  # a sort finds "no duplicates" faster than hashing
    if not (ordered[1:] == ordered[:-1]).any():
        return ratings, 0
    later = pd.Series(key).duplicated(keep="first").to_numpy()
    if policy == "error":
        j = int(np.argmax(later))
        i = int(np.argmax(key == key[j]))
        u, it = ratings["user"].iat[j], ratings["item"].iat[j]
        raise DataError(f"duplicate (user, item) pair ({show(user_ids[u])}, {show(item_ids[it])}) in "
                        f"{where(int(ratings.index[i]))} and again at {where(int(ratings.index[j]))};"
                        f" set duplicates=keep_last or duplicates=mean")
    if policy == "keep_last":
        order = np.lexsort((np.arange(len(key)), ratings["timestamp"].to_numpy(), key))
        last = np.ones(len(key), dtype=bool)
        last[:-1] = key[order][1:] != key[order][:-1]
        out = ratings.iloc[np.sort(order[last])]
    else:
        grouped = ratings.groupby([ratings["user"], ratings["item"]], sort=False)
        out = grouped.agg(rating=("rating", "mean"), timestamp=("timestamp", "max")).reset_index()
        out["rating"] = out["rating"].astype(ratings["rating"].dtype)
    return out, len(ratings) - len(out)


def sort_order(user: np.ndarray, timestamp: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Permutation sorting rows (``[n]`` int64 arrays, codes >= 0) by (user, timestamp, item).

    One argsort of a packed 63-bit key (user, timestamp - min, item); when that needs more bits,
    the timestamp's rank replaces it (a ``np.unique`` more), else ``np.lexsort`` (slowest).
    """
    if len(user) == 0:
        return np.zeros(0, dtype=np.int64)

    def bits(a: np.ndarray) -> int:
        return max(1, int(a.max()).bit_length())

    t = timestamp - timestamp.min()  # wraps negative for spans beyond 2**63
    if t.min() < 0 or bits(user) + bits(t) + bits(item) > 62:
        t = np.unique(timestamp, return_inverse=True)[1].reshape(-1).astype(np.int64)
    if bits(user) + bits(t) + bits(item) > 62:
        return np.lexsort((item, timestamp, user))
    key = (user.astype(np.int64) << (bits(t) + bits(item))) | (t << bits(item)) | item
    return np.argsort(key, kind="stable")


def _check_bounds(key: str, lo: int, hi: int | None) -> None:
    if isinstance(lo, bool) or not isinstance(lo, (int, np.integer)) or lo < 0:
        raise ConfigError(key, f"must be an integer >= 0, got {lo!r}")
    if hi is not None and (isinstance(hi, bool) or not isinstance(hi, (int, np.integer)) or hi < lo):
        raise ConfigError(key.replace("min_", "max_"),
                          f"must be null or an integer >= {key} ({lo}), got {hi!r}")


def apply_filters(ratings: pd.DataFrame, source: str, min_user_interactions: int = 0,
                  max_user_interactions: int | None = None, min_item_interactions: int = 0,
                  max_item_interactions: int | None = None) -> pd.DataFrame:
    """Keep items, then users, whose interaction counts lie in ``[min, max]`` (one pass each).

    Items are filtered first, so every user in the result satisfies the user bounds exactly
    (items may fall below theirs afterwards). Raises DataError naming the filter that removed
    every interaction. ``ratings``: columns user, item (codes); the result keeps the index.
    """
    _check_bounds("min_item_interactions", min_item_interactions, max_item_interactions)
    _check_bounds("min_user_interactions", min_user_interactions, max_user_interactions)
    for col, lo, hi in (("item", min_item_interactions, max_item_interactions),
                        ("user", min_user_interactions, max_user_interactions)):
        if lo == 0 and hi is None:
            continue
        counts = ratings[col].map(ratings[col].value_counts())
        keep = (counts >= lo) & (counts <= (hi if hi is not None else np.inf))
        if not keep.any():
            most, least = int(counts.max()), int(counts.min())
            raise DataError(f"{source}: the filter {col}_interactions in [{lo}, {hi}] removed every "
                            f"interaction (each {col} has {least}..{most}); relax "
                            f"min_{col}_interactions / max_{col}_interactions")
        ratings = ratings[keep.to_numpy()]
    return ratings


def compact(codes: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop ids no longer used after filtering: ``(new codes [n], kept ids, kept old codes)``."""
    used = np.unique(codes)
    return np.searchsorted(used, codes).astype(np.int64), ids[used], used


def scale_ratings(rating: np.ndarray, scale: str, bounds: tuple[float, float] | None = None,
                  ) -> tuple[np.ndarray, tuple[float, float], dict[str, object]]:
    """Apply ``rating_scale`` (``raw`` or ``unit``: ``(r - lo) / (hi - lo)``).

    Args:
        rating: float array ``[n]``.
        bounds: the scale's ``(lo, hi)``; None = the observed min and max.

    Returns:
        ``(float32 ratings [n], (lo, hi) of the result, metadata entries)``.
    """
    require_choice("rating_scale", scale, RATING_SCALES)
    lo, hi = bounds if bounds is not None else (float(rating.min()), float(rating.max()))
    meta = {"rating_scale": scale, "raw_rating_range": [lo, hi]}
    if not np.abs(rating).max() <= np.finfo(np.float32).max:
        raise DataError(f"ratings span [{rating.min()}, {rating.max()}], beyond float32; rescale them")
    if scale == "raw":
        return rating.astype(np.float32), (lo, hi), meta
    if not hi > lo:
        raise DataError(f"every rating equals {lo}; rating_scale=unit needs two distinct values, "
                        f"use rating_scale=raw")
    return ((rating - lo) / (hi - lo)).astype(np.float32), (0.0, 1.0), meta


def align_features(ids: np.ndarray, table_ids: np.ndarray, columns: dict[str, pd.Series],
                   bags: dict[str, pd.Series], max_bag_size: int | None = None,
                   ) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, list[str]]]:
    """Side-file features re-ordered to ``ids`` (the dataset's raw ids, by code).

    Args:
        ids: ``[n]`` raw ids of the dataset, as str.
        table_ids: ``[m]`` ids of the side file's rows, as str (unique).
        columns: token column -> ``[m]`` series (rows of the side file).
        bags: bag column -> ``[m]`` series of token lists.

    Returns:
        ``(codes frame [n, len(columns)], {bag: [n, width]}, vocabularies)``; ids absent from the
        side file get :data:`UNKNOWN` and empty bags. Field names are the column names.
    """
    row = pd.Index(table_ids).get_indexer(pd.Series(ids))
    found = row >= 0
    frame = pd.DataFrame(index=pd.RangeIndex(len(ids)))
    vocab: dict[str, list[str]] = {}
    for col, values in columns.items():
        picked = pd.Series(None, index=frame.index, dtype=object)
        picked[found] = values.to_numpy(dtype=object)[row[found]]
        frame[col], vocab[col] = categorical(picked)
    arrays = {}
    for col, values in bags.items():
        picked = pd.Series(None, index=frame.index, dtype=object)
        picked[found] = values.to_numpy(dtype=object)[row[found]]
        arrays[col], vocab[col] = bag_array(picked, len(ids), max_bag_size)
    return frame, arrays, vocab


SideTable = tuple[np.ndarray, dict[str, pd.Series], dict[str, pd.Series], int | None]
"""A side file: (row ids as str [m], token columns, bag columns, max bag size)."""


def assemble(name: str, raw: pd.DataFrame, where: Callable[[int], str], *, duplicates: str,
             filters: dict[str, int | None], rating_scale: str,
             bounds: tuple[float, float] | None = None, users: SideTable | None = None,
             items: SideTable | None = None, metadata: dict | None = None) -> Interactions:
    """Raw interactions + side tables -> :class:`Interactions` (generic loaders' pipeline).

    Args:
        raw: columns user, item (raw ids as str), rating (float64), timestamp (int64); index =
            data row number (``where(row)`` names it in errors).
        filters: keyword arguments of :func:`apply_filters`.
        bounds: the rating scale's ``(lo, hi)`` (None = observed).
        users, items: side tables; their columns become features of the users/items that have
            ratings (absent ones get :data:`UNKNOWN`).

    Steps: dense codes -> duplicates -> filters -> drop unused ids -> rating scale -> sort by
    (user, timestamp, item) -> features. Users and items are those left with ratings.
    """
    if len(raw) == 0:
        raise DataError(f"{name}: the interactions file has no data rows; check the file")
    user, user_ids = dense_codes(raw["user"].to_numpy(dtype=object))
    item, item_ids = dense_codes(raw["item"].to_numpy(dtype=object))
    frame = pd.DataFrame({"user": user, "item": item, "rating": raw["rating"].to_numpy(),
                          "timestamp": raw["timestamp"].to_numpy()}, index=raw.index)
    frame, n_dup = apply_duplicates(frame, duplicates, user_ids, item_ids, where)
    frame = apply_filters(frame, name, **filters)
    user, user_ids, _ = compact(frame["user"].to_numpy(), user_ids)
    item, item_ids, _ = compact(frame["item"].to_numpy(), item_ids)
    rating, scale, scale_meta = scale_ratings(frame["rating"].to_numpy(np.float64), rating_scale,
                                              bounds)
    stamp = frame["timestamp"].to_numpy(np.int64)
    order = sort_order(user, stamp, item)
    frame = pd.DataFrame({"user": user[order], "item": item[order], "rating": rating[order],
                          "timestamp": stamp[order]})
    parts = {}
    for kind, ids, side in (("user", user_ids, users), ("item", item_ids, items)):
        if side is None:
            parts[kind] = (pd.DataFrame(index=pd.RangeIndex(len(ids))), {}, {})
        else:
            parts[kind] = align_features(ids.astype(str), side[0], side[1], side[2], side[3])
    vocab = {**parts["user"][2], **parts["item"][2]}
    clash = set(parts["user"][2]) & set(parts["item"][2]) | set(vocab) & {"user_id", "item_id"}
    if clash:
        raise DataError(f"{name}: feature names {sorted(clash)} are used twice (user and item "
                        f"fields, user_id and item_id must differ); rename those columns")
    meta = dict(metadata or {})
    meta.update(scale_meta, unknown_token=UNKNOWN, vocab=vocab, raw_user_ids=user_ids.astype(str),
                raw_item_ids=item_ids.astype(str))
    meta["counts"] = {"ratings": len(frame), "users": len(user_ids), "items": len(item_ids),
                      "rows_read": len(raw), "duplicates_removed": n_dup,
                      "filtered_out": len(raw) - n_dup - len(frame)}
    return Interactions(name=name, ratings=frame, user_features=parts["user"][0],
                        item_features=parts["item"][0], user_bags=parts["user"][1],
                        item_bags=parts["item"][1], cardinalities={k: len(v) for k, v in vocab.items()},
                        rating_scale=scale, metadata=meta)
