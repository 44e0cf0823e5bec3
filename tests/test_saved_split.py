"""Saved splits: save_splits -> SavedSplit reloads identical tasks (same split_hash) or refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from metarec_runner.data.toy import make_toy_catalog
from metarec_runner.errors import ConfigError, DataError
from metarec_runner.run import Prepared
from metarec_runner.tasks.domains import Domains
from metarec_runner.tasks.four_states import FourStates
from metarec_runner.tasks.implicit import ImplicitUserColdStart
from metarec_runner.tasks.item_cold_start import ItemColdStart
from metarec_runner.tasks.saved import SavedSplit, read_split_metadata, save_splits
from metarec_runner.tasks.splitters import UserColdStart
from metarec_runner.tasks.user_groups import UserGroups
from tests.helpers import compose

DATA = Path(os.environ.get("METAREC_DATA_DIR")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")

FIELDS = ("task_ids", "support_x", "support_y", "support_offsets", "query_x", "query_y", "query_offsets")


@pytest.fixture(scope="module")
def toy():
    return make_toy_catalog(n_users=150, n_items=200, interactions_per_user=(20, 50), seed=2)


def _assert_same(a, b):
    assert a.split_hash == b.split_hash
    for part_a, part_b in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert part_a.task_kind == part_b.task_kind
        for f in FIELDS:
            ta, tb = getattr(part_a, f), getattr(part_b, f)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), f
        if part_a.query_expected is None:
            assert part_b.query_expected is None
        else:
            assert torch.allclose(part_a.query_expected, part_b.query_expected)


SPLITTERS = {
    "user_cold_start": lambda: UserColdStart(n_query=5, seed=1),
    "item_cold_start": lambda: ItemColdStart(n_query=5, min_interactions=10, seed=1),
    "four_states": lambda: FourStates(state="warm", n_query=5, seed=1),
    "user_groups": lambda: UserGroups(n_groups=10, n_query=10, n_support=20, min_interactions=30, seed=1),
    "domains": lambda: Domains(field="category", test_domains=[[0, 1, 2]], n_query=5, min_interactions=8, seed=1),
    "implicit": lambda: ImplicitUserColdStart(negatives_per_positive=2, seed=1),
}


@pytest.mark.parametrize("name", list(SPLITTERS))
def test_saved_then_reloaded_is_identical(toy, tmp_path, name):
    splits = SPLITTERS[name]()(toy)
    path = tmp_path / "split.parquet"
    save_splits(splits, toy, path)
    meta = read_split_metadata(path)
    assert meta["split_hash"] == splits.split_hash and meta["data_checksum"] == toy.checksum()
    assert meta["task_kind"]["test"] == splits.test.task_kind
    _assert_same(splits, SavedSplit(path)(toy))


def test_saved_rows_hold_split_role_order_and_codes(toy, tmp_path):
    splits = UserColdStart(n_query=5, seed=0)(toy)
    path = tmp_path / "s.parquet"
    save_splits(splits, toy, path)
    frame = pq.read_table(path).to_pandas()
    assert {"split", "task", "role", "order", "user", "item", "rating", "expected_rating"} <= set(frame.columns)
    test_q = frame[(frame.split == "test") & (frame.role == "query")].sort_values(["task", "order"])
    assert np.array_equal(test_q["item"].to_numpy(), splits.test.query_x[:, -1].numpy())
    assert np.array_equal(test_q["rating"].to_numpy(), splits.test.query_y.numpy())
    assert len(frame) == sum(int(p.support_offsets[-1] + p.query_offsets[-1])
                             for p in (splits.train, splits.val, splits.test))


def test_other_data_is_refused_naming_file_and_checksums(toy, tmp_path):
    path = tmp_path / "split.parquet"
    save_splits(UserColdStart(n_query=5)(toy), toy, path)
    other = make_toy_catalog(n_users=150, n_items=200, interactions_per_user=(20, 50), seed=3)
    with pytest.raises(DataError) as err:
        SavedSplit(path)(other)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert toy.checksum() in msg and other.checksum() in msg


def test_missing_and_damaged_files(toy, tmp_path):
    with pytest.raises(ConfigError, match="splitter.path.*no saved split"):
        SavedSplit(tmp_path / "nope.parquet")(toy)
    path = tmp_path / "split.parquet"
    save_splits(UserColdStart(n_query=5)(toy), toy, path)
    table = pq.read_table(path)
    frame = table.to_pandas()
    frame.loc[0, "rating"] = frame.loc[0, "rating"] + 1  # tamper with one rating
    damaged = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(table.schema.metadata)
    pq.write_table(damaged, path)
    with pytest.raises(DataError, match="damaged"):
        SavedSplit(path)(toy)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "plain.parquet")
    with pytest.raises(DataError, match="without metarec split metadata"):
        SavedSplit(tmp_path / "plain.parquet")(toy)
    assert json.loads(table.schema.metadata[b"metarec"])["format_version"] == 1


def test_splitter_saved_through_hydra(tmp_path):
    """splitter=saved splitter.path=... rebuilds the run's exact tasks from the config."""
    overrides = ["+algo=maml", "logger=none", "dataset.n_users=120", "dataset.n_items=80"]
    first = Prepared(compose(*overrides))
    path = tmp_path / "split.parquet"
    save_splits(first.splits, first.data, path)
    again = Prepared(compose(*overrides, "splitter=saved", f"splitter.path={path}"))
    _assert_same(first.splits, again.splits)


def test_saved_four_states_on_ml100k(tmp_path, monkeypatch):
    if not (DATA / "ml-100k").is_dir():
        pytest.skip(f"real dataset {DATA / 'ml-100k'} is absent (set METAREC_DATA_DIR to the shared data folder)")
    from metarec_runner.data.movielens import load_movielens

    monkeypatch.setenv("METAREC_CACHE_DIR", str(tmp_path / "cache"))
    data = load_movielens(name="ml-100k", data_dir=str(DATA))
    splits = FourStates(state="user_cold")(data)
    save_splits(splits, data, tmp_path / "ml.parquet")
    _assert_same(splits, SavedSplit(tmp_path / "ml.parquet")(data))
