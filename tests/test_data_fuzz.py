"""Fuzzing every parser: arbitrary bytes and mangled rows give a DataError or a valid Interactions.

Each case starts from a small valid dataset folder and replaces one file by hypothesis-generated
content: random bytes, rows built from awkward fields (separators, quotes, huge numbers, NaN,
non-ASCII, wrong field counts) mixed with valid rows, or a valid file with bytes spliced in.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metarec_runner.data.encode import sort_order
from metarec_runner.data.interactions import Interactions
from metarec_runner.data.movielens import load_movielens
from metarec_runner.data.recbole import load_recbole_atomic
from metarec_runner.data.tabular import load_tabular
from metarec_runner.errors import DataError
from tests.test_movielens import U_DATA, U_ITEM, U_USER

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

Files = dict[str, list[str]]
CASES: dict[str, tuple[Files, Callable[[Path], Interactions]]] = {
    "ml-100k": ({"ml-100k/u.data": U_DATA, "ml-100k/u.user": U_USER, "ml-100k/u.item": U_ITEM},
                lambda root: load_movielens("ml-100k", str(root), cache=False)),
    "ml-1m": ({"ml-1m/ratings.dat": ["1::1::5::978300760", "1::2::3::978302109", "2::1::4::978301968"],
               "ml-1m/users.dat": ["1::F::1::10::48067", "2::M::56::16::70072"],
               "ml-1m/movies.dat": ["1::Toy Story (1995)::Animation|Children's|Comedy",
                                    "2::Jumanji (1995)::Adventure|Children's|Fantasy"]},
              lambda root: load_movielens("ml-1m", str(root), duplicates="mean", cache=False)),
    "csv": ({"ml-latest-small/ratings.csv": ["userId,movieId,rating,timestamp", "1,1,4.0,964982703",
                                             "1,3,4.5,964981247", "2,1,0.5,964982224"],
             "ml-latest-small/movies.csv": ["movieId,title,genres",
                                            '1,"American President, The (1995)",Comedy|Drama',
                                            "3,Heat (1995),(no genres listed)"]},
            lambda root: load_movielens("ml-latest-small", str(root), rating_scale="unit",
                                        cache=False)),
    "atomic": ({"a/x.inter": ["user_id:token\titem_id:token\trating:float\ttimestamp:float",
                              "1\t10\t4\t5", "2\t10\t3\t6.5", "1\t11\t1\t7"],
                "a/x.item": ["item_id:token\tgenre:token_seq\tyear:token\tprice:float",
                             "10\tAction Drama\t1995\t1.5", "11\t\t\t"]},
               lambda root: load_recbole_atomic("x", str(root / "a"), duplicates="keep_last",
                                                cache=False)),
    "tabular": ({"r.csv": ["u,i,w", "a,x,3", "b,x,0", "a,y,12"],
                 "f.tsv": ["id\tkind\ttags", "x\tk1\tp|q", "y\tk2\t"]},
                lambda root: load_tabular("t", "r.csv", {"user": "u", "item": "i", "weight": "w"},
                                          feedback="log", min_user_interactions=1,
                                          item_features={"path": "f.tsv", "id_column": "id",
                                                         "columns": ["kind"], "bags": {"tags": "|"}},
                                          data_dir=str(root), cache=False)),
}
TARGETS = [(case, path) for case, (files, _) in CASES.items() for path in files]

FIELDS = st.one_of(
    st.integers(-3, 12).map(str), st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "NA", "nan", '"', '"a,b"', "::", ":", "|", "\t", ",", "\r", "(1995)",
                     "Title (19x5)", "é", "\x00", "\ufeff", "1e400", "0x1f", "\x1f", "[]"]),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
)


def separator(path: str) -> str:
    name = Path(path).name
    return ("::" if name.endswith(".dat") else "\t" if name in ("u.data", "f.tsv") or ".inter" in name
            or name.endswith(".item") else "|" if name.startswith("u.") else ",")


@st.composite
def mangled(draw, path: str, valid: list[str]) -> bytes:
    """Content for ``path``: random bytes, awkward rows mixed with valid ones, or spliced bytes."""
    kind = draw(st.sampled_from(["bytes", "rows", "splice"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    text = "\n".join(valid) + "\n"
    if kind == "splice":
        data = text.encode("latin-1", "replace")
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 4))
        return data[:at] + draw(st.binary(max_size=6)) + data[at + cut:]
    n = len(valid[0].split(separator(path)))
    row = st.lists(FIELDS, min_size=max(0, n - 2), max_size=n + 2).map(separator(path).join)
    rows = draw(st.lists(st.one_of(row, st.sampled_from(valid)), min_size=0, max_size=8))
    keep_header = Path(path).suffix in (".csv", ".inter", ".item", ".tsv") and draw(st.booleans())
    lines = ([valid[0]] if keep_header else []) + rows
    ending = draw(st.sampled_from(["\n", "\r\n", ""]))
    return ending.join(lines).encode(draw(st.sampled_from(["utf-8", "latin-1"])), "replace")


def check(load: Callable[[Path], Interactions], root: Path) -> None:
    """The loader gives a DataError or a consistent Interactions; anything else fails the test."""
    try:
        data = load(root)
    except DataError as e:
        assert str(e) and "\n" not in str(e)  # one line
        return
    assert isinstance(data, Interactions)
    r = data.ratings
    assert len(r) > 0 and r["user"].between(0, data.n_users - 1).all()
    assert r["item"].between(0, data.n_items - 1).all() and np.isfinite(r["rating"]).all()
    for frame in (data.user_features, data.item_features):
        for col in frame.columns:
            assert frame[col].between(0, data.cardinalities[col] - 1).all()
    for bags in (data.user_bags, data.item_bags):
        for name, arr in bags.items():
            assert arr.min() >= -1 and arr.max() < data.cardinalities[name]
    data.feature_rows(r["user"].to_numpy()[:5], r["item"].to_numpy()[:5])


@FUZZ
@given(rows=st.lists(st.tuples(st.integers(0, 2**20), st.integers(-(2**63), 2**63 - 1),
                               st.integers(0, 2**20)), max_size=40),
       small=st.booleans())
def test_sort_order_matches_lexsort(rows, small):
    """The packed-key fast paths order rows exactly like np.lexsort (user, timestamp, item)."""
    user, stamp, item = (np.array([r[k] for r in rows], dtype=np.int64) for k in range(3))
    if small:  # exercise the direct packing path
        user, stamp, item = user % 50, stamp % 10**9, item % 70
    order = sort_order(user, stamp, item)
    expected = np.lexsort((item, stamp, user))
    keys = np.stack([user, stamp, item], 1)
    assert np.array_equal(keys[order], keys[expected])


def test_valid_fixtures_load():
    for case, (files, load) in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for rel, lines in files.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text("\n".join(lines) + "\n", encoding="utf-8")
            assert isinstance(load(root), Interactions), case


@pytest.mark.parametrize("case, target", TARGETS, ids=[f"{c}:{Path(p).name}" for c, p in TARGETS])
@FUZZ
@given(data=st.data())
def test_mangled_file_gives_data_error_or_valid_data(case, target, data):
    files, load = CASES[case]
    content = data.draw(mangled(target, files[target]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, lines in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            raw = content if rel == target else ("\n".join(lines) + "\n").encode("utf-8")
            (root / rel).write_bytes(raw)
        check(load, root)
