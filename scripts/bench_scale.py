"""Scale benchmark: the toy catalog at MovieLens-25M size through the whole task pipeline.

Generates ~162k households x 62k toys x ~25M ratings, splits them into user cold-start tasks,
builds the MeLU-style model and runs ONE meta-training epoch of MAML plus one validation pass,
printing wall time per stage and the peak resident memory (target: <= 6 GB).

    python scripts/bench_scale.py                 # full size (a few minutes on 2 cores)
    python scripts/bench_scale.py --scale 0.05    # a quick look
"""

from __future__ import annotations

import argparse
import functools
import resource
import time

import torch
from rich.console import Console

from metarec_runner.algos.maml import MAML
from metarec_runner.data.toy import make_toy_catalog
from metarec_runner.evaluate.evaluator import QueryEvaluator
from metarec_runner.models.preference import PreferenceEstimator
from metarec_runner.runner import Runner, TrainerConfig
from metarec_runner.tasks.splitters import UserColdStart
from metarec_runner.tracking import NullTracker


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the ML-25M size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-train-tasks", type=int, default=0,
                    help="cap the meta-epoch at this many tasks (0 = all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_users, n_items = int(162_541 * args.scale), max(int(62_423 * args.scale), 300)
    stages: dict[str, float] = {}

    t = time.perf_counter()
    data = make_toy_catalog(n_users=n_users, n_items=n_items, interactions_per_user=(20, 288), seed=0)
    stages["generate"] = time.perf_counter() - t
    print(f"generated {len(data.ratings):,} ratings, {n_users:,} users, {n_items:,} items "
          f"in {stages['generate']:.1f}s, peak RSS {peak_rss_gb():.2f} GB", flush=True)

    t = time.perf_counter()
    splits = UserColdStart(ratios=(0.8, 0.1, 0.1), n_query=10, min_interactions=13, seed=0)(data)
    stages["split"] = time.perf_counter() - t
    schema, mean = data.schema, float(splits.train.support_y.mean())
    del data  # the tasks hold everything training needs
    print(f"split into {len(splits.train):,}/{len(splits.val):,}/{len(splits.test):,} tasks "
          f"in {stages['split']:.1f}s, peak RSS {peak_rss_gb():.2f} GB", flush=True)

    model = PreferenceEstimator(schema, embedding_dim=32, hidden=(64, 64), rating_mean=mean)
    algo = MAML(model, functools.partial(torch.optim.Adam, lr=2e-3), adapt="head", inner_lr=0.05,
                inner_steps=3, eval_inner_steps=10)
    runner = Runner(algo, QueryEvaluator(ks=(3, 5)), NullTracker(),
                    TrainerConfig(max_epochs=1, meta_batch_size=32, progress=False),
                    torch.device("cpu"), seed=0, console=Console(stderr=True))
    train = splits.train
    if args.max_train_tasks:
        idx = torch.arange(min(args.max_train_tasks, len(train)))
        train = _subset(train, idx)
    t = time.perf_counter()
    from rich.progress import Progress

    with Progress(disable=True) as progress:
        bar = progress.add_task("train", total=len(train))
        stats = runner._train_epoch(train, 1, progress, bar)
    stages["meta_epoch"] = time.perf_counter() - t
    print(f"one meta-epoch over {len(train):,} tasks in {stages['meta_epoch']:.1f}s "
          f"({stats['sys/train_tasks_per_sec']:.0f} tasks/s, train/loss={stats['train/loss']:.3f}), "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)

    t = time.perf_counter()
    val = runner.evaluator.evaluate(algo, splits.val, "val", runner.device)
    stages["validation"] = time.perf_counter() - t
    print(f"validation over {len(splits.val):,} users in {stages['validation']:.1f}s: "
          f"val/rmse={val.summary['val/rmse']:.3f} (floor {val.summary['val/floor_rmse']:.3f})")
    pairs = {f"{k}_s": round(v, 1) for k, v in stages.items()}
    pairs.update(ratings=int(splits.summary()["train_support_rows"] + splits.summary()["train_query_rows"]
                             + splits.summary()["val_support_rows"] + splits.summary()["val_query_rows"]
                             + splits.summary()["test_support_rows"] + splits.summary()["test_query_rows"]),
                 users=n_users, items=n_items, threads=args.threads, peak_rss_gb=round(peak_rss_gb(), 2))
    print(" ".join(f"{k}={v}" for k, v in pairs.items()))


def _subset(tasks, idx):
    """The first tasks of a TaskSet (for a shorter epoch)."""
    from dataclasses import replace

    s_end, q_end = int(tasks.support_offsets[len(idx)]), int(tasks.query_offsets[len(idx)])
    return replace(tasks, task_ids=tasks.task_ids[idx], support_x=tasks.support_x[:s_end],
                   support_y=tasks.support_y[:s_end], support_offsets=tasks.support_offsets[:len(idx) + 1],
                   query_x=tasks.query_x[:q_end], query_y=tasks.query_y[:q_end],
                   query_offsets=tasks.query_offsets[:len(idx) + 1],
                   query_expected=None if tasks.query_expected is None else tasks.query_expected[:q_end])


if __name__ == "__main__":
    main()
