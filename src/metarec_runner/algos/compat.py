"""Which algorithm works with which model: a requirements table checked when an algo is built.

Capabilities a model can provide:

- ``rowwise``: scores each feature row on its own (``model(x)``, ``forward_batched``); every
  gradient-based algorithm (MAML, FOMAML, Reptile, finetune, global, ...) needs it.
- ``head``: a ``body(x)`` / ``head`` split, needed by ``adapt: head``.
- ``item_embedding``: ``item_embedding(x [..., F]) -> [..., d]`` and ``item_embedding_dim``,
  needed by the metric algorithms (protonet, matchingnet): the model's vector for the row's
  item. Over the default fields it also embeds the row's user side features; within a user's
  task those are one constant, so a prototype's centred weights cancel them and attention
  sees a per-task constant. On the toy catalog this richer vector is what makes metric
  methods work (item ids alone do not carry the category structure early in training).
- ``sequence``: reads the user's support set itself (``encode_support(support_x, support_y,
  support_mask) -> state [B, H]`` and ``score(state, x) -> [B, L]``); only algorithms that hand
  the model the support set (protonet) can use it, and such a model is not ``rowwise``.

A model declares what it provides in a class attribute ``provides``; MeLU's
:class:`~metarec_runner.models.preference.PreferenceEstimator` is described here (its item
embedding is its body, the concatenated embeddings of all its fields).
An algorithm class not in :data:`ALGO_REQUIRES` is a gradient-based one (``rowwise``, plus
``head`` under ``adapt: head``). An incompatible pair raises one line naming both.
"""

from __future__ import annotations

from torch import Tensor, nn

from metarec_runner.errors import ConfigError
from metarec_runner.models.preference import PreferenceEstimator

#: config option name of each model class
MODEL_NAMES: dict[str, str] = {
    "PreferenceEstimator": "melu",
    "MatrixFactorization": "mf",
    "FactorizationMachine": "fm",
    "LinearModel": "linear",
    "MLPRecommender": "mlp",
    "GRUSequenceModel": "gru",
}

#: what each model provides with its default config (used to suggest alternatives)
MODEL_PROVIDES: dict[str, frozenset[str]] = {
    "melu": frozenset({"rowwise", "head", "item_embedding"}),
    "mf": frozenset({"rowwise", "head", "item_embedding"}),
    "fm": frozenset({"rowwise", "head", "item_embedding"}),
    "linear": frozenset({"rowwise", "head"}),
    "mlp": frozenset({"rowwise", "head", "item_embedding"}),
    "gru": frozenset({"item_embedding", "sequence"}),
}

#: config option name(s) of each algorithm class and the capabilities it needs
#: (``None`` = gradient-based: ``rowwise``, plus ``head`` under ``adapt: head``)
ALGO_REQUIRES: dict[str, tuple[str, frozenset[str] | None]] = {
    "MAML": ("maml/fomaml", None),
    "MetaSGD": ("metasgd", None),
    "Reptile": ("reptile", None),
    "GlobalModel": ("global", None),
    "Finetune": ("finetune", None),
    "ProtoNet": ("protonet", frozenset({"item_embedding"})),
    "MatchingNet": ("matchingnet", frozenset({"item_embedding"})),
}

_WHAT = {
    "rowwise": "a model that scores rows on their own (it never passes the support set to the model)",
    "head": "a model with a body/head split (adapt: head)",
    "item_embedding": "a model with item embeddings",
}
_LACKS = {
    "rowwise": "reads the user's support sequence",
    "head": "has no head",
    "item_embedding": "has none",
}


def model_name(model: nn.Module) -> str:
    """The config option name of ``model`` (its class name if unknown)."""
    return MODEL_NAMES.get(type(model).__name__, type(model).__name__)


def capabilities(model: nn.Module) -> frozenset[str]:
    """What ``model`` provides (see the module docstring)."""
    if isinstance(model, PreferenceEstimator):
        return frozenset({"rowwise", "head", "item_embedding"})
    declared = getattr(model, "provides", None)
    if declared is not None:
        return frozenset(declared)
    caps = set()  # an unlisted model: read its methods
    if callable(getattr(model, "encode_support", None)):
        caps.add("sequence")
    else:
        caps.add("rowwise")
    if callable(getattr(model, "body", None)) and isinstance(getattr(model, "head", None), nn.Module):
        caps.add("head")
    if callable(getattr(model, "item_embedding", None)):
        caps.add("item_embedding")
    return frozenset(caps)


def requirements(algo: object) -> tuple[str, frozenset[str]]:
    """``(algo name, needed capabilities)`` of an algorithm object (its ``scope`` set)."""
    cls = type(algo).__name__
    name, needs = ALGO_REQUIRES.get(cls, (cls, None))
    if needs is None:
        needs = frozenset({"rowwise", "head"} if getattr(algo, "scope", "all") == "head" else {"rowwise"})
    return name, needs


def check_compatible(algo: object, model: nn.Module) -> None:
    """Raise a one-line :class:`ConfigError` unless ``model`` provides what ``algo`` needs."""
    name, needs = requirements(algo)
    have = capabilities(model)
    missing = [c for c in ("rowwise", "head", "item_embedding") if c in needs and c not in have]
    if not missing:
        return
    need = missing[0]
    fits = sorted(m for m, caps in MODEL_PROVIDES.items() if needs <= caps)
    fix = f"use model={_or(fits)}" if fits else "use another model"
    if need == "head":
        fix = f"use algo.adapt=all or {fix}"
    if need == "rowwise" and "sequence" in have:
        fix = f"use algo=protonet with model={model_name(model)}, or {fix}"
    raise ConfigError(
        "model",
        f"algo {name} needs {_WHAT[need]}; model {model_name(model)} {_LACKS[need]}; {fix}",
    )


def _or(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# -- the item-embedding protocol ---------------------------------------------------------------


def item_embedding_dim(model: nn.Module) -> int:
    """Size ``d`` of ``model``'s item embeddings."""
    if isinstance(model, PreferenceEstimator):
        return int(model.embedding.embedding_dim) * len(model.fields)
    return int(model.item_embedding_dim)


def item_embedding(model: nn.Module, x: Tensor) -> Tensor:
    """Item embeddings ``[..., d]`` of feature rows ``x [..., F_all]``.

    MeLU's is its whole body: the concatenated embeddings of all its fields (``F * d``).
    """
    if isinstance(model, PreferenceEstimator):
        return model.body(x)
    return model.item_embedding(x)
