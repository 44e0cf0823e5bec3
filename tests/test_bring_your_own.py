"""A user's own ratings file + a YAML column mapping trains end to end through the CLI, and
`metarec data info` reports the real ml-100k counts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import METAREC

SHARED = Path(os.environ.get("METAREC_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.mark.slow
def test_unseen_dataset_from_a_yaml_mapping_trains(tmp_path):
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(150), 25)
    items = np.concatenate([rng.choice(200, 25, replace=False) for _ in range(150)])
    frame = pd.DataFrame({"customer": [f"c{u}" for u in users], "product": items,
                          "stars": rng.integers(1, 6, len(users)), "when": np.arange(len(users))})
    data = tmp_path / "shop"
    data.mkdir()
    frame.to_csv(data / "reviews.csv", index=False)
    conf = tmp_path / "my_conf" / "dataset"
    conf.mkdir(parents=True)
    (conf / "shop.yaml").write_text(
        "_target_: metarec_runner.data.tabular.load_tabular  # the generic loader\n"
        "name: shop                  # dataset name\n"
        f"data_dir: {tmp_path}       # where shop/ lives\n"
        "ratings: shop/reviews.csv   # the ratings file\n"
        "columns: {user: customer, item: product, rating: stars, timestamp: when}  # column mapping\n")
    res = subprocess.run([*METAREC, "train", "+algo=maml", "dataset=shop",
                          f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "trainer.max_epochs=2",
                          "trainer.progress=false", "logger=none"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "METAREC_OUTPUT_DIR": str(tmp_path / "out")})
    assert res.returncode == 0, res.stderr
    assert "data=shop (3750 ratings)" in res.stdout and "rmse" in res.stdout


@pytest.mark.slow
def test_data_info_prints_ml100k_counts(tmp_path):
    if not (SHARED / "ml-100k" / "u.data").exists():
        pytest.skip(f"real dataset {SHARED / 'ml-100k'} is absent (set METAREC_DATA_DIR)")
    res = subprocess.run([*METAREC, "data", "info", "ml-100k"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "METAREC_DATA_DIR": str(SHARED),
                                           "METAREC_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    text = res.stdout.replace(",", "")
    for needle in ("100000", "943", "1682", "genres"):
        assert needle in text, res.stdout
