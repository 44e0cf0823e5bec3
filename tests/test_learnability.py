"""On the toy catalog's planted structure, MAML beats the no-adaptation global model by a clear
margin and gets closer to the noise floor as the support set grows."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from metarec_runner.evaluate.summary import mean_ci
from metarec_runner.run import Prepared
from tests.helpers import compose, quiet_runner


def _train(algo: str, *extra: str):
    cfg = compose(f"+algo={algo}", "logger=none", "trainer.progress=false", "trainer.max_epochs=20", *extra)
    prep = Prepared(cfg)
    runner = quiet_runner(prep, cfg.seed)
    runner.fit(prep.splits.train, prep.splits.val)
    return prep, runner


@pytest.mark.slow
def test_maml_beats_global_and_approaches_the_noise_floor():
    torch.set_num_threads(1)
    maml_prep, maml = _train("maml")
    global_prep, glob = _train("global")
    assert maml_prep.splits.split_hash == global_prep.splits.split_hash  # identical test tasks
    m = maml.test(maml_prep.splits.test).per_task
    g = glob.test(global_prep.splits.test).per_task
    assert (m["task_id"].to_numpy() == g["task_id"].to_numpy()).all()
    diff, half, n = mean_ci(g["rmse"].to_numpy() - m["rmse"].to_numpy())
    print(f"global rmse {g['rmse'].mean():.3f}, maml {m['rmse'].mean():.3f}, "
          f"floor {m['floor_rmse'].mean():.3f}, paired gain {diff:.3f} ± {half:.3f} over {n} users")
    assert diff > 0.1 and diff - half > 0.05  # a clear, significant margin over identical users

    # few-shot curve: the gap to the Bayes-optimal predictor shrinks as the support grows
    gaps = []
    for k in (5, 10, 20, 40):
        res = maml_prep.evaluator.evaluate(maml.algo, maml_prep.splits.test.with_support_size(k), "test",
                                           maml_prep.device)
        gaps.append(res.summary["test/rmse"] - res.summary["test/floor_rmse"])
    print("gap to noise floor at k=5,10,20,40:", np.round(gaps, 3))
    assert all(b < a + 0.01 for a, b in pairwise(gaps))
    assert gaps[-1] < 0.6 * gaps[0]
    # the global model cannot use the support set at all: its gap is the k-independent baseline
    assert gaps[-1] < g["rmse"].mean() - g["floor_rmse"].mean() - 0.15
