"""The processed dataset cache: identical reloads, invalidation on edits, atomic writes."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from metarec_runner.data import cache as cache_mod
from metarec_runner.data import movielens, tabular
from metarec_runner.data.interactions import Interactions
from metarec_runner.data.movielens import load_movielens
from metarec_runner.data.recbole import load_recbole_atomic
from metarec_runner.data.tabular import load_tabular
from tests.test_movielens import DATA, U_DATA, need, write_100k


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("METAREC_CACHE_DIR", str(path))
    return path


def assert_same(a: Interactions, b: Interactions) -> None:
    for part in ("ratings", "user_features", "item_features"):
        pd.testing.assert_frame_equal(getattr(a, part), getattr(b, part))
    for x, y in ((a.user_bags, b.user_bags), (a.item_bags, b.item_bags)):
        assert list(x) == list(y) and all(np.array_equal(x[k], y[k]) for k in x)
    assert a.cardinalities == b.cardinalities and a.rating_scale == b.rating_scale
    assert a.checksum() == b.checksum()
    assert a.metadata["files"] == b.metadata["files"] and a.metadata["vocab"] == b.metadata["vocab"]
    for key in ("raw_user_ids", "raw_item_ids"):
        assert np.array_equal(a.metadata[key], b.metadata[key])


def entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_second_load_of_ml_100k_comes_from_the_cache(cache_dir, monkeypatch):
    need("ml-100k")
    t0 = time.perf_counter()
    first = load_movielens("ml-100k", str(DATA))
    t1 = time.perf_counter()

    def no_parsing(*args, **kwargs):
        raise AssertionError("a cached load must not parse the text files")

    monkeypatch.setattr(tabular, "read_table", no_parsing)
    monkeypatch.setattr(movielens, "read_table", no_parsing)
    second = load_movielens("ml-100k", str(DATA))
    t2 = time.perf_counter()
    assert first.metadata["cache"]["hit"] is False and second.metadata["cache"]["hit"] is True
    assert_same(first, second)
    print(f"ml-100k first load {t1 - t0:.3f}s, cached load {t2 - t1:.3f}s")  # reported, not asserted
    assert [e for e in entries(cache_dir) if e.startswith("ml-100k-")] == [
        os.path.basename(second.metadata["cache"]["dir"])]


def test_editing_a_source_file_invalidates_the_cache(tmp_path, cache_dir):
    write_100k(tmp_path)
    first = load_movielens("ml-100k", str(tmp_path))
    assert load_movielens("ml-100k", str(tmp_path)).metadata["cache"]["hit"]
    path = tmp_path / "ml-100k" / "u.data"
    stat = path.stat()
    path.write_text(path.read_text().replace("\t5\t", "\t1\t"))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    edited = load_movielens("ml-100k", str(tmp_path))
    assert edited.metadata["cache"]["hit"] is False
    assert edited.ratings["rating"].tolist() != first.ratings["rating"].tolist()
    assert edited.metadata["files"]["ratings"]["sha256"] != first.metadata["files"]["ratings"]["sha256"]
    with path.open("a") as f:  # a longer file
        f.write("2\t2\t5\t104\n")
    assert len(load_movielens("ml-100k", str(tmp_path)).ratings) == len(U_DATA) + 1
    assert load_movielens("ml-100k", str(tmp_path)).metadata["cache"]["hit"]


def test_arguments_are_part_of_the_key_and_cache_false_writes_nothing(tmp_path, cache_dir):
    write_100k(tmp_path)
    load_movielens("ml-100k", str(tmp_path), cache=False)
    assert entries(cache_dir) == []
    raw = load_movielens("ml-100k", str(tmp_path))
    unit = load_movielens("ml-100k", str(tmp_path), rating_scale="unit")
    assert raw.metadata["cache"]["dir"] != unit.metadata["cache"]["dir"]
    assert unit.rating_scale == (0.0, 1.0) and raw.rating_scale == (2.0, 5.0)
    assert len([e for e in entries(cache_dir) if e.startswith("ml-100k-")]) == 2


def test_an_interrupted_write_leaves_no_cache(tmp_path, cache_dir, monkeypatch):
    write_100k(tmp_path)
    real_save = np.save
    calls = []

    def failing_save(*args, **kwargs):  # dies after the parquet files and one bag are written
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("simulated crash mid-write")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(cache_mod.np, "save", failing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_movielens("ml-100k", str(tmp_path))
    assert entries(cache_dir) == ["checksums.json"]  # no dataset folder, no temp folder
    monkeypatch.setattr(cache_mod.np, "save", real_save)
    data = load_movielens("ml-100k", str(tmp_path))
    assert data.metadata["cache"]["hit"] is False
    assert load_movielens("ml-100k", str(tmp_path)).metadata["cache"]["hit"] is True


def test_a_damaged_cache_is_rebuilt(tmp_path, cache_dir):
    write_100k(tmp_path)
    first = load_movielens("ml-100k", str(tmp_path))
    folder = cache_dir / os.path.basename(first.metadata["cache"]["dir"])
    (folder / "ratings.parquet").write_bytes(b"garbage")
    again = load_movielens("ml-100k", str(tmp_path))
    assert again.metadata["cache"]["hit"] is False
    assert_same(first, again)
    shutil.rmtree(folder)
    assert load_movielens("ml-100k", str(tmp_path)).metadata["cache"]["hit"] is False


def test_default_cache_location_is_inside_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("METAREC_CACHE_DIR", raising=False)
    write_100k(tmp_path)
    data = load_movielens("ml-100k", str(tmp_path))
    assert data.metadata["cache"]["dir"].startswith(str(tmp_path / ".metarec-cache" / "ml-100k-"))


def test_a_read_only_data_dir_caches_under_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("METAREC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_100k(tmp_path / "data")
    (tmp_path / "data").chmod(0o555)
    try:
        data = load_movielens("ml-100k", str(tmp_path / "data"))
    finally:
        (tmp_path / "data").chmod(0o755)
    assert data.metadata["cache"]["dir"].startswith(str(tmp_path / "xdg" / "metarec" / "processed"))
    assert not (tmp_path / "data" / ".metarec-cache").exists()


def test_generic_loaders_round_trip_through_the_cache(tmp_path, cache_dir):
    (tmp_path / "r.csv").write_text("u,i,r\nb,x,1\na,y,2\na,x,3\n")
    (tmp_path / "f.csv").write_text("id,kind,tags\nx,k1,p q\ny,k2,q\n")
    kwargs = {"name": "t", "ratings": "r.csv", "columns": {"user": "u", "item": "i", "rating": "r"},
              "item_features": {"path": "f.csv", "id_column": "id", "columns": ["kind"],
                                "bags": {"tags": " "}}, "data_dir": str(tmp_path)}
    first, second = load_tabular(**kwargs), load_tabular(**kwargs)
    assert second.metadata["cache"]["hit"] and second.metadata["raw_user_ids"].tolist() == ["a", "b"]
    assert_same(first, second)
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\trating:float\nu\ti\t4\n")
    first, second = (load_recbole_atomic("x", str(tmp_path)) for _ in range(2))
    assert second.metadata["cache"]["hit"]
    assert_same(first, second)
