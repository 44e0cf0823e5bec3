"""The two-tower model: towers as documented, a zero-shot answer from user features, MAML on it
through torch.func.functional_call equal to the per-task reference."""

from __future__ import annotations

import functools

import pytest
import torch

from metarec_runner.algos.maml import MAML
from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.errors import ConfigError
from metarec_runner.models.two_tower import TwoTower
from metarec_runner.tasks.synthetic import random_taskset
from tests.test_models_zoo import _per_task_maml_loss

SCHEMA = FeatureSchema(("age", "gender", "genre", "user_id", "item_id"), (4, 2, 5, 20, 30),
                       user_fields=("age", "gender"))
TOL = 1e-10


def _model(**kw) -> TwoTower:
    torch.manual_seed(0)
    model = TwoTower(SCHEMA, embedding_dim=3, tower_dim=4, hidden=(5,), rating_mean=3.0, **kw).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_towers_read_their_own_fields_and_score_by_a_dot_product():
    model = _model()
    assert model.user_fields == ("age", "gender") and model.item_fields == ("genre", "item_id")
    x = torch.tensor([[1, 0, 3, 7, 11], [2, 1, 3, 9, 11]])
    emb_u = model.user_embedding.weight
    u_in = torch.stack([torch.cat([emb_u[int(r[0])], emb_u[4 + int(r[1])]]) for r in x])
    emb_i = model.item.weight
    i_in = torch.stack([torch.cat([emb_i[int(r[2])], emb_i[5 + int(r[4])]]) for r in x])
    bias = torch.stack([model.item_bias.weight[int(r[2]), 0] + model.item_bias.weight[5 + int(r[4]), 0] for r in x])
    expected = ((model.user_tower(u_in) + model.head.user) * model.item_tower(i_in)).sum(-1) + bias + model.head.bias
    assert torch.allclose(model(x), expected, atol=TOL)
    # the same item for two users who differ only in features: the zero-shot answer differs
    assert model(x)[0] != model(x)[1]
    # user_id is read by neither tower
    other = x.clone()
    other[:, 3] = 0
    assert torch.equal(model(x), model(other))


def test_without_user_fields_every_user_starts_from_the_same_vector():
    model = _model(user_fields=[], item_fields=["genre", "item_id"])
    x = torch.tensor([[1, 0, 3, 7, 11], [2, 1, 3, 9, 11]])  # two users, the same item
    assert model.user_embedding is None
    assert model(x)[0] == model(x)[1]  # no user tower: only the (adapted) head tells users apart


@pytest.mark.parametrize("kw, key", [({"user_fields": ["user_id"]}, "user_fields"),
                                     ({"item_fields": ["age", "item_id"]}, "item_fields"),
                                     ({"user_fields": ["nope"]}, "user_fields")])
def test_bad_fields_are_one_line(kw, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        TwoTower(SCHEMA, **kw)


@pytest.mark.parametrize("scope, first_order", [("head", False), ("all", False), ("head", True)])
def test_maml_on_two_towers_equals_the_per_task_reference(scope, first_order):
    model = _model()
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.1), adapt=scope, inner_lr=0.2, inner_steps=2,
                first_order=first_order, touched_rows=False)
    tasks = random_taskset(SCHEMA, 6, support=(2, 9), query=(1, 5), seed=1)
    batch = tasks.batch(torch.arange(6)).to("cpu", torch.float64)
    loss, _ = algo.meta_loss(batch)
    reference = _per_task_maml_loss(algo, batch, 0.2, 2, first_order)
    assert abs(float((loss - reference).detach())) < TOL
    params = list(model.parameters())
    for g, r in zip(torch.autograd.grad(loss, params, allow_unused=True),
                    torch.autograd.grad(reference, params, allow_unused=True), strict=True):
        if g is None or r is None:
            assert g is None or float(g.abs().max()) == 0.0
            continue
        assert (g - r).abs().max() < TOL
