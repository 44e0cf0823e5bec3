"""Sampled negatives of the ranking losses: items a task's user never interacted with, batched.

Every training step draws fresh negatives for every task of a meta-batch at once (no loop over
users or negatives): a Bool ``[B, n_items]`` mask of each task's interacted items (every item of
the user in the dataset, from the evaluator's :class:`~metarec_runner.evaluate.candidates.Catalog`,
plus the task's own support and query items, e.g. the implicit splitter's sampled label-0 rows),
then ``n`` items per task without replacement by Gumbel-top-k over the log proposal weights with
the interacted items at ``-inf`` (equivalent to drawing one item at a time proportionally to the
weights among the items not drawn yet). Draws come from a CPU ``torch.Generator``, so they do not
depend on the device and repeat exactly under the same seed.

Proposals (:data:`NEGATIVES`): ``uniform`` over the catalog, or ``popularity``: weights ``count +
1`` with ``count`` the item's meta-train interactions (rows of the meta-train tasks), so an item
no meta-train user rated can still be drawn. ``log_q`` is the log of the proposal over the whole
catalog (the sampled softmax's logQ correction; restricting it to a task's unseen items changes
it by a per-task constant, which cancels).

A task whose user has fewer unseen items than ``n`` gets all of them (the rest of its ``n``
slots are masked) and a warning names the value. Negative feature rows are built as the
evaluator builds candidate rows: ``catalog.feature_rows(users, items)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metarec_runner.errors import ConfigError
from metarec_runner.tasks.taskset import TaskBatch, TaskSet

if TYPE_CHECKING:  # evaluate imports nothing from here; the catalog is only read
    from metarec_runner.data.interactions import FeatureSchema
    from metarec_runner.evaluate.candidates import Catalog

NEGATIVES = ("uniform", "popularity")
"""Proposals of the sampled negatives: ``uniform`` over the catalog, ``popularity`` ~ meta-train
count + 1."""


@dataclass(frozen=True)
class Negatives:
    """``n`` sampled negatives per task of a batch.

    Attributes:
        items: LongTensor ``[B, n]`` item codes (CPU; any item where ``mask`` is False).
        mask: Bool ``[B, n]`` real negatives (fewer than ``n`` where the user's unseen items run out).
        log_q: ``[B, n]`` log proposal probability of each item over the catalog (CPU, float64).
        rows: LongTensor ``[B, n, F]`` feature rows of (task user, item), on the batch's device.
    """

    items: Tensor
    mask: Tensor
    log_q: Tensor
    rows: Tensor


class NegativeSampler:
    """Draws negatives for the tasks of a batch (see the module docstring).

    Args:
        catalog: the catalog the evaluator ranks (items, what every user rated, feature rows).
        user_column: the column of a feature row holding the user code (``user_id``).
        weights: ``[n_items]`` positive proposal weights; None = uniform.
    """

    def __init__(self, catalog: Catalog, user_column: int, weights: Tensor | None = None) -> None:
        self.catalog = catalog
        self.n_items = int(catalog.n_items)
        self.user_column = int(user_column)
        if weights is None:
            self.log_w = torch.zeros(self.n_items, dtype=torch.float64)
        else:
            self.log_w = weights.to(torch.float64).log()
        self.log_q = self.log_w - torch.logsumexp(self.log_w, 0)
        self.warned: set[int] = set()

    @classmethod
    def build(cls, catalog: Catalog, schema: FeatureSchema, proposal: str,
              train: TaskSet | None = None) -> NegativeSampler:
        """A sampler for ``proposal`` (:data:`NEGATIVES`); ``popularity`` counts the item codes
        (a row's last column) of ``train``'s support and query rows, or every rating of the
        catalog when ``train`` is None."""
        if "user_id" not in schema.names:
            raise ConfigError("loss", "ranking losses draw negatives per user, but the dataset's rows "
                              "have no user_id column; use loss=mse or bce")
        if proposal not in NEGATIVES:
            raise ConfigError("negatives", f"unknown value {proposal!r}; choose one of {', '.join(NEGATIVES)}")
        weights = None
        if proposal == "popularity":
            items = (catalog.rated_items if train is None
                     else torch.cat([train.support_x[:, -1], train.query_x[:, -1]]))
            weights = torch.bincount(items, minlength=catalog.n_items)[: catalog.n_items] + 1.0
        return cls(catalog, schema.columns("user_id")[0], weights)

    # -- what a batch's users interacted with ------------------------------------------------
    def users(self, batch: TaskBatch) -> Tensor:
        """``[B]`` user code of every task (CPU): the user column of its rows, which must agree.

        Raises:
            ConfigError: a task holds rows of several users (item, group or domain tasks).
        """
        rows = torch.cat([batch.support_x, batch.query_x], 1)[..., self.user_column].cpu()
        mask = torch.cat([batch.support_mask, batch.query_mask], 1).cpu()
        first = mask.long().argmax(1)
        users = rows.gather(1, first[:, None]).squeeze(1)
        if bool(((rows != users[:, None]) & mask).any()):
            raise ConfigError("loss", "ranking losses draw negatives per user, but a task holds rows "
                              "of several users (item, group or domain tasks); use a user splitter "
                              "(user_cold_start, temporal, implicit) or loss=mse")
        return users

    def interacted(self, batch: TaskBatch, users: Tensor) -> Tensor:
        """Bool ``[B, n_items]`` (CPU): every item of the task's user in the catalog, and the
        task's own support and query items (real rows only). A user the catalog does not know
        (a new user served from a checkpoint) has only the batch's items."""
        n_users = self.catalog.rated_offsets.shape[0] - 1
        known = (users >= 0) & (users < n_users)
        seen = self.catalog.rated_mask(users.clamp(0, max(n_users - 1, 0))) & known[:, None]
        items = torch.cat([batch.support_x[..., -1], batch.query_x[..., -1]], 1).cpu()
        mask = torch.cat([batch.support_mask, batch.query_mask], 1).cpu()
        row = torch.arange(len(users))[:, None].expand_as(items)[mask]
        seen[row, items[mask]] = True
        return seen

    # -- the draw ----------------------------------------------------------------------------
    def sample(self, batch: TaskBatch, n: int, generator: torch.Generator, sets: int = 1) -> list[Negatives]:
        """``sets`` independent draws of ``n`` negatives for every task of ``batch``.

        Args:
            batch: the tasks (any device; rows are returned on its device).
            n: negatives per task and set (capped per task at the user's unseen items, with a
                warning naming ``n``).
            generator: CPU generator (the draws do not depend on the device).
            sets: number of independent draws (e.g. 2: support and query negatives).

        Returns:
            ``sets`` :class:`Negatives`, each ``[B, min(n, n_items)]``.
        """
        users = self.users(batch)
        seen = self.interacted(batch, users)
        unseen = self.n_items - seen.sum(-1)  # [B]
        width = min(int(n), self.n_items)
        if int(unseen.min()) < n:
            self._warn(n, users, unseen)
        u = torch.rand(sets, len(users), self.n_items, generator=generator)
        keys = self.log_w.float() - (-u.clamp_min(1e-30).log()).log()  # log w + Gumbel noise
        keys = keys.masked_fill(seen, -math.inf)
        items = keys.topk(width, dim=-1).indices  # [sets, B, width], unseen items first
        mask = torch.arange(width)[None, :] < unseen[:, None]  # [B, width]
        out = []
        for k in range(sets):  # ``sets`` is 1 or 2: the draws themselves are batched
            rows = self.catalog.feature_rows(users[:, None].expand(-1, width).reshape(-1).numpy(),
                                             items[k].reshape(-1).numpy())
            rows = rows.view(len(users), width, -1).to(batch.support_x.device)
            out.append(Negatives(items[k], mask, self.log_q[items[k]], rows))
        return out

    def _warn(self, n: int, users: Tensor, unseen: Tensor) -> None:
        """One warning per distinct ``n`` whose draw was capped."""
        if n in self.warned:
            return
        self.warned.add(n)
        worst = int(unseen.argmin())
        warnings.warn(f"algo.n_negatives={n} is more than the {int(unseen[worst])} items user "
                      f"{int(users[worst])} has not interacted with; capped to each such user's unseen "
                      "items (lower algo.n_negatives to silence this)", RuntimeWarning, stacklevel=3)
