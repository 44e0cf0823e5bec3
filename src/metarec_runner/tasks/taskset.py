"""TaskSet (all tasks of one split, stored flat) and TaskBatch (B tasks padded with masks).

A TaskSet keeps every task's support and query rows in two flat tensors with CSR offsets, so
collating a meta-batch is a handful of vectorized gathers, never a Python loop over tasks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class TaskBatch:
    """B tasks padded to the batch's longest support and query set.

    Attributes:
        support_x: LongTensor ``[B, S, F]`` categorical feature rows (padding rows are zeros).
        support_y: FloatTensor ``[B, S]`` ratings (0 where padded).
        support_mask: BoolTensor ``[B, S]``, True on real rows.
        query_x: LongTensor ``[B, Q, F]``.
        query_y: FloatTensor ``[B, Q]``.
        query_mask: BoolTensor ``[B, Q]``.
        task_index: LongTensor ``[B]``, positions of the tasks in their TaskSet.
    """

    support_x: Tensor
    support_y: Tensor
    support_mask: Tensor
    query_x: Tensor
    query_y: Tensor
    query_mask: Tensor
    task_index: Tensor

    @property
    def size(self) -> int:
        return int(self.task_index.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move to ``device``; ``dtype`` (if given) applies to the rating tensors."""
        y_kw = {"device": device, "dtype": dtype} if dtype is not None else {"device": device}
        return TaskBatch(
            self.support_x.to(device),
            self.support_y.to(**y_kw),
            self.support_mask.to(device),
            self.query_x.to(device),
            self.query_y.to(**y_kw),
            self.query_mask.to(device),
            self.task_index.to(device),
        )


def _pad_gather(rows: Tensor, offsets: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Gather CSR segments ``idx`` of ``rows`` into a padded tensor.

    Args:
        rows: ``[N, ...]`` flat rows of all tasks.
        offsets: ``[T + 1]`` segment starts.
        idx: ``[B]`` task positions.

    Returns:
        ``(padded [B, L, ...], mask [B, L])`` with L the longest selected segment.
    """
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    width = int(lengths.max()) if len(idx) else 0
    pos = torch.arange(width)
    mask = pos[None, :] < lengths[:, None]
    gather = torch.where(mask, starts[:, None] + pos[None, :], torch.zeros((), dtype=torch.long))
    padded = rows[gather]
    if padded.dim() == 3:
        padded = padded * mask[..., None]
    else:
        padded = padded * mask
    return padded, mask


@dataclass(frozen=True)
class TaskSet:
    """All tasks of one split (one task per user for user cold start).

    Attributes:
        task_ids: ``[T]`` user codes (the task's user).
        support_x: ``[Ns, F]`` feature rows of every support set, task after task.
        support_y: ``[Ns]`` support ratings.
        support_offsets: ``[T + 1]`` CSR offsets into the support rows.
        query_x: ``[Nq, F]``; query_y: ``[Nq]``; query_offsets: ``[T + 1]``.
        query_expected: ``[Nq]`` Bayes-optimal predictions (synthetic data) or None.
        task_kind: what one task is: ``"user"`` (task_ids are user codes; the only kind that
            full-ranking protocols accept), ``"item"``, ``"group"`` or ``"domain"``.
    """

    task_ids: Tensor
    support_x: Tensor
    support_y: Tensor
    support_offsets: Tensor
    query_x: Tensor
    query_y: Tensor
    query_offsets: Tensor
    query_expected: Tensor | None = None
    task_kind: str = "user"

    def __len__(self) -> int:
        return int(self.task_ids.shape[0])

    @property
    def support_sizes(self) -> Tensor:
        """``[T]`` support rows per task."""
        return self.support_offsets[1:] - self.support_offsets[:-1]

    @property
    def query_sizes(self) -> Tensor:
        """``[T]`` query rows per task."""
        return self.query_offsets[1:] - self.query_offsets[:-1]

    def batch(self, idx: Tensor) -> TaskBatch:
        """Collate tasks ``idx`` (LongTensor ``[B]``) into a padded :class:`TaskBatch`."""
        sx, smask = _pad_gather(self.support_x, self.support_offsets, idx)
        sy, _ = _pad_gather(self.support_y, self.support_offsets, idx)
        qx, qmask = _pad_gather(self.query_x, self.query_offsets, idx)
        qy, _ = _pad_gather(self.query_y, self.query_offsets, idx)
        return TaskBatch(sx, sy, smask, qx, qy, qmask, idx)

    def query_expected_batch(self, idx: Tensor) -> Tensor | None:
        """``[B, Q]`` Bayes-optimal query predictions for tasks ``idx`` (None if unknown)."""
        if self.query_expected is None:
            return None
        return _pad_gather(self.query_expected, self.query_offsets, idx)[0]

    def item_counts(self, n_items: int) -> Tensor:
        """``[n_items]`` int64: how often each item appears in the tasks' support and query rows
        (the item id is a row's last column), e.g. the meta-train popularity."""
        items = torch.cat([self.support_x[:, -1], self.query_x[:, -1]])
        return torch.bincount(items.clamp_min(0), minlength=n_items)[:n_items]

    def subset(self, keep: Tensor) -> TaskSet:
        """The tasks where ``keep`` (``Bool[T]``) is True, in their order (CSR re-packed)."""
        def rows(offsets: Tensor) -> tuple[Tensor, Tensor]:
            sizes = (offsets[1:] - offsets[:-1])
            segment = torch.repeat_interleave(torch.arange(len(self)), sizes)
            new = torch.zeros(int(keep.sum()) + 1, dtype=offsets.dtype)
            new[1:] = torch.cumsum(sizes[keep], 0)
            return keep[segment], new

        s_keep, s_off = rows(self.support_offsets)
        q_keep, q_off = rows(self.query_offsets)
        expected = None if self.query_expected is None else self.query_expected[q_keep]
        return replace(
            self, task_ids=self.task_ids[keep],
            support_x=self.support_x[s_keep], support_y=self.support_y[s_keep], support_offsets=s_off,
            query_x=self.query_x[q_keep], query_y=self.query_y[q_keep], query_offsets=q_off,
            query_expected=expected,
        )

    def with_support_size(self, k: int) -> TaskSet:
        """The same tasks with each support set cut to its first ``k`` rows (few-shot curve)."""
        sizes = self.support_sizes.clamp(max=k)
        new_offsets = torch.zeros_like(self.support_offsets)
        new_offsets[1:] = torch.cumsum(sizes, 0)
        segment = torch.repeat_interleave(torch.arange(len(self)), self.support_sizes)
        position = torch.arange(self.support_x.shape[0]) - self.support_offsets[segment]
        keep = position < k
        return replace(
            self,
            support_x=self.support_x[keep],
            support_y=self.support_y[keep],
            support_offsets=new_offsets,
        )

    def fingerprint(self) -> str:
        """SHA-256 over task ids, rows and ratings: equal fingerprints mean identical tasks."""
        h = hashlib.sha256()
        for t in (self.task_ids, self.support_x, self.support_y, self.support_offsets,
                  self.query_x, self.query_y, self.query_offsets):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class TaskSplits:
    """Meta-train, validation and test tasks with disjoint users, and the hash that names them."""

    train: TaskSet
    val: TaskSet
    test: TaskSet
    filtered: dict[str, int] | None = None
    """What the splitter's interaction filters did, e.g. ``{"filtered_users": 12,
    "filtered_interactions": 80, "filtered_to_train_users": 10}`` (logged with the split)."""

    @property
    def split_hash(self) -> str:
        """First 16 hex digits of the SHA-256 over the three TaskSet fingerprints."""
        h = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            h.update(part.fingerprint().encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, int]:
        """Task and row counts per split."""
        out: dict[str, int] = {}
        for name, part in (("train", self.train), ("val", self.val), ("test", self.test)):
            out[f"{name}_tasks"] = len(part)
            out[f"{name}_support_rows"] = int(part.support_offsets[-1])
            out[f"{name}_query_rows"] = int(part.query_offsets[-1])
        out.update(self.filtered or {})
        return out
