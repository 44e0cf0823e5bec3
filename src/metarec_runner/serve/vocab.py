"""The saved vocabulary: a checkpoint's map between a dataset's raw values and a model's codes.

Every checkpoint carries ``meta["vocabulary"]`` (:meth:`Interactions.vocabulary`): the raw item
ids and titles by code, each field's tokens by code, the feature-row layout and the rating scale.
:class:`Vocabulary` answers raw item ids (or titles) with item codes and encodes a new user's
features as the user columns of a feature row, so serving never reads the dataset files.

A new user's row (``[user fields..., item fields..., user_id, item_id]``) is filled so:

* **user fields** come from the given features (``{"age": "25", "gender": "F"}``). A value the
  vocabulary does not know becomes the field's unknown token when the dataset has one (a value
  missing from its side file), otherwise a :class:`ServeError` names the field and valid values.
  A field that is not given takes the unknown token where there is one; otherwise the answer is
  averaged over ``samples`` pseudo-users whose missing fields are drawn uniformly from the
  field's tokens (seeded: the same answer every call), i.e. the model's expectation over the
  unknown features. A bag field (e.g. genres of a user) is given as ``"a|b|c"``; not given, it is
  empty (all ``-1``), which is how a bag says "none".
* **user_id** is the pseudo-user's index ``0..K-1`` (0 for a user with every feature given).
  No model reads ``user_id`` in the shipped configs (``models.fields.resolve_fields`` leaves it
  out of every default field list: a cold-start user's id row is never trained), so the value
  has no effect on scores; it tells a ranking loss's negative sampler the pseudo-users apart
  (:func:`~metarec_runner.serve.support.serving_catalog`). A model configured to embed
  ``user_id`` would read those training users' rows, which
  :func:`~metarec_runner.serve.recommender.load` warns about.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import MetarecError

BAG_SEPARATOR = "|"
"""Separates the tokens of a bag-valued user feature: ``"sci-fi|drama"``."""


class ServeError(MetarecError):
    """Bad input to a saved model (unknown field, value, column or rating): one line and the fix."""


def raw_key(value: Any) -> str:
    """The string a raw id is compared as: ``50``, ``50.0`` and ``"50"`` are all ``"50"``."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.generic):
        value = value.item()
    return str(value).strip()


def _examples(values: Iterable[str], k: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:k])
    return shown + (f", ... ({len(values)} in all)" if len(values) > k else "")


@dataclass(frozen=True)
class Vocabulary:
    """A checkpoint's vocabulary (the dict :meth:`Interactions.vocabulary` returned).

    Attributes:
        raw: the saved dict: ``raw_item_ids``, ``item_titles``, ``features``, ``unknown_token``,
            ``schema``, ``user_feature_columns``, ``user_bags``, ``rating_scale``, ...
    """

    raw: Mapping[str, Any]

    def __post_init__(self) -> None:
        ids = [str(i) for i in self.raw["raw_item_ids"]]
        object.__setattr__(self, "_item_code", {k: c for c, k in reversed(list(enumerate(ids))) if k})
        titles = self.raw.get("item_titles")
        by_title = {} if titles is None else {str(t): c for c, t in reversed(list(enumerate(titles)))}
        object.__setattr__(self, "_title_code", by_title)

    # -- the row layout ---------------------------------------------------------------------
    @property
    def schema(self) -> FeatureSchema:
        """The feature-row layout the model was built for."""
        s = self.raw["schema"]
        return FeatureSchema(tuple(s["names"]), tuple(int(c) for c in s["cardinalities"]),
                             tuple(int(w) for w in s["widths"]), tuple(s.get("user_fields", ())))

    @property
    def user_fields(self) -> tuple[str, ...]:
        """The user's side-feature fields, in row order (single tokens, then bags)."""
        return (*self.raw.get("user_feature_columns", ()), *self.raw.get("user_bags", ()))

    @property
    def n_user_columns(self) -> int:
        """Row columns ``0..n_user_columns-1`` hold the user fields (bags count their width)."""
        schema = self.schema
        return sum(schema.widths[schema.index(f)] for f in self.user_fields)

    @property
    def user_id_column(self) -> int:
        """The row column of ``user_id``."""
        return self.schema.columns("user_id").start

    # -- items ------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.raw["raw_item_ids"])

    @property
    def item_ids(self) -> list[str]:
        """Raw item ids by code, as strings."""
        return [str(i) for i in self.raw["raw_item_ids"]]

    @property
    def titles(self) -> list[str] | None:
        """Item titles by code, or None when the dataset has none."""
        titles = self.raw.get("item_titles")
        return None if titles is None else [str(t) for t in titles]

    def item_codes(self, values: Sequence[Any], by: str = "item") -> np.ndarray:
        """Codes ``[N]`` (int64) of raw item ids (``by="item"``) or titles (``by="title"``); -1
        where unknown. A title shared by several items names the first of them."""
        if by == "title" and self.titles is None:
            raise ServeError("this model's dataset has no item titles; give an item column of raw item ids")
        table = self._title_code if by == "title" else self._item_code  # type: ignore[attr-defined]
        keys = [raw_key(v) if by == "item" else str(v).strip() for v in values]
        return np.asarray([table.get(k, -1) for k in keys], dtype=np.int64)

    # -- ratings ----------------------------------------------------------------------------
    @property
    def rating_scale(self) -> tuple[float, float]:
        lo, hi = self.raw.get("rating_scale", (1.0, 5.0))
        return float(lo), float(hi)

    # -- the new user's features --------------------------------------------------------------
    def _tokens(self, name: str) -> list[str] | None:
        tokens = (self.raw.get("features") or {}).get(name)
        return None if tokens is None else [str(t) for t in tokens]

    def _unknown_code(self, name: str) -> int | None:
        tokens, unknown = self._tokens(name), self.raw.get("unknown_token")
        return tokens.index(unknown) if tokens is not None and unknown is not None and unknown in tokens else None

    def _encode_token(self, name: str, value: Any) -> int:
        """The code of one token of field ``name``."""
        text = raw_key(value)
        tokens = self._tokens(name)
        card = self.schema.cardinalities[self.schema.index(name)]
        if tokens is None:  # a dataset without a vocabulary (the toy catalog): the codes themselves
            if text.lstrip("-").isdigit() and 0 <= int(text) < card:
                return int(text)
            raise ServeError(f"user feature {name}={text!r}: this dataset stores {name} as codes; give an "
                             f"integer in 0..{card - 1}")
        if text in tokens:
            return tokens.index(text)
        unknown = self._unknown_code(name)
        if unknown is not None:
            return unknown
        raise ServeError(f"user feature {name}={text!r} is not a value the model knows; use one of "
                         f"{_examples(tokens)}, or leave {name} out (the answer is then averaged over its values)")

    def user_columns(self, features: Mapping[str, Any] | None, samples: int = 32,
                     seed: int = 0) -> torch.Tensor:
        """The user columns of a new user's feature rows.

        Args:
            features: ``{field: value}`` of the user's side features (raw tokens as the dataset
                writes them; a bag as ``"a|b"``); fields not given are filled as the module
                docstring says.
            samples: pseudo-users to average over when a field without an unknown token is missing.
            seed: their seed.

        Returns:
            LongTensor ``[K, n_user_columns]``: ``K = 1`` when every single-token field is given
            or has an unknown token, else ``K = samples``.
        """
        features = {str(k).strip(): v for k, v in (features or {}).items()}
        fields = self.user_fields
        extra = sorted(set(features) - set(fields))
        if extra:
            known = ", ".join(fields) if fields else "none: this dataset has no user features"
            raise ServeError(f"unknown user feature {extra[0]!r}; the model's user features are {known}")
        schema = self.schema
        bags = set(self.raw.get("user_bags", ()))
        missing = [f for f in fields if f not in bags and self._missing(features.get(f))
                   and self._unknown_code(f) is None]
        k = samples if missing else 1
        gen = torch.Generator().manual_seed(seed)
        parts = []
        for name in fields:
            value = features.get(name)
            width = schema.widths[schema.index(name)]
            if name in bags:
                tokens = [] if self._missing(value) else [t for t in str(value).split(BAG_SEPARATOR) if t.strip()]
                codes = [self._encode_token(name, t) for t in tokens][:width]
                row = torch.full((width,), -1, dtype=torch.long)
                row[:len(codes)] = torch.tensor(codes, dtype=torch.long)
                parts.append(row.expand(k, width))
            elif not self._missing(value):
                parts.append(torch.full((k, 1), self._encode_token(name, value), dtype=torch.long))
            elif self._unknown_code(name) is not None:
                parts.append(torch.full((k, 1), int(self._unknown_code(name)), dtype=torch.long))
            else:  # marginalise: uniform draws over the field's tokens
                card = schema.cardinalities[schema.index(name)]
                parts.append(torch.randint(card, (k, 1), generator=gen))
        if not parts:
            return torch.zeros(k, 0, dtype=torch.long)
        return torch.cat(parts, 1)

    @staticmethod
    def _missing(value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, float) and np.isnan(value):
            return True
        return isinstance(value, str) and not value.strip()
