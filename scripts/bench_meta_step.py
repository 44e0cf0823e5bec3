"""Tasks/s of the batched MAML core against the per-task reference loop, in one process.

Both sides run on identical data and an identical MeLU-sized model (8 categorical fields x
embedding 32 -> MLP 64-64 -> 1), 32 tasks a meta-batch, support sizes uniform in 20..90 (ragged,
padded by ``TaskSet.batch``), query 10. Timed work per meta-batch: meta-loss + ``backward()``
(no optimizer step), i.e. ``MAML.meta_loss`` against ``algos.reference.per_task_meta_loss``.

Batched and loop measurements alternate within every round (the order flips each round) so
machine noise hits both; the table reports the median over rounds. Before timing, each variant
asserts that the two sides compute the same loss and meta-gradient (float32 tolerance).

Usage::

    python scripts/bench_meta_step.py              # 1 thread, 7 rounds (about a minute)
    python scripts/bench_meta_step.py --threads 2
    python scripts/bench_meta_step.py --quick      # 3 rounds, fewer meta-batches

The last line of output is space-separated ``name=value`` pairs (machine-readable).
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from metarec_runner.algos.maml import MAML
from metarec_runner.algos.reference import per_task_meta_loss
from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.models.preference import PreferenceEstimator
from metarec_runner.tasks.synthetic import random_taskset
from metarec_runner.tasks.taskset import TaskBatch, TaskSet

# MeLU's MovieLens-1M fields (user: gender, age, occupation, zip; item: rate, genre, director,
# actor) with cardinalities of the same order; only the sizes matter here.
SCHEMA = FeatureSchema(
    ("gender", "age", "occupation", "zip", "rate", "genre", "director", "actor"),
    (2, 7, 21, 3402, 6, 25, 2186, 8030),
)
META_BATCH = 32
SUPPORT = (20, 90)
QUERY = 10
INNER_LR = 0.05


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration of MAML."""

    key: str  # suffix of the name=value keys
    label: str
    adapt: str
    steps: int
    first_order: bool


VARIANTS = (
    Variant("k1_second_order", "head, 2nd order, K=1", "head", 1, False),
    Variant("k5_second_order", "head, 2nd order, K=5", "head", 5, False),
    Variant("k1_first_order", "head, 1st order, K=1", "head", 1, True),
    Variant("k1_all", "all, 2nd order, K=1", "all", 1, False),
)


def make_tasks(n_tasks: int, seed: int) -> TaskSet:
    """Random feature rows, ratings in [1, 5], support sizes uniform in SUPPORT, query QUERY."""
    return random_taskset(SCHEMA, n_tasks, support=SUPPORT, query=(QUERY, QUERY), seed=seed)


def make_algo(v: Variant, seed: int, chunks: int | None = None) -> MAML:
    """MAML on a fresh MeLU-sized model; ``chunks=None`` keeps MAML's default."""
    torch.manual_seed(seed)
    model = PreferenceEstimator(SCHEMA, embedding_dim=32, hidden=(64, 64),
                                fields=list(SCHEMA.names), rating_mean=3.0)
    extra = {} if chunks is None else {"chunks": chunks}
    return MAML(model, functools.partial(torch.optim.SGD, lr=0.01), adapt=v.adapt,
                inner_lr=INNER_LR, inner_steps=v.steps, first_order=v.first_order, **extra)


def batched_step(algo: MAML, batch: TaskBatch) -> torch.Tensor:
    algo.model.zero_grad(set_to_none=True)
    loss, _ = algo.meta_loss(batch)
    loss.backward()
    return loss.detach()


def loop_step(algo: MAML, batch: TaskBatch) -> torch.Tensor:
    algo.model.zero_grad(set_to_none=True)
    loss = per_task_meta_loss(algo, batch, algo.inner_lr, algo.inner_steps, algo.first_order)
    loss.backward()
    return loss.detach()


def check_equal_work(algo: MAML, batch: TaskBatch) -> None:
    """Assert both sides give the same meta-loss and meta-gradient (float32 tolerance)."""
    grads = []
    losses = []
    for step in (batched_step, loop_step):
        losses.append(float(step(algo, batch)))
        grads.append(torch.cat([p.grad.flatten() for p in algo.model.parameters()]))
    assert abs(losses[0] - losses[1]) <= 1e-5 * max(1.0, abs(losses[1])), losses
    scale = grads[1].abs().max().item()
    err = (grads[0] - grads[1]).abs().max().item()
    assert err <= 1e-4 * max(scale, 1e-6), f"meta-gradients differ: {err:.3g} (scale {scale:.3g})"
    algo.model.zero_grad(set_to_none=True)


def time_tasks_per_s(step: Callable[[MAML, TaskBatch], torch.Tensor], algo: MAML,
                     batches: list[TaskBatch]) -> float:
    start = time.perf_counter()
    for batch in batches:
        step(algo, batch)
    return sum(b.size for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (default 7; 3 with --quick)")
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2),
                        help="torch intra-op threads")
    parser.add_argument("--batches", type=int, default=None,
                        help="meta-batches per timed measurement (default 4; 2 with --quick)")
    parser.add_argument("--chunks", type=int, default=None,
                        help="MAML's support-size groups per meta-batch (default: MAML's own)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and meta-batches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    n_batches = args.batches or (2 if args.quick else 4)
    torch.set_num_threads(args.threads)

    tasks = make_tasks(META_BATCH * n_batches, seed=args.seed)
    order = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(args.seed + 1))
    batches = [tasks.batch(order[i * META_BATCH:(i + 1) * META_BATCH]) for i in range(n_batches)]
    pad = sum(int(b.support_mask.shape[1]) * b.size for b in batches)
    real = sum(int(b.support_mask.sum()) for b in batches)
    print(f"torch {torch.__version__}, threads={args.threads}, rounds={rounds}, "
          f"{n_batches} meta-batches x {META_BATCH} tasks, support {SUPPORT[0]}-{SUPPORT[1]} "
          f"(padding {1 - real / pad:.0%} of support rows), query {QUERY}")

    algos = {v.key: make_algo(v, args.seed, args.chunks) for v in VARIANTS}
    chunks = getattr(algos[VARIANTS[0].key], "chunks", 1)
    print(f"batched side: MAML.meta_loss with chunks={chunks}; loop side: per_task_meta_loss")
    for v in VARIANTS:
        check_equal_work(algos[v.key], batches[0])
        for step in (batched_step, loop_step):  # warm-up
            step(algos[v.key], batches[0])

    samples: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for v in VARIANTS:
            sides = [("batched", batched_step), ("loop", loop_step)]
            if r % 2:
                sides.reverse()
            for side, step in sides:
                rate = time_tasks_per_s(step, algos[v.key], batches)
                samples.setdefault((v.key, side), []).append(rate)

    fields = [f"threads={args.threads}", f"rounds={rounds}", f"chunks={chunks}"]
    print(f"\n{'variant':<24}{'batched tasks/s':>17}{'loop tasks/s':>14}{'speedup':>9}")
    for v in VARIANTS:
        fast = statistics.median(samples[(v.key, "batched")])
        slow = statistics.median(samples[(v.key, "loop")])
        print(f"{v.label:<24}{fast:>17.0f}{slow:>14.0f}{fast / slow:>8.2f}x")
        fields += [f"batched_{v.key}={fast:.1f}", f"loop_{v.key}={slow:.1f}",
                   f"speedup_{v.key}={fast / slow:.2f}"]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"\npeak RSS: {peak_mib:.0f} MiB")
    fields.append(f"peak_rss_mib={peak_mib:.0f}")
    print(" ".join(fields))


if __name__ == "__main__":
    main()
