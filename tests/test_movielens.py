"""MovieLens loaders: real-data counts (shared/data), file formats, errors, and the dataset configs.

Real files are read from ``$METAREC_DATA_DIR``, else the ``shared/data`` folder beside the
checkout; tests needing a dataset that is absent are skipped (never copy the files into the repo).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from metarec_runner.data.encode import UNKNOWN
from metarec_runner.data.interactions import Interactions
from metarec_runner.data.movielens import FOLDERS, load_movielens, parse_movies, parse_users
from metarec_runner.errors import ConfigError, DataError
from metarec_runner.paths import group_options
from tests.helpers import compose

DATA = Path(os.environ.get("METAREC_DATA_DIR")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def need(folder: str) -> Path:
    """The real dataset folder, or skip the test with the reason."""
    path = DATA / folder
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (set METAREC_DATA_DIR to the shared data folder)")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Processed caches go to a tmp folder, never into the (shared) data folder."""
    monkeypatch.setenv("METAREC_CACHE_DIR", str(tmp_path / "cache"))


# ------------------------------------------------------------------ synthetic files

ITEM_FLAGS = "|".join(["0"] * 19)


def item_line(movie: int, title: str, date: str = "01-Jan-1995", genres: tuple[int, ...] = (5,)) -> str:
    flags = ["1" if g in genres else "0" for g in range(19)]
    return "|".join([str(movie), title, date, "", "http://x", *flags])


U_DATA = ["1\t1\t5\t100", "1\t2\t3\t101", "2\t1\t4\t102", "2\t3\t2\t103"]
U_USER = ["1|24|M|technician|85711", "2|53|F|other|02139"]
U_ITEM = [item_line(1, "Toy Story (1995)", genres=(3, 4, 5)), item_line(2, "GoldenEye (1995)"),
          item_line(3, "unknown", date="", genres=(0,))]


def write_100k(root: Path, data=U_DATA, user=U_USER, item=U_ITEM, name: str = "ml-100k") -> Path:
    """A tiny ml-100k-format folder ``root/name`` (lists of lines or raw bytes per file)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for fname, content in (("u.data", data), ("u.user", user), ("u.item", item)):
        raw = content if isinstance(content, bytes) else ("\n".join(content) + "\n").encode("latin-1")
        (folder / fname).write_bytes(raw)
    return folder


# ------------------------------------------------------------------ real data


def test_ml_100k_counts_and_features():
    need("ml-100k")
    data = load_movielens("ml-100k", str(DATA), cache=False)
    assert (len(data.ratings), data.n_users, data.n_items) == (100_000, 943, 1682)
    # genres: the 19 flags of u.item, "unknown" included as a token of its own
    assert data.cardinalities["genres"] == 19 and "unknown" in data.metadata["vocab"]["genres"]
    assert list(data.user_features.columns) == ["age", "gender", "occupation", "zip"]
    assert data.cardinalities["gender"] == 2 and data.cardinalities["occupation"] == 21
    assert list(data.item_features.columns) == ["year"] and list(data.item_bags) == ["genres", "title"]
    assert UNKNOWN in data.metadata["vocab"]["year"]  # item 267 has no release date
    assert data.item_bags["title"].shape[1] <= 16 and data.item_bags["genres"].shape == (1682, 6)
    assert data.rating_scale == (1.0, 5.0)
    assert data.ratings.dtypes.astype(str).tolist() == ["int64", "int64", "float32", "int64"]
    assert np.bincount(data.ratings["rating"].astype(int))[1:].tolist() == [
        6110, 11370, 27145, 34174, 21201]
    files = data.metadata["files"]
    assert files["ratings"]["sha256"].startswith("06416e597f82b734")
    assert set(files) == {"ratings", "users", "items"}
    assert data.metadata["raw_user_ids"].tolist() == list(range(1, 944))
    assert data.schema.n_fields == 4 + 3 + 2


def test_ml_latest_small_counts():
    need("ml-latest-small")
    data = load_movielens("ml-latest-small", str(DATA), cache=False)
    # items are every movie of movies.csv (9,742), of which 9,724 have ratings
    assert (len(data.ratings), data.n_users, data.n_items) == (100_836, 610, 9_742)
    assert data.metadata["counts"]["rated_items"] == 9_724
    assert data.rating_scale == (0.5, 5.0) and data.user_features.shape == (610, 0)
    assert data.cardinalities["genres"] == 20  # 19 genres + "(no genres listed)"
    assert "(no genres listed)" in data.metadata["vocab"]["genres"]
    assert data.item_bags["title"].shape[1] == 16  # capped by max_title_tokens


def test_ml_1m_side_files_parse_and_missing_ratings_is_named():
    folder = need("ml-1m")
    users, _ = parse_users(folder / "users.dat", "dat")
    movies, src = parse_movies(folder / "movies.dat", "dat")
    assert len(users) == 6_040 and len(movies) == 3_883 and movies["item"].max() == 3952
    assert users.iloc[0].to_dict() == {"user": 1, "age": "1", "gender": "F", "occupation": "10",
                                       "zip": "48067"}
    assert movies.iloc[0]["genres"] == ["Animation", "Children's", "Comedy"]
    assert any("é" in t for t in movies["title"])  # ISO-8859-1 decoded
    assert src.sha256.startswith("0140fc2356357c1a")
    with pytest.raises(DataError, match=rf"ratings\.dat is missing from {folder}"):
        load_movielens("ml-1m", str(DATA))


def test_unit_scale_and_title_options():
    need("ml-latest-small")
    data = load_movielens("ml-latest-small", str(DATA), rating_scale="unit", title_tokens=False,
                          cache=False)
    assert data.rating_scale == (0.0, 1.0) and data.ratings["rating"].min() == 0.0
    assert data.metadata["rating_scale"] == "unit" and data.metadata["raw_rating_range"] == [0.5, 5.0]
    assert list(data.item_bags) == ["genres"] and "title" not in data.cardinalities


# ------------------------------------------------------------------ synthetic formats


def test_synthetic_100k_features(tmp_path):
    write_100k(tmp_path)
    data = load_movielens("ml-100k", str(tmp_path))
    assert isinstance(data, Interactions) and (data.n_users, data.n_items) == (2, 3)
    vocab = data.metadata["vocab"]
    assert vocab["zip"] == ["02139", "85711"]  # zip codes stay strings (leading zero kept)
    assert vocab["year"] == ["1995", UNKNOWN]
    title = data.item_bags["title"]
    assert [vocab["title"][c] for c in title[0] if c >= 0] == ["toy", "story"]
    assert [vocab["genres"][c] for c in data.item_bags["genres"][0] if c >= 0] == [
        "Animation", "Children's", "Comedy"]


def test_csv_format_with_quoted_titles(tmp_path):
    folder = tmp_path / "ml-25m"
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\r\n1,11,4.5,5\r\n"
                                        "1,12,0.5,6\r\n7,11,3.0,1\r\n")
    (folder / "movies.csv").write_text('movieId,title,genres\n11,"American President, The (1995)",'
                                       'Comedy|Drama|Romance\n12,Café (2006–2007),(no genres listed)\n'
                                       '13,No Year,Drama\n')
    data = load_movielens("ml-25m", str(tmp_path), max_title_tokens=2)
    assert (len(data.ratings), data.n_users, data.n_items) == (3, 2, 3)
    vocab = data.metadata["vocab"]
    assert vocab["year"] == ["1995", "2006", UNKNOWN]
    assert data.item_bags["title"].shape == (3, 2)  # "american president, the" capped at 2 words
    assert [vocab["title"][c] for c in data.item_bags["title"][1] if c >= 0] == ["café"]
    assert data.ratings["user"].tolist() == [0, 0, 1] and data.rating_scale == (0.5, 4.5)


def test_zip_folder_name_and_dat_format(tmp_path):
    folder = tmp_path / "ml-10M100K"  # the zip's own folder name is accepted
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::10::4.5::100\n2::10::1::90\n2::20::5::95\n")
    (folder / "movies.dat").write_text("10::Se7en: The Movie (1995)::Crime|Thriller\n"
                                       "20::Heat (1995)::Action\n")
    data = load_movielens("ml-10m", str(tmp_path))
    assert (len(data.ratings), data.n_users, data.n_items) == (3, 2, 2)
    assert data.user_features.shape == (2, 0)
    assert "se7en:" in data.metadata["vocab"]["title"]  # colons inside titles survive "::"


def test_data_dir_from_env_and_xdg(tmp_path, monkeypatch):
    write_100k(tmp_path / "env")
    monkeypatch.setenv("METAREC_DATA_DIR", str(tmp_path / "env"))
    assert load_movielens("ml-100k").n_users == 2
    monkeypatch.delenv("METAREC_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "metarec" / "data" / "ml-100k"
    with pytest.raises(DataError, match=rf"{expected} not found.*metarec data download ml-100k"):
        load_movielens("ml-100k")


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("lines, pattern", [
    (["1\t1\t5\t100", "1\t2\tx\t101"], r"u\.data line 2: '1\\t2\\tx\\t101': rating 'x' is not a"),
    (["1\t1\t5\t100", "1\t2\t3\t101\t7"], r"u\.data line 2: expected 4 fields, saw 5"),
    (["1\t1\t5\t100", "", "1\t2\t3"], r"u\.data line 3: .*timestamp is missing"),
    (["1\t1\t5\t100", "1\t9\t3\t101"], r"u\.data line 2: .*movie id 9 is unknown"),
    (["1\t1\t5\t100", "5\t2\t3\t101"], r"u\.data line 2: .*user id 5 is unknown"),
    (["1\t1.5\t5\t100"], r"u\.data line 1: .*movie id 1\.5 is not an integer"),
])
def test_malformed_rows_name_file_line_and_text(tmp_path, lines, pattern):
    write_100k(tmp_path, data=lines)
    with pytest.raises(DataError, match=pattern):
        load_movielens("ml-100k", str(tmp_path))


def test_encoding_and_binary_errors(tmp_path):
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4,5\n")
    (folder / "movies.csv").write_bytes(b"movieId,title,genres\n1,Caf\xe9 (1995),Drama\n")
    with pytest.raises(DataError, match=r"movies\.csv line 2: byte 0xe9 .*not utf-8"):
        load_movielens("ml-latest-small", str(tmp_path))
    (folder / "movies.csv").write_bytes(b"movieId,title,genres\n1,x\x00y,Drama\n")
    with pytest.raises(DataError, match=r"movies\.csv line 2: NUL byte.*not latin-1/utf-8"):
        load_movielens("ml-latest-small", str(tmp_path))
    (folder / "movies.csv").write_text("id,name,kind\n1,x,Drama\n")
    with pytest.raises(DataError, match=r"movies\.csv line 1: header 'id,name,kind' is not"):
        load_movielens("ml-latest-small", str(tmp_path))


def test_side_file_errors(tmp_path):
    write_100k(tmp_path, user=U_USER + ["2|30|M|other|12345"])
    with pytest.raises(DataError, match=r"u\.user line 3: .*user id 2 appears twice"):
        load_movielens("ml-100k", str(tmp_path))
    write_100k(tmp_path, item=U_ITEM[:2] + ["3|Title (1990)|x"])
    with pytest.raises(DataError, match=r"u\.item line 3: .*genre flag unknown is missing"):
        load_movielens("ml-100k", str(tmp_path))


def test_duplicates_policy(tmp_path):
    write_100k(tmp_path, data=U_DATA + ["1\t2\t5\t99", "1\t2\t4\t300"])
    with pytest.raises(DataError, match=r"duplicate \(user, item\) pair \(1, 2\) in .*u\.data "
                                        r"line 2: .* and again at .*u\.data line 5"):
        load_movielens("ml-100k", str(tmp_path))
    last = load_movielens("ml-100k", str(tmp_path), duplicates="keep_last")
    row = last.ratings[(last.ratings.user == 0) & (last.ratings.item == 1)]
    assert row[["rating", "timestamp"]].values.tolist() == [[4.0, 300]]  # latest timestamp wins
    mean = load_movielens("ml-100k", str(tmp_path), duplicates="mean")
    row = mean.ratings[(mean.ratings.user == 0) & (mean.ratings.item == 1)]
    assert row[["rating", "timestamp"]].values.tolist() == [[4.0, 300]]  # (3 + 5 + 4) / 3
    assert len(last.ratings) == len(mean.ratings) == 4
    assert last.metadata["counts"]["duplicates_removed"] == 2


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="name: unknown value 'ml-2k'"):
        load_movielens("ml-2k", str(tmp_path))
    for kwargs, key in (({"duplicates": "first"}, "duplicates"), ({"rating_scale": "z"}, "rating_scale"),
                        ({"max_title_tokens": 0}, "max_title_tokens"), ({"cache": "yes"}, "cache")):
        with pytest.raises(ConfigError, match=key):
            load_movielens("ml-100k", str(tmp_path), **kwargs)


# ------------------------------------------------------------------ configs

MOVIELENS_CONFIGS = {"movielens_100k": "ml-100k", "movielens_1m": "ml-1m", "movielens_10m": "ml-10m",
                     "movielens_20m": "ml-20m", "movielens_25m": "ml-25m", "movielens_32m": "ml-32m",
                     "movielens_latest_small": "ml-latest-small", "movielens_latest": "ml-latest"}


def compose_dataset(option: str, *overrides: str):
    return compose("+algo=maml", f"dataset={option}", "logger=none", *overrides)


def test_every_movielens_config_exists():
    assert set(MOVIELENS_CONFIGS) <= set(group_options("dataset"))


@pytest.mark.parametrize("option", sorted(MOVIELENS_CONFIGS))
def test_movielens_configs_compose_and_instantiate(option, monkeypatch):
    name = MOVIELENS_CONFIGS[option]
    if not any((DATA / f).is_dir() for f in FOLDERS.get(name, (name,))):
        pytest.skip(f"real dataset {DATA / name} is absent (set METAREC_DATA_DIR to the folder)")
    monkeypatch.setenv("METAREC_DATA_DIR", str(DATA))
    cfg = compose_dataset(option)
    assert cfg.dataset.name == name and cfg.dataset.data_dir == str(DATA)
    if name == "ml-1m" and not (DATA / "ml-1m" / "ratings.dat").is_file():
        with pytest.raises(InstantiationException) as info:
            instantiate(cfg.dataset)
        assert isinstance(info.value.__cause__, DataError)
        return
    data = instantiate(cfg.dataset)
    assert isinstance(data, Interactions) and data.name == name


def test_config_data_dir_defaults_to_null(monkeypatch):
    monkeypatch.delenv("METAREC_DATA_DIR", raising=False)
    assert compose_dataset("movielens_100k").dataset.data_dir is None
