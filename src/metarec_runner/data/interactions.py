"""Interactions: the one in-memory data format every dataset is loaded into.

Ratings are a pandas frame with a fixed column schema; users and items are re-indexed to dense
integer codes ``0..n-1``; side features are categorical token codes, one column per field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from metarec_runner.errors import DataError

RATING_COLUMNS = ("user", "item", "rating", "timestamp")
"""Required columns of :attr:`Interactions.ratings` (int64, int64, float32, int64)."""

OPTIONAL_RATING_COLUMNS = ("expected_rating",)
"""Optional columns: ``expected_rating`` is the Bayes-optimal prediction of a synthetic dataset."""


@dataclass(frozen=True)
class FeatureSchema:
    """The categorical fields of one interaction row, in column order.

    Rows are built as ``[user fields..., item fields..., user_id, item_id]``. A field occupies
    ``widths[j]`` consecutive columns: 1 for a single token, more for a *bag* of tokens (genres,
    title words) padded with ``-1``. ``cardinalities[j]`` is the number of distinct tokens.
    ``user_fields`` names the fields that describe the user (side features, not ``user_id``);
    empty when the schema was built without that knowledge.
    """

    names: tuple[str, ...]
    cardinalities: tuple[int, ...]
    widths: tuple[int, ...] = ()
    user_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.widths:
            object.__setattr__(self, "widths", (1,) * len(self.names))
        if not len(self.names) == len(self.cardinalities) == len(self.widths):
            raise DataError("feature schema: names, cardinalities and widths differ in length")
        unknown = [f for f in self.user_fields if f not in self.names]
        if unknown:
            raise DataError(f"feature schema: user fields {unknown} are not fields of the schema")

    @property
    def n_fields(self) -> int:
        return len(self.names)

    @property
    def n_columns(self) -> int:
        """Columns of a feature row (bags count their width)."""
        return sum(self.widths)

    def index(self, name: str) -> int:
        """Field number of ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise DataError(
                f"unknown feature field {name!r}; the dataset has {', '.join(self.names)}"
            ) from None

    def columns(self, name: str) -> range:
        """Row columns that hold field ``name``."""
        j = self.index(name)
        start = sum(self.widths[:j])
        return range(start, start + self.widths[j])


@dataclass
class Interactions:
    """Explicit-feedback interactions plus categorical side features.

    Attributes:
        name: dataset name, e.g. ``"toy"`` or ``"ml-100k"``.
        ratings: frame with columns ``user`` (int64 code), ``item`` (int64 code), ``rating``
            (float32), ``timestamp`` (int64), optionally ``expected_rating`` (float64).
        user_features: frame indexed by user code ``0..n_users-1``; int64 token codes, one column
            per field (field names are the column names).
        item_features: frame indexed by item code ``0..n_items-1``; same layout.
        cardinalities: tokens per feature column (``{column: n_tokens}``).
        user_bags, item_bags: bag-of-token fields, ``{name: int64 array [n, width]}`` padded
            with ``-1`` (e.g. genres, title words); their token counts are in ``cardinalities``.
        rating_scale: ``(min, max)`` of the rating scale.
        noise_floor_rmse: RMSE of the data's own generating model (synthetic data only).
        metadata: free-form facts about the source (file checksums, generator settings).
    """

    name: str
    ratings: pd.DataFrame
    user_features: pd.DataFrame
    item_features: pd.DataFrame
    cardinalities: dict[str, int]
    user_bags: dict[str, np.ndarray] = field(default_factory=dict)
    item_bags: dict[str, np.ndarray] = field(default_factory=dict)
    rating_scale: tuple[float, float] = (1.0, 5.0)
    noise_floor_rmse: float | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in RATING_COLUMNS if c not in self.ratings.columns]
        if missing:
            raise DataError(f"dataset {self.name!r}: ratings lack columns {missing}")
        if len(self.ratings) == 0:
            raise DataError(f"dataset {self.name!r} has no ratings")
        for frame, kind in ((self.user_features, "user"), (self.item_features, "item")):
            for col in frame.columns:
                if col not in self.cardinalities:
                    raise DataError(f"dataset {self.name!r}: {kind} feature {col!r} has no cardinality")
        for bags, n, kind in ((self.user_bags, self.n_users, "user"), (self.item_bags, self.n_items, "item")):
            for name, arr in bags.items():
                if name not in self.cardinalities or arr.ndim != 2 or arr.shape[0] != n:
                    raise DataError(
                        f"dataset {self.name!r}: {kind} bag {name!r} must be [{n}, width] with a cardinality"
                    )

    @property
    def n_users(self) -> int:
        return len(self.user_features)

    @property
    def n_items(self) -> int:
        return len(self.item_features)

    def _fields(self) -> list[tuple[str, int, int]]:
        """``(name, cardinality, width)`` per field, in row order (without the id fields)."""
        out = [(c, self.cardinalities[c], 1) for c in self.user_features.columns]
        out += [(n, self.cardinalities[n], a.shape[1]) for n, a in self.user_bags.items()]
        out += [(c, self.cardinalities[c], 1) for c in self.item_features.columns]
        out += [(n, self.cardinalities[n], a.shape[1]) for n, a in self.item_bags.items()]
        return out

    @property
    def schema(self) -> FeatureSchema:
        """Fields of a row built by :meth:`feature_rows`."""
        fields = [*self._fields(), ("user_id", self.n_users, 1), ("item_id", self.n_items, 1)]
        names, cards, widths = zip(*fields, strict=True)
        users = (*map(str, self.user_features.columns), *self.user_bags)
        return FeatureSchema(tuple(names), tuple(cards), tuple(widths), users)

    def feature_rows(self, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
        """Categorical feature rows for (user, item) pairs.

        Args:
            users: int array ``[N]`` of user codes.
            items: int array ``[N]`` of item codes.

        Returns:
            LongTensor ``[N, C]`` laid out as :attr:`schema` describes (bags padded with -1).
        """
        parts = [self.user_features.to_numpy(dtype=np.int64)[users]]
        parts += [a[users] for a in self.user_bags.values()]
        parts += [self.item_features.to_numpy(dtype=np.int64)[items]]
        parts += [a[items] for a in self.item_bags.values()]
        parts += [users[:, None], items[:, None]]
        rows = np.concatenate(parts, axis=1)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))

    def checksum(self) -> str:
        """SHA-256 (first 16 hex digits) over ratings and features: identifies the exact data."""
        h = hashlib.sha256()
        for col in RATING_COLUMNS:
            h.update(np.ascontiguousarray(self.ratings[col].to_numpy()).tobytes())
        for frame in (self.user_features, self.item_features):
            h.update(",".join(map(str, frame.columns)).encode())
            h.update(np.ascontiguousarray(frame.to_numpy(dtype=np.int64)).tobytes())
        for bags in (self.user_bags, self.item_bags):
            for name, arr in bags.items():
                h.update(name.encode())
                h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def vocabulary(self) -> dict[str, object]:
        """What maps this dataset's raw values to the codes a model reads (JSON-able), saved with
        every checkpoint so a trained model can answer raw ids without the dataset files:
        ``raw_user_ids`` / ``raw_item_ids`` (by code, as strings), ``item_titles`` (by code, or
        ``None``), ``features`` (each field's tokens, by code), the row ``schema`` and column
        layout, and the rating scale."""
        meta = self.metadata

        def strings(key: str, n: int) -> list[str] | None:
            values = meta.get(key)
            return None if values is None or len(values) != n else [str(v) for v in values]

        schema = self.schema
        return {
            "raw_user_ids": strings("raw_user_ids", self.n_users) or [str(i) for i in range(self.n_users)],
            "raw_item_ids": strings("raw_item_ids", self.n_items) or [str(i) for i in range(self.n_items)],
            "item_titles": strings("item_titles", self.n_items),
            "features": {k: [str(t) for t in v] for k, v in (meta.get("vocab") or {}).items()},
            "unknown_token": meta.get("unknown_token"),
            "schema": {"names": list(schema.names), "cardinalities": list(schema.cardinalities),
                       "widths": list(schema.widths), "user_fields": list(schema.user_fields)},
            "user_feature_columns": [str(c) for c in self.user_features.columns],
            "user_bags": list(self.user_bags),
            "item_feature_columns": [str(c) for c in self.item_features.columns],
            "item_bags": list(self.item_bags),
            "rating_scale": [float(self.rating_scale[0]), float(self.rating_scale[1])],
        }

    def item_rows(self) -> torch.Tensor:
        """``[V, C]`` feature rows of every item for user code 0 (a server replaces the user
        columns with the new user's): what a saved model scores the catalog with."""
        items = np.arange(self.n_items)
        return self.feature_rows(np.zeros_like(items), items)

    def summary(self) -> dict[str, object]:
        """Counts worth printing and logging."""
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": len(self.ratings),
            "rating_min": self.rating_scale[0],
            "rating_max": self.rating_scale[1],
            "user_features": [*self.user_features.columns, *self.user_bags],
            "item_features": [*self.item_features.columns, *self.item_bags],
            "checksum": self.checksum(),
        }
