"""Touched-row adaptation: adapt only the embedding rows each task's support set reads.

Full-table SGD on an embedding table gives every row a task's support set does not read a zero
gradient, so those rows keep their initial values. Adapting ``adapt: all`` therefore needs, per
task, only the rows its support set touches: they are gathered (all tasks at once) into a small
per-task table ``values [B, U, d]`` (``U`` = the most distinct rows any task of the batch reads),
adapted with the rest of the model's per-task weights by the ordinary batched inner loop, and
looked up for query rows by a per-task ``searchsorted``; rows a task did not touch fall back to
the shared table. The numbers are those of full-table SGD (tested to 1e-10 in float64), second
order included (the gather ``W[rows]`` is differentiable), without a ``[B, V, d]`` copy of the
table per task.

A model opts in with ``table_name`` (the table parameter), ``table_rows(x)`` and
``forward_rows(params, emb, keep)`` (see ``models.preference.PreferenceEstimator``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from metarec_runner.algos.functional import Params, expand_params, inner_loop


def supports_touched_rows(model: nn.Module) -> bool:
    """Whether ``model`` offers the touched-row protocol (see the module docstring)."""
    return (
        isinstance(getattr(model, "table_name", None), str)
        and callable(getattr(model, "table_rows", None))
        and callable(getattr(model, "forward_rows", None))
    )


def touched_rows(codes: Tensor, keep: Tensor, n_rows: int) -> Tensor:
    """Sorted distinct table rows each task reads, padded with ``n_rows``; no loop over tasks.

    Args:
        codes: ``[B, L, C]`` table rows read by every column of every row.
        keep: ``[B, L, C]`` bool; False entries (padding rows, empty bag slots) are not counted.
        n_rows: the table's row count ``V`` (the padding value, above every real row).

    Returns:
        ``rows [B, U]``: task ``b``'s distinct rows ascending, then ``V``; ``U >= 1``.
    """
    batch = codes.shape[0]
    flat = codes.reshape(batch, -1).masked_fill(~keep.reshape(batch, -1), n_rows)
    ordered = flat.sort(-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered < n_rows
    width = max(int(first.sum(1).max()), 1) if batch else 1
    slot = torch.where(first, first.cumsum(1) - 1, width)  # non-first entries go to a spare slot
    rows = ordered.new_full((batch, width + 1), n_rows)
    rows.scatter_(1, slot, ordered)
    rows[:, width] = n_rows
    return rows[:, :width].contiguous()


def locate(rows: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of ``codes [B, L, C]`` in each task's sorted ``rows [B, U]``.

    Returns:
        ``(pos [B, L, C], hit [B, L, C])``: ``rows[b, pos] == codes`` where ``hit``; ``pos`` is
        a valid index (meaningless) where not.
    """
    batch = codes.shape[0]
    flat = codes.reshape(batch, -1)
    pos = torch.searchsorted(rows, flat).clamp_max(rows.shape[1] - 1)
    hit = rows.gather(1, pos) == flat
    return pos.view_as(codes), hit.view_as(codes)


def _gather(values: Tensor, pos: Tensor) -> Tensor:
    """``values [B, U, d]`` at per-task positions ``pos [B, L, C]`` -> ``[B, L, C, d]``."""
    task = torch.arange(values.shape[0], device=values.device).view(-1, 1, 1)
    return values[task, pos]


class _LocalTables:
    """The model run on per-task local tables: ``forward_batched(params, local)`` with
    ``params[table] [B, U, d]`` and ``local [B, L, C]`` flat positions into the tables
    extended by one zero row each (see :func:`_flat_local`). Lets
    :func:`~metarec_runner.algos.functional.inner_loop` adapt local tables."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward_batched(self, params: Params, local: Tensor) -> Tensor:
        values = params[self.model.table_name]  # [B, U, d]
        batch, _, dim = values.shape
        table = torch.cat([values, values.new_zeros(batch, 1, dim)], 1).reshape(-1, dim)
        emb = table.index_select(0, local.reshape(-1)).view(*local.shape, dim)
        return self.model.forward_rows(params, emb, None)


def _flat_local(pos: Tensor, keep: Tensor, width: int) -> Tensor:
    """Positions ``pos [B, L, C]`` into ``[B, U]`` tables as flat row numbers of the
    ``[B * (U + 1), d]`` stack of the tables each extended by a zero row; entries not kept
    point at their task's zero row (they contribute nothing, with no mask multiply)."""
    task = torch.arange(pos.shape[0], device=pos.device).view(-1, 1, 1)
    return task * (width + 1) + torch.where(keep, pos, width)


class TouchedFastWeights(Mapping):
    """Per-task fast weights of a whole model, the table kept as touched rows only.

    As a mapping it gives every parameter as explicit ``[B, *shape]`` tensors (the table is
    materialised, ``[B, V, d]``: for inspection and tests); :meth:`forward` never does.

    Attributes:
        model: the model (see :func:`supports_touched_rows`).
        base: ``[V, d]`` the shared table the rows were gathered from.
        rows: ``[B, U]`` each task's touched rows (see :func:`touched_rows`).
        values: ``[B, U, d]`` their adapted values (padding slots hold unused numbers).
        rest: ``{name: [B, *shape]}`` every other parameter's fast weights.
    """

    def __init__(self, model: nn.Module, base: Tensor, rows: Tensor, values: Tensor,
                 rest: Params) -> None:
        self.model, self.base, self.rows, self.values, self.rest = model, base, rows, values, rest

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``[B, L]`` for feature rows ``x [B, L, F_all]`` with every task's weights:
        touched rows from the task's table, the others from the shared one."""
        codes, present = self.model.table_rows(x)
        pos, hit = locate(self.rows, codes)
        emb = torch.where(hit.unsqueeze(-1), _gather(self.values, pos), self.base[codes])
        return self.model.forward_rows(self.rest, emb, present)

    def detach(self) -> TouchedFastWeights:
        """The same weights with no graph, the shared table copied once (not per task): later
        in-place updates of the model do not change them."""
        return TouchedFastWeights(self.model, self.base.detach().clone(), self.rows,
                                  self.values.detach(), {n: p.detach() for n, p in self.rest.items()})

    def task_mean(self, name: str) -> Tensor:
        """The mean over tasks of parameter ``name``'s fast weights, ``[*shape]``, without a
        full table per task (touched rows' changes are summed into the shared table)."""
        if name != self.model.table_name:
            return self.rest[name].mean(0)
        n_rows = self.base.shape[0]
        valid = self.rows < n_rows
        delta = (self.values - self.base[self.rows.clamp_max(n_rows - 1)])[valid]
        total = torch.zeros_like(self.base).index_add_(0, self.rows[valid], delta)
        return self.base + total / self.rows.shape[0]

    def _table(self) -> Tensor:
        batch, n_rows = self.rows.shape[0], self.base.shape[0]
        full = torch.cat([self.base, self.base[:1]]).expand(batch, n_rows + 1, -1).clone()
        index = self.rows.unsqueeze(-1).expand_as(self.values)  # padding slots write row V
        return full.scatter(1, index, self.values)[:, :n_rows]

    def __getitem__(self, name: str) -> Tensor:
        if name == self.model.table_name:
            return self._table()
        return self.rest[name]

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self.model.named_parameters())

    def __len__(self) -> int:
        return len(self.rest) + 1


def touched_inner_loop(
    model: nn.Module,
    support_x: Tensor,
    target: Tensor,
    mask: Tensor,
    lr: float | Mapping[str, Tensor],
    steps: int,
    create_graph: bool,
    detach: bool = False,
    loss: str = "mse",
) -> tuple[TouchedFastWeights, list[Tensor]]:
    """:func:`~metarec_runner.algos.functional.inner_loop` on every parameter of ``model``,
    the table adapted on each task's touched rows only (same numbers as full tables).

    Args:
        model: see :func:`supports_touched_rows`.
        support_x: ``[B, S, F_all]`` support feature rows; target ``[B, S]``; mask ``[B, S]``.
        lr: scalar, or per-parameter step sizes ``{name: [*shape]}`` (Meta-SGD; the table's
            are gathered at the touched rows, so they get gradients there only).
        steps, create_graph, detach, loss: see ``inner_loop`` and ``expand_params``.

    Returns:
        ``(fast weights, [per-task support loss [B] before each step])``.
    """
    name = model.table_name
    base = model.get_parameter(name)
    if detach:
        base = base.detach()
    n_rows = base.shape[0]
    codes, present = model.table_rows(support_x)
    keep = mask.unsqueeze(-1).expand_as(codes)
    if present is not None:
        keep = keep & present
    rows = touched_rows(codes, keep, n_rows)
    gather_rows = rows.clamp_max(n_rows - 1)
    pos, hit = locate(rows, codes)
    local = _flat_local(pos, keep & hit, rows.shape[1])  # padding and empty bag slots read 0
    values = base[gather_rows]  # [B, U, d]
    if detach:
        values.requires_grad_(True)
    params = {name: values, **expand_params(model, rows.shape[0], detach=detach, skip={name})}
    if isinstance(lr, Mapping):
        lr = {**lr, name: lr[name][gather_rows]}
    params, losses = inner_loop(_LocalTables(model), params, local, target, mask, lr, steps,
                                create_graph, loss)
    values = params.pop(name)
    return TouchedFastWeights(model, base, rows, values, params), losses
