"""One inner loop, chosen once: fast paths only on the exact classes that wrote them (a model that
overrides ``forward`` trains through ``functional_call`` on that forward), touched rows for every
embedding model (equal to full tables), ``check_fast_path`` and the touched-rows config error."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra import compose, initialize_config_dir

from metarec_runner.algos.baselines import Finetune, GlobalModel
from metarec_runner.algos.functional import has_exact_fast_path
from metarec_runner.algos.inner_loop import InnerLoop, check_fast_path
from metarec_runner.algos.maml import MAML
from metarec_runner.algos.metasgd import MetaSGD
from metarec_runner.algos.reference import per_task_meta_loss
from metarec_runner.algos.reptile import Reptile
from metarec_runner.algos.touched import TouchedFastWeights
from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.models.fields import RowSparseTable
from metarec_runner.models.fm import FactorizationMachine
from metarec_runner.models.linear import LinearModel
from metarec_runner.models.mf import MatrixFactorization
from metarec_runner.models.mlp import MLPRecommender
from metarec_runner.models.preference import MLPHead, PreferenceEstimator
from metarec_runner.paths import conf_dir
from metarec_runner.run import build
from tests.conftest import SMALL_SCHEMA, random_taskset

TOL = 1e-10
SGD = functools.partial(torch.optim.SGD, lr=0.1)
BAG_SCHEMA = FeatureSchema(("a", "genre", "b", "user_id", "item_id"), (3, 6, 5, 20, 30), (1, 3, 1, 1, 1))
EMBEDDING_MODELS = {"mf": MatrixFactorization, "fm": FactorizationMachine, "linear": LinearModel,
                    "mlp": MLPRecommender, "melu": PreferenceEstimator}


def _melu(seed: int = 0, schema: FeatureSchema = SMALL_SCHEMA) -> PreferenceEstimator:
    torch.manual_seed(seed)
    return PreferenceEstimator(schema, embedding_dim=4, hidden=(8, 6), rating_mean=3.0).double()


def _zoo(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {"embedding_dim": 4, "hidden": (6,)} if name in ("mlp", "melu") else {}
    model = EMBEDDING_MODELS[name](BAG_SCHEMA, rating_mean=3.0, **kw).double()
    with torch.no_grad():  # off the (often zero) initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(schema: FeatureSchema = SMALL_SCHEMA, n_tasks: int = 6, seed: int = 1):
    tasks = random_taskset(schema, n_tasks, support=(2, 9), query=(1, 5), seed=seed)
    batch = tasks.batch(torch.arange(n_tasks)).to("cpu", torch.float64)
    if schema is BAG_SCHEMA:  # bags of 0-3 genres: empty slots are -1
        g = torch.Generator().manual_seed(seed)
        for x in (batch.support_x, batch.query_x):
            cols = x[..., 1:4]
            cols.masked_fill_(torch.rand(cols.shape, generator=g) < 0.4, -1)
    return batch


def _grads(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# -- fast paths only on the exact classes -------------------------------------------------------


class SquashedHead(MLPHead):
    """Scores squashed into 1..5: inherits MLPHead's fast paths, which do not compute this forward."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return 1.0 + 4.0 * torch.sigmoid(super().forward(h))


class LoggedHead(MLPHead):
    """Overrides forward without changing it, and says so: its inherited fast paths stay."""

    exact_fast_path = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h)


class LoggedHeadChild(LoggedHead):
    """The opt-in is read from the class's own body: a subclass overriding forward loses it."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h) + 1.0


def _with_head(cls: type[MLPHead]) -> PreferenceEstimator:
    model = _melu()
    head = cls(model.head.net[0].in_features, [8, 6], output_bias=0.0).double()
    head.load_state_dict(model.head.state_dict())
    model.head = head
    return model


def test_fast_paths_apply_to_exact_classes_or_explicit_opt_in():
    assert has_exact_fast_path(_melu().head, "forward_batched")
    assert has_exact_fast_path(_melu(), "forward_batched")
    assert not has_exact_fast_path(_with_head(SquashedHead).head)
    assert not has_exact_fast_path(_with_head(SquashedHead))  # a submodule's fast path is wrong
    assert has_exact_fast_path(_with_head(LoggedHead).head)
    assert not has_exact_fast_path(_with_head(LoggedHeadChild).head)
    names = {(cls, fo): MAML(_with_head(cls), SGD, inner_steps=1 if fo else 3, first_order=fo)
             .inner_loop.name for cls in (MLPHead, SquashedHead, LoggedHead) for fo in (False, True)}
    assert names == {(MLPHead, False): "fixed_input", (MLPHead, True): "packed_first_order",
                     (SquashedHead, False): "functional", (SquashedHead, True): "functional",
                     (LoggedHead, False): "fixed_input", (LoggedHead, True): "packed_first_order"}
    assert MetaSGD(_melu(), SGD).inner_loop.name == "batched"  # per-parameter step sizes
    assert MAML(_melu(), SGD, adapt="all").inner_loop.name == "touched_rows"
    assert MAML(_melu(), SGD, adapt="all", touched_rows=False).inner_loop.name == "batched"
    assert GlobalModel(_melu(), SGD).inner_loop_name == "none"
    assert Finetune(_melu(), SGD).inner_loop_name == "fixed_input"


@pytest.mark.parametrize("first_order, steps", [(False, 1), (False, 3), (True, 1), (True, 2)])
def test_head_overriding_forward_trains_through_its_own_forward(first_order, steps):
    """The squashed head's meta-loss and meta-gradient equal the per-task functional_call loop
    (its MLPHead fast paths would score the unsquashed MLP instead)."""
    model = _with_head(SquashedHead)
    algo = MAML(model, SGD, adapt="head", inner_lr=0.3, inner_steps=steps, first_order=first_order)
    assert algo.inner_loop.name == "functional"
    batch = _batch()
    loss, _ = algo.meta_loss(batch)
    reference = per_task_meta_loss(algo, batch, 0.3, steps, first_order)
    assert abs(float(loss.detach() - reference.detach())) < TOL
    assert _max_diff(_grads(loss, model), _grads(reference, model)) < TOL
    # the adapted scores are squashed too, and equal the meta-training path's
    scores, _ = algo.adapt_and_score(batch, 0.3, steps, create_graph=False)
    adapted = MAML(model, SGD, inner_lr=0.3, inner_steps=steps, eval_inner_steps=steps).adapt(batch)
    pred = adapted.predict(batch.query_x)
    assert ((pred >= 1) & (pred <= 5)).all() and (pred - scores.detach()).abs().max() < TOL
    # the exact class gives a different meta-loss on the same weights: the paths are not equal
    plain = _melu()
    plain_loss, _ = MAML(plain, SGD, inner_lr=0.3, inner_steps=steps,
                         first_order=first_order).meta_loss(batch)
    assert abs(float(plain_loss - loss)) > 1e-3


def test_model_overriding_forward_adapts_all_through_functional_call():
    class ClippedMF(MatrixFactorization):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).clamp(1.0, 5.0)

    torch.manual_seed(0)
    model = ClippedMF(SMALL_SCHEMA, rating_mean=3.0).double()
    with pytest.raises(ConfigError, match="algo.touched_rows=false"):
        MAML(model, SGD, adapt="all")
    algo = MAML(model, SGD, adapt="all", touched_rows=False, inner_lr=0.3, inner_steps=2)
    assert algo.inner_loop.name == "functional"
    batch = _batch()
    loss, _ = algo.meta_loss(batch)
    reference = per_task_meta_loss(algo, batch, 0.3, 2, False)
    assert abs(float(loss.detach() - reference.detach())) < TOL
    assert _max_diff(_grads(loss, model), _grads(reference, model)) < TOL


# -- touched rows for every embedding model -----------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("name", ["mf", "fm", "mlp", "linear"])
def test_touched_rows_equal_dense_tables(name, first_order):
    batch = _batch(BAG_SCHEMA)
    other = _batch(BAG_SCHEMA, seed=7).query_x[:, : batch.query_x.shape[1]]
    algos = [MAML(_zoo(name), SGD, adapt="all", inner_lr=0.3, inner_steps=2, eval_inner_steps=3,
                  first_order=first_order, touched_rows=touched) for touched in (True, False)]
    assert [a.inner_loop.name for a in algos] == ["touched_rows", "batched"]
    (loss_t, inner_t), (loss_d, inner_d) = (a.meta_loss(batch) for a in algos)
    assert abs(float(loss_t - loss_d)) < TOL and abs(float(inner_t - inner_d)) < TOL
    assert _max_diff(_grads(loss_t, algos[0].model), _grads(loss_d, algos[1].model)) < TOL
    reference = per_task_meta_loss(algos[1], batch, 0.3, 2, first_order)
    assert abs(float(loss_t.detach() - reference.detach())) < TOL
    fast_t, fast_d = (a.adapt(batch).params for a in algos)
    assert isinstance(fast_t, TouchedFastWeights)
    assert all(t.values.shape[1] < t.base.shape[0] for t in fast_t.tables.values())  # sparse
    for x in (batch.query_x, batch.support_x, other):
        assert (fast_t.predict(x) - fast_d.predict(x)).abs().max() < TOL
    for n in fast_d:
        assert (fast_t[n] - fast_d[n]).abs().max() < TOL
        assert (fast_t.task_mean(n) - fast_d.task_mean(n)).abs().max() < TOL


def test_touched_rows_reptile_and_metasgd_equal_dense_tables():
    batch = _batch(BAG_SCHEMA)
    reptiles = [Reptile(_zoo("mf"), SGD, adapt="all", inner_lr=0.2, inner_steps=3,
                        touched_rows=touched) for touched in (True, False)]
    for algo in reptiles:
        algo.meta_step(batch)
    assert _max_diff(list(reptiles[0].model.parameters()), list(reptiles[1].model.parameters())) < TOL
    metas = [MetaSGD(_zoo("fm"), SGD, adapt="all", inner_lr=0.2, inner_steps=2,
                     touched_rows=touched) for touched in (True, False)]
    losses = [a.meta_loss(batch)[0] for a in metas]
    assert abs(float(losses[0] - losses[1])) < TOL
    for a, b in zip(metas[0].step_sizes.parameters(), metas[1].step_sizes.parameters(), strict=True):
        (ga,) = torch.autograd.grad(losses[0], a, retain_graph=True)
        (gb,) = torch.autograd.grad(losses[1], b, retain_graph=True)
        assert (ga - gb).abs().max() < TOL


def test_touched_rows_hold_only_the_rows_tasks_read():
    """A 200k-row catalog: the per-task tables are [B, U, d] with U the rows a support set reads."""
    schema = FeatureSchema(("user_id", "item_id"), (10, 200_000))
    torch.manual_seed(0)
    model = MatrixFactorization(schema, embedding_dim=8, item_fields=["item_id"])
    batch = random_taskset(schema, 4, support=(5, 9), query=(2, 3), seed=0).batch(torch.arange(4))
    fast = MAML(model, SGD, adapt="all", inner_steps=2).adapt(batch).params
    table = fast.tables["item.weight"]
    assert isinstance(table, RowSparseTable) and table.base.shape == (200_000, 8)
    assert table.values.shape[0] == 4 and table.values.shape[1] <= 9  # support sets of <= 9 rows


# -- check_fast_path ------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", ["melu_head", "melu_packed", "melu_all", "mf_all", "mlp_head",
                                   "linear_head", "metasgd_all"])
def test_check_fast_path_passes_on_the_builtin_models(setup):
    model = _melu(schema=BAG_SCHEMA) if setup.startswith(("melu", "metasgd")) else _zoo(setup.split("_")[0])
    kw = {"adapt": "head" if setup.endswith(("head", "packed")) else "all", "inner_steps": 2}
    if setup == "melu_packed":
        kw.update(inner_steps=1, first_order=True)
    algo = (MetaSGD if setup == "metasgd_all" else MAML)(model, SGD, **kw)
    algo.check_fast_path = True
    assert algo.inner_loop.name != "functional"
    batch = _batch(BAG_SCHEMA)
    stats = algo.meta_step(batch)
    algo.adapt(batch).predict(batch.query_x)
    assert algo._checked_paths == {"meta", "adapt"} and stats["loss"] > 0


def test_check_fast_path_fails_loudly_on_a_broken_fast_path(monkeypatch):
    real = MLPHead.forward_rest

    def wrong_rest(self, params, z, prefix=""):  # off by a constant: not the class's forward
        return real(self, params, z, prefix) + 0.5

    batch = _batch()
    monkeypatch.setattr(MLPHead, "forward_rest", wrong_rest)  # the class's own: still trusted
    algo = MAML(_melu(), SGD, inner_steps=2, check_fast_path=True)
    assert algo.inner_loop.name == "fixed_input"
    with pytest.raises(TrainingError, match=r"^algo.check_fast_path: the fixed_input inner loop "
                                            r"differs .* in the query loss") as err:
        algo.meta_step(batch)
    assert "\n" not in str(err.value)
    MAML(_melu(), SGD, inner_steps=2).meta_step(batch)  # off by default: no check


def test_check_fast_path_names_the_parameter_of_a_broken_row_lookup(monkeypatch):
    real = RowSparseTable.embed

    def shifted(self, x, codes):  # wrong only for rows outside the support set
        out = real(self, x, codes)
        return out if x is self.support else out + 1.0

    monkeypatch.setattr(RowSparseTable, "embed", shifted)
    algo = MAML(_zoo("mf"), SGD, adapt="all", inner_steps=1)
    batch = _batch(BAG_SCHEMA)
    with pytest.raises(TrainingError, match="touched_rows inner loop .* in the query loss"):
        check_fast_path(algo.inner_loop, batch, 0.1, 1, True, detach=False)
    with pytest.raises(TrainingError, match="adapted item.weight|the query loss"):
        check_fast_path(algo.inner_loop, batch, 0.1, 1, False, detach=True)
    check_fast_path(InnerLoop(algo.model, "all"), batch, 0.1, 1, True, detach=False)  # the reference


def test_check_fast_path_is_a_config_key_of_the_maml_family_and_finetune():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for option in ("fomaml", "melu", "finetune"):
            cfg = compose(config_name="config", overrides=[f"+algo={option}", "logger=none"])
            assert cfg.algo.check_fast_path is False
            cfg.algo.check_fast_path = True
            assert build("algo", cfg.algo, model=_melu()).check_fast_path


# -- touched_rows on a model that cannot honour it ------------------------------------------------


class PlainScorer(torch.nn.Module):
    """A plugin model with only ``__init__`` and ``forward``: no embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.w.dtype) * self.w).sum(-1)


def test_touched_rows_without_embeddings_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^touched_rows: .*model PlainScorer has no row-sparse "
                                          r"embedding table.*set algo.touched_rows=false") as err:
        MAML(PlainScorer(), SGD, adapt="all")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="algo.touched_rows=false"):
        Finetune(PlainScorer(), SGD, adapt="all")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+algo=maml", "logger=none", "algo.adapt=all"])
    with pytest.raises(ConfigError, match=r"^algo.touched_rows: "):
        build("algo", cfg.algo, model=PlainScorer())
    algo = MAML(PlainScorer(), SGD, adapt="all", touched_rows=False, inner_steps=2)
    assert algo.inner_loop.name == "functional"
    GlobalModel(PlainScorer(), SGD)  # never adapts: touched rows do not apply
    batch = _batch()
    loss, _ = algo.meta_loss(batch)
    reference = per_task_meta_loss(algo, batch, algo.inner_lr, 2, False)
    assert abs(float(loss.detach() - reference.detach())) < TOL
