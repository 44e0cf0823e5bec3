"""Ranking losses (bpr, bce with sampled negatives, sampled softmax) for every trainable algorithm.

A planted catalog (users like the items whose ``item % 3`` is their ``user % 3``) stands in for a
dataset: its :class:`Catalog` is what the evaluator ranks and what the negatives are drawn from.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call

from metarec_runner.algos.baselines import Finetune, GlobalModel
from metarec_runner.algos.maml import MAML
from metarec_runner.algos.metasgd import MetaSGD
from metarec_runner.algos.metric import MatchingNet, ProtoNet
from metarec_runner.algos.negatives import NegativeSampler
from metarec_runner.algos.ranking_loss import RankingObjective, ranking_loss
from metarec_runner.algos.reptile import Reptile
from metarec_runner.config.rules import check_config
from metarec_runner.errors import ConfigError, TrainingError
from metarec_runner.evaluate.candidates import Catalog
from metarec_runner.models.preference import PreferenceEstimator
from metarec_runner.tasks.taskset import TaskSet
from tests.helpers import SMALL_SCHEMA, compose, quiet_runner, tiny_model

N_USERS, N_ITEMS = 20, 30  # SMALL_SCHEMA's user_id and item_id cardinalities


def _feature_rows(users: np.ndarray, items: np.ndarray) -> torch.Tensor:
    """SMALL_SCHEMA rows ``[a, b, c, user_id, item_id]``: two item fields, one user field."""
    users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
    return torch.from_numpy(np.stack([items % 3, items % 5, users % 7, users, items], 1))


def planted(seed: int = 0, per_user: tuple[int, int] = (9, 14)) -> tuple[Catalog, TaskSet]:
    """Every user rates random items: 5 where ``item % 3 == user % 3``, else 1 or 2; two thirds
    of a user's rows are the support set, the rest the query set (one task per user)."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(N_USERS):
        chosen = rng.choice(N_ITEMS, int(rng.integers(per_user[0], per_user[1] + 1)), replace=False)
        users += [u] * len(chosen)
        items += chosen.tolist()
    users, items = np.array(users), np.array(items)
    ratings = np.where(items % 3 == users % 3, 5.0, 1.0 + (items % 2))
    counts = np.bincount(users, minlength=N_USERS)
    catalog = Catalog(N_ITEMS, torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])),
                      torch.from_numpy(items), _feature_rows)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(users)) - start[users]
    support = pos < (2 * counts[users]) // 3

    def part(keep: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        offsets = np.concatenate([[0], np.cumsum(np.bincount(users[keep], minlength=N_USERS))])
        return (_feature_rows(users[keep], items[keep]), torch.from_numpy(ratings[keep]),
                torch.from_numpy(offsets))

    sx, sy, so = part(support)
    qx, qy, qo = part(~support)
    return catalog, TaskSet(torch.arange(N_USERS), sx, sy, so, qx, qy, qo)


def _bound(algo, catalog: Catalog, tasks: TaskSet):
    algo.bind_catalog(catalog, tasks, schema=SMALL_SCHEMA)
    return algo


def _batch(tasks: TaskSet, n: int = 8):
    return tasks.batch(torch.arange(n)).to("cpu", torch.float64)


# -- the negatives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("proposal", ["uniform", "popularity"])
def test_negatives_never_hit_the_users_items_and_repeat_under_a_seed(proposal):
    catalog, tasks = planted()
    # the catalog knows only the support items: query items (e.g. implicit label-0 rows) come
    # from the batch and must be excluded too
    support_only = Catalog(N_ITEMS, tasks.support_offsets, tasks.support_x[:, -1], _feature_rows)
    sampler = NegativeSampler.build(support_only, SMALL_SCHEMA, proposal, tasks)
    batch = _batch(tasks, N_USERS)
    rated = catalog.rated_mask(torch.arange(N_USERS))
    counts = torch.bincount(torch.cat([tasks.support_x[:, -1], tasks.query_x[:, -1]]), minlength=N_ITEMS)
    weights = (counts + 1.0) if proposal == "popularity" else torch.ones(N_ITEMS)
    assert torch.allclose(sampler.log_q, (weights / weights.sum()).log().double())
    draws = []
    for seed in (3, 3, 4):
        neg_s, neg_q = sampler.sample(batch, 6, torch.Generator().manual_seed(seed), sets=2)
        for neg in (neg_s, neg_q):
            assert neg.mask.all()
            hit = rated.gather(1, neg.items)
            assert not bool(hit.any())  # never an item the user rated, in support or query
            assert (neg.rows[..., -1] == neg.items).all() and (neg.rows[..., 3] == torch.arange(N_USERS)[:, None]).all()
            assert all(len(set(r.tolist())) == 6 for r in neg.items)  # distinct within a task
        draws.append(torch.cat([neg_s.items, neg_q.items], 1))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_too_many_negatives_are_capped_with_a_warning_naming_the_value():
    catalog, tasks = planted()
    sampler = NegativeSampler.build(catalog, SMALL_SCHEMA, "uniform", tasks)
    batch = _batch(tasks, N_USERS)
    unseen = N_ITEMS - catalog.rated_mask(torch.arange(N_USERS)).sum(1)
    with pytest.warns(RuntimeWarning, match=r"algo\.n_negatives=25 is more than the \d+ items"):
        (neg,) = sampler.sample(batch, 25, torch.Generator().manual_seed(0))
    assert torch.equal(neg.mask.sum(1), unseen)  # every unseen item, and only those
    rated = catalog.rated_mask(torch.arange(N_USERS))
    assert not bool((rated.gather(1, neg.items) & neg.mask).any())


# -- the losses and their gradients -----------------------------------------------------------------


def _tiny_scores():
    pos = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64, requires_grad=True)
    neg = torch.tensor([[0.5, 1.5, -0.7, 9.0]], dtype=torch.float64, requires_grad=True)
    pos_mask = torch.tensor([[True, True, False]])  # the third row is not a positive
    neg_mask = torch.tensor([[True, True, True, False]])  # the fourth negative is padding
    return pos, neg, pos_mask, neg_mask


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bpr_gradient_equals_the_hand_computed_one():
    pos, neg, pm, nm = _tiny_scores()
    ranking_loss(pos, pm, neg, "bpr", nm).sum().backward()
    p, n = [0.3, -1.2], [0.5, 1.5, -0.7]
    want_p = [-sum(_sigmoid(b - a) for b in n) / 6 for a in p]
    want_n = [sum(_sigmoid(b - a) for a in p) / 6 for b in n]
    assert torch.allclose(pos.grad, torch.tensor([[*want_p, 0.0]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(neg.grad, torch.tensor([[*want_n, 0.0]], dtype=torch.float64), atol=1e-12)
    loss = ranking_loss(pos, pm, neg, "bpr", nm)
    assert float(loss.detach()) == pytest.approx(sum(math.log1p(math.exp(b - a)) for a in p for b in n) / 6)


def test_bce_with_negatives_gradient_equals_the_hand_computed_one():
    pos, neg, pm, nm = _tiny_scores()
    ranking_loss(pos, pm, neg, "bce", nm).sum().backward()
    want_p = [-_sigmoid(-a) / 5 for a in (0.3, -1.2)]
    want_n = [_sigmoid(b) / 5 for b in (0.5, 1.5, -0.7)]
    assert torch.allclose(pos.grad, torch.tensor([[*want_p, 0.0]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(neg.grad, torch.tensor([[*want_n, 0.0]], dtype=torch.float64), atol=1e-12)


def test_sampled_softmax_gradient_with_logq_equals_the_hand_computed_one():
    pos, neg, pm, nm = _tiny_scores()
    pos_q = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    neg_q = torch.tensor([[-0.2, -3.0, -1.5, -0.1]], dtype=torch.float64)
    ranking_loss(pos, pm, neg, "softmax", nm, pos_q, neg_q).sum().backward()
    sp = [0.3 + 1.0, -1.2 + 2.0]  # s - log q
    sn = [0.5 + 0.2, 1.5 + 3.0, -0.7 + 1.5]
    want_p, want_n = [], [0.0, 0.0, 0.0]
    for a in sp:
        z = math.exp(a) + sum(math.exp(b) for b in sn)
        want_p.append((-1 + math.exp(a) / z) / 2)
        for j, b in enumerate(sn):
            want_n[j] += math.exp(b) / z / 2
    assert torch.allclose(pos.grad, torch.tensor([[*want_p, 0.0]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(neg.grad, torch.tensor([[*want_n, 0.0]], dtype=torch.float64), atol=1e-12)


def test_a_task_without_positives_costs_nothing():
    scores = torch.randn(2, 3, dtype=torch.float64)
    none = torch.zeros(2, 3, dtype=torch.bool)
    for kind in ("bpr", "bce", "softmax"):
        assert torch.equal(ranking_loss(scores, none, torch.randn(2, 4, dtype=torch.float64), kind),
                           torch.zeros(2, dtype=torch.float64))


# -- every trainable algorithm ------------------------------------------------------------------------

ADAM = functools.partial(torch.optim.Adam, lr=0.05)
ALGOS = {
    "global": lambda m, **kw: GlobalModel(m, ADAM, **kw),
    "finetune": lambda m, **kw: Finetune(m, ADAM, adapt="head", finetune_steps=2, **kw),
    "maml": lambda m, **kw: MAML(m, ADAM, adapt="head", inner_lr=0.1, inner_steps=2, **kw),
    "fomaml_all": lambda m, **kw: MAML(m, ADAM, adapt="all", inner_lr=0.1, first_order=True, **kw),
    "metasgd": lambda m, **kw: MetaSGD(m, ADAM, adapt="all", inner_lr=0.1, **kw),
    "reptile": lambda m, **kw: Reptile(m, functools.partial(torch.optim.SGD, lr=0.5), adapt="head",
                                       inner_lr=1.0, inner_steps=3, body_optimizer=ADAM, **kw),
    "protonet": lambda m, **kw: ProtoNet(m, ADAM, **kw),
    "matchingnet": lambda m, **kw: MatchingNet(m, ADAM, **kw),
}


@pytest.mark.parametrize("kind", ["bpr", "bce", "softmax"])
@pytest.mark.parametrize("name", list(ALGOS))
def test_every_trainable_algo_meta_steps_and_its_ranking_loss_decreases(name, kind):
    catalog, tasks = planted()
    negatives = "popularity" if kind == "softmax" else "uniform"  # softmax: the logQ path
    algo = _bound(ALGOS[name](tiny_model(0), loss=kind, negatives=negatives, n_negatives=8,
                              positive_threshold=4.0, seed=1), catalog, tasks)
    batch = _batch(tasks, N_USERS)
    losses = [algo.meta_step(batch)["loss"] for _ in range(24)]  # fresh negatives every step
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.9 * first, (name, kind, np.round(losses, 3))
    scores = algo.adapt(batch).predict(batch.query_x)  # adaptation draws its own negatives
    assert scores.shape == batch.query_y.shape and bool(torch.isfinite(scores).all())


OTHER_SCOPES = {  # the remaining (algo, scope) pairs: one finite meta_step and adaptation each
    "reptile_all": lambda m, **kw: Reptile(m, functools.partial(torch.optim.SGD, lr=1.0), adapt="all",
                                           inner_lr=0.3, inner_steps=3, **kw),
    "metasgd_head": lambda m, **kw: MetaSGD(m, ADAM, adapt="head", inner_lr=0.1, **kw),
    "finetune_all": lambda m, **kw: Finetune(m, ADAM, adapt="all", finetune_steps=2, **kw),
}


@pytest.mark.parametrize("kind", ["bpr", "bce", "softmax"])
@pytest.mark.parametrize("name", list(OTHER_SCOPES))
def test_the_other_scopes_meta_step_with_each_ranking_loss(name, kind):
    catalog, tasks = planted()
    algo = _bound(OTHER_SCOPES[name](tiny_model(0), loss=kind, negatives="uniform", n_negatives=6),
                  catalog, tasks)
    batch = _batch(tasks)
    stats = algo.meta_step(batch)
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert bool(torch.isfinite(algo.adapt(batch).predict(batch.query_x)).all())


def test_ranking_meta_gradient_of_the_batched_core_equals_the_functional_reference():
    """``check_fast_path`` on an episode: the batched inner loop with a ranking task loss equals
    ``vmap(functional_call)`` in float64."""
    catalog, tasks = planted()
    for adapt in ("head", "all"):
        algo = _bound(MAML(tiny_model(0), ADAM, adapt=adapt, inner_lr=0.1, inner_steps=2, loss="softmax",
                           negatives="popularity", n_negatives=5, check_fast_path=True), catalog, tasks)
        algo.meta_step(_batch(tasks))  # raises TrainingError if the paths differ
        assert algo.inner_loop_name == ("fixed_input" if adapt == "head" else "touched_rows")


def _per_task_ranking_meta_loss(algo: MAML, ep, steps: int) -> torch.Tensor:
    """The MAML meta-loss of episode ``ep``, one task at a time on its real rows only (plain
    ``functional_call`` on dict fast weights, ``torch.autograd.grad`` per task)."""
    module, kind = algo.adapted_module, algo.ranking.kind
    total = torch.zeros((), dtype=torch.float64)
    for b in range(ep.batch.size):
        fast = dict(module.named_parameters())

        def task_loss(role, x, mask, fast=fast, b=b):
            real, n = mask[b, :role.n_real], int(mask[b, :role.n_real].sum())
            pred = functional_call(module, fast, (algo.inputs(x[b][mask[b]]),))
            q = (None, None) if role.pos_log_q is None else (role.pos_log_q[b][real][None],
                                                              role.neg_log_q[b][mask[b, role.n_real:]][None])
            return ranking_loss(pred[None, :n], role.pos_mask[b][real][None], pred[None, n:], kind, None, *q)[0]

        for _ in range(steps):
            loss = task_loss(ep.support, ep.batch.support_x, ep.batch.support_mask)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not algo.first_order)
            fast.update({n: p - algo.inner_lr * g for (n, p), g in zip(fast.items(), grads, strict=True)})
        total = total + task_loss(ep.query, ep.batch.query_x, ep.batch.query_mask)
    return total / ep.batch.size


@pytest.mark.parametrize("adapt", ["head", "all"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind", ["bpr", "softmax"])
def test_batched_ranking_meta_gradient_equals_the_per_task_loop(adapt, first_order, kind):
    catalog, tasks = planted()
    model = tiny_model(0)
    algo = _bound(MAML(model, ADAM, adapt=adapt, inner_lr=0.3, inner_steps=2, first_order=first_order,
                       chunks=1, loss=kind, negatives="popularity", n_negatives=5), catalog, tasks)
    batch = _batch(tasks)
    state = algo.ranking.generator.get_state()
    loss, _ = algo.meta_loss(batch)
    algo.ranking.generator.set_state(state)  # the same draws for the reference
    reference = _per_task_ranking_meta_loss(algo, algo.ranking.episode(batch), 2)
    params = list(model.parameters())
    batched = torch.autograd.grad(loss, params, allow_unused=True)
    looped = torch.autograd.grad(reference, params, allow_unused=True)
    assert abs(float((loss - reference).detach())) < 1e-10
    assert any(g is not None and float(g.abs().sum()) > 0 for g in batched)
    for g, r in zip(batched, looped, strict=True):
        g = torch.zeros(()) if g is None else g
        r = torch.zeros(()) if r is None else r
        assert float((g - r).abs().max()) < 1e-10


def test_adaptation_negatives_are_the_same_at_every_evaluation():
    """Adaptation draws are seeded by the tasks, not by the training generator's state."""
    catalog, tasks = planted()
    algo = _bound(MAML(tiny_model(0), ADAM, loss="bpr", n_negatives=5), catalog, tasks)
    batch = _batch(tasks)
    state = copy.deepcopy(algo.state_dict())
    first = algo.adapt(batch).predict(batch.query_x)
    algo.meta_step(batch)  # draws training negatives, moves the model
    algo.load_state_dict(state)
    assert torch.equal(first, algo.adapt(batch).predict(batch.query_x))


# -- bad input ------------------------------------------------------------------------------------------


def test_a_ranking_loss_on_a_model_without_item_ids_is_refused_in_one_line():
    torch.manual_seed(0)
    no_ids = PreferenceEstimator(SMALL_SCHEMA, embedding_dim=4, hidden=(8,), fields=["a", "b"]).double()
    for build in (lambda: MAML(no_ids, ADAM, loss="bpr"), lambda: ProtoNet(no_ids, ADAM, loss="softmax"),
                  lambda: GlobalModel(no_ids, ADAM, loss="bce", negatives="uniform")):
        with pytest.raises(ConfigError) as err:
            build()
        assert err.value.key == "loss" and "\n" not in str(err.value)
        assert "does not read item_id; add item_id to model.fields" in str(err.value)
    MAML(no_ids, ADAM, loss="bce")  # bce on given labels needs no item ids
    with pytest.raises(ConfigError, match=r"^model\.item_fields: algo\.loss=bpr ranks .* has no item_id"):
        check_config(compose("+algo=fomaml", "model=mf", "algo.loss=bpr", "model.item_fields=[category]"),
                     ["model.item_fields=[category]"])


def test_other_bad_ranking_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^negatives: loss=mse .* set algo\.negatives=null"):
        MAML(tiny_model(0), ADAM, negatives="uniform")
    with pytest.raises(ConfigError, match=r"^n_negatives: must be > 0"):
        MAML(tiny_model(0), ADAM, loss="bpr", n_negatives=0)
    with pytest.raises(ConfigError, match=r"^algo\.negatives: unknown value"):
        check_config(compose("+algo=maml", "algo.loss=bpr", "algo.negatives=hard"))
    with pytest.raises(ConfigError, match=r"^algo\.negatives: algo\.loss=mse"):
        check_config(compose("+algo=maml", "algo.negatives=uniform"), ["algo.negatives=uniform"])
    ndcg = "trainer.monitor=val/ndcg_at_10"
    with pytest.raises(ConfigError, match=r"^algo\.loss: .* tasks hold rows of several users"):
        check_config(compose("+algo=maml", "algo.loss=softmax", "splitter=item_cold_start",
                             "evaluator=query_only", "trainer.monitor=val/ndcg_at_5"))
    with pytest.raises(ConfigError, match=r"^trainer\.monitor: algo\.loss=bpr trains ranking scores"):
        check_config(compose("+algo=protonet", "algo.loss=bpr"))
    check_config(compose("+algo=maml", "algo.loss=bpr", "algo.negatives=popularity", "model=mf", ndcg))
    check_config(compose("+algo=global", "algo.loss=bce", "algo.negatives=uniform", ndcg))
    catalog, tasks = planted()
    unbound = MAML(tiny_model(0), ADAM, loss="bpr")
    with pytest.raises(TrainingError, match="bind_catalog"):
        unbound.meta_step(_batch(tasks))
    high = _bound(MAML(tiny_model(0), ADAM, loss="bpr", positive_threshold=6.0), catalog, tasks)
    with pytest.raises(ConfigError, match=r"^positive_threshold: no row of the batch is rated >= 6"):
        high.meta_step(_batch(tasks))


def test_mse_and_bce_on_labels_take_no_negatives():
    assert MAML(tiny_model(0), ADAM).ranking is None
    assert MAML(tiny_model(0), ADAM, loss="bce").ranking is None
    ranked = MAML(tiny_model(0), ADAM, loss="bpr")
    assert isinstance(ranked.ranking, RankingObjective) and ranked.ranking.negatives == "uniform"
    assert not ranked.predicts_ratings and MAML(tiny_model(0), ADAM).predicts_ratings
    assert set(MAML(tiny_model(0), ADAM).state_dict()) == {"model", "optimizer"}
    assert set(ranked.state_dict()) == {"model", "optimizer", "negatives"}


# -- learnability on the toy catalog ----------------------------------------------------------------------


def _toy(algo: str, *extra: str):
    from metarec_runner.run import Prepared

    cfg = compose(f"+algo={algo}", "logger=none", "trainer.progress=false", "trainer.checkpoint=false",
                  "save_split=false", "evaluator.references=false", "evaluator.metrics=[ndcg,recall]", *extra)
    prep = Prepared(cfg)
    prep.algo.bind_catalog(Catalog.from_interactions(prep.data), prep.splits.train)
    runner = quiet_runner(prep, cfg.seed)
    runner.fit(prep.splits.train, prep.splits.val)
    test = prep.splits.test.with_support_size(5)
    return prep.evaluator.evaluate(prep.algo, test, "test", prep.device).per_task


@pytest.mark.slow
def test_a_ranking_trained_meta_learner_beats_popularity_at_k5_on_toy():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        meta = _toy("fomaml", "model=mf", "algo.loss=bpr", "algo.adapt=head", "algo.inner_lr=0.5",
                    "algo.eval_inner_steps=5", "trainer.max_epochs=12", "trainer.monitor=val/ndcg_at_5",
                    "algo.meta_optimizer.lr=0.01")
        pop = _toy("popularity", "trainer.monitor=val/ndcg_at_5")
    assert (meta["task_id"].to_numpy() == pop["task_id"].to_numpy()).all()
    m, p = meta["ndcg_at_5"].mean(), pop["ndcg_at_5"].mean()
    print(f"toy, k=5 support items: ndcg@5 fomaml+bpr {m:.3f} vs popularity {p:.3f}; "
          f"recall@5 {meta['recall_at_5'].mean():.3f} vs {pop['recall_at_5'].mean():.3f}")
    assert m > p + 0.03 and m > 1.15 * p
