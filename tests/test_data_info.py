"""`metarec data info`: registry names (naming the exact missing files), dataset config options
(shipped or the user's own on hydra.searchpath) and YAML files, and one-line errors otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metarec_runner.cli.app import app
from metarec_runner.data.registry import missing_files

SHARED = Path(os.environ.get("METAREC_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

RATINGS = "who,what,stars,day\na,x,4,2020-01-01\na,y,3,2020-01-02\nb,x,5,2020-01-03\nc,z,1,2020-02-01\n"
YAML = """\
_target_: metarec_runner.data.tabular.load_tabular  # the generic loader
name: mine                          # dataset name
data_dir: {root}                    # folder the paths are relative to
ratings: mine/ratings.csv           # the ratings file
columns: {{user: who, item: what, rating: stars, timestamp: day}}  # column mapping
timestamp_format: "%Y-%m-%d"        # dates, not integer seconds
cache: false                        # no processed cache
"""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAREC_CACHE_DIR", str(tmp_path / "cache"))


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, ["data", "info", *args])
    return res.exit_code, res.stdout, res.stderr


def own_config(tmp_path: Path) -> Path:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "ratings.csv").write_text(RATINGS)
    conf = tmp_path / "my_conf" / "dataset"
    conf.mkdir(parents=True)
    path = conf / "mine.yaml"
    path.write_text(YAML.format(root=tmp_path))
    return path


def assert_summary(out: str, users: int, items: int, interactions: int) -> None:
    for line in (f"users: {users}", f"items: {items}", f"interactions: {interactions}",
                 "rating scale: ", "user features: ", "item features: ", "content checksum: "):
        assert line in out, out


def test_a_folder_without_a_file_names_the_file_and_how_to_get_it(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    for name in ("movies.dat", "users.dat"):
        (folder / name).write_text("x\n")
    assert missing_files("ml-1m", tmp_path) == ["ratings.dat"]
    code, out, err = run("ml-1m", "--data-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"{folder} lacks ratings.dat" in err
    assert "metarec data download ml-1m" in err and "copy ratings.dat" in err
    (folder / "users.dat").unlink()
    _, _, err = run("ml-1m", "--data-dir", str(tmp_path))
    assert "lacks ratings.dat, users.dat" in err
    code, _, err = run("ml-100k", "--data-dir", str(tmp_path))  # no folder at all
    assert code == 2 and f"ml-100k is not under {tmp_path}; run `metarec data download ml-100k`" in err


def test_the_shared_ml1m_folder_names_ratings_dat():
    folder = SHARED / "ml-1m"
    if not folder.is_dir() or (folder / "ratings.dat").exists():
        pytest.skip(f"{folder} is absent or complete")
    code, _, err = run("ml-1m", "--data-dir", str(SHARED))
    assert code == 2 and "lacks ratings.dat" in err and "is not under" not in err


def test_a_shipped_config_option_with_overrides():
    code, out, err = run("toy", "dataset.n_users=50")
    assert code == 0, err
    assert out.startswith("toy: built by metarec_runner.data.toy.make_toy_catalog\nconfig: dataset=toy\n")
    assert "users: 50\nitems: 300\n" in out and "item features: category, age_band" in out


def test_a_users_own_option_on_the_search_path(tmp_path):
    own_config(tmp_path)
    code, out, err = run("mine", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]")
    assert code == 0, err
    assert_summary(out, users=3, items=3, interactions=4)
    assert "rating scale: 1 .. 5" in out and "config: dataset=mine" in out


def test_a_yaml_path_with_overrides_and_data_dir(tmp_path):
    path = own_config(tmp_path)
    code, out, err = run(str(path))
    assert code == 0, err
    assert_summary(out, users=3, items=3, interactions=4)
    assert f"config: {path}" in out
    code, out, err = run(str(path), "dataset.min_item_interactions=2")
    assert code == 0, err
    assert_summary(out, users=2, items=1, interactions=2)
    code, _, err = run(str(path), "--data-dir", str(tmp_path / "elsewhere"))  # --data-dir wins
    assert code == 2 and f"{tmp_path / 'elsewhere' / 'mine' / 'ratings.csv'} not found" in err


@pytest.mark.parametrize("arg, needle", [
    ("nope", "dataset: unknown dataset 'nope': not a registry name (ml-100k"),
    ("missing.yaml", "missing.yaml: no such file; check the path"),
    ("bad.yaml", "bad.yaml: not valid YAML"),
    ("list.yaml", "list.yaml: not a dataset config: it needs a mapping with _target_"),
])
def test_bad_input_is_one_line_naming_the_value_and_the_fix(tmp_path, monkeypatch, arg, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("name: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    code, out, err = run(arg)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err, err


def test_config_errors_name_the_key(tmp_path):
    code, _, err = run("toy", "dataset.bogus=1")
    assert code == 2 and err.startswith("error: dataset.bogus: no such key") and err.count("\n") == 1
    code, _, err = run("ml-1m", "dataset.x=1")
    assert code == 2 and "a registry name takes no overrides" in err
    code, _, err = run("recbole_atomic", "dataset.folder=nowhere", "--data-dir", str(tmp_path))
    assert code == 2 and f"{tmp_path / 'nowhere' / 'ml-100k.inter'} not found" in err


def test_data_list_marks_a_folder_with_missing_files_partial(tmp_path):
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "movies.dat").write_text("x\n")
    res = CliRunner().invoke(app, ["data", "list", "--data-dir", str(tmp_path)])
    assert res.exit_code == 0
    rows = {line.split()[0]: line for line in res.stdout.splitlines()[2:]}
    assert "  partial  " in rows["ml-1m"] and "  -  " in rows["ml-100k"]
