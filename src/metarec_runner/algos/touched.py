"""Touched-row adaptation: adapt only the embedding rows each task's support set reads.

Full-table SGD on an embedding table gives every row a task's support set does not read a zero
gradient, so those rows keep their initial values. Adapting a module's tables therefore needs,
per task, only the rows its support set touches: they are gathered (all tasks at once) into a
small per-task table ``values [B, U, d]`` (``U`` = the most distinct rows any task of the batch
reads), adapted with the rest of the module's per-task weights by the ordinary batched inner
loop, and looked up for query rows by a per-task ``searchsorted``; rows a task did not touch
fall back to the shared table. The numbers are those of full-table SGD (tested to 1e-10 in
float64), second order included (the gather ``W[rows]`` is differentiable), without a
``[B, V, d]`` copy of the table per task: memory is ``O(rows touched)``.

The row-sparse weights live in the shared embedding layer: a submodule that declares
``row_sparse = "<parameter name>"`` (:class:`~metarec_runner.models.fields.FieldEmbedding`) reads
that parameter's fast weights as a :class:`~metarec_runner.models.fields.RowSparseTable` in its
own lookups and builds them with ``gather_rows(x, mask, base)``. A module honours touched rows
when it holds such a layer and its ``forward_batched`` is exact for its class
(:func:`supports_touched_rows`): mf, fm, linear, mlp and the MeLU estimator.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor, nn

from metarec_runner.algos.functional import (
    FastWeights,
    Params,
    expand_params,
    has_exact_fast_path,
    inner_loop,
)
from metarec_runner.models.fields import RowSparseTable, locate, touched_rows

__all__ = ["TouchedFastWeights", "locate", "row_sparse_tables", "supports_touched_rows",
           "touched_inner_loop", "touched_rows"]


def row_sparse_tables(module: nn.Module) -> dict[str, nn.Module]:
    """``{parameter name in module: layer}`` of every embedding layer of ``module`` whose table
    takes row-sparse fast weights (a ``row_sparse`` class attribute naming the parameter)."""
    out: dict[str, nn.Module] = {}
    for prefix, layer in module.named_modules():
        name = getattr(type(layer), "row_sparse", None)
        if isinstance(name, str) and isinstance(getattr(layer, name, None), nn.Parameter):
            out[f"{prefix}.{name}" if prefix else name] = layer
    return out


def supports_touched_rows(module: nn.Module) -> bool:
    """Whether ``module`` can adapt its tables on touched rows: it has a row-sparse embedding
    layer and an exact ``forward_batched`` (see ``functional.has_exact_fast_path``)."""
    return bool(row_sparse_tables(module)) and has_exact_fast_path(module, "forward_batched")


class TouchedFastWeights(FastWeights):
    """Per-task fast weights of a module, its tables kept as touched rows only.

    As a mapping it gives every parameter as explicit ``[B, *shape]`` tensors (a table is
    materialised, ``[B, V, d]``: for inspection and tests); :meth:`forward` never does.

    Attributes:
        module: the adapted module (see :func:`supports_touched_rows`).
        tables: ``{name: RowSparseTable}`` of every row-sparse table.
        rest: ``{name: [B, *shape]}`` every other parameter's fast weights.
    """

    def __init__(self, module: nn.Module, tables: dict[str, RowSparseTable], rest: Params,
                 features=None) -> None:
        self.module, self.tables, self.rest, self.features = module, tables, rest, features

    @property
    def values(self) -> Tensor:
        """``[B, U, d]`` the adapted touched rows of the module's only table."""
        (table,) = self.tables.values()
        return table.values

    def forward(self, h: Tensor) -> Tensor:
        """Scores ``[B, L]`` for the module's inputs ``h`` (feature rows) with every task's
        weights: touched rows from the task's table, the others from the shared one."""
        return self.module.forward_batched({**self.rest, **self.tables}, h)

    def detach(self) -> TouchedFastWeights:
        """No graph; each shared table copied once (not per task)."""
        return TouchedFastWeights(self.module, {n: t.detach() for n, t in self.tables.items()},
                                  {n: p.detach() for n, p in self.rest.items()}, self.features)

    def task_mean(self, name: str) -> Tensor:
        """The mean over tasks of parameter ``name``'s fast weights, ``[*shape]``, without a
        full table per task (touched rows' changes are summed into the shared table)."""
        if name in self.tables:
            return self.tables[name].task_mean()
        return self.rest[name].mean(0)

    def __getitem__(self, name: str) -> Tensor:
        if name in self.tables:
            return self.tables[name].dense()
        return self.rest[name]

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self.module.named_parameters())


def touched_inner_loop(
    module: nn.Module,
    inputs: Tensor,
    target: Tensor,
    mask: Tensor,
    lr: float | Mapping[str, Tensor],
    steps: int,
    create_graph: bool,
    detach: bool = False,
    loss: str = "mse",
) -> tuple[TouchedFastWeights, list[Tensor]]:
    """:func:`~metarec_runner.algos.functional.inner_loop` on every parameter of ``module``,
    its tables adapted on each task's touched rows only (same numbers as full tables).

    Args:
        module: see :func:`supports_touched_rows`.
        inputs: ``[B, S, F_all]`` support feature rows (the module's inputs); target ``[B, S]``;
            mask ``[B, S]``.
        lr: scalar, or per-parameter step sizes ``{name: [*shape]}`` (Meta-SGD; a table's are
            gathered at the touched rows, so they get gradients there only).
        steps, create_graph, detach, loss: see ``inner_loop`` and ``expand_params``.

    Returns:
        ``(fast weights, [per-task support loss [B] before each step])``.
    """
    layers = row_sparse_tables(module)
    tables: dict[str, RowSparseTable] = {}
    for name, layer in layers.items():
        base = module.get_parameter(name)
        table = layer.gather_rows(inputs, mask, base.detach() if detach else base)
        if detach:
            table.values.requires_grad_(True)
        tables[name] = table
    params = {**{n: t.values for n, t in tables.items()},
              **expand_params(module, inputs.shape[0], detach=detach, skip=set(layers))}
    if isinstance(lr, Mapping):
        n_rows = {n: t.base.shape[0] for n, t in tables.items()}
        lr = {**lr, **{n: lr[n][t.rows.clamp_max(n_rows[n] - 1)] for n, t in tables.items()}}

    def forward(p: Params, h: Tensor) -> Tensor:
        local = {n: tables[n].with_values(p[n]) for n in tables}
        return module.forward_batched({**p, **local}, h)

    params, losses = inner_loop(module, params, inputs, target, mask, lr, steps, create_graph,
                                loss, forward=forward)
    adapted = {n: tables[n].with_values(params.pop(n), keep_support=False) for n in tables}
    return TouchedFastWeights(module, adapted, params), losses
