"""Capabilities on the classes: models declare ``provides``, algorithms ``requires``/``uses``,
read through the MRO (a subclass of every built-in algorithm and model keeps its parent's
verdicts, by the attributes and when actually built), the declarations match the models'
methods, and README.md's compatibility table is the one the attributes render."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hydra.utils import instantiate

from metarec_runner.algos import compat
from metarec_runner.algos.compat import (
    TABLE_HEADER,
    builtin_classes,
    check_compatible,
    compatible,
    missing,
    option_names,
    provided,
    render_table,
)
from metarec_runner.algos.maml import MAML
from metarec_runner.algos.metric import ProtoNet
from metarec_runner.errors import ConfigError
from metarec_runner.models.gru import GRUSequenceModel
from metarec_runner.models.linear import LinearModel
from metarec_runner.paths import conf_dir
from tests.helpers import SMALL_SCHEMA, compose

README = Path(__file__).resolve().parents[1] / "README.md"
ALGOS = builtin_classes("algo")
MODELS = builtin_classes("model")
ALGO_CLASSES = list(dict.fromkeys(ALGOS.values()))  # each class once (maml, fomaml, melu: MAML)
MODEL_CLASSES = list(MODELS.values())
ADAPTS = (None, "head", "all")


def _subclass(cls: type) -> type:
    """``class MyX(X): pass`` for a built-in class ``X``."""

    class MyX(cls):
        pass

    MyX.__name__ = MyX.__qualname__ = f"My{cls.__name__}"
    return MyX


def test_every_option_names_a_class():
    assert set(ALGOS) == {p.stem for p in (conf_dir() / "algo").glob("*.yaml")}
    assert set(MODELS) == {p.stem for p in (conf_dir() / "model").glob("*.yaml")}
    assert option_names("algo", MAML) == ["maml", "fomaml", "melu"]  # own _target_ first
    assert option_names("model", GRUSequenceModel) == ["gru"]
    assert option_names("algo", _subclass(ProtoNet)) == ["MyProtoNet"]  # no option builds it


@pytest.mark.parametrize("algo", ALGO_CLASSES, ids=lambda c: c.__name__)
def test_a_subclass_of_every_algorithm_has_its_parents_verdicts(algo):
    sub = _subclass(algo)
    for model in [*MODEL_CLASSES, *map(_subclass, MODEL_CLASSES)]:
        for adapt in ADAPTS:
            assert missing(sub, model, adapt) == missing(algo, model, adapt), (model, adapt)
            assert compatible(sub, model, adapt) == compatible(algo, model, adapt)


@pytest.mark.parametrize("model", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_a_subclass_of_every_model_has_its_parents_verdicts(model):
    sub = _subclass(model)
    assert provided(sub) == provided(model)
    for algo in [*ALGO_CLASSES, *map(_subclass, ALGO_CLASSES)]:
        for adapt in ADAPTS:
            assert missing(algo, sub, adapt) == missing(algo, model, adapt), (algo, adapt)
            assert compatible(algo, sub, adapt) == compatible(algo, model, adapt)


def _partial(group: str, option: str):
    cfg = compose(f"+algo={option}" if group == "algo" else f"model={option}", "logger=none")
    return instantiate(cfg[group], _partial_=True)


def _built(algo_cls: type, algo_kw, model_cls: type, model_kw) -> str | None:
    """Build ``algo_cls(model=model_cls(...))``: None, or the ConfigError's message."""
    torch.manual_seed(0)
    model = model_cls(*model_kw.args, **model_kw.keywords, schema=SMALL_SCHEMA, rating_mean=3.0)
    try:
        algo_cls(*algo_kw.args, **algo_kw.keywords, model=model)
    except ConfigError as e:
        assert e.key == "model" and "\n" not in str(e)
        return e.message
    return None


@pytest.mark.parametrize("option", list(ALGOS))
def test_built_subclasses_are_accepted_or_refused_as_their_parents(option):
    """The issue's case: ``class MyProtoNet(ProtoNet)`` with ``model=gru`` is built as
    ``ProtoNet`` is; every pair's message is the parent's with the class names in."""
    algo_kw = _partial("algo", option)
    algo, my_algo = algo_kw.func, _subclass(algo_kw.func)
    for model_option in MODELS:
        model_kw = _partial("model", model_option)
        model, my_model = model_kw.func, _subclass(model_kw.func)
        parent = _built(algo, algo_kw, model, model_kw)
        assert (parent is None) == compatible(algo, model, algo_kw.keywords.get("adapt"))
        names = {"/".join(option_names("algo", algo)): my_algo.__name__,
                 model_option: my_model.__name__}
        for a in (algo, my_algo):
            for m in (model, my_model):
                got = _built(a, algo_kw, m, model_kw)
                assert (got is None) == (parent is None), (a, m)
                if got is not None:
                    assert _normalise(got, names) == parent, (a, m)


def _normalise(message: str, names: dict[str, str]) -> str:
    """``message`` with the subclasses' names replaced by their parents' option names."""
    for parent, sub in names.items():
        message = re.sub(rf"\b{re.escape(sub)}\b", parent, message)
    return message


@pytest.mark.parametrize("option", list(MODELS))
def test_declared_capabilities_match_the_models_methods(option):
    """``provides`` is the single source, so it must be true: each capability's protocol works,
    and a model with the methods of ``head``/``item_embedding``/``sequence`` declares it."""
    kw = _partial("model", option)
    model = kw.func(*kw.args, **kw.keywords, schema=SMALL_SCHEMA, rating_mean=3.0)
    caps = provided(model)
    assert caps <= compat.CAPABILITIES.keys()
    x = torch.zeros(2, 3, len(SMALL_SCHEMA.names), dtype=torch.long)
    y, mask = torch.full((2, 3), 3.0), torch.ones(2, 3, dtype=torch.bool)
    if "rowwise" in caps:
        assert model(x).shape == (2, 3)
    has_head = callable(getattr(model, "body", None)) and isinstance(getattr(model, "head", None),
                                                                    torch.nn.Module)
    assert ("head" in caps) == has_head
    if has_head:
        assert model.head(model.body(x)).shape == (2, 3)
    has_emb = callable(getattr(model, "item_embedding", None))
    assert ("item_embedding" in caps) == has_emb
    if has_emb:
        assert model.item_embedding(x).shape == (2, 3, model.item_embedding_dim)
    has_seq = callable(getattr(model, "encode_support", None))
    assert ("sequence" in caps) == has_seq
    assert not ("sequence" in caps and "rowwise" in caps)
    if has_seq:
        assert model.score(model.encode_support(x, y, mask), x).shape == (2, 3)


def test_every_rowwise_model_has_a_head():
    """What the note under README's table says (``adapt: head`` refuses none of them)."""
    for cls in MODEL_CLASSES:
        if "rowwise" in provided(cls):
            assert "head" in provided(cls), cls


# -- messages -----------------------------------------------------------------------------------


def test_messages_name_the_pair_and_the_models_that_fit():
    with pytest.raises(ConfigError) as err:
        check_compatible(ProtoNet, LinearModel)
    assert str(err.value) == ("model: algo protonet needs a model with item embeddings; model linear "
                              "has none; use model=fm, gru, melu, mf, mlp or two_tower")
    with pytest.raises(ConfigError) as err:
        check_compatible(MAML, GRUSequenceModel, adapt="head")
    assert str(err.value) == (
        "model: algo maml/fomaml/melu needs a model that scores rows on their own (it never passes "
        "the support set to the model); model gru reads the user's support sequence; use "
        "algo=protonet with model=gru, or use model=fm, linear, melu, mf, mlp or two_tower")
    check_compatible(_subclass(ProtoNet), GRUSequenceModel)  # the MyProtoNet: accepted


def test_an_undeclared_model_is_a_row_scorer_and_is_told_how_to_declare():
    class NoHead(torch.nn.Module):
        def forward(self, x):
            return x[..., 0].float()

    assert provided(NoHead) == {"rowwise"}
    check_compatible(MAML, NoHead, adapt="all")
    with pytest.raises(ConfigError, match=r"model NoHead has no head; use algo\.adapt=all or use "
                       r"model=fm, linear, melu, mf, mlp or two_tower, or declare 'head' in a `provides`"):
        check_compatible(MAML, NoHead, adapt="head")

    class Declared(NoHead):
        provides: ClassVar[frozenset[str]] = frozenset({"rowwise", "head"})

    check_compatible(MAML, Declared, adapt="head")


class CustomModel(torch.nn.Module):
    """A user's model with item embeddings, added as a config option in the test below."""

    provides: ClassVar[frozenset[str]] = frozenset({"rowwise", "head", "item_embedding"})


def test_suggestions_come_from_the_options_classes(tmp_path, monkeypatch):
    """A model option added to the config folder is suggested from its class's attributes."""
    for group in ("algo", "model"):
        shutil.copytree(conf_dir() / group, tmp_path / group)
    (tmp_path / "model" / "custom.yaml").write_text("_target_: tests.test_capabilities.CustomModel\n")
    monkeypatch.setenv("METAREC_CONF_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"model linear has none; use model=custom, fm, gru, melu, "
                       r"mf, mlp or two_tower$"):
        check_compatible(ProtoNet, LinearModel)


# -- the README table ---------------------------------------------------------------------------


def _readme_table() -> list[str]:
    lines = README.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"| {TABLE_HEADER} |")), None)
    assert start is not None, f"no '| {TABLE_HEADER} |' table in {README}"
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return [line.rstrip() for line in lines[start:end]]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_readme_table_verdicts_match_the_attributes():
    """Every yes/no cell of README's table is the verdict of its algorithms' and model's
    classes, and every algo and model option has its row and column."""
    header, _, *rows = _readme_table()
    columns = [re.fullmatch(r"`([^`]+)`", c).group(1) for c in _cells(header)[1:]]
    assert sorted(columns) == sorted(MODELS)
    seen: list[str] = []
    for row in rows:
        label, *cells = _cells(row)
        options = re.findall(r"`([^`]+)`", label)
        seen += options
        assert len(cells) == len(columns), row
        for option in options:
            assert option in ALGOS, f"README row names unknown algo {option!r}"
            for model, text in zip(columns, cells, strict=True):
                verdict = text.split(":")[0].split(" ")[0].strip().lower()
                assert verdict in ("yes", "no"), text
                expected = compatible(ALGOS[option], MODELS[model])
                assert (verdict == "yes") == expected, (option, model, text, missing(ALGOS[option],
                                                                                     MODELS[model]))
    assert sorted(seen) == sorted(ALGOS), "README's table must list every algo option once"


def test_readme_table_is_the_rendered_one():
    """README.md shows exactly :func:`render_table` (paste its output after changing a
    ``provides``/``requires``/``uses`` attribute or a config option)."""
    assert "\n".join(_readme_table()) == render_table()
