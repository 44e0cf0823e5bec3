"""Time EASE's fit two ways on a real study's meta-train matrix, side by side in one run.

- ``full inverse``: ``np.linalg.inv(X^T X + lambda I)`` over the whole catalog (metarec before the
  change, and the textbook form);
- ``metarec``: :class:`metarec_runner.algos.baselines_ranking.EASE` as it fits now, by Cholesky
  over the items with a meta-train interaction only (exact: an item without one has zero weights).

Both weight matrices are compared (max abs difference), then the ratio of the times is printed:

    METAREC_DATA_DIR=... python scripts/bench_ease_fit.py experiment=coldstart_lastfm
    METAREC_DATA_DIR=... python scripts/bench_ease_fit.py experiment=coldstart_mlsmall --repeats 3

Arguments other than ``--repeats`` are ``metarec train`` overrides (``+coldstart=ease`` is added).
Set ``OMP_NUM_THREADS`` to compare at a fixed thread count.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="timed fits of each (the best is kept)")
    args, overrides = parser.parse_known_args(argv)
    import torch

    from metarec_runner.algos.baselines_ranking import EASE, catalog_size, interaction_matrix
    from metarec_runner.prepare import Prepared
    from metarec_runner.run import compose, job_context

    cfg, _ = job_context(compose("+coldstart=ease", "logger=none", *overrides))
    prep = Prepared(cfg)
    algo = EASE(prep.model, l2=float(cfg.algo.l2), positive_threshold=cfg.algo.positive_threshold)
    x = interaction_matrix(prep.splits.train, algo.positive_threshold, catalog_size(prep.model))
    active = int((np.asarray(x.getnnz(axis=0)) > 0).sum())
    print(f"{cfg.dataset.name}: meta-train matrix {x.shape[0]} x {x.shape[1]} ({x.nnz} interactions), "
          f"{active} items with one; torch threads {torch.get_num_threads()}")

    def full_inverse() -> np.ndarray:
        g = (x.T @ x).toarray().astype(np.float64)
        g[np.diag_indices_from(g)] += algo.l2
        p = np.linalg.inv(g)
        b = p / -np.diag(p)
        b[np.diag_indices_from(b)] = 0.0
        return b

    def metarec() -> np.ndarray:
        return algo._fit(x)["weights"].numpy()

    times, weights = {}, {}
    for name, fit in (("full inverse", full_inverse), ("metarec", metarec)):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            weights[name] = fit()
            best = min(best, time.perf_counter() - start)
        times[name] = best
        print(f"{name:>12}: {best:8.2f} s")
    diff = float(np.abs(weights["full inverse"].astype(np.float32) - weights["metarec"]).max())
    print(f"max |B_full - B_metarec| = {diff:.2e}; speed-up {times['full inverse'] / times['metarec']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
