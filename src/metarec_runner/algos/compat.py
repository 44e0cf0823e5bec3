"""Which algorithm works with which model, read from class attributes; checked when an algo is built.

A model class declares what it **provides**, an algorithm class what it **requires** (and what
it **uses** when a model has it), as class attributes::

    class MyModel(nn.Module):
        provides = frozenset({"rowwise", "head", "item_embedding"})

    class MyAlgo(SupportSGD):
        requires = frozenset({"rowwise"})   # inherited from SupportSGD anyway

They are read with ``getattr`` on the class, i.e. through the MRO: a subclass inherits its
parent's declaration (``class MyProtoNet(ProtoNet): pass`` accepts exactly the models
``ProtoNet`` accepts) and may replace it with its own. There is no table of class names.

Capabilities (:data:`CAPABILITIES`):

- ``rowwise``: scores each feature row on its own (``model(x)``, ``forward_batched``); every
  gradient-based algorithm (MAML, FOMAML, Meta-SGD, Reptile, finetune, global) needs it.
- ``head``: a ``body(x)`` / ``head`` split, needed by ``adapt: head`` (an algorithm object whose
  ``scope`` is ``head`` requires it on top of its class's ``requires``).
- ``item_embedding``: ``item_embedding(x [..., F]) -> [..., d]`` and ``item_embedding_dim``,
  needed by the metric algorithms (protonet, matchingnet): the model's vector for the row's
  item. Over the default fields it also embeds the row's user side features; within a user's
  task those are one constant, so a prototype's centred weights cancel them and attention
  sees a per-task constant. On the toy catalog this richer vector is what makes metric
  methods work (item ids alone do not carry the category structure early in training).
- ``sequence``: reads the user's support set itself (``encode_support(support_x, support_y,
  support_mask) -> state [B, H]`` and ``score(state, x) -> [B, L]``); only an algorithm that
  hands the model the support set (``uses`` it: protonet) makes use of it, and such a model is
  not ``rowwise``.
- ``catalog``: scores a user state against every item of the catalog in one matmul (the set
  encoder), needed by the set ranker's softmax over the catalog.
- ``item_ids``: reads the row's item id, needed by an algorithm object whose loss ranks sampled
  negatives (``bpr``, ``softmax``, ``bce`` with ``negatives``; ``algos.ranking_loss``): without
  ids a negative sharing a positive's side features gets its score. A model object provides it
  when one of its field embeddings (a submodule's ``fields``) includes ``item_id``; a class may
  declare it. A ranking loss on a model without it stops with one line naming ``loss``.

A model class without a ``provides`` attribute is taken as a plain row scorer (``rowwise``
only). An algorithm class without ``requires`` needs nothing (:class:`MetaAlgorithm`'s default,
so the reference scorers accept every model).

Config names in messages and in :func:`render_table` come from the config folder
(:func:`~metarec_runner.paths.conf_dir`): an option names a class through its ``_target_``, its
own or one inherited from its ``defaults`` (``fomaml`` and ``melu`` build ``MAML``). A class no
option builds is named by its class name. An incompatible pair raises one line that names both
and the models (and algorithms) that would work, computed from the built-in classes'
attributes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from metarec_runner.errors import ConfigError
from metarec_runner.paths import conf_dir

#: the capability vocabulary, in the order missing capabilities are reported
CAPABILITIES: dict[str, str] = {
    "rowwise": "scores each feature row on its own (model(x), forward_batched)",
    "head": "a body(x) / head split (adapt: head)",
    "item_embedding": "item_embedding(x) -> [..., d] and item_embedding_dim",
    "sequence": "encode_support(support_x, support_y, support_mask) and score(state, x)",
    "catalog": "scores a user state against the whole catalog in one matmul (catalog_scores)",
    "item_ids": "reads the item id of a row (a field embedding over item_id)",
}

#: what an algorithm needing a capability needs, as the error message says it
_WHAT = {
    "rowwise": "a model that scores rows on their own (it never passes the support set to the model)",
    "head": "a model with a body/head split (adapt: head)",
    "item_embedding": "a model with item embeddings",
    "sequence": "a model that reads the support sequence",
    "catalog": "a model that scores the whole catalog from a user state (model=set_encoder)",
    "item_ids": "a model that reads item ids",
}
#: what a model lacking a capability is, as the error message says it (``model X ...``)
_LACKS = {
    "rowwise": "does not score rows on its own",
    "head": "has no head",
    "item_embedding": "has none",
    "sequence": "does not read the support sequence",
    "catalog": "does not score the whole catalog from a user state",
    "item_ids": "does not read item_id",
}
#: a README table cell for a lacking model (``no: ...``)
_CELL_LACKS = {
    "rowwise": "does not score rows on its own",
    "head": "no body/head split",
    "item_embedding": "no item embeddings",
    "sequence": "does not read the support sequence",
    "catalog": "no catalog scoring",
    "item_ids": "no item ids",
}
#: a README table cell for a model whose capability the algorithm uses (``yes (...)``)
_CELL_USES = {
    "rowwise": "scores rows",
    "head": "adapts the head",
    "item_embedding": "its item embeddings",
    "sequence": "its state over the support sequence",
    "catalog": "scores the catalog",
    "item_ids": "reads item ids",
}
#: a README table row label for algorithms requiring a set of capabilities
_ROW_NEEDS = {
    "rowwise": "gradient-based",
    "head": "need a head",
    "item_embedding": "need item embeddings",
    "sequence": "need a sequence model",
    "catalog": "need a catalog scorer",
    "item_ids": "need item ids",
}

TABLE_HEADER = "algo \\ model"
"""The top-left cell of the compatibility table (how tests find it in README.md)."""


# -- reading the attributes ---------------------------------------------------------------------


def _class(obj: object) -> type:
    return obj if isinstance(obj, type) else type(obj)


def reads_item_ids(model: nn.Module) -> bool:
    """Whether a model object embeds the ``item_id`` field (a submodule's ``fields`` has it)."""
    return any("item_id" in getattr(m, "fields", ()) for m in model.modules()
               if isinstance(getattr(m, "fields", None), tuple | list))


def provided(model: nn.Module | type) -> frozenset[str]:
    """What a model (object or class) provides: its class's ``provides`` (through the MRO),
    ``{"rowwise"}`` if it declares none; a model object also provides ``item_ids`` when it
    reads them (:func:`reads_item_ids`)."""
    declared = getattr(_class(model), "provides", None)
    have = frozenset({"rowwise"}) if declared is None else frozenset(declared)
    if isinstance(model, nn.Module) and "item_ids" not in have and reads_item_ids(model):
        have |= {"item_ids"}
    return have


def used(algo: object) -> frozenset[str]:
    """The optional capabilities an algorithm (object or class) makes use of when a model has
    them: its class's ``uses`` (through the MRO)."""
    return frozenset(getattr(_class(algo), "uses", ()))


def required(algo: object, adapt: str | None = None) -> frozenset[str]:
    """What an algorithm (object or class) requires of its model.

    Its class's ``requires`` (through the MRO), plus ``head`` when it adapts the head only:
    ``adapt == "head"``, or for an object with ``adapt=None``, its ``scope`` is ``head``; plus
    ``item_ids`` for an object whose loss ranks sampled negatives (its ``ranking`` is set).
    """
    needs = set(getattr(_class(algo), "requires", ()))
    if not isinstance(algo, type) and getattr(algo, "ranking", None) is not None:
        needs.add("item_ids")
    if adapt is None and not isinstance(algo, type):
        adapt = getattr(algo, "scope", None)
    if adapt == "head":
        needs.add("head")
    return frozenset(needs)


def missing(algo: object, model: nn.Module | type, adapt: str | None = None) -> list[str]:
    """Capabilities ``algo`` requires that ``model`` lacks, in :data:`CAPABILITIES` order
    (empty: compatible). Arguments may be objects or classes (see :func:`required`)."""
    needs, have = required(algo, adapt), provided(model)
    order = [*CAPABILITIES, *sorted(needs - CAPABILITIES.keys())]
    return [c for c in order if c in needs and c not in have]


def compatible(algo: object, model: nn.Module | type, adapt: str | None = None) -> bool:
    """Whether ``model`` provides everything ``algo`` requires (see :func:`missing`)."""
    return not missing(algo, model, adapt)


# -- the config options -------------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    """The YAML mapping in ``path`` (None if it is not one, or cannot be read: such an option
    names no class here)."""
    try:
        node = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, yaml.YAMLError, OmegaConfBaseException):
        return None
    return node if isinstance(node, dict) else None


def _target(folder: Path, option: str, seen: frozenset[str] = frozenset()) -> str | None:
    """The ``_target_`` of ``folder/option.yaml``: its own, else the last one its same-group
    ``defaults`` entries give it (None if none, or the file cannot be read)."""
    node = _load(folder / f"{option}.yaml")
    if node is None:
        return None
    if isinstance(node.get("_target_"), str):
        return node["_target_"]
    defaults = node.get("defaults") or []
    for entry in reversed(defaults if isinstance(defaults, list) else []):
        if isinstance(entry, str) and entry != "_self_" and entry not in seen:
            target = _target(folder, entry, seen | {option})
            if target is not None:
                return target
    return None


def _import(target: str) -> type | None:
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def builtin_classes(group: str) -> dict[str, type]:
    """``{option: class}`` of every option of config group ``group`` (``algo``, ``model``)
    whose ``_target_`` is a class, in option order."""
    folder = conf_dir() / group
    out: dict[str, type] = {}
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        target = _target(folder, path.stem)
        cls = _import(target) if target else None
        if cls is not None:
            out[path.stem] = cls
    return out


def option_names(group: str, obj: object) -> list[str]:
    """The options of ``group`` that build exactly ``obj``'s class (an option whose own file has
    the ``_target_`` first, then those inheriting it), or ``[class name]`` if none does."""
    cls = _class(obj)
    folder = conf_dir() / group
    names = [n for n, c in builtin_classes(group).items() if c is cls]
    if not names:
        return [cls.__name__]
    own = [n for n in names if "_target_" in (_load(folder / f"{n}.yaml") or {})]
    return own + [n for n in names if n not in own]


def _name(group: str, obj: object) -> str:
    return "/".join(option_names(group, obj))


def _or(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# -- the check ----------------------------------------------------------------------------------


def check_compatible(algo: object, model: nn.Module | type, adapt: str | None = None) -> None:
    """Raise a one-line :class:`ConfigError` (key ``model``; ``algo.model`` once built under
    the ``algo`` group) unless ``model`` provides what ``algo`` requires.

    The message names the algorithm, the model, what is missing and the fix: the built-in
    models that would work, ``algo.adapt=all`` for a missing head, and the built-in algorithms
    that use what this model has (``algo=protonet`` for ``model=gru``).
    """
    lacking = missing(algo, model, adapt)
    if not lacking:
        return
    need, needs, have = lacking[0], required(algo, adapt), provided(model)
    model_name = _name("model", model)
    if need == "item_ids":
        raise ConfigError("loss", f"loss={algo.loss} ranks sampled negatives against the user's items, "
                          f"which needs a model that reads item ids; model {model_name} does not read "
                          "item_id; add item_id to model.fields / model.item_fields (or set them to "
                          "null), or use loss=mse")
    fits = [n for n, cls in sorted(builtin_classes("model").items()) if needs <= provided(cls)]
    fix = f"use model={_or(fits)}" if fits else "use another model"
    if need == "head":
        fix = f"use algo.adapt=all or {fix}"
    others = _algos_using(have, model)
    if others:
        fix = f"use algo={_or(others)} with model={model_name}, or {fix}"
    if getattr(_class(model), "provides", None) is None:
        fix = (f"{fix}, or declare {need!r} in a `provides` class attribute of "
               f"{_class(model).__name__} if it has it")
    lacks = _LACKS.get(need, f"lacks {need}")
    if need == "rowwise" and "sequence" in have:
        lacks = "reads the user's support sequence"
    raise ConfigError(
        "model",
        f"algo {_name('algo', algo)} needs {_WHAT.get(need, f'a model with {need}')}; "
        f"model {model_name} {lacks}; {fix}",
    )


def _algos_using(have: Iterable[str], model: object) -> list[str]:
    """Built-in algorithm options that accept ``model`` and use one of its capabilities."""
    have = frozenset(have)
    return [n for n, cls in sorted(builtin_classes("algo").items())
            if used(cls) & have and compatible(cls, model, "all")]


# -- the README table ---------------------------------------------------------------------------


def cell(algo: object, model: nn.Module | type) -> str:
    """One cell of :func:`render_table`: ``yes``, ``yes (what it uses)`` or ``no: what lacks``."""
    lacking = missing(algo, model)
    if lacking:
        have = provided(model)
        if lacking[0] == "rowwise" and "sequence" in have:
            return "no: reads the support sequence"
        return "no: " + _CELL_LACKS.get(lacking[0], f"lacks {lacking[0]}")
    uses = [c for c in CAPABILITIES if c in used(algo) & provided(model)]
    return f"yes ({', '.join(_CELL_USES.get(c, c) for c in uses)})" if uses else "yes"


def render_table() -> str:
    """The README's compatibility table, from the built-in classes' attributes.

    One column per model option, one row per group of algorithm options with the same
    requirements and the same cells (their classes' ``requires`` and ``uses``; ``adapt: head``
    also needs ``head``, which the note under the table states). Rows requiring something come
    first, in the order of their first option.
    """
    models = builtin_classes("model")
    rows: dict[tuple[frozenset[str], tuple[str, ...]], list[str]] = {}
    for option, cls in builtin_classes("algo").items():
        cells = tuple(cell(cls, m) for m in models.values())
        rows.setdefault((required(cls), cells), []).append(option)
    lines = [
        f"| {TABLE_HEADER} | " + " | ".join(f"`{m}`" for m in models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for (needs, cells), options in sorted(rows.items(), key=lambda kv: (not kv[0][0], kv[1][0])):
        label = ", ".join(f"`{o}`" for o in options)
        label += f" ({', '.join(_ROW_NEEDS.get(c, c) for c in CAPABILITIES if c in needs)})" if needs \
            else " (need nothing of the model)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
