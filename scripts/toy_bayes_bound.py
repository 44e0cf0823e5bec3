"""How close to the toy catalog's noise floor can ANY learner get from the same support sets?

``floor_rmse`` is the RMSE of the Bayes-optimal prediction that *knows* each household's latent
per-category taste ``t_u``. A learner only sees the support ratings, so even an oracle that knows
everything else (the population part, every toy's quality, the noise law) must estimate
``t_u[c] ~ N(0, taste_std^2)`` from the ``n_c`` support ratings in category ``c``. Its posterior
variance is ``1 / (1 / taste_std^2 + n_c / sigma^2)`` (``sigma^2``: the rating noise around the
latent score; rounding and clipping to 1-5 stars only add to it), and its expected squared error on
a query item of category ``c`` is the floor's plus that variance. This script prints that bound,
averaged over the real test split's query items, for a few noise variances:

    python scripts/toy_bayes_bound.py                      # the default main job's data and split
    python scripts/toy_bayes_bound.py dataset.n_users=2000 # any override of `metarec train`

It is a lower bound for every algorithm on this split (the posterior is Gaussian-exact, ignoring
the extra information rounding leaks, which is small), so a target below it cannot be met.
"""

from __future__ import annotations

import math
import sys

import numpy as np


def main(overrides: list[str]) -> None:
    from metarec_runner.prepare import Prepared
    from metarec_runner.run import compose, job_context

    cfg, _ = job_context(compose("+algo=maml", "logger=none", *overrides))
    prep = Prepared(cfg)
    data, test = prep.data, prep.splits.test
    column = sum(data.schema.widths[: data.schema.index("category")])
    taste_var = float(cfg.dataset.taste_std) ** 2
    noise_std = float(cfg.dataset.noise_std)
    if test.query_expected is None:
        raise SystemExit("this dataset has no Bayes-optimal predictions (expected_rating); use dataset=toy")
    per_user: list[tuple[np.ndarray, float]] = []  # (support ratings in each query item's category, floor^2)
    for t in range(len(test)):
        s_lo, s_hi = int(test.support_offsets[t]), int(test.support_offsets[t + 1])
        q_lo, q_hi = int(test.query_offsets[t]), int(test.query_offsets[t + 1])
        support = test.support_x[s_lo:s_hi, column].numpy()
        query = test.query_x[q_lo:q_hi, column].numpy()
        err = test.query_expected[q_lo:q_hi].numpy() - test.query_y[q_lo:q_hi].numpy()
        per_user.append((np.array([(support == c).sum() for c in query], dtype=np.float64), float(np.mean(err**2))))
    counts = np.concatenate([c for c, _ in per_user])
    floor = float(np.mean([math.sqrt(f) for _, f in per_user]))  # as reported: the mean over users of their RMSE
    print(f"test users {len(test)}, mean support {float(test.support_sizes.float().mean()):.1f}; support ratings "
          f"in a query item's category: mean {counts.mean():.2f}, none for {np.mean(counts == 0):.1%}")
    print(f"floor_rmse (taste known) {floor:.4f}; 15% above it: {1.15 * floor:.4f}")
    for noise_var in (noise_std**2, noise_std**2 + 1 / 12, noise_std**2 + 1 / 6):
        bound = float(np.mean([math.sqrt(f + float(np.mean(1.0 / (1.0 / taste_var + c / noise_var))))
                               for c, f in per_user]))
        print(f"sigma^2={noise_var:.3f}: an oracle learner's test RMSE >= {bound:.4f} "
              f"({bound / floor - 1:+.1%} over the floor)")

if __name__ == "__main__":
    main(sys.argv[1:])
