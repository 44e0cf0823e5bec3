"""Serving a trained model: ``metarec_runner.load`` -> Recommender, the pyfunc model, its REST server.

One MAML model is meta-trained for 2 epochs on the toy catalog (tracked in a module-level MLflow
store) and every test reads it back from its checkpoint alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import metarec_runner
from metarec_runner.checkpoint import FORMAT, CheckpointError, load_checkpoint
from metarec_runner.serve.recommender import Recommender
from metarec_runner.serve.support import batch_from_ratings
from metarec_runner.serve.vocab import ServeError
from tests.helpers import free_port, stop_group, tracked_run, wait_until_answers

FEATURES = {"age_group": "2", "region": "1", "price_sensitivity": "0"}  # every toy user field: one pseudo-user
CATEGORY = 3  # the toy row's column of the item's category


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 2-epoch MAML run on the toy catalog: ``{"run_id", "best", "folder", "uri"}``."""
    return tracked_run(tmp_path_factory.mktemp("serve") / "outputs", "+algo=maml", "trainer.max_epochs=2",
                       "trainer.progress=false")


@pytest.fixture(scope="module")
def rec(trained) -> Recommender:
    return metarec_runner.load(trained["best"])


def _items_of_category(rec: Recommender, category: int, k: int) -> list[str]:
    codes = torch.nonzero(rec.item_rows[:, CATEGORY] == category).flatten()[:k]
    return [rec.vocab.item_ids[int(c)] for c in codes]


def test_loads_by_path_folder_run_id_and_latest(trained, rec):
    ratings = {"1": 5, "2": 1}
    expected = rec.recommend(ratings, n=5, user_features=FEATURES)
    for spec in (trained["folder"], trained["run_id"], "latest"):
        other = metarec_runner.load(spec, tracking_uri=trained["uri"])
        assert other.path == trained["best"]
        pd.testing.assert_frame_equal(other.recommend(ratings, n=5, user_features=FEATURES), expected)


def test_rebuilt_model_holds_the_saved_weights(trained, rec):
    saved = load_checkpoint(trained["best"]).algo["model"]
    now = rec.algo.model.state_dict()
    assert set(saved) == set(now)
    for name, tensor in saved.items():
        assert torch.equal(now[name], tensor), name


def test_recommend_excludes_rated_items_and_matches_adapt_topk(rec):
    rated = [*_items_of_category(rec, 0, 4), *_items_of_category(rec, 1, 4)]
    ratings = pd.DataFrame({"item": rated, "rating": [5, 5, 4, 5, 1, 2, 1, 1]})
    top = rec.recommend(ratings, n=20, user_features=FEATURES)
    assert list(top.columns) == ["rank", "item", "title", "score"]
    assert list(top["rank"]) == list(range(1, 21))
    assert not set(top["item"]) & set(rated)
    assert top["score"].is_monotonic_decreasing
    user = rec.adapt(ratings, user_features=FEATURES)
    pd.testing.assert_frame_equal(user.topk(20), top)
    np.testing.assert_allclose(user.score(list(top["item"])), top["score"].to_numpy())
    everything = user.topk(10_000)  # the catalog but the rated items, every one exactly once
    assert len(everything) == rec.vocab.n_items - len(rated) and everything["item"].is_unique
    assert set(user.topk(10_000, exclude=[])["item"]) == set(rec.vocab.item_ids)


def test_adaptation_really_happens_users_with_other_ratings_get_other_items(rec):
    likes, dislikes = _items_of_category(rec, 0, 6), _items_of_category(rec, 1, 6)
    a = rec.adapt({**{i: 5 for i in likes}, **{i: 1 for i in dislikes}}, user_features=FEATURES)
    b = rec.adapt({**{i: 1 for i in likes}, **{i: 5 for i in dislikes}}, user_features=FEATURES)
    assert list(a.topk(10)["item"]) != list(b.topk(10)["item"])
    unrated_0 = _items_of_category(rec, 0, 40)[6:]
    unrated_1 = _items_of_category(rec, 1, 40)[6:]
    # each user's scores moved towards its own ratings, on items of those categories it did not rate
    assert a.score(unrated_0).mean() > b.score(unrated_0).mean()
    assert b.score(unrated_1).mean() > a.score(unrated_1).mean()
    zero = rec.adapt(None, user_features=FEATURES)
    assert not np.allclose(a.catalog_scores(), zero.catalog_scores())


def test_zero_shot_answer_without_ratings(rec):
    top = rec.recommend(None, n=10, user_features=FEATURES)
    assert len(top) == 10 and top["score"].is_monotonic_decreasing
    pd.testing.assert_frame_equal(rec.recommend(pd.DataFrame(columns=["item", "rating"]), n=10,
                                                user_features=FEATURES), top)
    # MAML's zero-shot answer: the meta-learned initialisation on the user's rows
    rows = rec.item_rows.clone()
    rows[:, :3] = torch.tensor([2, 1, 0])
    rows[:, rec.vocab.user_id_column] = 0
    with torch.no_grad():
        direct = rec.algo.model(rows.unsqueeze(0)).double().squeeze(0).numpy()
    np.testing.assert_allclose(rec.adapt(None, user_features=FEATURES).catalog_scores(), direct, rtol=1e-6)
    other = rec.adapt(None, user_features={**FEATURES, "age_group": "4"})
    assert not np.allclose(other.catalog_scores(), direct)  # the user's features matter


def test_missing_user_features_are_averaged_over_seeded_pseudo_users(rec):
    user = rec.adapt({"1": 5})
    assert user.user_columns.shape == (rec.samples, 3)
    assert len(torch.unique(user.user_columns, dim=0)) > 1
    again = rec.adapt({"1": 5})
    np.testing.assert_array_equal(user.catalog_scores(), again.catalog_scores())


def test_batch_from_ratings_builds_the_rows_from_the_saved_vocabulary(trained):
    ckpt = load_checkpoint(trained["best"])
    batch = batch_from_ratings(pd.DataFrame({"item": ["3", "7", "nope"], "rating": [4, 2, 5]}),
                                   ckpt.meta["vocabulary"], ckpt.item_rows, {"age_group": 4, "region": "5"})
    vocab = metarec_runner.serve.Vocabulary(ckpt.meta["vocabulary"])
    k = batch.size
    assert k == 32  # price_sensitivity is missing: averaged over pseudo-users
    assert batch.support_x.shape == (k, 2, ckpt.item_rows.shape[1]) and batch.query_x.shape == (k, 0, 9)
    codes = vocab.item_codes(["3", "7"])
    expected = ckpt.item_rows[codes].clone()
    assert torch.equal(batch.support_x[:, :, 3:7], expected[:, 3:7].expand(k, 2, 4))  # item fields kept
    assert (batch.support_x[:, :, 0] == 4).all() and (batch.support_x[:, :, 1] == 5).all()
    pseudo = torch.arange(k).view(k, 1).expand(k, 2)
    assert torch.equal(batch.support_x[:, :, vocab.user_id_column], pseudo)  # user_id: the pseudo-user's index
    assert torch.equal(batch.support_x[:, :, -1], torch.as_tensor(codes).expand(k, 2))
    assert torch.equal(batch.support_y, torch.tensor([[4.0, 2.0]]).expand(k, 2)) and batch.support_mask.all()


def test_unknown_items_are_skipped_with_a_warning(rec):
    with pytest.warns(UserWarning, match=r"2 unknown item\(s\) skipped \(e.g. 'x1', '99999'\)"):
        user = rec.adapt(pd.DataFrame({"item": ["x1", "1", "99999"], "rating": [3, 4, 5]}), FEATURES)
    assert user.unknown_items == ["x1", "99999"] and user.rated_items == ["1"]
    with pytest.raises(ServeError, match="unknown item id"):
        user.score(["1", "x1"])


@pytest.mark.parametrize(("ratings", "features", "match"), [
    (pd.DataFrame({"movie": ["1"], "rating": [4]}), None, r"columns must be item,rating .* found movie, rating"),
    (pd.DataFrame({"item": ["1"], "stars": [4]}), None, r"columns must be item,rating"),
    (pd.DataFrame({"item": ["1", "2"], "rating": ["4", "good"]}), None, r"row 2: rating 'good' is not a number"),
    (pd.DataFrame({"item": ["1", "2"], "rating": [4, 7]}), None, r"row 2: rating 7 is outside .* \[1, 5\]"),
    (pd.DataFrame({"title": ["A toy"], "rating": [4]}), None, r"no item titles"),
    ({"1": 4}, {"colour": "red"}, r"unknown user feature 'colour'; the model's user features are age_group"),
    ({"1": 4}, {"age_group": "9"}, r"age_group='9': .* integer in 0..4"),
])
def test_bad_input_is_one_line(rec, ratings, features, match):
    with pytest.raises(ServeError, match=match) as info:
        rec.recommend(ratings, n=3, user_features=features)
    assert "\n" not in str(info.value)


def test_unknown_runs_and_paths_are_one_line(trained, tmp_path):
    with pytest.raises(ServeError, match=r"no such run in sqlite"):
        metarec_runner.load("0" * 32, tracking_uri=trained["uri"])
    with pytest.raises(ServeError, match=r"no such file or folder, and not an MLflow run id"):
        metarec_runner.load(str(tmp_path / "nothing"))
    with pytest.raises(ServeError, match=r"no best.pt in this folder"):
        metarec_runner.load(tmp_path)
    missing = tmp_path / "store" / "mlflow.db"
    with pytest.raises(ServeError, match=r"no MLflow store at"):
        metarec_runner.load("latest", tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()  # nothing was created


def test_a_run_whose_folder_is_gone_is_read_from_its_artifacts(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained["uri"])
    source = client.get_run(trained["run_id"])
    moved = client.create_run(source.info.experiment_id, tags={"output_dir": str(tmp_path / "deleted")})
    client.log_artifact(moved.info.run_id, str(trained["best"]), "checkpoints")
    rec = metarec_runner.load(moved.info.run_id, tracking_uri=trained["uri"])
    assert rec.path.name == "best.pt" and rec.path != trained["best"]
    assert rec.path.read_bytes() == Path(trained["best"]).read_bytes()
    client.set_terminated(moved.info.run_id, "FAILED")  # never the `latest` FINISHED run


class _Payload:
    """Unpickling it would create ``marker`` (if ``torch.load`` ran pickled code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickled_payload_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "best.pt"
    torch.save({"format": FORMAT, "meta": "{}", "algo": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\)") as info:
        metarec_runner.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_a_truncated_or_foreign_checkpoint_is_one_line(trained, tmp_path):
    data = Path(trained["best"]).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pt: truncated or corrupt checkpoint") as info:
        metarec_runner.load(cut)
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match=r"not a metarec checkpoint"):
        metarec_runner.load(foreign)


@pytest.mark.parametrize("overrides", [("+algo=reptile",), ("+algo=protonet",), ("+algo=popularity",),
                                       ("+algo=maml", "model=fm", "algo.adapt=all", "dtype=float64")])
def test_other_algorithms_and_models_serve_from_their_checkpoint(overrides):
    result = metarec_runner.train(metarec_runner.compose(
        *overrides, "dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=1", "trainer.progress=false",
        "logger=none", "evaluator.adaptation_steps=[]"))
    rec = metarec_runner.load(result.checkpoint)
    user = rec.adapt({"1": 5, "2": 1, "7": 4}, user_features=FEATURES)
    top = user.topk(5)
    assert len(top) == 5 and not {"1", "2", "7"} & set(top["item"]) and np.isfinite(top["score"]).all()
    assert len(rec.recommend(None, n=5)) == 5


def test_a_ranking_trained_model_adapts_against_negatives_when_served():
    """loss=softmax: adaptation draws negatives from the checkpoint's catalog, never the user's items."""
    result = metarec_runner.train(metarec_runner.compose(
        "+algo=maml", "model=mf", "algo.loss=softmax", "algo.negatives=popularity", "trainer.monitor=val/ndcg_at_10",
        "dataset.n_users=120", "dataset.n_items=80", "trainer.max_epochs=2", "trainer.progress=false", "logger=none"))
    rec = metarec_runner.load(result.checkpoint)
    a = rec.adapt({"1": 5, "2": 5, "7": 5}, user_features=FEATURES)
    b = rec.adapt({"30": 5, "40": 5, "50": 5}, user_features=FEATURES)
    assert not {"1", "2", "7"} & set(a.topk(10)["item"]) and not {"30", "40", "50"} & set(b.topk(10)["item"])
    assert not np.allclose(a.catalog_scores(), b.catalog_scores())  # the support moved the scores
    again = rec.adapt({"1": 5, "2": 5, "7": 5}, user_features=FEATURES)
    np.testing.assert_array_equal(a.catalog_scores(), again.catalog_scores())  # seeded negatives


# -- the MLflow pyfunc model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pyfunc_uri(trained) -> str:
    from metarec_runner.serve.pyfunc import log_pyfunc_model

    return log_pyfunc_model(trained["uri"], trained["run_id"], trained["best"])


def test_pyfunc_model_predicts_what_recommend_returns(trained, rec, pyfunc_uri, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    assert pyfunc_uri == f"runs:/{trained['run_id']}/model"
    model = mlflow.pyfunc.load_model(pyfunc_uri)
    frame = pd.DataFrame({"item": ["1", "2", "3"], "rating": [5, 1, 4],
                          "age_group": ["2", None, None], "region": ["1", None, None],
                          "price_sensitivity": ["0", None, None]})
    got = model.predict(frame, params={"n": 7})
    expected = rec.recommend(frame[["item", "rating"]], n=7, user_features=FEATURES)
    pd.testing.assert_frame_equal(got, expected.assign(title=expected["title"].fillna("")))
    zero = model.predict(pd.DataFrame({"age_group": ["2"], "region": ["1"], "price_sensitivity": ["0"]}))
    assert list(zero["item"]) == list(rec.recommend(None, n=10, user_features=FEATURES)["item"])
    sig = model.metadata.signature
    assert sig.inputs.input_names()[:3] == ["item", "title", "rating"]
    assert sig.outputs.input_names() == ["rank", "item", "title", "score"]
    assert sig.params.to_dict()[0]["name"] == "n"
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"rating 9 is outside"):
        model.predict(pd.DataFrame({"item": ["1"], "rating": [9]}))


def test_log_pyfunc_model_through_the_runs_tracker(trained, tmp_path, monkeypatch):
    """What run.py does at the end of a run: log through its MlflowTracker, then load it back."""
    import mlflow.pyfunc

    from metarec_runner.serve.pyfunc import log_pyfunc_model
    from metarec_runner.tracking.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker(trained["uri"], "serve-test", run_name="pyfunc")
    run_id = tracker.start({"x": 1})
    assert log_pyfunc_model(tracker, run_id, trained["best"]) == f"runs:/{run_id}/model"
    tracker.finish("FINISHED")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert len(model.predict(pd.DataFrame({"item": ["1"], "rating": [3.0]}), params={"n": 4})) == 4
    assert log_pyfunc_model(None, "", trained["best"]) is None  # logger=none
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        log_pyfunc_model(tracker, run_id, tmp_path / "best.pt")


@pytest.mark.slow
def test_rest_server_answers_invocations(trained, rec, pyfunc_uri, tmp_path):
    """``mlflow models serve --env-manager local`` on a loopback port: a few POST /invocations."""
    import requests

    if shutil.which("uvicorn", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mlflow models serve needs uvicorn in this environment")
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH: the venv's, also when not activated
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["uri"], "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", pyfunc_uri, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, f"{url}/ping", 120, tmp_path / "serve.log", "mlflow models serve")
        body = {"dataframe_split": {"columns": ["item", "rating", "age_group", "region", "price_sensitivity"],
                                    "data": [["1", 5, "2", "1", "0"], [2, 1, None, None, None],
                                             ["3", 4.5, None, None, None]]},
                "params": {"n": 5}}
        got = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert got.status_code == 200, got.text
        expected = rec.recommend({"1": 5, "2": 1, "3": 4.5}, n=5, user_features=FEATURES)
        answer = pd.DataFrame(got.json()["predictions"])
        assert list(answer["item"]) == list(expected["item"]) and list(answer["rank"]) == [1, 2, 3, 4, 5]
        np.testing.assert_allclose(answer["score"], expected["score"], rtol=1e-9)
        bad = requests.post(f"{url}/invocations", timeout=60,
                            json={"dataframe_split": {"columns": ["item", "rating"], "data": [["1", "x"]]}})
        assert bad.status_code == 400 and "rating 'x' is not a number" in bad.json()["message"]
    finally:
        stop_group(proc)  # the server and its uvicorn worker
        log.close()
