"""Tasks/s of ``meta_step`` with the pointwise mse loss against the ranking losses, side by side.

Variants: algorithm (``maml`` at its preset: second order, 3 inner steps, ``adapt: head``; and
``global``) x loss (``mse``; ``bpr`` and ``softmax`` with ``n_negatives`` uniform negatives per
task, drawn afresh for the support and the query of every step), each built exactly as ``metarec
train +algo=<algo> algo.loss=<loss>`` builds it (Hydra compose + ``run.Prepared``, the catalog
bound as a run binds it). Every variant steps through the same meta-batches (a seeded
permutation of the meta-train tasks); the variants alternate within every round, so machine
noise hits all of them, and the table reports the median over rounds. The timed work is whole
``meta_step`` calls (negative sampling, feature rows, the forward and backward passes and the
optimizer step).

Usage::

    python scripts/bench_ranking_loss.py                      # toy catalog, model=melu, 5 rounds
    python scripts/bench_ranking_loss.py --quick              # 2 rounds of 2 meta-batches
    METAREC_DATA_DIR=/path/to/data python scripts/bench_ranking_loss.py --dataset movielens_100k
    python scripts/bench_ranking_loss.py --model mf --n-negatives 50 --threads 2

The last line of output is space-separated ``name=value`` pairs (machine-readable):
``tasks_per_s_<algo>_<loss>`` and ``ratio_<algo>_<loss>`` (tasks/s relative to the same algo's mse).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from hydra import compose, initialize_config_dir

from metarec_runner.evaluate.candidates import Catalog
from metarec_runner.paths import conf_dir
from metarec_runner.run import Prepared

ALGOS = ("maml", "global")
LOSSES = ("mse", "bpr", "softmax")


def build(algo: str, loss: str, args: argparse.Namespace) -> Prepared:
    """The run's objects for ``+algo=<algo> algo.loss=<loss>`` with the catalog bound."""
    overrides = [f"+algo={algo}", f"dataset={args.dataset}", f"model={args.model}", "logger=none",
                 "trainer.progress=false", "trainer.monitor=val/ndcg_at_10", "device=cpu", f"algo.loss={loss}"]
    if loss != "mse":
        overrides += [f"algo.n_negatives={args.n_negatives}", "algo.negatives=uniform"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    prep = Prepared(cfg)
    prep.algo.bind_catalog(Catalog.from_interactions(prep.data), prep.splits.train)
    return prep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="toy", help="a conf/dataset option (default toy)")
    parser.add_argument("--model", default="melu", help="a conf/model option (default melu)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (median reported)")
    parser.add_argument("--batches", type=int, default=4, help="meta-batches timed per round")
    parser.add_argument("--batch-size", type=int, default=32, help="tasks per meta-batch")
    parser.add_argument("--n-negatives", type=int, default=20, help="negatives per task and role")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 meta-batches")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batches = 2, 2
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)

    variants = {(a, loss): build(a, loss, args) for a in ALGOS for loss in LOSSES}
    train = next(iter(variants.values())).splits.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    chunks = order.split(args.batch_size)[: args.batches]
    chunks = [c for c in chunks if len(c) == args.batch_size] or list(order.split(args.batch_size)[:1])
    dtype = next(variants[ALGOS[0], "mse"].algo.model.parameters()).dtype
    batches = [train.batch(c).to("cpu", dtype) for c in chunks]
    n_tasks = sum(b.size for b in batches)
    for prep in variants.values():  # warm-up: first-call costs (inner-loop choice, allocator)
        prep.algo.meta_step(batches[0])

    rates: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        keys = list(variants) if r % 2 == 0 else list(reversed(variants))
        for key in keys:
            algo = variants[key].algo
            start = time.perf_counter()
            for batch in batches:
                algo.meta_step(batch)
            rates[key].append(n_tasks / (time.perf_counter() - start))

    print(f"torch {torch.__version__}, {args.threads} thread(s); dataset={args.dataset} model={args.model}; "
          f"{len(batches)} meta-batches x {batches[0].size} tasks, {args.rounds} rounds; "
          f"ranking losses with {args.n_negatives} uniform negatives per task and role")
    print(f"{'algo':8} {'loss':8} {'tasks/s':>9} {'vs mse':>7}")
    pairs = []
    for a in ALGOS:
        base = statistics.median(rates[a, "mse"])
        for loss in LOSSES:
            med = statistics.median(rates[a, loss])
            print(f"{a:8} {loss:8} {med:9.0f} {med / base:6.2f}x")
            pairs += [f"tasks_per_s_{a}_{loss}={med:.1f}", f"ratio_{a}_{loss}={med / base:.3f}"]
    print(" ".join(pairs))


if __name__ == "__main__":
    main()
