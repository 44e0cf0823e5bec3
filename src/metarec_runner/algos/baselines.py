"""Non-meta baselines that run through the same runner and evaluator.

``GlobalModel``: the same model trained on every meta-train interaction (support and query
pooled), no per-user adaptation. ``Finetune``: the global model plus a few SGD steps on each
test user's support set (the baseline every meta-learner must beat).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from metarec_runner.algos.base import AdaptedScorer, MetaAlgorithm
from metarec_runner.algos.functional import pointwise_loss
from metarec_runner.errors import require_positive
from metarec_runner.tasks.taskset import TaskBatch


class GlobalModel(MetaAlgorithm):
    """Plain supervised training on all interactions of the meta-train users; no adaptation.

    Args:
        model, meta_optimizer: see :class:`MetaAlgorithm`.
        loss: ``mse`` (ratings), ``bce`` (0/1 labels; scores are logits), or a ranking loss
            (``bpr``, ``softmax``, ``bce`` with ``negatives``): every positive of a task (support
            and query) against the task's sampled negatives.
        negatives, n_negatives, positive_threshold, seed: see :class:`MetaAlgorithm`.
    """

    adapts = False
    #: trains ``model(x)`` on rows: the model must score rows on their own (``algos.compat``)
    requires: ClassVar[frozenset[str]] = frozenset({"rowwise"})

    def __init__(
        self, model: nn.Module, meta_optimizer: Callable[..., torch.optim.Optimizer], loss: str = "mse",
        negatives: str | None = None, n_negatives: int = 20, positive_threshold: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, meta_optimizer, adapt="all", loss=loss, negatives=negatives,
                         n_negatives=n_negatives, positive_threshold=positive_threshold, seed=seed)

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        """One optimizer step on the mean loss over every real support and query row (a ranking
        loss: the mean over tasks of the pooled positives against both draws of negatives)."""
        self.check_labels(batch)
        if self.ranking is not None:
            ep = self.ranking.episode(batch)
            loss = ep.pooled_loss(self.model(ep.batch.support_x), self.model(ep.batch.query_x)).mean()
            self._outer_update(loss)
            return {"loss": loss.item()}
        pred_s, pred_q = self.model(batch.support_x), self.model(batch.query_x)
        err = torch.cat([pointwise_loss(pred_s, batch.support_y, self.loss) * batch.support_mask,
                         pointwise_loss(pred_q, batch.query_y, self.loss) * batch.query_mask], dim=1)
        n = batch.support_mask.sum() + batch.query_mask.sum()
        loss = err.sum() / n
        self._outer_update(loss)
        return {"loss": loss.item()}

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        return AdaptedScorer(self, None)


class Finetune(GlobalModel):
    """Global model, then ``finetune_steps`` SGD steps per test user on its support set.

    Args:
        model, meta_optimizer, loss: as :class:`GlobalModel` (``loss`` also drives fine-tuning:
            a ranking loss fine-tunes on the support's positives against sampled negatives).
        adapt: which parameters fine-tune (``head`` or ``all``).
        finetune_lr: SGD step size at adaptation time.
        finetune_steps: SGD steps at adaptation time.
        touched_rows, check_fast_path, negatives, n_negatives, positive_threshold, seed: see
            :class:`MetaAlgorithm` (fine-tuning's inner loop).
    """

    adapts = True
    sgd_adapts: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        meta_optimizer: Callable[..., torch.optim.Optimizer],
        adapt: str = "head",
        finetune_lr: float = 0.05,
        finetune_steps: int = 5,
        loss: str = "mse",
        touched_rows: bool = True,
        check_fast_path: bool = False,
        negatives: str | None = None,
        n_negatives: int = 20,
        positive_threshold: float | None = None,
        seed: int = 0,
    ) -> None:
        MetaAlgorithm.__init__(self, model, meta_optimizer, adapt, touched_rows, loss, check_fast_path,
                               negatives, n_negatives, positive_threshold, seed)
        require_positive("finetune_lr", finetune_lr)
        require_positive("finetune_steps", finetune_steps)
        self.finetune_lr = float(finetune_lr)
        self.finetune_steps = int(finetune_steps)

    def step_sizes(self) -> float:
        """The fine-tuning step size (a scalar)."""
        return self.finetune_lr

    def adapt(self, batch: TaskBatch) -> AdaptedScorer:
        return self.sgd_adapt(batch, self.finetune_lr, self.finetune_steps)
