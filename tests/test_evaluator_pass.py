"""Evaluation reads as one pass: a task set's candidates and relevance are built once."""

from __future__ import annotations

import torch

import metarec_runner.evaluate.evaluator as evaluator_module
from metarec_runner.prepare import build
from tests.helpers import compose, fit_test


def test_candidates_are_built_once_per_task_set_and_reused_identically(monkeypatch):
    cfg = compose("+algo=global", "logger=none", "dataset.n_users=120", "dataset.n_items=80",
                  "trainer.max_epochs=1", "trainer.progress=false")
    prep, _, _ = fit_test(cfg)
    calls = {"n": 0}
    real = evaluator_module.build_candidates

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator_module, "build_candidates", counting)
    ev, val, dev = prep.evaluator, prep.splits.val, prep.device
    ev._prepared.clear()
    first = ev.evaluate(prep.algo, val, "val", dev)
    built = calls["n"]
    assert built == -(-len(val) // ev.batch_size) > 0  # one build per batch of the task set
    second = ev.evaluate(prep.algo, val, "val", dev)
    assert calls["n"] == built  # reused, not rebuilt
    assert first.summary == second.summary
    fresh = build("evaluator", cfg.evaluator).bind(ev.catalog, ev.rating_mean)
    assert fresh.evaluate(prep.algo, val, "val", dev).summary == first.summary  # same as a cold evaluator
    with torch.no_grad():
        for p in prep.algo.model.parameters():
            p.add_(0.05)
    moved = ev.evaluate(prep.algo, val, "val", dev)
    assert moved.summary["val/rmse"] != first.summary["val/rmse"]  # the scores are fresh every call


def test_every_test_report_carries_popularity_equal_to_the_popularity_algo():
    """``test/ref/popularity/*`` scores the same candidates by meta-train counts: the numbers of
    ``algo=popularity`` itself, beside every model."""
    tiny = ("logger=none", "dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=1",
            "trainer.progress=false")
    _, _, model = fit_test(compose("+algo=global", *tiny))
    _, _, popularity = fit_test(compose("+algo=popularity", *tiny))
    for metric in ("ndcg_at_10", "recall_at_10", "mrr_at_10"):
        assert model.summary[f"test/ref/popularity/{metric}"] == popularity.summary[f"test/{metric}"]
    assert model.summary["test/ref/popularity/ndcg_at_10"] != model.summary["test/ref/random/ndcg_at_10"]
