"""Every config option composes and instantiates; the algo override rules the CLI relies on."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, get_method

from metarec_runner.cli import normalize_overrides
from metarec_runner.errors import ConfigError
from metarec_runner.paths import conf_dir, group_options
from metarec_runner.run import Prepared, build
from tests.helpers import compose

FAST = ["logger=none", "dataset.n_users=120", "dataset.n_items=80"]


def _yaml_files():
    root = conf_dir()
    return sorted(p for p in root.rglob("*.yaml"))


def _model_for(algo: str) -> list[str]:
    """The default model, or the first model option whose declared capabilities the algo's
    class requires (``set_ranker`` needs ``set_encoder``): read from the class attributes."""
    from metarec_runner.algos.compat import builtin_classes, compatible

    algo_cls = builtin_classes("algo")[algo]
    models = builtin_classes("model")
    if compatible(algo_cls, models["melu"]):
        return []
    model = next(name for name, cls in models.items() if compatible(algo_cls, cls))
    ranking_only = ["trainer.monitor=val/ndcg_at_5"] if not algo_cls.predicts_ratings else []
    return [f"model={model}", *ranking_only]


@pytest.mark.parametrize("algo", group_options("algo"))
def test_every_algo_builds_with_the_default_stack(algo):
    cfg = compose(f"+algo={algo}", *FAST, *_model_for(algo))
    prep = Prepared(cfg)
    assert type(prep.algo) is get_class(cfg.algo._target_)
    assert prep.algo.model is prep.model
    assert len(prep.splits.train) > 0 and len(prep.splits.test) > 0


@pytest.mark.parametrize("group", ["splitter", "model", "evaluator", "trainer"])
def test_every_group_option_instantiates(group):
    """(logger=mlflow needs Hydra's runtime for its paths: the CLI tests build it; real datasets
    are instantiated by the loader tests, where their files exist.)"""
    # query_only works with every kind of task (full ranking needs user tasks)
    extra = ["evaluator=query_only"] if group == "splitter" else []
    for option in group_options(group):
        if (group, option) == ("splitter", "saved"):
            continue  # needs a saved file: tests/test_split_artifact.py runs it
        # gru and set_encoder need an algo that hands them the support set (compat refuses maml)
        algo = {("model", "gru"): "protonet", ("model", "set_encoder"): "set_ranker"}.get(
            (group, option), "maml")
        # implicit labels are 0/1: relevance starts at 1 (the default threshold 4 is refused)
        labels = ["evaluator.relevance_threshold=1"] if (group, option) == ("splitter", "implicit") else []
        ranking_only = ["trainer.monitor=val/ndcg_at_5"] if algo == "set_ranker" else []
        cfg = compose(f"+algo={algo}", *FAST, *extra, *labels, *ranking_only, f"{group}={option}")
        prep = Prepared(cfg)
        if group != "splitter":  # the option's class was built (splits are what a splitter leaves)
            built = {"model": prep.model, "evaluator": prep.evaluator, "trainer": prep.trainer}[group]
            assert type(built) is get_class(cfg[group]._target_), option
        # the built model scores the split's test queries: one finite score per query row
        batch = prep.splits.test.batch(torch.arange(min(4, len(prep.splits.test))))
        scores = prep.model(batch.query_x.to(prep.device))
        assert scores.shape == batch.query_y.shape, option
        assert torch.isfinite(scores[batch.query_mask]).all(), option


@pytest.mark.parametrize("dataset", group_options("dataset"))
def test_every_dataset_option_composes(dataset):
    cfg = compose("+algo=maml", "logger=none", f"dataset={dataset}")
    assert cfg.dataset._target_.startswith("metarec_runner.data.")
    assert callable(get_method(cfg.dataset._target_))  # the loader the option names exists
    assert isinstance(cfg.dataset.name, str) and cfg.dataset.name.strip()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(conf_dir())))
def test_every_yaml_key_has_a_comment(path):
    """Each line that sets a key carries a `#` comment (the config documents itself)."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- _self_"):
            continue
        if ":" in stripped or stripped.startswith("- "):
            assert "#" in line, f"{path.name}:{n} has no comment: {line!r}"


def test_plus_algo_and_plain_algo_both_work():
    assert normalize_overrides(["algo=maml", "algo.inner_lr=0.1", "+algo=reptile", "seed=1"]) == [
        "+algo=maml", "algo.inner_lr=0.1", "+algo=reptile", "seed=1"]
    cfg = compose(*normalize_overrides(["algo=fomaml"]))
    assert cfg.algo.first_order is True
    with pytest.raises(ConfigCompositionException):
        compose("algo=maml")  # without the CLI's rewrite Hydra refuses it: algo is not in defaults


def test_missing_algo_lists_the_options():
    with pytest.raises(ConfigError, match="no algorithm chosen.*maml.*reptile"):
        Prepared(compose(*FAST))


@pytest.mark.parametrize("override, key", [
    ("algo.inner_lr=-0.1", "algo.inner_lr"),
    ("algo.inner_steps=0", "algo.inner_steps"),
    ("algo.adapt=everything", "algo.adapt"),
    ("algo.meta_optimizer.lr=-1", "algo.meta_optimizer"),
    ("splitter.n_query=500", "splitter.n_query"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("dataset.n_users=0", "dataset.n_users"),
    ("model.embedding_dim=0", "model.embedding_dim"),
    ("device=tpu", "device"),
])
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        Prepared(compose("+algo=maml", *FAST, override))
    assert str(info.value).startswith(key), str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_constructor_key_is_a_config_error():
    cfg = compose("+algo=maml", *FAST, "+algo.not_a_key=1")
    with pytest.raises(ConfigError, match="algo: cannot build"):
        build("algo", cfg.algo, model=Prepared(compose("+algo=global", *FAST)).model)


@pytest.mark.parametrize("overrides, name", [([], "maml-melu-toy-s0"), (["seed=3"], "maml-melu-toy-s3"),
                                             (["seed=1", "split_seed=2"], "maml-melu-toy-s1-split2")])
def test_run_names_tell_split_seeds_apart(overrides, name):
    """A split-seed sweep's runs get distinct names (and output folders); split seed 0 adds nothing."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose("+algo=maml", *overrides, hydra=True)
    HydraConfig.instance().set_config(cfg)  # run_name reads the group choices from Hydra's config
    assert cfg.run_name == name
