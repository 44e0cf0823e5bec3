"""Ranking losses of the trainable algorithms: each task's positives against its sampled negatives.

Per task ``b`` with positives ``P_b`` (real rows rated ``>= positive_threshold``; every real row
with ``null``, for implicit data) and sampled negatives ``N_b`` (items the user never interacted
with, :mod:`metarec_runner.algos.negatives`), :func:`ranking_loss` is

- ``bpr`` (Rendle et al. UAI 2009): the mean over pairs ``(p, n)`` of ``-log sigmoid(s_p - s_n)``;
- ``bce``: binary cross-entropy of the positives as 1 and the negatives as 0 (scores are
  logits), the mean over the ``|P_b| + |N_b|`` rows;
- ``softmax`` (sampled softmax, Jean et al. ACL 2015; Yi et al. RecSys 2019): the mean over
  ``p`` of ``-s'_p + log(exp s'_p + sum_n exp s'_n)`` with the logQ correction ``s' = s - log q``
  (``q``: the proposal probability of the item; uniform negatives need none).

A task without a positive costs 0. Real rows below the threshold are neither positives nor
negatives (explicit data keeps its ratings for the evaluator's relevance; the losses use them
only through the threshold). Masked logits are the dtype's finite minimum, never ``-inf``.

:class:`RankingObjective` is what an algorithm holds when its loss takes sampled negatives: it
draws them (resampled every step, from its own seeded generator) and lays each task's
negatives out after its support and query rows, an :class:`Episode`, so the model's forward, the
inner loops and the fast weights score the real rows and the negatives in one batched call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from metarec_runner.algos.negatives import NEGATIVES, Negatives, NegativeSampler
from metarec_runner.errors import ConfigError, TrainingError, require_choice, require_positive
from metarec_runner.tasks.taskset import TaskBatch

RANKING_LOSSES = ("bce", "bpr", "softmax")
"""Losses that compare positives with sampled negatives (``bce`` only with ``negatives`` set)."""


def ranking_loss(pos_scores: Tensor, pos_mask: Tensor, neg_scores: Tensor, kind: str,
                 neg_mask: Tensor | None = None, pos_log_q: Tensor | None = None,
                 neg_log_q: Tensor | None = None) -> Tensor:
    """Per-task ranking loss ``[B]`` (see the module docstring; 0 for a task without positives).

    Args:
        pos_scores: ``[B, P]`` scores of the rows that may be positives; pos_mask: Bool ``[B, P]``.
        neg_scores: ``[B, N]`` scores of the sampled negatives; neg_mask: Bool ``[B, N]`` (None: all).
        kind: ``bpr``, ``bce`` or ``softmax``.
        pos_log_q, neg_log_q: ``softmax``: log proposal probabilities ``[B, P]``, ``[B, N]`` of
            the items (None: uniform, no correction).
    """
    pm = pos_mask.to(pos_scores.dtype)
    nm = torch.ones_like(neg_scores) if neg_mask is None else neg_mask.to(neg_scores.dtype)
    n_pos, n_neg = pm.sum(-1), nm.sum(-1)
    if kind == "bpr":
        pairs = F.softplus(neg_scores.unsqueeze(-2) - pos_scores.unsqueeze(-1))  # [B, P, N]
        weight = pm.unsqueeze(-1) * nm.unsqueeze(-2)
        return (pairs * weight).sum((-2, -1)) / (n_pos * n_neg).clamp_min(1.0)
    if kind == "bce":
        total = (F.softplus(-pos_scores) * pm).sum(-1) + (F.softplus(neg_scores) * nm).sum(-1)
        return torch.where(n_pos > 0, total / (n_pos + n_neg).clamp_min(1.0), torch.zeros_like(total))
    if kind == "softmax":
        s_pos = pos_scores if pos_log_q is None else pos_scores - pos_log_q
        s_neg = neg_scores if neg_log_q is None else neg_scores - neg_log_q
        s_neg = s_neg.masked_fill(nm == 0, torch.finfo(s_neg.dtype).min)
        lse = torch.logsumexp(s_neg, -1, keepdim=True)  # [B, 1]
        per = torch.logaddexp(s_pos, lse) - s_pos  # [B, P]
        return (per * pm).sum(-1) / n_pos.clamp_min(1.0)
    raise ValueError(f"unknown ranking loss {kind!r}; choose one of {', '.join(RANKING_LOSSES)}")


@dataclass(frozen=True)
class RankedRows:
    """One role (support or query) of an :class:`Episode`: scores ``[B, L + N]`` hold the
    ``L`` real rows, then the ``N`` negatives.

    Attributes:
        kind: the loss (:func:`ranking_loss`).
        pos_mask: Bool ``[B, L]`` positives among the real rows.
        neg_mask: Bool ``[B, N]`` real negatives.
        pos_log_q, neg_log_q: ``[B, L]``, ``[B, N]`` log proposal probabilities (``softmax``
            with popularity negatives; else None).
    """

    kind: str
    pos_mask: Tensor
    neg_mask: Tensor
    pos_log_q: Tensor | None
    neg_log_q: Tensor | None

    @property
    def n_real(self) -> int:
        return int(self.pos_mask.shape[1])

    def loss(self, pred: Tensor) -> Tensor:
        """Per-task loss ``[B]`` of scores ``pred [B, L + N]`` (a task loss of the inner loops)."""
        n = self.n_real
        return ranking_loss(pred[:, :n], self.pos_mask, pred[:, n:], self.kind, self.neg_mask,
                            self.pos_log_q, self.neg_log_q)

    def has_positive(self) -> Tensor:
        """Bool ``[B]``: whether a task has a positive in this role."""
        return self.pos_mask.any(-1)


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else torch.cat([a, b], 1)


@dataclass(frozen=True)
class Episode:
    """A meta-batch with every task's negatives appended to its support and its query rows.

    Attributes:
        batch: :class:`TaskBatch` whose ``support_x`` is ``[B, S + N, F]`` (the real rows, then
            the support negatives; mask and zero ratings extended alike) and ``query_x``
            ``[B, Q + N, F]`` (the query negatives, an independent draw).
        support, query: the losses of the two roles (:class:`RankedRows`).
    """

    batch: TaskBatch
    support: RankedRows
    query: RankedRows

    def pooled_loss(self, support_pred: Tensor, query_pred: Tensor) -> Tensor:
        """Per-task loss ``[B]`` of every positive (support and query) against both draws of
        negatives (the global model's objective); scores as the two roles lay them out."""
        s, q = self.support.n_real, self.query.n_real
        pos = torch.cat([support_pred[:, :s], query_pred[:, :q]], 1)
        neg = torch.cat([support_pred[:, s:], query_pred[:, q:]], 1)
        return ranking_loss(pos, torch.cat([self.support.pos_mask, self.query.pos_mask], 1), neg,
                            self.support.kind, torch.cat([self.support.neg_mask, self.query.neg_mask], 1),
                            _cat(self.support.pos_log_q, self.query.pos_log_q),
                            _cat(self.support.neg_log_q, self.query.neg_log_q))


class RankingObjective:
    """Sampled negatives and their loss, for an algorithm whose loss takes them.

    Args:
        kind: the loss (:data:`RANKING_LOSSES`).
        negatives: the proposal (``uniform`` | ``popularity``, :data:`~metarec_runner.algos.negatives.NEGATIVES`).
        n_negatives: negatives per task, drawn afresh for the support and for the query of every step.
        positive_threshold: ratings ``>=`` this are positives; None = every real row.
        seed: seeds the training draws; adaptation draws are seeded by ``seed`` and the tasks.

    Attributes:
        sampler: the :class:`~metarec_runner.algos.negatives.NegativeSampler`, bound once the
            catalog is known (:meth:`bind`).
    """

    def __init__(self, kind: str, negatives: str, n_negatives: int, positive_threshold: float | None,
                 seed: int) -> None:
        require_choice("loss", kind, RANKING_LOSSES)
        require_choice("negatives", negatives, NEGATIVES)
        if isinstance(n_negatives, bool) or not isinstance(n_negatives, int):
            raise ConfigError("n_negatives", f"must be an integer >= 1, got {n_negatives!r}; e.g. 20")
        require_positive("n_negatives", n_negatives)
        self.kind, self.negatives, self.n_negatives = kind, negatives, int(n_negatives)
        self.threshold = None if positive_threshold is None else float(positive_threshold)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.sampler: NegativeSampler | None = None

    def bind(self, sampler: NegativeSampler) -> None:
        """Use ``sampler`` from now on."""
        self.sampler = sampler

    def state_dict(self) -> dict:
        """The training draws' generator state (a resumed run draws what it would have drawn)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def positives(self, y: Tensor, mask: Tensor) -> Tensor:
        """Bool ``[B, L]``: real rows rated ``>= positive_threshold`` (every real row with None)."""
        return mask if self.threshold is None else mask & (y >= self.threshold)

    def adapt_generator(self, batch: TaskBatch) -> torch.Generator:
        """A generator seeded by ``seed`` and the batch's task indices: a task adapts on the same
        negatives at every evaluation, whatever training drew before."""
        digest = hashlib.sha256(f"{self.seed}:".encode() + batch.task_index.cpu().numpy().tobytes())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)

    def episode(self, batch: TaskBatch, generator: torch.Generator | None = None) -> Episode:
        """Draw fresh negatives for ``batch`` and lay them out (:class:`Episode`).

        Args:
            batch: the tasks.
            generator: the draws' source; None = :attr:`generator` (training: every real row of
                the batch is then checked for a positive as well).

        Raises:
            TrainingError: no catalog was bound.
            ConfigError: training, and no real row of the batch reaches ``positive_threshold``.
        """
        if self.sampler is None:
            raise TrainingError(
                f"algo.loss={self.kind} draws negatives from the catalog, but none was bound: call "
                "algo.bind_catalog(Catalog.from_interactions(data), train_tasks) before training")
        pos_s = self.positives(batch.support_y, batch.support_mask)
        pos_q = self.positives(batch.query_y, batch.query_mask)
        if generator is None and self.threshold is not None and not bool(pos_s.any() | pos_q.any()):
            real = torch.cat([batch.support_y[batch.support_mask], batch.query_y[batch.query_mask]])
            top = float(real.max()) if real.numel() else float("nan")
            raise ConfigError("positive_threshold", f"no row of the batch is rated >= {self.threshold:g} "
                              f"(largest {top:g}); lower algo.positive_threshold (1 for 0/1 labels, "
                              "null for every row)")
        neg_s, neg_q = self.sampler.sample(batch, self.n_negatives, generator or self.generator, sets=2)
        aug = replace(batch, **self._rows(batch.support_x, batch.support_y, batch.support_mask, neg_s, "support"),
                      **self._rows(batch.query_x, batch.query_y, batch.query_mask, neg_q, "query"))
        dtype = batch.support_y.dtype
        return Episode(aug, self._ranked(batch.support_x, pos_s, neg_s, dtype),
                       self._ranked(batch.query_x, pos_q, neg_q, dtype))

    @staticmethod
    def _rows(x: Tensor, y: Tensor, mask: Tensor, neg: Negatives, role: str) -> dict[str, Tensor]:
        """``{role_x, role_y, role_mask}`` with the negatives appended (ratings 0 on them)."""
        n = neg.rows.shape[1]
        return {f"{role}_x": torch.cat([x, neg.rows], 1),
                f"{role}_y": torch.cat([y, y.new_zeros(y.shape[0], n)], 1),
                f"{role}_mask": torch.cat([mask, neg.mask.to(mask.device)], 1)}

    def _ranked(self, x: Tensor, pos: Tensor, neg: Negatives, dtype: torch.dtype) -> RankedRows:
        """The loss of one role; logQ terms (in the scores' ``dtype``) only for ``softmax`` with
        non-uniform negatives."""
        device = pos.device
        pos_q = neg_q = None
        if self.kind == "softmax" and self.negatives != "uniform":
            log_q = self.sampler.log_q
            pos_q = log_q[x[..., -1].cpu().clamp(0, log_q.shape[0] - 1)].to(device, dtype)
            neg_q = neg.log_q.to(device, dtype)
        return RankedRows(self.kind, pos, neg.mask.to(device), pos_q, neg_q)


def ranking_objective(loss: str, negatives: str | None, n_negatives: int, positive_threshold: float | None,
                      seed: int) -> RankingObjective | None:
    """The algorithm's :class:`RankingObjective`, or None for a pointwise loss.

    ``negatives`` None means the loss's own: none for ``mse`` and ``bce`` (bce on the given 0/1
    labels), ``uniform`` for ``bpr`` and ``softmax``.

    Raises:
        ConfigError: ``mse`` with negatives.
    """
    if negatives is None:
        if loss in ("mse", "bce"):
            return None
        negatives = "uniform"
    if loss == "mse":
        raise ConfigError("negatives", f"loss=mse regresses ratings and takes no sampled negatives, got "
                          f"negatives={negatives}; set algo.negatives=null or use algo.loss=bpr, softmax or bce")
    return RankingObjective(loss, negatives, n_negatives, positive_threshold, seed)
