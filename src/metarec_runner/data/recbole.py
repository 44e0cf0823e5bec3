"""RecBole atomic files: ``<name>.inter`` (+ optional ``<name>.user``, ``<name>.item``).

Each file is tab-separated with a header of ``field:type`` entries; types are ``token`` (one
token), ``token_seq`` (space-separated tokens), ``float`` and ``float_seq``. In ``.user``/``.item``
files, ``token`` fields become categorical features and ``token_seq`` fields token bags; ``float``
and ``float_seq`` fields have no categorical encoding and are skipped (listed in
``metadata["skipped_fields"]``). The ``.inter`` file supplies user, item, rating and timestamp
(field names configurable; other fields are ignored).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from metarec_runner.data.cache import cached, resolve_data_dir
from metarec_runner.data.encode import SideTable, assemble, check_unique
from metarec_runner.data.interactions import Interactions
from metarec_runner.data.tabular import (
    FEEDBACK,
    SourceFile,
    feedback_values,
    numeric_column,
    read_table,
    resolve_path,
    text_column,
)
from metarec_runner.errors import ConfigError, DataError, require_choice

TYPES = ("token", "token_seq", "float", "float_seq")
_FIELD = re.compile(r"([^:\s]+):(\w+)")


def read_atomic(path: Path) -> tuple[pd.DataFrame, dict[str, str], SourceFile]:
    """One atomic file -> ``(frame with columns named by field, {field: type}, source)``.

    Token and token_seq columns are str (missing = NaN); float columns are left for
    :func:`~metarec_runner.data.tabular.numeric_column` to check.
    """
    first = b""
    try:
        with path.open("rb") as f:
            first = f.readline().rstrip(b"\r\n")
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror}); check the folder") from None
    header = [e.strip() for e in first.decode("utf-8", "replace").lstrip("\ufeff").split("\t")]
    types: dict[str, str] = {}
    for entry in header:
        m = _FIELD.fullmatch(entry)
        if m is None or m.group(2) not in TYPES or m.group(1) in types:
            raise DataError(f"{path} line 1: header field {entry[:60]!r} is not a unique "
                            f"name:type with type {', '.join(TYPES)}; fix the header")
        types[m.group(1)] = m.group(2)
    text = [e for e, t in zip(header, types.values(), strict=True) if t.startswith("token")]
    frame, src = read_table(path, sep="\t", names=header, header=True, text=text)
    frame.columns = list(types)
    return frame, types, src


def _field(types: dict[str, str], field: str, kind: str, path: Path, key: str) -> str:
    if types.get(field) != kind:
        have = ", ".join(f"{f}:{t}" for f, t in types.items())
        raise DataError(f"{path}: no {field}:{kind} field (it has {have}); set {key} to the field "
                        f"that holds it")
    return field


def _side(path: Path, id_field: str, key: str, max_bag_size: int | None,
          skipped: list[str]) -> tuple[SideTable | None, SourceFile | None]:
    if not path.is_file():
        return None, None
    frame, types, src = read_atomic(path)
    _field(types, id_field, "token", path, key)
    ids = text_column(frame, id_field)
    missing = ids.isna().to_numpy()
    if missing.any():
        raise DataError(f"{src.where(int(np.argmax(missing)))}: {id_field} is missing; fix that line")
    ids = ids.to_numpy(dtype=object)
    check_unique(ids, id_field, src.where)
    cols = {f: text_column(frame, f) for f, t in types.items() if t == "token" and f != id_field}
    bags = {f: text_column(frame, f).fillna("").str.split() for f, t in types.items()
            if t == "token_seq"}
    skipped += [f"{path.name}:{f}:{t}" for f, t in types.items() if t.startswith("float")]
    return (ids, cols, bags, max_bag_size), src


def load_recbole_atomic(name: str, folder: str, data_dir: str | None = None,
                        user_field: str = "user_id", item_field: str = "item_id",
                        rating_field: str | None = "rating", timestamp_field: str | None = "timestamp",
                        feedback: str = "explicit", duplicates: str = "error",
                        min_user_interactions: int = 0, max_user_interactions: int | None = None,
                        min_item_interactions: int = 0, max_item_interactions: int | None = None,
                        rating_scale: str = "raw", max_bag_size: int | None = None,
                        cache: bool = True) -> Interactions:
    """Load ``<folder>/<name>.inter`` and, where present, ``.user`` and ``.item``.

    Args:
        name: the files' base name, also the dataset name.
        folder: the folder; relative paths resolve against the data dir.
        user_field, item_field: token fields of the ids (in every file).
        rating_field: float field of the rating/weight (None or absent with implicit feedback
            = every row weighs 1).
        timestamp_field: float field of the time (fractions are floored); None or absent = 0.
        feedback: ``explicit`` | ``binary`` | ``log`` (see :func:`~tabular.load_tabular`).
        duplicates, min_/max_*_interactions, rating_scale: as in :func:`~tabular.load_tabular`.
        max_bag_size: cap on tokens per token_seq bag (None = no cap).

    Returns:
        Interactions over the users and items with ratings; features from ``.user``/``.item``
        (ids missing there get ``<unknown>``); raw ids (str) by code in ``metadata``.
    """
    require_choice("feedback", feedback, FEEDBACK)
    root = resolve_data_dir(data_dir)
    base = resolve_path(folder, root)
    inter_path = base / f"{name}.inter"
    if not inter_path.is_file():
        raise DataError(f"{inter_path} not found; the folder must hold RecBole atomic files "
                        f"{name}.inter (+ .user, .item); check folder and name")
    filters = {"min_user_interactions": min_user_interactions,
               "max_user_interactions": max_user_interactions,
               "min_item_interactions": min_item_interactions,
               "max_item_interactions": max_item_interactions}
    if max_bag_size is not None and (not isinstance(max_bag_size, int) or max_bag_size < 1):
        raise ConfigError("max_bag_size", f"must be null or an integer >= 1, got {max_bag_size!r}")
    files = [p for p in (base / f"{name}.{s}" for s in ("inter", "user", "item")) if p.is_file()]
    args = {"loader": "recbole", "fields": [user_field, item_field, rating_field, timestamp_field],
            "feedback": feedback, "duplicates": duplicates, "filters": filters,
            "rating_scale": rating_scale, "max_bag_size": max_bag_size,
            "files": [p.name for p in files]}

    def build() -> Interactions:
        frame, types, src = read_atomic(inter_path)
        ids = {}
        for key, field in (("user_field", user_field), ("item_field", item_field)):
            _field(types, field, "token", inter_path, key)
            ids[key] = text_column(frame, field)
            missing = ids[key].isna().to_numpy()
            if missing.any():
                raise DataError(f"{src.where(int(np.argmax(missing)))}: {field} is missing; "
                                f"fix that line")
        if rating_field in types:
            _field(types, rating_field, "float", inter_path, "rating_field")
            value = numeric_column(frame, rating_field, src, integer=False)
        elif feedback == "explicit":
            raise DataError(f"{inter_path} has no {rating_field!r} field; set rating_field to "
                            f"its rating field, or use feedback=binary/log")
        else:
            value = np.ones(len(frame))
        value, bounds = feedback_values(value, feedback, src, frame.index)
        stamp = np.zeros(len(frame), np.int64)
        if timestamp_field in types:
            _field(types, timestamp_field, "float", inter_path, "timestamp_field")
            t = np.floor(numeric_column(frame, timestamp_field, src, integer=False))
            if (np.abs(t) >= 2.0**62).any():
                raise DataError(f"{src.where(int(np.argmax(np.abs(t) >= 2.0**62)))}: "
                                f"{timestamp_field} is out of range; fix that line")
            stamp = t.astype(np.int64)
        raw = pd.DataFrame({"user": ids["user_field"].to_numpy(dtype=object),
                            "item": ids["item_field"].to_numpy(dtype=object), "rating": value,
                            "timestamp": stamp}, index=frame.index)
        skipped: list[str] = []
        users, u_src = _side(base / f"{name}.user", user_field, "user_field", max_bag_size, skipped)
        items, i_src = _side(base / f"{name}.item", item_field, "item_field", max_bag_size, skipped)
        sources = {k: s for k, s in (("inter", src), ("user", u_src), ("item", i_src)) if s}
        return assemble(name, raw, src.where, duplicates=duplicates, filters=filters,
                        rating_scale=rating_scale, bounds=bounds, users=users, items=items,
                        metadata={"source": f"RecBole atomic files {base / name}.*",
                                  "feedback": feedback, "skipped_fields": skipped,
                                  "files": {k: s.describe() for k, s in sources.items()}})

    return cached(name, root, files, args, build, enabled=cache)
