"""A trained model as a recommender for new users: ``metarec_runner.load(run).recommend(ratings)``.

::

    import metarec_runner
    rec = metarec_runner.load("latest")                 # run id | latest | run folder | best.pt
    rec.recommend({"50": 5, "172": 4, "181": 5}, n=10)  # DataFrame rank, item, title, score
    user = rec.adapt(my_ratings_df, user_features={"age": "25", "gender": "F"})
    user.score(["1", "2"]), user.topk(5, exclude=["1"])

Everything comes from the checkpoint (:mod:`metarec_runner.checkpoint`): the composed config
rebuilds the model and the algorithm, their saved state is loaded, the vocabulary maps raw ids
and user features to codes (:mod:`metarec_runner.serve.vocab` says how a new user's row is
filled), and the saved item rows are the catalog. The dataset files are never read.

``adapt`` runs the algorithm's own test-time adaptation (MAML's inner SGD steps, a set
encoder's forward pass, ...) on the user's support set; an empty support is the zero-shot
answer (the meta-learned initialisation, from the user's features alone). The whole catalog is
then scored in one batched call per chunk of at most :data:`MAX_ROWS` rows, as the evaluator
does, and the items the user rated are left out of the top N.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from metarec_runner.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from metarec_runner.serve.locate import resolve_checkpoint
from metarec_runner.serve.support import (
    Support,
    parse_support,
    serving_catalog,
    support_batch,
    user_rows,
)
from metarec_runner.serve.vocab import ServeError, Vocabulary, raw_key
from metarec_runner.tasks.taskset import TaskBatch

MAX_ROWS = 1 << 17
"""Feature rows scored per model call (bounds memory for a large catalog)."""

COLUMNS = ("rank", "item", "title", "score")
"""Columns of a recommendation table."""


def build_algo(ckpt: Checkpoint, device: torch.device | str = "cpu"):
    """The checkpoint's algorithm, rebuilt from its config and loaded with its saved state
    (``best_algo`` of a ``last.pt``, else ``algo``), in eval mode on ``device``."""
    from metarec_runner.prepare import build
    from metarec_runner.utils import resolve_dtype

    meta = ckpt.meta
    missing = [k for k in ("config", "vocabulary", "rating_mean") if k not in meta]
    if missing or ckpt.item_rows is None:
        what = ", ".join(missing + (["item_rows"] if ckpt.item_rows is None else []))
        raise CheckpointError(f"checkpoint of run {meta.get('run_id')} lacks {what} (written before serving "
                              "existed); train the model again")
    cfg = meta["config"]
    vocab = Vocabulary(meta["vocabulary"])
    schema = vocab.schema
    model = build("model", OmegaConf.create(cfg["model"]), schema=schema, rating_mean=float(meta["rating_mean"]))
    model = model.to(device=device, dtype=resolve_dtype(str(cfg.get("dtype", "float32"))))
    model.schema = schema  # algorithms that read raw fields (group_popularity) need the row layout
    algo = build("algo", OmegaConf.create(cfg["algo"]), model=model)
    saved = meta.get("algo_class")
    built = f"{type(algo).__module__}.{type(algo).__qualname__}"
    if saved and saved != built:
        raise CheckpointError(f"checkpoint holds a {saved}, but its config builds a {built}; train again")
    try:
        algo.load_state_dict(ckpt.best_algo if ckpt.best_algo is not None else ckpt.algo)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"the saved state does not fit the model its config builds ({first[:200]}); "
                              "the checkpoint comes from another metarec version or was edited") from None
    algo.model.eval()
    return algo


def reads_user_id(model: torch.nn.Module) -> bool:
    """Whether any embedding of ``model`` reads the ``user_id`` field."""
    return any("user_id" in tuple(getattr(m, "fields", ()) or ()) for m in model.modules())


@dataclass
class Recommender:
    """A saved model that recommends items to new users from a few of their ratings.

    Attributes:
        algo: the rebuilt :class:`~metarec_runner.algos.base.MetaAlgorithm` (eval mode).
        vocab: the saved vocabulary.
        item_rows: ``[V, C]`` every item's feature row (user columns are replaced per user).
        meta: the checkpoint's metadata (``run_id``, ``config``, ``choices``, ``best_value``, ...).
        path: the checkpoint file, when loaded from one.
        samples: pseudo-users averaged over when a user field without an unknown token is missing.
    """

    algo: Any
    vocab: Vocabulary
    item_rows: torch.Tensor
    meta: dict[str, Any]
    path: Path | None = None
    samples: int = 32

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, path: Path | None = None, device: torch.device | str = "cpu",
                        samples: int = 32) -> Recommender:
        """A recommender of a loaded checkpoint (see :func:`build_algo`)."""
        algo = build_algo(ckpt, device)
        if reads_user_id(algo.model):
            warnings.warn("this model embeds user_id: a new user reads a training user's id row (a new user has "
                          "none of its own); train with the default model fields for serving", stacklevel=3)
        return cls(algo, Vocabulary(ckpt.meta["vocabulary"]), ckpt.item_rows.long().cpu(), ckpt.meta, path,
                   samples)

    @property
    def device(self) -> torch.device:
        return next(self.algo.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.algo.model.parameters()).dtype

    @property
    def run_id(self) -> str | None:
        return self.meta.get("run_id")

    @property
    def user_features(self) -> tuple[str, ...]:
        """The user features the model reads (``user_features={...}`` keys)."""
        return self.vocab.user_fields

    def support(self, ratings: Any = None, source: str = "ratings") -> Support:
        """The user's ratings checked and in codes (:func:`~metarec_runner.serve.support.parse_support`)."""
        return parse_support(ratings, self.vocab, source)

    def batch(self, support: Support, user_features: Mapping[str, Any] | None = None) -> TaskBatch:
        """The user's tasks (one per pseudo-user; see :func:`~metarec_runner.serve.support.support_batch`)."""
        return self._tasks(support, user_features)[1]

    def _tasks(self, support: Support, user_features: Mapping[str, Any] | None) -> tuple[torch.Tensor, TaskBatch]:
        """``(user columns [K, Cu], the K tasks)``."""
        columns = self.vocab.user_columns(user_features, self.samples)
        return columns, support_batch(self.item_rows, support, columns, self.vocab.user_id_column, self.dtype)

    def adapt(self, support: Any = None, user_features: Mapping[str, Any] | None = None,
              source: str = "ratings") -> AdaptedUser:
        """Adapt to a new user.

        Args:
            support: the user's ratings: a :class:`Support`, a DataFrame with ``item,rating``
                (or ``title,rating``) columns, a ``{item: rating}`` dict, ``(item, rating)``
                pairs, or None (no ratings: the zero-shot answer). Unknown items are skipped
                (listed in :attr:`AdaptedUser.unknown_items`, with a warning).
            user_features: ``{field: raw value}`` of the user's side features.
            source: what messages name (a file path).
        """
        if not isinstance(support, Support):
            support = self.support(support, source)
        if support.unknown:
            examples = ", ".join(repr(u) for u in support.unknown[:5])
            warnings.warn(f"{source}: {len(support.unknown)} unknown item(s) skipped (e.g. {examples})", stacklevel=2)
        columns, batch = self._tasks(support, user_features)
        if getattr(self.algo, "ranking", None) is not None:  # a ranking loss adapts against sampled negatives
            self.algo.bind_catalog(serving_catalog(self.item_rows, columns, self.vocab.user_id_column),
                                   None, self.vocab.schema)
        scorer = self.algo.adapt(batch.to(self.device, self.dtype))
        return AdaptedUser(self, scorer, columns, support)

    def recommend(self, ratings: Any = None, n: int = 10,
                  user_features: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """The top ``n`` items for a new user with these ratings (rated items left out):
        ``DataFrame[rank, item, title, score]`` (``adapt(ratings, user_features).topk(n)``)."""
        return self.adapt(ratings, user_features).topk(n)


@dataclass
class AdaptedUser:
    """One new user's adapted model.

    Attributes:
        recommender: the :class:`Recommender` it came from.
        scorer: the algorithm's adapted scorer (``predict(x [K, L, C]) -> [K, L]``).
        user_columns: ``[K, Cu]`` the user columns of its pseudo-users (scores are their mean).
        support: the ratings it adapted to.
    """

    recommender: Recommender
    scorer: Any
    user_columns: torch.Tensor
    support: Support
    _catalog: np.ndarray | None = field(default=None, repr=False)

    @property
    def unknown_items(self) -> list[str]:
        """Raw ids (or titles) of the support that the model does not know (skipped)."""
        return list(self.support.unknown)

    @property
    def rated_items(self) -> list[str]:
        """Raw ids of the support items."""
        ids = self.recommender.vocab.item_ids
        return [ids[int(c)] for c in self.support.items]

    def scores_of_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Scores ``[L]`` (float64, CPU) of item codes ``codes [L]``: each pseudo-user's
        prediction averaged, in chunks of at most :data:`MAX_ROWS` rows per model call."""
        rec = self.recommender
        k = self.user_columns.shape[0]
        width = max(1, MAX_ROWS // k)
        parts = []
        for start in range(0, codes.shape[0], width):
            chunk = codes[start:start + width]
            rows = user_rows(rec.item_rows[chunk], self.user_columns, rec.vocab.user_id_column)  # [K, w, C]
            pred = self.scorer.predict(rows.to(rec.device))  # [K, w]
            parts.append(pred.double().mean(0).cpu())
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def catalog_scores(self) -> np.ndarray:
        """``[V]`` scores of every item (computed once)."""
        if self._catalog is None:
            scores = self.scores_of_codes(torch.arange(self.recommender.vocab.n_items)).numpy()
            if not np.isfinite(scores).all():
                raise ServeError("the model returned NaN or infinite scores for this user; the checkpoint is "
                                 "unusable (train again)")
            self._catalog = scores
        return self._catalog

    def score(self, items: Sequence[Any]) -> np.ndarray:
        """Scores ``[N]`` (float64) of raw item ids ``items``.

        Raises:
            ServeError: an item the model does not know.
        """
        codes = self.recommender.vocab.item_codes(list(items))
        if (codes < 0).any():
            bad = [raw_key(v) for v, c in zip(items, codes, strict=True) if c < 0]
            raise ServeError(f"unknown item id(s) {', '.join(repr(b) for b in bad[:5])} ({len(bad)} in all); "
                             "give raw item ids of the model's dataset")
        return self.catalog_scores()[codes]

    def topk(self, n: int = 10, exclude: Iterable[Any] | None = None) -> pd.DataFrame:
        """The ``n`` highest-scoring items: ``DataFrame[rank, item, title, score]``.

        Args:
            n: how many (fewer when the catalog left after ``exclude`` is smaller).
            exclude: raw item ids to leave out; None = the items of the support (already rated).
                Unknown ids are ignored. Ties in score keep the lower item code first.
        """
        if int(n) < 1:
            raise ServeError(f"n must be >= 1, got {n}")
        vocab = self.recommender.vocab
        scores = self.catalog_scores()
        keep = np.ones(vocab.n_items, dtype=bool)
        if exclude is None:
            keep[self.support.items] = False
        else:
            codes = vocab.item_codes(list(exclude))
            keep[codes[codes >= 0]] = False
        candidates = np.flatnonzero(keep)
        order = candidates[np.argsort(-scores[candidates], kind="stable")][: int(n)]
        ids, titles = vocab.item_ids, vocab.titles
        return pd.DataFrame({
            "rank": np.arange(1, len(order) + 1, dtype=np.int64),
            "item": [ids[c] for c in order],
            "title": [titles[c] for c in order] if titles is not None else [None] * len(order),
            "score": scores[order].astype(np.float64),
        }, columns=list(COLUMNS))


def load(run: str | Path = "latest", tracking_uri: str | None = None, device: torch.device | str = "cpu",
         samples: int = 32) -> Recommender:
    """A saved model as a :class:`Recommender`.

    Args:
        run: an MLflow run id, ``latest`` (the newest FINISHED run with a ``best.pt`` in the
            store), a run folder, or a ``best.pt`` path.
        tracking_uri: the MLflow store of run ids (default: the one ``metarec train`` writes to).
        device: where the model runs.
        samples: pseudo-users to average over when a user feature is missing (see
            :mod:`~metarec_runner.serve.vocab`).

    Raises:
        ServeError: the run or path does not exist. CheckpointError: the file is truncated,
        corrupt, pickled or not a metarec checkpoint.
    """
    path = resolve_checkpoint(run, tracking_uri)
    return Recommender.from_checkpoint(load_checkpoint(path), path=path, device=device, samples=samples)
