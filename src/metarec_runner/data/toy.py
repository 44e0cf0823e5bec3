"""A synthetic toy store with planted structure, so that "meta-learning helps" is testable.

Items are toys with a category (10), a recommended age band (5), a price tier (4), a brand
(``n_brands``; each brand leans towards one primary and one secondary category) and a latent
quality ``q_i ~ N(0, quality_std)``. Households (users) have an observed child age group (5), an
observed region (6, a nuisance feature with NO effect on ratings), an observed price sensitivity
(3) and a LATENT per-category taste ``t_u ~ N(0, taste_std^2 I_10)``. The true score is

    r* = 3.0 + AGE_FIT[user_age, item_age] + AFFINITY[user_age, category] + t_u[category]
             + q_i + PRICE_EFFECT[sensitivity, tier]

and the observed rating is ``clip(round(r* + eps), 1, 5)`` (or ``clip(r* + eps, 1, 5)`` when
``integer_ratings=False``) with ``eps ~ N(0, noise_std^2)``. ``AGE_FIT``, ``AFFINITY`` and
``PRICE_EFFECT`` are hand-written constants below (not drawn from any RNG). Features only explain
the population part of r*; the taste part must be learned from each household's own ratings,
which is exactly what a few-shot (meta-learned) adaptation can exploit.

Exposure: household ``u`` rates ``n_u ~ U{lo..hi}`` distinct items, drawn with weights
``popularity[i] * EXPOSURE_BY_AGE_DISTANCE[|user_age - item_age|]`` where popularity is Zipf
(``rank^-popularity_exponent``) over a random item permutation. Sampling is vectorized in rounds:
draw (an adaptive multiple of) each household's deficit with replacement (multinomial item counts
per age group, shuffled over the group's slots), drop (user, item) pairs already held, keep a
random subset of at most the deficit. After
``WEIGHTED_ROUNDS`` rounds any deficit left (only with very steep popularity) is filled for up to
``UNIFORM_ROUNDS`` more rounds from uniform exposure; a shortfall left after that (only when ``hi``
is close to ``n_items``) is kept, but every household keeps at least one rating (its first draw).
``expected_rating`` is ``E[rating | r*]`` in closed form, the Bayes-optimal prediction.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd
import torch

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError

CATEGORIES = ["building blocks", "dolls", "puzzles", "STEM kits", "plush", "vehicles",
              "arts and crafts", "board games", "outdoor", "musical"]
AGE_BANDS = ["0-2", "3-5", "6-8", "9-12", "13+"]
PRICE_TIERS = ["budget", "standard", "premium", "luxury"]
PRICE_SENSITIVITIES = ["budget-minded", "neutral", "premium-seeking"]
N_REGIONS = 6
RATING_SCALE = (1.0, 5.0)
BASE_SCORE = 3.0
WEIGHTED_ROUNDS, UNIFORM_ROUNDS = 16, 8
MAX_OVERSAMPLING = 32.0

_BAND_DISTANCE = np.abs(np.subtract.outer(np.arange(5), np.arange(5)))
AGE_FIT = np.array([0.0, -0.4, -1.0, -1.5, -1.5])[_BAND_DISTANCE]
"""[user age group, item age band]: 0 on the diagonal, -0.4 one band off, down to -1.5."""

AFFINITY = np.array([
    # blocks dolls puzzl STEM  plush vehic arts  board outdr music
    [0.3, 0.0, -0.4, -0.8, 0.8, 0.6, -0.6, -0.8, 0.0, 0.3],   # 0-2: plush, vehicles
    [0.6, 0.5, 0.2, -0.4, 0.4, 0.6, 0.4, -0.3, 0.2, 0.1],     # 3-5: blocks, dolls, vehicles
    [0.5, 0.3, 0.3, 0.3, -0.2, 0.3, 0.5, 0.2, 0.5, -0.1],     # 6-8: blocks, crafts, outdoor
    [0.1, -0.3, 0.4, 0.7, -0.5, 0.0, 0.1, 0.5, 0.6, 0.2],     # 9-12: STEM, outdoor, board
    [-0.4, -0.6, 0.3, 0.8, -0.8, -0.3, 0.0, 0.7, 0.2, 0.6],   # 13+: STEM, board, musical
])
"""[user age group, category]: age-dependent category preferences in [-0.8, 0.8]."""

PRICE_EFFECT = np.array([[0.3, 0.1, -0.2, -0.5], [0.0, 0.05, 0.05, -0.1], [-0.3, -0.1, 0.2, 0.3]])
"""[price sensitivity (budget-minded, neutral, premium-seeking), price tier]: small shifts."""

EXPOSURE_BY_AGE_DISTANCE = np.array([1.0, 0.35, 0.08, 0.02, 0.01])
PRICE_TIER_PROBS = np.array([0.3, 0.35, 0.25, 0.1])
SENSITIVITY_PROBS = np.array([0.35, 0.4, 0.25])
START_EPOCH = 1_577_836_800  # 2020-01-01 UTC
SPAN_SECONDS = 180 * 86_400


def _phi(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF, vectorized (numpy has no erf; torch's is used on a float64 view)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    return (0.5 * (1.0 + torch.special.erf(t / math.sqrt(2.0)))).numpy()


def _pdf(x: np.ndarray) -> np.ndarray:
    """Standard normal density."""
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def expected_observed_rating(true_score: np.ndarray, noise_std: float,
                             integer_ratings: bool = True) -> np.ndarray:
    """``E[observed rating | r*]`` for ``r* + N(0, noise_std^2)`` rounded (optionally) and clipped.

    Args:
        true_score: float array ``[N]`` of true scores ``r*``.
        noise_std: standard deviation of the Gaussian noise (>= 0).
        integer_ratings: round to whole stars before clipping to ``RATING_SCALE``.

    Returns:
        float64 array ``[N]``.
    """
    m = np.asarray(true_score, dtype=np.float64)
    lo, hi = RATING_SCALE
    if noise_std == 0:
        return np.clip(np.rint(m) if integer_ratings else m, lo, hi)
    if integer_ratings:  # E[K] = lo + sum_t P(r* + eps > t) over thresholds t = lo+0.5 .. hi-0.5
        z = torch.from_numpy(m / (noise_std * math.sqrt(2.0)))
        out = torch.full_like(z, lo + 0.5 * (hi - lo))
        for t in np.arange(lo + 0.5, hi, 1.0):
            out.add_(torch.special.erf(z - t / (noise_std * math.sqrt(2.0))), alpha=0.5)
        return out.numpy()
    a, b = (lo - m) / noise_std, (hi - m) / noise_std  # mean of a normal censored to [lo, hi]
    pa, pb = _phi(a), _phi(b)
    return lo * pa + hi * (1.0 - pb) + m * (pb - pa) + noise_std * (_pdf(a) - _pdf(b))


def _check_int(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}, got {value!r}; set {key} to one")
    return int(value)


def _check_float(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value >= 0):
        raise ConfigError(key, f"must be a finite number >= 0, got {value!r}; set {key} to one")
    return float(value)


def make_toy_catalog(
    name: str = "toy",
    n_users: int = 400,
    n_items: int = 300,
    n_brands: int = 24,
    interactions_per_user: tuple[int, int] | list[int] = (20, 60),
    noise_std: float = 0.4,
    taste_std: float = 0.9,
    quality_std: float = 0.4,
    popularity_exponent: float = 1.0,
    integer_ratings: bool = True,
    seed: int = 0,
) -> Interactions:
    """Generate the toy store (see the module docstring for the planted model).

    Returns:
        :class:`Interactions` with ``ratings`` ``[N, 5]`` (user, item, rating, timestamp,
        expected_rating) sorted by (user, timestamp), ``user_features`` ``[n_users, 3]``
        (age_group, region, price_sensitivity), ``item_features`` ``[n_items, 4]`` (category,
        age_band, price_tier, brand), and ``noise_floor_rmse`` = RMSE of ``expected_rating``.
        ``N`` is ``sum_u n_u`` minus the (rare, documented) duplicate shortfall.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("name", f"must be a non-empty string, got {name!r}")
    n_users = _check_int("n_users", n_users, 1)
    n_items = _check_int("n_items", n_items, 2)
    n_brands = _check_int("n_brands", n_brands, 1)
    seed = _check_int("seed", seed, 0)
    noise_std = _check_float("noise_std", noise_std)
    taste_std = _check_float("taste_std", taste_std)
    quality_std = _check_float("quality_std", quality_std)
    popularity_exponent = _check_float("popularity_exponent", popularity_exponent)
    try:
        lo, hi = (_check_int("interactions_per_user", v, 1) for v in list(interactions_per_user))
    except (TypeError, ValueError, ConfigError):
        lo, hi = 0, -1
    if not 1 <= lo <= hi <= n_items:
        raise ConfigError("interactions_per_user", f"must be a pair [lo, hi] of integers with "
                          f"1 <= lo <= hi <= n_items ({n_items}), got {interactions_per_user!r}")
    if not isinstance(integer_ratings, bool):
        raise ConfigError("integer_ratings", f"must be true or false, got {integer_ratings!r}")
    rng = np.random.default_rng(seed)

    # catalog: brands lean to a primary (60%) and a secondary (25%) category
    primary = rng.permutation(np.arange(n_brands) % len(CATEGORIES))
    secondary = (primary + rng.integers(1, len(CATEGORIES), n_brands)) % len(CATEGORIES)
    brand = rng.integers(0, n_brands, n_items)
    pick = rng.random(n_items)
    category = np.where(pick < 0.6, primary[brand], np.where(
        pick < 0.85, secondary[brand], rng.integers(0, len(CATEGORIES), n_items)))
    age_band = rng.integers(0, len(AGE_BANDS), n_items)
    tier = rng.choice(len(PRICE_TIERS), n_items, p=PRICE_TIER_PROBS)
    quality = (rng.standard_normal(n_items) * quality_std).astype(np.float32)
    # households
    age_group = rng.integers(0, len(AGE_BANDS), n_users)
    region = rng.integers(0, N_REGIONS, n_users)
    sensitivity = rng.choice(len(PRICE_SENSITIVITIES), n_users, p=SENSITIVITY_PROBS)
    taste = (rng.standard_normal((n_users, len(CATEGORIES)), dtype=np.float32) * taste_std)

    # exposure: per user age group, popularity x age boost (rows sum to 1)
    popularity = (rng.permutation(n_items) + 1.0) ** -popularity_exponent
    exposure = popularity[None, :] * EXPOSURE_BY_AGE_DISTANCE[_BAND_DISTANCE[:, age_band]]
    exposure /= exposure.sum(axis=1, keepdims=True)
    members = [np.flatnonzero(age_group == g) for g in range(len(AGE_BANDS))]

    def draw_keys(n_draw: np.ndarray, weighted: bool) -> np.ndarray:
        """Sorted distinct keys ``user * n_items + item`` of ``n_draw[u]`` draws per user."""
        parts = []
        for g, group in enumerate(members):  # a loop over 5 age groups, not over users
            users = np.repeat(group, n_draw[group])
            p = exposure[g] if weighted else np.full(n_items, 1.0 / n_items)
            items = np.repeat(np.arange(n_items), rng.multinomial(len(users), p))
            rng.shuffle(items)  # multinomial counts + shuffle == iid draws, without a search
            parts.append(users * n_items + items)
        keys = np.sort(np.concatenate(parts))
        return keys[np.concatenate([[True], keys[1:] != keys[:-1]])]

    # rounds: draw `factor` x each deficit, drop known pairs, keep a random `deficit` of the rest
    n_target = rng.integers(lo, hi + 1, n_users)
    have = np.zeros(n_users, dtype=np.int64)
    accepted: list[np.ndarray] = []  # sorted key arrays, one per round
    factor = 1.0
    for round_ in range(WEIGHTED_ROUNDS + UNIFORM_ROUNDS):
        missing = n_target - have
        if not missing.any():
            break
        n_draw = np.ceil(missing * factor).astype(np.int64)
        cand = draw_keys(n_draw, weighted=round_ < WEIGHTED_ROUNDS)
        for known in accepted:
            pos = np.minimum(np.searchsorted(known, cand), len(known) - 1)
            cand = cand[known[pos] != cand]
        factor = min(MAX_OVERSAMPLING, 1.25 * n_draw.sum() / max(len(cand), 1))
        cu = cand // n_items
        found = np.bincount(cu, minlength=n_users)
        if (found > missing).any():  # keep a random subset of `missing` per user
            order = np.argsort((cu << 32) | rng.integers(0, 2**32, len(cand)), kind="stable")
            cu, cand = cu[order], cand[order]
            rank = np.arange(len(cand)) - (np.cumsum(found) - found)[cu]
            cand = np.sort(cand[rank < missing[cu]])
            found = np.minimum(found, missing)
        have += found
        if len(cand):
            accepted.append(cand)
    keys = np.concatenate(accepted)
    del accepted, cand

    # timestamps: random start day + sorted random offsets (+ position, so strictly increasing)
    user = keys // n_items
    item = keys - user * n_items
    packed = (user << 32) | rng.integers(0, SPAN_SECONDS, len(user))
    order = np.argsort(packed, kind="stable")
    packed, item = packed[order], item[order]
    del keys, order
    user = packed >> 32
    start = START_EPOCH + rng.integers(0, 365, n_users) * 86_400 - (np.cumsum(have) - have)
    timestamp = (packed & 0xFFFFFFFF) + start[user] + np.arange(len(user))
    del packed

    # planted scores: one [15 user kinds, 200 item kinds] table + quality + latent taste
    table = (AGE_FIT[:, None, :, None, None] + AFFINITY[:, None, None, None, :]
             + PRICE_EFFECT[None, :, None, :, None])  # [age, sens, item age, tier, category]
    user_kind = age_group * len(PRICE_SENSITIVITIES) + sensitivity
    item_kind = (age_band * len(PRICE_TIERS) + tier) * len(CATEGORIES) + category
    true_score = table.reshape(-1).astype(np.float32)[user_kind[user] * 200 + item_kind[item]]
    true_score += quality[item]
    true_score += taste.reshape(-1)[user * len(CATEGORIES) + category[item]]
    true_score = true_score.astype(np.float64) + BASE_SCORE
    noisy = true_score + rng.standard_normal(len(user)) * noise_std
    rating = np.clip(np.rint(noisy) if integer_ratings else noisy, *RATING_SCALE).astype(np.float32)
    del noisy
    expected = expected_observed_rating(true_score, noise_std, integer_ratings)
    del true_score
    noise_floor = float(np.sqrt(np.mean((rating.astype(np.float64) - expected) ** 2)))

    ratings = pd.DataFrame({"user": user, "item": item, "rating": rating, "timestamp": timestamp,
                            "expected_rating": expected}, copy=False)
    user_features = pd.DataFrame({"age_group": age_group, "region": region,
                                  "price_sensitivity": sensitivity}, dtype=np.int64)
    item_features = pd.DataFrame({"category": category, "age_band": age_band, "price_tier": tier,
                                  "brand": brand}, dtype=np.int64)
    return Interactions(
        name=name, ratings=ratings, user_features=user_features, item_features=item_features,
        cardinalities={"age_group": 5, "region": N_REGIONS, "price_sensitivity": 3,
                       "category": 10, "age_band": 5, "price_tier": 4, "brand": n_brands},
        rating_scale=RATING_SCALE, noise_floor_rmse=noise_floor,
        metadata={"generator": "metarec toy catalog v1",
                  "args": {"name": name, "n_users": n_users, "n_items": n_items,
                           "n_brands": n_brands, "interactions_per_user": [lo, hi],
                           "noise_std": noise_std, "taste_std": taste_std,
                           "quality_std": quality_std, "popularity_exponent": popularity_exponent,
                           "integer_ratings": integer_ratings, "seed": seed},
                  "categories": list(CATEGORIES), "age_bands": list(AGE_BANDS),
                  "price_tiers": list(PRICE_TIERS),
                  "price_sensitivities": list(PRICE_SENSITIVITIES)},
    )
