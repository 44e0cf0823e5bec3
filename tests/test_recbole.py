"""RecBole atomic files: an ml-100k export loads to exactly what the direct loader gives."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate

from metarec_runner.data.encode import UNKNOWN
from metarec_runner.data.interactions import Interactions
from metarec_runner.data.movielens import load_movielens
from metarec_runner.data.recbole import load_recbole_atomic
from metarec_runner.errors import DataError
from tests.test_movielens import DATA, compose_dataset, need, write_100k


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAREC_CACHE_DIR", str(tmp_path / "cache"))


def export_atomic(data: Interactions, folder: Path, name: str) -> None:
    """Write ``data`` as RecBole atomic files (decoded tokens; the raw ids as user/item ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, users, items = data.metadata["vocab"], data.metadata["raw_user_ids"], data.metadata["raw_item_ids"]
    r = data.ratings
    inter = pd.DataFrame({"user_id:token": users[r.user], "item_id:token": items[r.item],
                          "rating:float": r.rating, "timestamp:float": r.timestamp})
    inter.sample(frac=1.0, random_state=0).to_csv(folder / f"{name}.inter", sep="\t", index=False,
                                                      quoting=csv.QUOTE_NONE)

    def side(ids, frame, bags, path):
        out = {"id:token": ids}
        for col in frame.columns:
            out[f"{col}:token"] = np.asarray(vocab[col], dtype=object)[frame[col]]
        out["score:float"] = np.arange(len(ids)) / 7  # a float field: skipped with a note
        for name_, arr in bags.items():
            out[f"{name_}:token_seq"] = [" ".join(vocab[name_][c] for c in row if c >= 0) for row in arr]
        table = pd.DataFrame(out).rename(columns={"id:token": path.suffix[1:] + "_id:token"})
        table.to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_NONE)

    side(users, data.user_features, data.user_bags, folder / f"{name}.user")
    side(items, data.item_features, data.item_bags, folder / f"{name}.item")


def assert_same(a: Interactions, b: Interactions) -> None:
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.user_features, b.user_features)
    pd.testing.assert_frame_equal(a.item_features, b.item_features)
    assert a.cardinalities == b.cardinalities
    for x, y in ((a.user_bags, b.user_bags), (a.item_bags, b.item_bags)):
        assert list(x) == list(y) and all(np.array_equal(x[k], y[k]) for k in x)
    assert a.checksum() == b.checksum()


def test_ml_100k_atomic_export_matches_the_direct_loader(tmp_path):
    need("ml-100k")
    direct = load_movielens("ml-100k", str(DATA), cache=False)
    export_atomic(direct, tmp_path / "atomic", "ml-100k")
    atomic = load_recbole_atomic("ml-100k", "atomic", data_dir=str(tmp_path))
    assert_same(direct, atomic)
    assert (len(atomic.ratings), atomic.n_users, atomic.n_items) == (100_000, 943, 1682)
    assert atomic.metadata["skipped_fields"] == ["ml-100k.user:score:float", "ml-100k.item:score:float"]


def test_synthetic_atomic_export_matches(tmp_path):
    write_100k(tmp_path)
    direct = load_movielens("ml-100k", str(tmp_path), cache=False)
    export_atomic(direct, tmp_path / "atomic", "tiny")
    assert_same(direct, load_recbole_atomic("tiny", str(tmp_path / "atomic")))
    cfg = compose_dataset("recbole_atomic", "dataset.name=tiny", f"dataset.folder={tmp_path / 'atomic'}")
    assert_same(direct, instantiate(cfg.dataset))


def test_implicit_inter_without_item_file(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\tclicks:float\n"
                                      "u1\ti1\t2\nu1\ti2\t0\nu2\ti1\t5\n")
    (tmp_path / "x.user").write_text("user_id:token\tgroup:token\thist:token_seq\nu1\tA\tp q p\n")
    data = load_recbole_atomic("x", str(tmp_path), rating_field="clicks", feedback="binary")
    assert data.ratings["rating"].tolist() == [1.0, 0.0, 1.0] and data.item_features.shape == (2, 0)
    assert [data.metadata["vocab"]["group"][c] for c in data.user_features["group"]] == ["A", UNKNOWN]
    assert data.user_bags["hist"].tolist() == [[0, 1, 0], [-1, -1, -1]]  # repeats are kept
    with pytest.raises(DataError, match=r"x\.inter has no 'rating' field; set rating_field"):
        load_recbole_atomic("x", str(tmp_path))


@pytest.mark.parametrize("header, pattern", [
    ("user_id\titem_id", r"x\.inter line 1: header field 'user_id' is not a unique name:type"),
    ("user_id:token\titem_id:tokens", r"header field 'item_id:tokens'"),
    ("user:token\titem_id:token",
     r"x\.inter: no user_id:token field \(it has user:token, item_id:token\); set user_field"),
])
def test_bad_headers(tmp_path, header, pattern):
    (tmp_path / "x.inter").write_text(header + "\n1\t2\n")
    with pytest.raises(DataError, match=pattern):
        load_recbole_atomic("x", str(tmp_path), feedback="binary")


def test_missing_inter_file(tmp_path):
    with pytest.raises(DataError, match=r"y\.inter not found; the folder must hold RecBole"):
        load_recbole_atomic("y", str(tmp_path))
