"""Versioned benchmark settings compose and reproduce their protocol's published counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metarec_runner.paths import group_options
from metarec_runner.run import Prepared
from tests.helpers import compose

SHARED = Path(os.environ.get("METAREC_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiments_compose_and_never_pin_the_algorithm(experiment):
    cfg = compose(f"experiment={experiment}", "logger=none")
    assert "algo" not in cfg
    cfg = compose(f"experiment={experiment}", "+algo=maml", "logger=none")
    assert cfg.algo._target_.endswith("MAML")


def test_recbole_metarec_preset_reproduces_the_peer_counts(monkeypatch, tmp_path):
    if not (SHARED / "ml-100k" / "u.data").exists():
        pytest.skip(f"real dataset {SHARED / 'ml-100k'} is absent (set METAREC_DATA_DIR)")
    monkeypatch.setenv("METAREC_DATA_DIR", str(SHARED))
    monkeypatch.setenv("METAREC_CACHE_DIR", str(tmp_path / "cache"))
    prep = Prepared(compose("experiment=ml100k_recbole_metarec", "+algo=maml", "logger=none"))
    s = prep.splits
    assert (len(s.train), len(s.val), len(s.test)) == (466, 58, 58)
    rows = sum(int(p.support_offsets[-1] + p.query_offsets[-1]) for p in (s.train, s.val, s.test))
    assert rows == 25_778
    for part in (s.train, s.val, s.test):
        assert (part.query_sizes == 10).all()
        assert part.support_sizes.min() >= 3 and part.support_sizes.max() <= 90
    assert "user_id" not in prep.model.fields and "item_id" not in prep.model.fields


@pytest.mark.parametrize("experiment, threshold", [("coldstart_ml100k", 4.0), ("coldstart_mlsmall", 4.0),
                                                   ("coldstart_lastfm", 1.0)])
@pytest.mark.parametrize("preset", ["maml", "global", "finetune", "set_ranker"])
def test_ranking_positives_follow_the_study_relevance(experiment, threshold, preset):
    """The ranking losses train on what the study counts as relevant: 4 and 5 stars on MovieLens,
    every listened artist on Last.fm's 0/1 data (a threshold of 4 there would leave no positive)."""
    cfg = compose(f"experiment={experiment}", f"+coldstart={preset}", "logger=none")
    assert cfg.evaluator.relevance_threshold == threshold
    assert cfg.algo.positive_threshold == threshold
