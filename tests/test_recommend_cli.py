"""``metarec recommend``: a ratings CSV in, the top-N table out; bad input is one line, exit 2.

The command runs in-process through typer's CliRunner (stdout and stderr apart) on one small
MAML run; the subprocess tests (marked slow) run it as a user does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import metarec_runner
from metarec_runner.checkpoint import FORMAT
from metarec_runner.cli.app import app
from tests.helpers import METAREC, metarec_env, tracked_run

TINY = ["dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=1", "trainer.progress=false"]
FEATURES = "age_group=1,region=2,price_sensitivity=0"
FEATURE_DICT = {"age_group": "1", "region": "2", "price_sensitivity": "0"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A small tracked MAML run: ``{"run_id", "best", "folder", "uri", "out"}``."""
    return tracked_run(tmp_path_factory.mktemp("recommend") / "outputs", "+algo=maml", *TINY)


def _invoke(*args: str):
    return CliRunner().invoke(app, ["recommend", *args])


def _csv(tmp_path: Path, text: str, name: str = "my_ratings.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _fails(result, *needles: str) -> str:
    """The command failed with exit 2, one stderr line holding ``needles``, nothing on stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarec: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_csv_output_matches_the_python_api_and_leaves_rated_items_out(run, tmp_path):
    ratings = _csv(tmp_path, "item,rating\n1,5\n2,1\n3,4\n")
    res = _invoke("--run", str(run["best"]), "--ratings", str(ratings), "-n", "6", "--user-features", FEATURES,
                  "--format", "csv")
    assert res.exit_code == 0, res.stderr
    got = pd.read_csv(StringIO(res.stdout), dtype={"item": str, "title": str}, keep_default_na=False)
    assert list(got.columns) == ["rank", "item", "title", "score"]
    expected = metarec_runner.load(run["best"]).recommend({"1": 5, "2": 1, "3": 4}, n=6, user_features=FEATURE_DICT)
    assert list(got["item"]) == list(expected["item"]) and list(got["rank"]) == list(range(1, 7))
    assert not {"1", "2", "3"} & set(got["item"])
    assert (got["score"] - expected["score"]).abs().max() < 1e-6


def test_json_and_table_by_run_id_and_latest(run, tmp_path):
    ratings = _csv(tmp_path, "item,rating\n4,5\n")
    by_id = _invoke("--run", run["run_id"], "--tracking-uri", run["uri"], "--ratings", str(ratings), "-n", "3",
                    "--format", "json", "--user-features", FEATURES)
    assert by_id.exit_code == 0, by_id.stderr
    rows = json.loads(by_id.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3] and set(rows[0]) == {"rank", "item", "title", "score"}
    table = _invoke("--run", "latest", "--tracking-uri", run["uri"], "--ratings", str(ratings), "-n", "3",
                    "--user-features", FEATURES)
    assert table.exit_code == 0, table.stderr
    assert "top items for a new user with 1 rating(s)" in table.stdout and run["run_id"] in table.stdout
    for row in rows:
        assert f" {row['item']} " in table.stdout


def test_unknown_items_are_reported_and_skipped(run, tmp_path):
    ratings = _csv(tmp_path, "item,rating\n1,5\nnope,4\n99999,3\n")
    res = _invoke("--run", str(run["folder"]), "--ratings", str(ratings), "-n", "4", "--format", "csv")
    assert res.exit_code == 0, res.stderr
    assert "2 unknown item(s) in" in res.stderr and "'nope', '99999'" in res.stderr
    assert len(pd.read_csv(StringIO(res.stdout))) == 4


def test_an_empty_file_without_features_is_the_zero_shot_answer(run, tmp_path):
    empty = _csv(tmp_path, "")
    res = _invoke("--run", str(run["best"]), "--ratings", str(empty), "-n", "5", "--format", "csv")
    assert res.exit_code == 0, res.stderr
    header_only = _invoke("--run", str(run["best"]), "--ratings", str(_csv(tmp_path, "item,rating\n", "h.csv")),
                          "-n", "5", "--format", "csv")
    assert header_only.stdout == res.stdout
    expected = metarec_runner.load(run["best"]).recommend(None, n=5)
    assert list(pd.read_csv(StringIO(res.stdout), dtype={"item": str})["item"]) == list(expected["item"])


@pytest.mark.parametrize(("text", "needles"), [
    ("movie,stars\n1,5\n", ("my_ratings.csv: columns must be item,rating", "found movie, stars")),
    ("item,rating\n1,5\n2,great\n", ("my_ratings.csv: row 2: rating 'great' is not a number",)),
    ("item,rating\n1,5\n2,\n", ("my_ratings.csv: row 2: rating '' is not a number",)),
    ("item,rating\n1,5\n2,11\n", ("my_ratings.csv: row 2: rating 11 is outside this model's rating scale [1, 5]",)),
])
def test_bad_ratings_files_are_one_line(run, tmp_path, text, needles):
    ratings = _csv(tmp_path, text)
    _fails(_invoke("--run", str(run["best"]), "--ratings", str(ratings)), *needles)


def test_bad_options_are_one_line(run, tmp_path):
    ratings = _csv(tmp_path, "item,rating\n1,5\n")
    best = str(run["best"])
    _fails(_invoke("--run", best, "--ratings", str(ratings), "--format", "xml"), "--format must be one of table")
    _fails(_invoke("--run", best, "--ratings", str(ratings), "-n", "0"), "-n must be >= 1")
    _fails(_invoke("--run", best, "--ratings", str(tmp_path / "absent.csv")), "absent.csv: no such ratings file")
    _fails(_invoke("--run", best, "--user-features", "age_group"), "'age_group' is not key=value")
    with_unknown = str(_csv(tmp_path, "item,rating\n1,5\nnope,3\n", "unknown.csv"))  # no report before the error
    _fails(_invoke("--run", best, "--ratings", with_unknown, "--user-features", "shoe=42"),
           "unknown user feature 'shoe'")
    _fails(_invoke("--run", best, "--ratings", with_unknown, "--user-features", "region=77"), "region='77'",
           "integer in 0..")


def test_unknown_runs_are_one_line_and_create_nothing(run, tmp_path):
    _fails(_invoke("--run", "f" * 32, "--tracking-uri", run["uri"]), f"--run {'f' * 32}: no such run in")
    _fails(_invoke("--run", "my-best-run"), "--run 'my-best-run': no such file or folder")
    store = tmp_path / "fresh" / "mlflow.db"
    _fails(_invoke("--run", "latest", "--tracking-uri", f"sqlite:///{store}"), "no MLflow store at")
    assert not store.parent.exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def test_corrupt_pickled_and_foreign_checkpoints_are_one_line(run, tmp_path):
    data = Path(run["best"]).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 3])
    _fails(_invoke("--run", str(cut)), "cut.pt: truncated or corrupt checkpoint")
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "code-ran"
    torch.save({"format": FORMAT, "meta": "{}", "algo": _Payload(marker)}, evil)
    _fails(_invoke("--run", str(evil)), "evil.pt: refused by torch.load(weights_only=True)")
    assert not marker.exists()
    foreign = tmp_path / "foreign.pt"
    torch.save({"state": torch.ones(2)}, foreign)
    _fails(_invoke("--run", str(foreign)), "foreign.pt: not a metarec checkpoint")
    _fails(_invoke("--run", str(tmp_path / "missing.pt")), "missing.pt: no such checkpoint file")


@pytest.mark.slow
def test_recommend_as_a_subprocess_and_help_stays_light(run, tmp_path):
    ratings = _csv(tmp_path, "item,rating\n1,5\n5,2\n")
    res = subprocess.run([*METAREC, "recommend", "--run", str(run["best"]), "--ratings", str(ratings), "-n", "3",
                          "--format", "csv"], cwd=tmp_path, env=metarec_env(tmp_path / "outputs"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "rank,item,title,score" and len(res.stdout.splitlines()) == 4
    bad = subprocess.run([*METAREC, "recommend", "--run", str(run["best"]), "--ratings", str(_csv(
        tmp_path, "item,rating\n1,9\n", "bad.csv"))], cwd=tmp_path, env=metarec_env(tmp_path / "outputs"),
        capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    helped = subprocess.run([*METAREC, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "recommend" in helped.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, metarec_runner.cli.app; print(sorted(m for m in "
                            "('torch', 'mlflow', 'pandas', 'hydra') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "[]"
