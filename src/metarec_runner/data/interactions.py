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

    Rows are built as ``[user features..., item features..., user_id, item_id]``;
    ``cardinalities[j]`` is the number of distinct tokens of field ``j``.
    """

    names: tuple[str, ...]
    cardinalities: tuple[int, ...]

    @property
    def n_fields(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Column index of field ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise DataError(
                f"unknown feature field {name!r}; the dataset has {', '.join(self.names)}"
            ) from None


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
        rating_scale: ``(min, max)`` of the rating scale.
        noise_floor_rmse: RMSE of the data's own generating model (synthetic data only).
        metadata: free-form facts about the source (file checksums, generator settings).
    """

    name: str
    ratings: pd.DataFrame
    user_features: pd.DataFrame
    item_features: pd.DataFrame
    cardinalities: dict[str, int]
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

    @property
    def n_users(self) -> int:
        return len(self.user_features)

    @property
    def n_items(self) -> int:
        return len(self.item_features)

    @property
    def schema(self) -> FeatureSchema:
        """Fields of a row built by :meth:`feature_rows`."""
        names = [*self.user_features.columns, *self.item_features.columns, "user_id", "item_id"]
        cards = [self.cardinalities[c] for c in self.user_features.columns]
        cards += [self.cardinalities[c] for c in self.item_features.columns]
        cards += [self.n_users, self.n_items]
        return FeatureSchema(tuple(names), tuple(cards))

    def feature_rows(self, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
        """Categorical feature rows for (user, item) pairs.

        Args:
            users: int array ``[N]`` of user codes.
            items: int array ``[N]`` of item codes.

        Returns:
            LongTensor ``[N, F]`` laid out as :attr:`schema` describes.
        """
        u = self.user_features.to_numpy(dtype=np.int64)[users]
        i = self.item_features.to_numpy(dtype=np.int64)[items]
        rows = np.concatenate([u, i, users[:, None], items[:, None]], axis=1)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))

    def checksum(self) -> str:
        """SHA-256 (first 16 hex digits) over ratings and features: identifies the exact data."""
        h = hashlib.sha256()
        for col in RATING_COLUMNS:
            h.update(np.ascontiguousarray(self.ratings[col].to_numpy()).tobytes())
        for frame in (self.user_features, self.item_features):
            h.update(",".join(map(str, frame.columns)).encode())
            h.update(np.ascontiguousarray(frame.to_numpy(dtype=np.int64)).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, object]:
        """Counts worth printing and logging."""
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": len(self.ratings),
            "rating_min": self.rating_scale[0],
            "rating_max": self.rating_scale[1],
            "user_features": list(self.user_features.columns),
            "item_features": list(self.item_features.columns),
            "checksum": self.checksum(),
        }
