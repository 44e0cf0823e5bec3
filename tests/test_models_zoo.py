"""The model zoo (mf, fm, linear, mlp, gru): batched per-task computation equals the per-task
module call in float64, MAML meta-gradients equal a per-task loop, MF adapts only the user
vector, and every algo x model pair either runs a meta-step or, when the classes' capability
attributes say it is incompatible (``algos.compat``; README's table is tested against them in
``test_capabilities``), raises a one-line error."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.func import functional_call

from metarec_runner.algos.compat import builtin_classes, missing
from metarec_runner.algos.maml import MAML
from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import ConfigError
from metarec_runner.models.fm import FactorizationMachine
from metarec_runner.models.gru import GRUSequenceModel
from metarec_runner.models.linear import LinearModel
from metarec_runner.models.mf import MatrixFactorization
from metarec_runner.models.mlp import MLPRecommender
from metarec_runner.models.preference import FUSED_BAG_MIN_ROWS, PreferenceEstimator
from metarec_runner.paths import conf_dir, group_options
from metarec_runner.run import build
from tests.conftest import SMALL_SCHEMA, random_taskset

TOL = 1e-10
BAG_SCHEMA = FeatureSchema(("a", "genre", "b", "user_id", "item_id"), (3, 6, 5, 20, 30), (1, 3, 1, 1, 1))
ROWWISE = {"mf": MatrixFactorization, "fm": FactorizationMachine, "linear": LinearModel,
           "mlp": MLPRecommender}


def _model(cls, schema, seed: int = 0):
    torch.manual_seed(seed)
    kw = {"item_fields": ["item_id", "b"]} if cls in (MatrixFactorization, GRUSequenceModel) else {}
    if cls in (FactorizationMachine, MLPRecommender):
        kw = {"item_fields": ["item_id", "genre"]} if schema is BAG_SCHEMA else {"item_fields": ["item_id", "c"]}
    if cls is MatrixFactorization and schema is BAG_SCHEMA:
        kw = {"item_fields": ["item_id", "genre"]}
    model = cls(schema, rating_mean=3.0, **kw).double()
    with torch.no_grad():  # move every parameter off its (often zero) initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(schema, n_tasks: int = 6, seed: int = 1):
    tasks = random_taskset(schema, n_tasks, support=(2, 9), query=(1, 5), seed=seed)
    batch = tasks.batch(torch.arange(n_tasks)).to("cpu", torch.float64)
    if schema is BAG_SCHEMA:  # pad some bags with -1 (one bag entirely empty)
        g = torch.Generator().manual_seed(seed)
        for x in (batch.support_x, batch.query_x):
            cols = x[..., 1:4]
            cols.masked_fill_(torch.rand(cols.shape, generator=g) < 0.4, -1)
        batch.support_x[0, 0, 1:4] = -1
    return batch


def _per_task_params(model, batch_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {n: p.detach().expand(batch_size, *p.shape).clone()
            + 0.05 * torch.randn(batch_size, *p.shape, generator=g, dtype=p.dtype)
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("schema", [SMALL_SCHEMA, BAG_SCHEMA], ids=["plain", "bags"])
@pytest.mark.parametrize("name", sorted(ROWWISE))
def test_forward_batched_equals_per_task_module_call(name, schema):
    model = _model(ROWWISE[name], schema)
    batch = _batch(schema)
    params = _per_task_params(model, batch.size)
    fast = model.forward_batched(params, batch.query_x)
    for b in range(batch.size):
        ref = functional_call(model, {n: p[b] for n, p in params.items()}, (batch.query_x[b],))
        assert (fast[b] - ref).abs().max() < TOL
    # and the shared weights broadcast: model(x) on [B, L, F] equals the per-row call
    rows = batch.query_x.reshape(-1, batch.query_x.shape[-1])
    assert (model(batch.query_x).reshape(-1) - model(rows)).abs().max() < TOL


@pytest.mark.parametrize("schema", [SMALL_SCHEMA, BAG_SCHEMA], ids=["plain", "bags"])
def test_fm_pairwise_term_equals_explicit_pair_sum(schema):
    model = _model(FactorizationMachine, schema)
    x = _batch(schema).query_x
    emb, values = model.factors.lookup(x)  # [B, L, C, k], [B, L, C]
    v = emb * values.unsqueeze(-1)
    c = v.shape[-2]
    pairs = sum((v[..., i, :] * v[..., j, :]).sum(-1) for i in range(c) for j in range(i + 1, c))
    lin = (model.linear.lookup(x)[0].squeeze(-1) * values).sum(-1)
    assert (model.body(x)[..., -1] - (pairs + lin)).abs().max() < TOL


def _per_task_maml_loss(algo, batch, lr: float, steps: int, first_order: bool) -> torch.Tensor:
    """Mean query MSE after ``steps`` SGD steps, one unpadded task at a time."""
    module = algo.adapted_module
    base = dict(module.named_parameters())
    total = torch.zeros((), dtype=batch.support_y.dtype)
    for b in range(batch.size):
        s_n, q_n = int(batch.support_mask[b].sum()), int(batch.query_mask[b].sum())
        s_in, q_in = algo.inputs(batch.support_x[b, :s_n]), algo.inputs(batch.query_x[b, :q_n])
        fast = dict(base)
        for _ in range(steps):
            loss = ((functional_call(module, fast, (s_in,)) - batch.support_y[b, :s_n]) ** 2).mean()
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}
        total = total + ((functional_call(module, fast, (q_in,)) - batch.query_y[b, :q_n]) ** 2).mean()
    return total / batch.size


@pytest.mark.parametrize("scope, first_order, steps",
                         [("head", False, 2), ("all", False, 2), ("head", True, 2), ("head", True, 1)])
@pytest.mark.parametrize("name", sorted(ROWWISE))
def test_batched_maml_meta_gradient_equals_per_task_loop(name, scope, first_order, steps):
    """Every zoo model, including one first-order step (MeLU's packed path: test_batched_core)."""
    model = _model(ROWWISE[name], BAG_SCHEMA)
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), adapt=scope, inner_lr=0.2,
                inner_steps=steps, first_order=first_order, chunks=2)
    batch = _batch(BAG_SCHEMA)
    params = list(model.parameters())
    loss, _ = algo.meta_loss(batch)
    reference = _per_task_maml_loss(algo, batch, 0.2, steps, first_order)
    assert abs(float((loss - reference).detach())) < TOL
    for p, g, r in zip(params, torch.autograd.grad(loss, params, allow_unused=True),
                       torch.autograd.grad(reference, params, allow_unused=True), strict=True):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        assert (g - r).abs().max() < TOL


def test_mf_maml_adapts_the_user_vector_only():
    model = _model(MatrixFactorization, SMALL_SCHEMA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), adapt="head", inner_lr=0.1,
                inner_steps=1, eval_inner_steps=5)
    batch = _batch(SMALL_SCHEMA)
    scorer = algo.adapt(batch)
    assert set(scorer.params) == {"user", "bias"}  # the head = the user's vector and bias
    user = scorer.params["user"]
    assert user.shape == (batch.size, model.head.user.shape[0])
    assert (user - before["head.user"]).abs().amax(1).min() > 1e-6  # every task moved its vector
    for n, p in model.named_parameters():  # item factors (and the model) unchanged
        assert torch.equal(p, before[n])
    # adapted scores use the shared item factors with each task's own user vector
    q, bias = model.item_embedding(batch.query_x), model.item_bias.pooled(batch.query_x).squeeze(-1)
    expected = (q * user[:, None, :]).sum(-1) + bias + scorer.params["bias"]
    assert (scorer.predict(batch.query_x) - expected).abs().max() < TOL
    base = ((model(batch.support_x) - batch.support_y) ** 2 * batch.support_mask).sum(1)
    adapted = ((scorer.predict(batch.support_x) - batch.support_y) ** 2 * batch.support_mask).sum(1)
    assert (adapted < base).all()


@pytest.mark.parametrize("schema", [SMALL_SCHEMA, BAG_SCHEMA], ids=["plain", "bags"])
def test_gru_batched_state_equals_per_task_recursion(schema):
    torch.manual_seed(0)
    model = GRUSequenceModel(schema, embedding_dim=5, hidden_dim=4, rating_mean=3.0).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = _batch(schema)
    state = model.encode_support(batch.support_x, batch.support_y, batch.support_mask)
    scores = model.forward_with_support(batch.support_x, batch.support_y, batch.support_mask, batch.query_x)
    for b in range(batch.size):
        n = int(batch.support_mask[b].sum())
        h = model.h0
        for t in range(n):  # the unpadded recursion, one step at a time
            e = model.item_embedding(batch.support_x[b, t])
            inp = torch.cat([e, (batch.support_y[b, t] - 3.0).reshape(1)])
            h = model.cell(inp.unsqueeze(0), h.unsqueeze(0)).squeeze(0)
        assert (state[b] - h).abs().max() < TOL
        ref = model.score(h.unsqueeze(0), batch.query_x[b:b + 1])[0]
        assert (scores[b] - ref).abs().max() < TOL


# -- every algo x model pair ------------------------------------------------------------------

#: what the message says a model lacks, per missing capability
LACKS = {"rowwise": "reads the user's support sequence; use algo=", "head": "has no head",
         "item_embedding": "has none", "catalog": "does not score the whole catalog"}


def _taskset_of(batch):
    """The padded ``batch`` as a flat TaskSet (its real rows only)."""
    from metarec_runner.tasks.taskset import TaskSet

    def offsets(mask):
        return torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])

    return TaskSet(torch.arange(batch.size), batch.support_x[batch.support_mask],
                   batch.support_y[batch.support_mask], offsets(batch.support_mask),
                   batch.query_x[batch.query_mask], batch.query_y[batch.query_mask],
                   offsets(batch.query_mask))


@pytest.mark.parametrize("algo", group_options("algo"))
def test_every_algo_model_pair_runs_a_meta_step_or_refuses(algo):
    batch = _batch(SMALL_SCHEMA, n_tasks=4).to("cpu", torch.float32)
    for model_name in group_options("model"):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"+algo={algo}", f"model={model_name}",
                                                           "logger=none"])
        torch.manual_seed(0)
        model = build("model", cfg.model, schema=SMALL_SCHEMA, rating_mean=3.0)
        algo_cls = builtin_classes("algo")[algo]
        lacking = missing(algo_cls, model, cfg.algo.get("adapt"))
        if lacking:  # the attributes say no: building refuses in one line naming both
            with pytest.raises(ConfigError, match=f"model {model_name} {LACKS[lacking[0]]}") as err:
                build("algo", cfg.algo, model=model)
            assert "\n" not in str(err.value) and str(err.value).startswith("algo.model: algo ")
            continue
        algo_obj = build("algo", cfg.algo, model=model)
        if algo_obj.fits_once and algo == "group_popularity":  # the random rows carry no user field
            with pytest.raises(ConfigError, match="the tasks have no user field"):
                algo_obj.fit(_taskset_of(batch))
            continue
        if algo_obj.fits_once:  # closed-form and counting scorers: one fit, no meta-step
            algo_obj.fit(_taskset_of(batch))
        else:
            stats = algo_obj.meta_step(batch)
            assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), (algo, model_name)
        pred = algo_obj.adapt(batch).predict(batch.query_x)
        assert pred.shape == batch.query_y.shape and torch.isfinite(pred).all(), (algo, model_name)


def test_adapt_head_on_a_model_without_head_names_the_fix():
    class NoHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.w * x[..., 0]

    with pytest.raises(ConfigError, match="adapt: head.*model NoHead has no head; use algo.adapt=all"):
        MAML(NoHead(), functools.partial(torch.optim.SGD, lr=0.1), adapt="head")
    MAML(NoHead(), functools.partial(torch.optim.SGD, lr=0.1), adapt="all", touched_rows=False)


@pytest.mark.parametrize("name", ["mf", "fm", "mlp", "gru"])
def test_item_fields_must_exist(name):
    cls = {**ROWWISE, "gru": GRUSequenceModel}[name]
    with pytest.raises(ConfigError, match="item_fields"):
        cls(SMALL_SCHEMA, item_fields=["colour"])


@pytest.mark.parametrize("rows", [5, FUSED_BAG_MIN_ROWS + 40])
def test_melu_body_fused_bags_equal_pooled_lookup(rows):
    """Above FUSED_BAG_MIN_ROWS rows the body pools bags with embedding_bag, below it with the
    bag_sum matmul: both equal the written-out sum of each field's token embeddings, values
    and embedding gradients (float64), for 2-d and 3-d inputs with empty bag slots."""
    torch.manual_seed(0)
    model = PreferenceEstimator(BAG_SCHEMA, embedding_dim=4, hidden=(8,)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.stack([torch.randint(0, c, (rows,), generator=g)
                     for c in (3, 6, 6, 6, 5, 20, 30)], -1)  # a, genre x3, b, user_id, item_id
    x[:, 1:4][torch.rand(rows, 3, generator=g) < 0.4] = -1  # empty bag slots (some bags empty)
    weight = model.embedding.weight  # field blocks: a 0-2, genre 3-8, b 9-13, item_id 14-43
    expected = torch.cat([
        weight[x[:, 0]],
        sum(weight[3 + x[:, c].clamp_min(0)] * (x[:, c] >= 0).double().unsqueeze(-1)
            for c in (1, 2, 3)),
        weight[9 + x[:, 4]],
        weight[14 + x[:, 6]],
    ], -1)
    for shape in ((rows, -1), (1, rows, -1)):
        got = model.body(x.reshape(*shape[:-1], x.shape[-1]))
        assert got.shape == (*shape[:-1], 16)
        assert (got.reshape(rows, -1) - expected).abs().max() < 1e-12
    probe = torch.randn(rows, 16, dtype=torch.float64, generator=g)
    (g_body,) = torch.autograd.grad((model.body(x) * probe).sum(), [weight])
    (g_ref,) = torch.autograd.grad((expected * probe).sum(), [weight])
    assert (g_body - g_ref).abs().max() < 1e-12
