"""The synthetic toy store: determinism, shapes, and that the planted structure is really there."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from metarec_runner.data.interactions import Interactions
from metarec_runner.data.toy import expected_observed_rating, make_toy_catalog
from metarec_runner.errors import ConfigError


@pytest.fixture(scope="module")
def toy() -> Interactions:
    return make_toy_catalog()


@pytest.fixture(scope="module")
def big() -> Interactions:
    """Enough households for stable statistics (about 120k ratings)."""
    return make_toy_catalog(n_users=3000, seed=7)


def _rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    diff = np.asarray(pred, np.float64) - np.asarray(truth, np.float64)
    return float(np.sqrt(np.mean(diff**2)))


def _joined(data: Interactions) -> pd.DataFrame:
    return data.ratings.join(data.user_features, on="user").join(data.item_features, on="item")


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_frames(toy: Interactions) -> None:
    again = make_toy_catalog()
    pd.testing.assert_frame_equal(toy.ratings, again.ratings)
    pd.testing.assert_frame_equal(toy.user_features, again.user_features)
    pd.testing.assert_frame_equal(toy.item_features, again.item_features)
    assert toy.noise_floor_rmse == again.noise_floor_rmse
    assert toy.checksum() == again.checksum()


def test_different_seed_gives_different_data(toy: Interactions) -> None:
    other = make_toy_catalog(seed=1)
    assert other.checksum() != toy.checksum()
    n = min(len(other.ratings), len(toy.ratings))
    a, b = other.ratings["rating"].to_numpy()[:n], toy.ratings["rating"].to_numpy()[:n]
    assert not np.array_equal(a, b)
    assert not other.item_features.equals(toy.item_features)


# ---------------------------------------------------------------- shapes and schema


def test_sizes_dtypes_and_schema(toy: Interactions) -> None:
    r = toy.ratings
    assert toy.name == "toy"
    assert toy.n_users == 400 and toy.n_items == 300
    assert list(r.columns) == ["user", "item", "rating", "timestamp", "expected_rating"]
    assert dict(r.dtypes.astype(str)) == {"user": "int64", "item": "int64", "rating": "float32",
                                          "timestamp": "int64", "expected_rating": "float64"}
    assert isinstance(r.index, pd.RangeIndex) and r.index[0] == 0 and r.index[-1] == len(r) - 1
    assert r["user"].between(0, 399).all() and r["item"].between(0, 299).all()
    counts = np.bincount(r["user"].to_numpy(), minlength=400)
    assert counts.min() >= 20 and counts.max() <= 60  # the default config has no dedup shortfall
    assert 400 * 20 < len(r) < 400 * 60
    assert not r.duplicated(["user", "item"]).any()
    assert set(np.unique(r["rating"])) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(set(np.unique(r["rating"]))) == 5

    assert list(toy.user_features.columns) == ["age_group", "region", "price_sensitivity"]
    assert list(toy.item_features.columns) == ["category", "age_band", "price_tier", "brand"]
    assert toy.cardinalities == {"age_group": 5, "region": 6, "price_sensitivity": 3,
                                 "category": 10, "age_band": 5, "price_tier": 4, "brand": 24}
    for frame, n in ((toy.user_features, 400), (toy.item_features, 300)):
        assert list(frame.index) == list(range(n))
        for col in frame.columns:
            assert frame[col].dtype == np.int64
            assert frame[col].between(0, toy.cardinalities[col] - 1).all()
            assert frame[col].nunique() == toy.cardinalities[col]  # every token is used
    assert toy.rating_scale == (1.0, 5.0)
    assert toy.metadata["generator"] == "metarec toy catalog v1"
    assert toy.metadata["args"]["interactions_per_user"] == [20, 60]
    assert len(toy.metadata["categories"]) == 10 and toy.metadata["age_bands"][-1] == "13+"
    assert toy.schema.cardinalities == (5, 6, 3, 10, 5, 4, 24, 400, 300)


def test_sorted_by_user_then_strictly_increasing_timestamps(toy: Interactions) -> None:
    user = toy.ratings["user"].to_numpy()
    ts = toy.ratings["timestamp"].to_numpy()
    assert (np.diff(user) >= 0).all()
    same = user[1:] == user[:-1]
    assert (ts[1:][same] > ts[:-1][same]).all()
    assert ts.min() > 1_500_000_000  # plausible unix seconds


def test_custom_sizes_and_list_range() -> None:
    data = make_toy_catalog(name="tiny", n_users=50, n_items=40, n_brands=3,
                            interactions_per_user=[5, 5], seed=3)
    counts = np.bincount(data.ratings["user"].to_numpy(), minlength=50)
    assert data.n_users == 50 and data.n_items == 40 and (counts == 5).all()
    assert data.cardinalities["brand"] == 3 and data.name == "tiny"


def test_steep_popularity_and_full_catalog_fill_up() -> None:
    steep = make_toy_catalog(popularity_exponent=6.0)
    counts = np.bincount(steep.ratings["user"].to_numpy(), minlength=400)
    assert counts.min() >= 20 and counts.max() <= 60
    # every household must rate every toy: the documented shortfall stays tiny, never empties a user
    full = make_toy_catalog(n_users=30, n_items=40, interactions_per_user=(40, 40))
    counts = np.bincount(full.ratings["user"].to_numpy(), minlength=30)
    assert counts.min() >= 1 and counts.max() <= 40 and counts.sum() >= 0.97 * 30 * 40


def test_continuous_ratings_are_clipped_not_rounded() -> None:
    data = make_toy_catalog(integer_ratings=False)
    rating = data.ratings["rating"].to_numpy()
    assert rating.min() >= 1.0 and rating.max() <= 5.0
    assert (rating != np.round(rating)).mean() > 0.5


# ---------------------------------------------------------------- the noise floor


def test_expected_rating_attains_the_noise_floor_without_bias(big: Interactions) -> None:
    r = big.ratings
    assert _rmse(r["expected_rating"], r["rating"]) == pytest.approx(big.noise_floor_rmse, rel=1e-9)
    residual = r["rating"].to_numpy(np.float64) - r["expected_rating"].to_numpy()
    assert abs(residual.mean()) < 4 * residual.std() / math.sqrt(len(residual))
    assert r["expected_rating"].between(1.0, 5.0).all()


def test_noise_floor_matches_noise_std_when_clipping_is_rare() -> None:
    data = make_toy_catalog(n_users=2000, integer_ratings=False, noise_std=0.2, taste_std=0.3,
                            quality_std=0.2)
    rating = data.ratings["rating"]
    assert ((rating == 1.0) | (rating == 5.0)).mean() < 0.03
    assert data.noise_floor_rmse == pytest.approx(0.2, rel=0.05)


def test_zero_noise_has_zero_floor() -> None:
    data = make_toy_catalog(noise_std=0.0)
    assert data.noise_floor_rmse == 0.0
    np.testing.assert_array_equal(data.ratings["rating"], data.ratings["expected_rating"])


def test_noise_floor_beats_simple_predictors(toy: Interactions) -> None:
    r = toy.ratings
    floor = toy.noise_floor_rmse
    assert 0.3 < floor < 0.6
    assert _rmse(np.full(len(r), r["rating"].mean()), r["rating"]) > floor + 0.4
    assert _rmse(r.groupby("item")["rating"].transform("mean"), r["rating"]) > floor + 0.3


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("noise_std", [0.4, 1.0])
def test_expected_rating_matches_monte_carlo(integer: bool, noise_std: float) -> None:
    true_score = np.array([-0.3, 1.0, 1.49, 2.2, 3.0, 3.5, 4.7, 6.1])
    eps = np.random.default_rng(123).standard_normal((200_000, 1)) * noise_std
    noisy = true_score[None, :] + eps
    observed = np.clip(np.rint(noisy) if integer else noisy, 1.0, 5.0)
    np.testing.assert_allclose(expected_observed_rating(true_score, noise_std, integer),
                               observed.mean(axis=0), atol=0.02)


# ---------------------------------------------------------------- planted structure


def _half_split(r: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    pos = r.groupby("user").cumcount().to_numpy()
    return r[pos % 2 == 0], r[pos % 2 == 1]


def _features_vs_personal_rmse(data: Interactions) -> tuple[float, float]:
    """Held-out RMSE of the best features-only cell means, and of those plus per-household taste."""
    r = _joined(data)
    train, test = _half_split(r)
    cells = ["age_group", "price_sensitivity", "category", "age_band", "price_tier"]
    cell_mean = train.groupby(cells)["rating"].mean().rename("cell")
    item_resid = (train["rating"] - train.join(cell_mean, on=cells)["cell"]).groupby(train["item"])
    item_bias = (item_resid.sum() / (item_resid.count() + 5.0)).rename("item_bias")

    def population(frame: pd.DataFrame) -> pd.Series:
        joined = frame.join(cell_mean, on=cells).join(item_bias, on="item")
        return joined["cell"].fillna(train["rating"].mean()) + joined["item_bias"].fillna(0.0)

    resid = (train["rating"] - population(train)).groupby([train["user"], train["category"]])
    taste = (resid.sum() / (resid.count() + 1.0)).rename("taste")  # shrunk per-(user, category)
    base = population(test)
    personal = base + test.join(taste, on=["user", "category"])["taste"].fillna(0.0)
    return _rmse(base, test["rating"]), _rmse(personal, test["rating"])


def test_latent_taste_is_planted_and_learnable_from_own_history(big: Interactions) -> None:
    features_only, personal = _features_vs_personal_rmse(big)
    assert features_only > big.noise_floor_rmse + 0.3  # observed features leave taste unexplained
    assert personal < features_only - 0.1  # a household's own ratings recover part of it


def test_without_taste_personalisation_does_not_help() -> None:
    data = make_toy_catalog(n_users=3000, taste_std=0.0, seed=7)
    features_only, personal = _features_vs_personal_rmse(data)
    assert personal > features_only - 0.02
    assert features_only < data.noise_floor_rmse + 0.15


def test_age_group_category_means_are_far_from_the_floor(big: Interactions) -> None:
    r = _joined(big)
    coarse = r.groupby(["age_group", "category"])["rating"].transform("mean")
    assert _rmse(coarse, r["rating"]) > big.noise_floor_rmse + 0.3
    # ... yet the age x category affinity is real: those means spread widely
    assert r.groupby(["age_group", "category"])["expected_rating"].mean().std() > 0.3


def test_region_is_a_nuisance_and_exposure_is_age_appropriate(big: Interactions) -> None:
    r = _joined(big)
    by_region = r.groupby("region")["expected_rating"].mean()
    by_age_fit = r.groupby(r["age_group"] == r["age_band"])["expected_rating"].mean()
    assert by_region.max() - by_region.min() < 0.15  # sampling spread only; no region effect
    assert by_age_fit[True] - by_age_fit[False] > 0.3  # off-band toys rate lower
    assert ((r["age_group"] - r["age_band"]).abs() <= 1).mean() > 0.75
    brand_share = big.item_features.groupby("brand")["category"].agg(
        lambda c: c.value_counts(normalize=True).iloc[0])
    assert brand_share.mean() > 0.4  # brands lean towards a category


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"n_users": 0}, "n_users"),
        ({"n_users": 2.5}, "n_users"),
        ({"n_items": 1}, "n_items"),
        ({"n_brands": 0}, "n_brands"),
        ({"interactions_per_user": (0, 5)}, "interactions_per_user"),
        ({"interactions_per_user": (10, 5)}, "interactions_per_user"),
        ({"interactions_per_user": (5, 301)}, "interactions_per_user"),
        ({"interactions_per_user": (5,)}, "interactions_per_user"),
        ({"interactions_per_user": 5}, "interactions_per_user"),
        ({"interactions_per_user": "ab"}, "interactions_per_user"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"taste_std": float("nan")}, "taste_std"),
        ({"quality_std": -1}, "quality_std"),
        ({"popularity_exponent": -0.5}, "popularity_exponent"),
        ({"integer_ratings": "yes"}, "integer_ratings"),
        ({"seed": -1}, "seed"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_toy_catalog(**kwargs)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


# ---------------------------------------------------------------- scale
# (generation speed is printed by scripts/bench_scale.py, never asserted: these machines are noisy)


def test_larger_catalog_generates() -> None:
    data = make_toy_catalog(n_users=20_000, n_items=5_000, n_brands=100, seed=5)
    counts = np.bincount(data.ratings["user"].to_numpy(), minlength=20_000)
    assert data.n_users == 20_000 and data.n_items == 5_000
    assert counts.min() >= 20 and counts.max() <= 60
    assert data.ratings["item"].nunique() > 4_000
    assert 0.3 < data.noise_floor_rmse < 0.6
