"""Strong non-meta-learned ranking baselines: EASE, ItemKNN and implicit ALS, fitted once.

Each learns item-item weights or item factors from the binary interaction matrix ``X``
(``[meta-train tasks, items]``: every support AND query row of every meta-train task; one task
per user) and scores a new user by folding in their SUPPORT row ``x_s`` alone (never the query):

- :class:`EASE` (Steck, WWW 2019): ``P = (X^T X + lambda I)^-1``, ``B = I - P diag(1/diag P)``
  (zero diagonal); score ``= x_s B``.
- :class:`ItemKNN`: cosine with shrinkage ``S_ij = x_i . x_j / (|x_i| |x_j| + shrinkage)`` over
  item columns, zero diagonal, only each target item's top-``neighbours`` similar items kept;
  score of item ``j`` ``= sum_{i in support} S_ij``.
- :class:`ALS` (Hu, Koren, Volinsky, ICDM 2008): confidence ``1 + confidence * x``, item factors
  ``Y`` by alternating least squares (each half-step ``cg_steps`` warm-started conjugate-gradient
  steps, as in the ``implicit`` package). Fold-in: the exact ridge solution
  ``(Y^T C_u Y + lambda I) u = Y^T C_u p_u`` from the support with ``Y`` fixed; score ``= Y u``.

Interactions: every rating counts (binary ``X``), or with ``positive_threshold`` only ratings
``>= positive_threshold`` count, for the train matrix and the support fold-in alike.

Popularity blend (makes ``alpha`` comparable across datasets): ``score = s / max_j |s_j| +
alpha * pop / max(pop)`` with ``s`` the model's scores over the catalog for that user and
``pop`` the items' meta-train interaction counts. At ``k = 0`` (no support item known to the
model: an empty support, only unseen items, or only ratings under the threshold) EASE and
ItemKNN score ``pop / max(pop)`` (popularity); ALS uses the mean meta-train user vector.

Like every :class:`~metarec_runner.algos.scorers.ReferenceScorer` they are fitted once (the
runner calls :meth:`fit`, no epoch loop) and predict no ratings (no RMSE/MAE). ``l2``, ``alpha``,
``neighbours``, ``shrinkage`` are tuned on the validation users by a sweep, e.g.
``metarec train -m +algo=ease algo.l2=100,200,500 trainer.monitor=val/ndcg_at_10``; the configs'
defaults are the ML-100K validation optimum at full support (few-shot supports prefer a larger
``alpha``: about 1 at k <= 5). Items beyond the fitted catalog score one below the user's lowest
score. The fitted tensors (float32) live in ``state_dict()``. Fitting runs on CPU (ML-100K: EASE
~1 s, ItemKNN ~0.4 s, ALS ~0.5 s); adapt/predict run on the batch's device. EASE and ItemKNN solve
only over the items with a meta-train interaction (:func:`active_gram`; exact), and EASE inverts
``X^T X + lambda I`` by its Cholesky factor (half the flops of a general inverse).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from metarec_runner.algos.base import AdaptedScorer
from metarec_runner.algos.scorers import ReferenceScorer, _dtype, _item_ids
from metarec_runner.errors import ConfigError, TrainingError, require_non_negative, require_positive
from metarec_runner.tasks.taskset import TaskBatch, TaskSet


def catalog_size(model: nn.Module) -> int:
    """Items in the model's schema (``model.schema``, if the model keeps one), else 0."""
    schema = getattr(model, "schema", None)
    if schema is not None and "item_id" in getattr(schema, "names", ()):
        return int(schema.cardinalities[schema.index("item_id")])
    return 0


def check_threshold(positive_threshold: float | None) -> float | None:
    if positive_threshold is None:
        return None
    try:
        return float(positive_threshold)
    except (TypeError, ValueError):
        raise ConfigError("positive_threshold", f"must be a number or null, got "
                          f"{positive_threshold!r}") from None


def interaction_matrix(train: TaskSet, threshold: float | None, n_items: int = 0) -> sp.csr_matrix:
    """Binary ``[tasks, items]`` CSR matrix of every support and query row of ``train`` (ratings
    ``>= threshold`` only, unless ``threshold`` is None); ``n_items`` columns at least."""
    rows, items, ys = [], [], []
    for x, y, offsets in ((train.support_x, train.support_y, train.support_offsets),
                          (train.query_x, train.query_y, train.query_offsets)):
        sizes = offsets[1:] - offsets[:-1]
        rows.append(torch.repeat_interleave(torch.arange(len(train)), sizes))
        items.append(_item_ids(x))
        ys.append(y)
    row, item, y = (torch.cat(t).numpy() for t in (rows, items, ys))
    keep = np.ones(len(y), dtype=bool) if threshold is None else y >= threshold
    width = max(n_items, int(item.max()) + 1 if len(item) else 0)
    x = sp.csr_matrix((np.ones(int(keep.sum())), (row[keep], item[keep])), shape=(len(train), width))
    x.data[:] = 1.0  # repeated (task, item) pairs were summed
    return x


def active_gram(x: sp.csr_matrix) -> tuple[Tensor, Tensor]:
    """``(active [A] item ids, G [A, A] float64)``: the Gram matrix ``X^T X`` restricted to the
    items with at least one interaction. An item without any has a zero row and column in
    ``X^T X``, so EASE's and ItemKNN's weights to and from it are exactly zero; leaving it out
    makes the dense solve cubic in the items seen, not in the catalog (Last.fm 2K split 0: 14,198 of
    17,632 artists)."""
    seen = np.flatnonzero(np.asarray(x.getnnz(axis=0)) > 0)
    xa = x[:, seen]
    return torch.from_numpy(seen), torch.from_numpy((xa.T @ xa).toarray().astype(np.float64))


def scatter_square(block: Tensor, index: Tensor, size: int) -> Tensor:
    """``out [size, size]``, zero but ``out[index][:, index] = block [A, A]``."""
    out = block.new_zeros(size, size)
    out[index[:, None], index[None, :]] = block
    return out


class _FoldIn(ReferenceScorer):
    """Shared by the ranking baselines: the train matrix, popularity, support fold-in, blend."""

    _state: tuple[str, ...] = ()  # the subclass's fitted tensors (attributes named so)

    def __init__(self, model: nn.Module, alpha: float = 0.0,
                 positive_threshold: float | None = None) -> None:
        super().__init__(model)
        require_non_negative("alpha", alpha)
        self.alpha = float(alpha)
        self.positive_threshold = check_threshold(positive_threshold)
        self.reset()

    def reset(self) -> None:
        self.popularity = torch.zeros(0)  # [n_items] meta-train interactions per item
        for name in self._state:
            setattr(self, name, torch.zeros(0))
        self._cache: dict = {}

    # fitting ----------------------------------------------------------------------------
    def fit(self, train: TaskSet) -> None:
        x = interaction_matrix(train, self.positive_threshold, catalog_size(self.model))
        if x.nnz == 0:
            raise TrainingError("no meta-train interaction counts (check algo.positive_threshold)")
        self.popularity = torch.from_numpy(np.asarray(x.sum(0)).ravel()).float()
        for name, value in self._fit(x).items():
            value = torch.as_tensor(value)
            setattr(self, name, (value.float() if value.is_floating_point() else value).contiguous())
        self._cache = {}

    def _fit(self, x: sp.csr_matrix) -> dict[str, np.ndarray | Tensor]:
        raise NotImplementedError

    @property
    def n_items(self) -> int:
        return int(self.popularity.shape[0])

    def _on(self, device: torch.device) -> dict[str, Tensor]:
        """The fitted tensors on ``device`` (cached)."""
        if not self.n_items:
            raise TrainingError(f"{type(self).__name__} is not fitted: call fit(train) first")
        if device not in self._cache:
            names = ("popularity", *self._state)
            self._cache = {device: {n: getattr(self, n).to(device) for n in names}}
        return self._cache[device]

    # scoring ----------------------------------------------------------------------------
    def support(self, batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor]:
        """``(xs [B, I] binary, items [B, S] clamped to the catalog, w [B, S])``: the support
        matrix and per-row weights (0 on padding, unknown items, ratings under the threshold;
        repeated items share a weight of 1)."""
        items = _item_ids(batch.support_x)
        keep = batch.support_mask & (items < self.n_items)
        if self.positive_threshold is not None:
            keep &= batch.support_y >= self.positive_threshold
        items = torch.where(keep, items, torch.zeros_like(items))
        w = keep.float()
        counts = w.new_zeros(batch.size, self.n_items)
        task = torch.arange(batch.size, device=items.device)[:, None].expand_as(items)
        counts.index_put_((task, items), w, accumulate=True)
        w = w / counts.gather(1, items).clamp_min(1.0)
        return counts.clamp(max=1.0), items, w

    def fold_in(self, batch: TaskBatch, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(scores [B, I], popularity fallback [B] bool)`` from the support rows alone."""
        raise NotImplementedError

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        t = self._on(batch.support_x.device)
        s, fallback = self.fold_in(batch, t)
        pop = t["popularity"] / t["popularity"].max().clamp_min(1e-12)
        s = s / s.abs().amax(1, keepdim=True).clamp_min(1e-12) + self.alpha * pop
        s = torch.where(fallback[:, None], pop.expand_as(s), s)
        return AdaptedScorer(self, {"scores": s, "fill": s.amin(1) - 1.0})

    def predict(self, params, x: Tensor) -> Tensor:
        if params is None:
            raise TrainingError(f"{type(self).__name__} scores only through adapt(batch).predict(x)")
        items = _item_ids(x)
        known = items < self.n_items
        out = params["scores"].gather(1, torch.where(known, items, torch.zeros_like(items)))
        return torch.where(known, out, params["fill"][:, None]).to(_dtype(self.model))

    # state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {n: getattr(self, n).clone() for n in ("popularity", *self._state)}

    def load_state_dict(self, state: dict) -> None:
        for n in ("popularity", *self._state):
            setattr(self, n, state[n].clone())
        self._cache = {}


class EASE(_FoldIn):
    """EASE (Steck, WWW 2019): closed-form item-item weights, support fold-in ``x_s B``.

    Args:
        model: kept for the runner (dtype, and ``model.schema`` for the catalog size if any).
        l2: ``lambda`` of ``(X^T X + lambda I)^-1`` (> 0; tune on validation users).
        alpha: weight of the normalised popularity blend (see the module docstring).
        positive_threshold: only ratings ``>=`` this count as interactions (null = all).
    """

    _state = ("weights",)

    def __init__(self, model: nn.Module, l2: float = 500.0, alpha: float = 0.0,
                 positive_threshold: float | None = None) -> None:
        require_positive("l2", l2)
        self.l2 = float(l2)
        super().__init__(model, alpha, positive_threshold)

    def _fit(self, x: sp.csr_matrix) -> dict[str, Tensor]:
        active, g = active_gram(x)
        g.diagonal().add_(self.l2)
        p = torch.cholesky_inverse(torch.linalg.cholesky(g))  # G + lambda I is SPD
        b = p / -p.diagonal()  # B_ij = -P_ij / P_jj
        b.fill_diagonal_(0.0)
        return {"weights": scatter_square(b.float(), active, x.shape[1])}

    def fold_in(self, batch: TaskBatch, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        xs, _, _ = self.support(batch)
        return xs @ t["weights"], xs.sum(1) == 0


class ItemKNN(_FoldIn):
    """Item-based kNN on cosine similarity with shrinkage, top-``neighbours`` per target item.

    Args:
        model: kept for the runner.
        neighbours: similar items kept per target item (its column of ``S``; >= 1).
        shrinkage: added to the norms' product in the cosine's denominator (>= 0).
        alpha: weight of the normalised popularity blend.
        positive_threshold: only ratings ``>=`` this count as interactions (null = all).
    """

    _state = ("neighbour_index", "neighbour_sim")

    def __init__(self, model: nn.Module, neighbours: int = 100, shrinkage: float = 10.0,
                 alpha: float = 0.0, positive_threshold: float | None = None) -> None:
        require_positive("neighbours", neighbours)
        require_non_negative("shrinkage", shrinkage)
        self.neighbours = int(neighbours)
        self.shrinkage = float(shrinkage)
        super().__init__(model, alpha, positive_threshold)

    def _fit(self, x: sp.csr_matrix) -> dict[str, Tensor]:
        active, g = active_gram(x)
        norm = g.diagonal().sqrt()
        den = norm[:, None] * norm[None, :] + self.shrinkage
        sim = torch.where(den > 0, g / den.clamp_min(1e-300), torch.zeros_like(g))
        sim.fill_diagonal_(0.0)
        k = min(self.neighbours, sim.shape[0])
        value, index = torch.topk(sim, k, dim=0)  # [k, A]: the k most similar items of column j
        # back to catalog ids; an item without interactions has no similar item (sim 0 to item 0)
        n_items = x.shape[1]
        full_index = torch.zeros(k, n_items, dtype=torch.long)
        full_sim = torch.zeros(k, n_items, dtype=value.dtype)
        full_index[:, active] = active[index]
        full_sim[:, active] = value
        return {"neighbour_index": full_index, "neighbour_sim": full_sim}

    def similarity(self, device: torch.device) -> Tensor:
        """The pruned similarity matrix ``S [I, I]`` (dense, cached per device)."""
        t = self._on(device)
        if "dense" not in t:
            t["dense"] = torch.zeros(self.n_items, self.n_items, device=device).scatter_(
                0, t["neighbour_index"], t["neighbour_sim"])
        return t["dense"]

    def fold_in(self, batch: TaskBatch, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        xs, _, _ = self.support(batch)
        return xs @ self.similarity(xs.device), xs.sum(1) == 0


class ALS(_FoldIn):
    """Implicit-feedback ALS (Hu, Koren, Volinsky 2008) item factors; ridge fold-in of the support.

    Args:
        model: kept for the runner.
        factors: latent dimension.
        regularization: ``lambda`` on user and item factors (> 0).
        iterations: alternating sweeps (users then items).
        confidence: ``c`` of the confidence ``1 + c * x``.
        cg_steps: conjugate-gradient steps per half-sweep (warm-started; ``implicit``'s default 3).
        seed: seed of the ``N(0, 0.01^2)`` initial factors.
        alpha: weight of the normalised popularity blend (default 0: plain ALS scores).
        positive_threshold: only ratings ``>=`` this count as interactions (null = all).
    """

    _state = ("item_factors", "user_mean")

    def __init__(self, model: nn.Module, factors: int = 64, regularization: float = 10.0,
                 iterations: int = 15, confidence: float = 10.0, cg_steps: int = 3, seed: int = 0,
                 alpha: float = 0.0, positive_threshold: float | None = None) -> None:
        for key, v in (("factors", factors), ("regularization", regularization),
                       ("iterations", iterations), ("cg_steps", cg_steps)):
            require_positive(key, v)
        require_non_negative("confidence", confidence)
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")
        self.factors, self.iterations, self.cg_steps = int(factors), int(iterations), int(cg_steps)
        self.regularization, self.confidence, self.seed = float(regularization), float(confidence), seed
        super().__init__(model, alpha, positive_threshold)

    def _half_step(self, x: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """``u [n_rows, F]`` after ``cg_steps`` CG steps on every row's normal equations
        ``(Y^T Y + c Y_u^T Y_u + lambda I) u = (1 + c) Y_u^T 1`` (``Y_u``: the row's items in the
        binary sparse CSR ``x [n_rows, n_cols]``); ``O(nnz F)`` per step."""
        gram = y.T @ y + self.regularization * torch.eye(y.shape[1], dtype=y.dtype)

        def matvec(p: Tensor) -> Tensor:  # x * (p y^T) only where x is non-zero, then @ y
            return p @ gram + self.confidence * (torch.sparse.sampled_addmm(x, p, y.T, beta=0.0) @ y)

        r = (1 + self.confidence) * (x @ y) - matvec(u)
        p, rs = r.clone(), (r * r).sum(1)
        for _ in range(self.cg_steps):
            ap = matvec(p)
            step = rs / (p * ap).sum(1).clamp_min(1e-30)
            u = u + step[:, None] * p
            r = r - step[:, None] * ap
            new = (r * r).sum(1)
            p = r + (new / rs.clamp_min(1e-30))[:, None] * p
            rs = new
        return u

    def _fit(self, x: sp.csr_matrix) -> dict[str, Tensor]:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            by_user, by_item = (torch.sparse_csr_tensor(
                torch.from_numpy(m.indptr).long(), torch.from_numpy(m.indices).long(),
                torch.ones(m.nnz), m.shape) for m in (x, x.T.tocsr()))
        gen = torch.Generator().manual_seed(self.seed)
        users = torch.randn(x.shape[0], self.factors, generator=gen) * 0.01
        items = torch.randn(x.shape[1], self.factors, generator=gen) * 0.01
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # torch's CPU sparse kernels slow down 10x with busy cores
        try:
            for _ in range(self.iterations):
                users = self._half_step(by_user, items, users)
                items = self._half_step(by_item, users, items)
        finally:
            torch.set_num_threads(threads)
        return {"item_factors": items, "user_mean": users.mean(0)}

    def user_vectors(self, batch: TaskBatch, t: dict[str, Tensor]) -> Tensor:
        """``[B, F]``: the ridge solution from each support (mean user vector where none)."""
        _, items, w = self.support(batch)
        y = t["item_factors"]
        ys = y[items]  # [B, S, F]
        eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
        wys = ys * w[..., None]
        a = (y.T @ y + self.regularization * eye) + self.confidence * (wys.transpose(1, 2) @ ys)
        rhs = (1 + self.confidence) * wys.sum(1)
        u = torch.linalg.solve(a, rhs)
        return torch.where((w.sum(1) == 0)[:, None], t["user_mean"].expand_as(u), u)

    def fold_in(self, batch: TaskBatch, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        u = self.user_vectors(batch, t)
        return u @ t["item_factors"].T, torch.zeros(batch.size, dtype=torch.bool, device=u.device)
