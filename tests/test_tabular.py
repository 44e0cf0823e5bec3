"""The generic (bring-your-own) tabular loader: Last.fm 2k via the shipped config, feedback modes,
duplicates, filters, side features, formats and errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate

from metarec_runner.data.encode import UNKNOWN
from metarec_runner.data.interactions import Interactions
from metarec_runner.data.tabular import load_tabular
from metarec_runner.errors import ConfigError, DataError
from tests.test_movielens import DATA, compose_dataset, need

COLS = {"user": "u", "item": "i", "rating": "r", "timestamp": "t"}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAREC_CACHE_DIR", str(tmp_path / "cache"))


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path, **kwargs) -> Interactions:
    kwargs = {"name": "t", "ratings": "r.csv", "columns": COLS, "data_dir": str(tmp_path), **kwargs}
    return load_tabular(**kwargs)


# ------------------------------------------------------------------ Last.fm via the config


def test_lastfm_2k_through_the_shipped_config(monkeypatch):
    need("hetrec2011-lastfm-2k")
    monkeypatch.setenv("METAREC_DATA_DIR", str(DATA))
    cfg = compose_dataset("lastfm_2k")
    assert cfg.dataset.feedback == "log" and cfg.dataset.data_dir == str(DATA)
    data = instantiate(cfg.dataset)
    assert (len(data.ratings), data.n_users, data.n_items) == (92_834, 1_892, 17_632)
    assert data.metadata["files"]["ratings"]["sha256"].startswith("001400dc3c7d2667")
    assert (data.ratings["timestamp"] == 0).all() and data.ratings["rating"].min() == np.float32(np.log1p(1))
    raw = pd.read_csv(DATA / "hetrec2011-lastfm-2k" / "user_artists.dat", sep="\t")
    first = raw.iloc[0]  # userID 2, artistID 51, weight 13883
    u = list(data.metadata["raw_user_ids"]).index(str(first.userID))
    i = list(data.metadata["raw_item_ids"]).index(str(first.artistID))
    row = data.ratings[(data.ratings.user == u) & (data.ratings.item == i)]
    assert row["rating"].tolist() == [pytest.approx(np.log1p(first.weight), rel=1e-6)]
    binary = instantiate(compose_dataset("lastfm_2k", "dataset.feedback=binary").dataset)
    assert (binary.ratings["rating"] == 1).all() and binary.rating_scale == (0.0, 1.0)
    assert binary.checksum() != data.checksum()


# ------------------------------------------------------------------ feedback, duplicates, filters


def test_feedback_modes_and_missing_timestamps(tmp_path):
    write(tmp_path / "w.tsv", "user\titem\tcount\na\tx\t0\na\ty\t3\nb\tx\t7\n")
    cols = {"user": "user", "item": "item", "weight": "count"}
    log = load(tmp_path, ratings="w.tsv", columns=cols, feedback="log")
    assert sorted(log.ratings["rating"].round(5)) == sorted(np.round(np.log1p([0, 3, 7]), 5).astype(np.float32))
    assert (log.ratings["timestamp"] == 0).all()
    binary = load(tmp_path, ratings="w.tsv", columns=cols, feedback="binary")
    assert binary.ratings["rating"].tolist() == [0.0, 1.0, 1.0] and binary.rating_scale == (0.0, 1.0)
    pairs = load(tmp_path, ratings="w.tsv", columns={"user": "user", "item": "item"}, feedback="binary")
    assert (pairs.ratings["rating"] == 1).all()
    write(tmp_path / "n.tsv", "user\titem\tcount\na\tx\t-2\n")
    with pytest.raises(DataError, match=r"n\.tsv line 2: 'a\\tx\\t-2': negative weight"):
        load(tmp_path, ratings="n.tsv", columns=cols, feedback="log")
    with pytest.raises(ConfigError, match="columns.rating: feedback=explicit needs"):
        load(tmp_path, ratings="w.tsv", columns=cols)


def test_duplicates_keep_last_mean_error(tmp_path):
    write(tmp_path / "r.csv", "u,i,r,t\n1,a,1,50\n1,a,5,10\n2,a,3,1\n1,a,3,50\n")
    with pytest.raises(DataError, match=r"duplicate \(user, item\) pair \('1', 'a'\) in "
                                        r".*r\.csv line 2: '1,a,1,50' and again at .*r\.csv line 3"):
        load(tmp_path)
    last = load(tmp_path, duplicates="keep_last")  # latest timestamp; ties -> the later row
    assert last.ratings[["user", "rating", "timestamp"]].values.tolist() == [[0, 3, 50], [1, 3, 1]]
    mean = load(tmp_path, duplicates="mean")
    assert mean.ratings[["user", "rating", "timestamp"]].values.tolist() == [[0, 3, 50], [1, 3, 1]]
    assert mean.metadata["counts"]["duplicates_removed"] == 2
    write(tmp_path / "m.csv", "u,i,r,t\n1,a,1,5\n1,a,2,6\n")
    assert load(tmp_path, ratings="m.csv", duplicates="mean").ratings["rating"].tolist() == [1.5]


def test_filters_and_the_filter_that_empties_the_data(tmp_path):
    rows = ["u,i,r,t"] + [f"{u},{i},4,{u * 10 + i}" for u in range(5) for i in range(u + 1)]
    write(tmp_path / "r.csv", "\n".join(rows) + "\n")  # user u rated items 0..u
    data = load(tmp_path, min_user_interactions=3)
    assert data.n_users == 3 and data.metadata["raw_user_ids"].tolist() == ["2", "3", "4"]
    capped = load(tmp_path, max_user_interactions=2, min_item_interactions=2)
    # items first (item 4 has one rating), then users: user 4 (4 left) is cut by max=2
    assert capped.metadata["raw_user_ids"].tolist() == ["0", "1"]
    with pytest.raises(DataError, match=r"filter user_interactions in \[6, None\] removed every "
                                        r"interaction.*min_user_interactions"):
        load(tmp_path, min_user_interactions=6)
    with pytest.raises(DataError, match=r"filter item_interactions in \[9, None\] removed every"):
        load(tmp_path, min_item_interactions=9)
    with pytest.raises(ConfigError, match="max_user_interactions"):
        load(tmp_path, min_user_interactions=3, max_user_interactions=2)


# ------------------------------------------------------------------ features and formats


def test_side_features_and_bags(tmp_path):
    write(tmp_path / "r.csv", "u,i,r,t\n1,a,4,1\n2,b,3,2\n2,c,5,3\n")
    write(tmp_path / "feat" / "items.csv", "id,brand,tags\na,acme,red|big\nb,,blue\nz,zz,x\n")
    write(tmp_path / "users.tsv", "uid\tcountry\n1\tNL\n")
    data = load(tmp_path, item_features={"path": "feat/items.csv", "id_column": "id",
                                         "columns": ["brand"], "bags": {"tags": "|"}},
                user_features={"path": str(tmp_path / "users.tsv"), "id_column": "uid",
                               "columns": ["country"]})
    vocab = data.metadata["vocab"]
    assert sorted(vocab["brand"]) == [UNKNOWN, "acme"]  # b has an empty brand, c is not in the file
    assert [vocab["brand"][c] for c in data.item_features["brand"]] == ["acme", UNKNOWN, UNKNOWN]
    assert data.item_bags["tags"].tolist() == [[2, 0], [1, -1], [-1, -1]]  # red big, blue, none
    assert vocab["tags"] == ["big", "blue", "red"]
    assert [vocab["country"][c] for c in data.user_features["country"]] == ["NL", UNKNOWN]
    assert set(data.metadata["files"]) == {"ratings", "user_features", "item_features"}
    with pytest.raises(DataError, match=r"items\.csv has no column 'colour' .*fix item_features"):
        load(tmp_path, item_features={"path": "feat/items.csv", "id_column": "id",
                                      "columns": ["colour"]})


def test_formats_parquet_headerless_and_inference(tmp_path):
    frame = pd.DataFrame({"u": [1, 1, 2], "i": [10, 11, 10], "r": [1.0, 2.0, 3.0], "t": [3, 2, 1]})
    frame.to_parquet(tmp_path / "r.parquet")
    frame.to_csv(tmp_path / "r.tsv", sep="\t", index=False)
    frame.to_csv(tmp_path / "r.txt", sep=";", index=False, header=False)
    a = load(tmp_path, ratings="r.parquet")
    b = load(tmp_path, ratings="r.tsv")
    c = load(tmp_path, ratings="r.txt", sep=";", header=False,
             columns={"user": 0, "item": 1, "rating": 2, "timestamp": 3})
    assert a.checksum() == b.checksum() == c.checksum()
    assert a.ratings["user"].tolist() == [0, 0, 1] and a.ratings["timestamp"].tolist() == [2, 3, 1]
    with pytest.raises(ConfigError, match=r"sep: cannot infer the separator of r\.txt"):
        load(tmp_path, ratings="r.txt")
    with pytest.raises(DataError, match=r"r\.tsv has no column 'user' \(it has 'u', 'i', 'r', 't'\); fix columns.user"):
        load(tmp_path, ratings="r.tsv", columns={"user": "user", "item": "i", "rating": "r"})
    with pytest.raises(ConfigError, match="feedback: unknown value 'implicit'"):
        load(tmp_path, feedback="implicit")
    with pytest.raises(DataError, match=r"nope\.csv not found"):
        load(tmp_path, ratings="nope.csv")


# ------------------------------------------------------------------ timestamps and column types


def test_date_timestamps_become_integer_seconds(tmp_path):
    write(tmp_path / "r.csv", "u,i,r,t\n1,10,4,2020-01-01\n1,11,3,2020-01-02\n2,10,5,1969-12-31\n")
    data = load(tmp_path, timestamp_format="%Y-%m-%d")
    assert sorted(data.ratings["timestamp"].tolist()) == [-86400, 1577836800, 1577923200]
    assert data.ratings["timestamp"].dtype == np.int64
    inferred = load(tmp_path, timestamp_format=None, cache=False)
    assert inferred.checksum() == data.checksum()
    write(tmp_path / "dt.csv", "u,i,r,t\n1,10,4,2020-01-01 00:00:01\n1,11,3,2020-01-01T12:00:00+01:00\n")
    iso = load(tmp_path, ratings="dt.csv", timestamp_format="ISO8601")
    assert sorted(iso.ratings["timestamp"].tolist()) == [1577836801, 1577876400]  # +01:00 -> UTC


def test_integer_timestamps_unchanged_with_every_format_that_allows_them(tmp_path):
    write(tmp_path / "r.csv", "u,i,r,t\n1,10,4,300\n1,11,3,100\n")
    for fmt in ("unix", None):
        assert sorted(load(tmp_path, timestamp_format=fmt, cache=False).ratings["timestamp"]) == [100, 300]
    write(tmp_path / "d.csv", "u,i,r,t\n1,10,4,20200102\n1,11,3,20200101\n")
    days = load(tmp_path, ratings="d.csv", timestamp_format="%Y%m%d")  # integers read as dates
    assert sorted(days.ratings["timestamp"]) == [1577836800, 1577923200]


def test_parquet_datetime_column(tmp_path):
    frame = pd.DataFrame({"u": [1, 2], "i": [10, 10], "r": [1.0, 2.0],
                          "t": pd.to_datetime(["2020-01-01 00:00:00", "2020-01-02 00:00:30"])})
    frame.to_parquet(tmp_path / "r.parquet")
    data = load(tmp_path, ratings="r.parquet")  # already datetimes: no format needed
    assert sorted(data.ratings["timestamp"]) == [1577836800, 1577923230]


def test_a_date_column_without_a_format_names_the_column_not_a_line(tmp_path):
    write(tmp_path / "r.csv", "u,i,r,t\n1,10,4,2020-01-01\n1,11,3,2020-01-02\n2,10,5,2020-01-03\n")
    with pytest.raises(DataError) as err:
        load(tmp_path)
    text = str(err.value)
    assert "column 't' (columns.timestamp) is not integer: 3 of 3 values fail, first " \
           "'2020-01-01', '2020-01-02', '2020-01-03'" in text
    assert "timestamp_format" in text and "line" not in text
    with pytest.raises(DataError, match=r"column 't' \(columns.timestamp\) is not dates in the format "
                                        r"'%d/%m/%Y'.*first '2020-01-01'"):
        load(tmp_path, timestamp_format="%d/%m/%Y")
    write(tmp_path / "h.csv", "1;10;4;2020-01-01\n1;11;3;2020-01-02\n")  # header-less: the position
    with pytest.raises(DataError, match=r"h\.csv: column 3 \(columns.timestamp\) is not integer"):
        load(tmp_path, ratings="h.csv", sep=";", header=False,
             columns={"user": 0, "item": 1, "rating": 2, "timestamp": 3})


def test_one_bad_line_still_names_the_line(tmp_path):
    write(tmp_path / "r.csv", "u,i,r,t\n1,10,4,2020-01-01\n1,11,3,2020-13-45\n2,10,5,2020-01-03\n")
    with pytest.raises(DataError, match=r"r\.csv line 3: '1,11,3,2020-13-45': timestamp '2020-13-45' "
                                        r"is not a date in the format '%Y-%m-%d'; fix or remove that line"):
        load(tmp_path, timestamp_format="%Y-%m-%d")
    write(tmp_path / "x.csv", "u,i,r,t\n1,10,4,1\n1,11,x,2\n2,10,5,3\n")
    with pytest.raises(DataError, match=r"x\.csv line 3: .*r 'x' is not a finite number; fix or remove"):
        load(tmp_path, ratings="x.csv")
    write(tmp_path / "s.csv", "u,i,r,t\n1,10,good,1\n1,11,bad,2\n2,10,5,3\n")
    with pytest.raises(DataError, match=r"s\.csv: column 'r' \(columns.rating\) is not numeric: 2 of 3 "
                                        r"values fail, first 'good', 'bad'; map columns.rating"):
        load(tmp_path, ratings="s.csv")
