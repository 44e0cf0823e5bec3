"""Peak memory of ``adapt: all`` with touched rows against full per-task tables, on a large catalog.

Touched-row adaptation (``algos.touched``) keeps each task's adapted embedding rows only
(``[B, U, d]``, ``U`` = the most distinct rows a support set reads), where full tables copy the
whole ``[V, d]`` table per task (``[B, V, d]``). This script measures both on a synthetic catalog
of ``--items`` items (default 200k) for ``mf`` and ``mlp`` (and ``fm``, ``linear``, ``melu`` on
request), one MAML meta-gradient (second order, ``--steps`` inner steps) on ``--meta-batch``
tasks with 20-90 support rows:

- ``peak MiB``: the peak resident set size during one outer gradient (meta-objective and
  ``backward()``) minus the resident size just before it, measured in a child process per
  variant started with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc maps every block over 64 KiB on
  its own and unmaps it when freed, so the resident size follows the live tensors), after one
  warm-up step; VmHWM is reset through ``/proc/self/clear_refs``.
- ``fast-weight MiB``: the bytes of the adapted fast weights test-time adaptation keeps
  (``algo.adapt(batch)``): per-task tensors, the touched rows' values and indices.
- ``step s``: the wall time of that outer gradient (1 thread).

Usage::

    python scripts/bench_touched_memory.py                      # mf and mlp, 200k items
    python scripts/bench_touched_memory.py --models mf --items 1000000 --dim 8

The last line of output is space-separated ``name=value`` pairs (machine-readable).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from metarec_runner.algos.maml import MAML
from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.models.fm import FactorizationMachine
from metarec_runner.models.linear import LinearModel
from metarec_runner.models.mf import MatrixFactorization
from metarec_runner.models.mlp import MLPRecommender
from metarec_runner.models.preference import PreferenceEstimator
from metarec_runner.tasks.synthetic import random_taskset

MODELS = {"mf": MatrixFactorization, "fm": FactorizationMachine, "linear": LinearModel,
          "mlp": MLPRecommender, "melu": PreferenceEstimator}


def schema(items: int) -> FeatureSchema:
    """User side features, a genre bag of 3 slots, the user and item ids (``items`` items)."""
    return FeatureSchema(("age", "occupation", "genre", "user_id", "item_id"),
                         (7, 21, 25, 6040, items), (1, 1, 3, 1, 1))


def build(name: str, args: argparse.Namespace) -> tuple[MAML, object]:
    """The algorithm (touched rows per ``args.touched``) and one meta-batch."""
    sch = schema(args.items)
    torch.manual_seed(args.seed)
    kw = {} if name == "linear" else {"embedding_dim": args.dim}
    model = MODELS[name](sch, rating_mean=3.0, **kw)
    algo = MAML(model, functools.partial(torch.optim.SGD, lr=0.01), adapt="all", inner_lr=0.05,
                inner_steps=args.steps, first_order=args.first_order, touched_rows=args.touched)
    tasks = random_taskset(sch, args.meta_batch, support=(20, 90), query=(10, 10), seed=args.seed)
    return algo, tasks.batch(torch.arange(args.meta_batch)).to("cpu", torch.float32)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _fast_weight_bytes(fast) -> int:
    tables = getattr(fast, "tables", {})
    total = sum(t.values.nbytes + t.rows.nbytes for t in tables.values())
    rest = getattr(fast, "rest", None)
    params = rest if rest is not None else dict(fast.items())
    return total + sum(p.nbytes for n, p in params.items() if n not in tables)


def child(name: str, args: argparse.Namespace) -> dict[str, float]:
    """One measurement in this process (see the module docstring)."""
    torch.set_num_threads(1)
    algo, batch = build(name, args)

    def step() -> None:
        algo.optimizer.zero_grad(set_to_none=True)
        objective, _ = algo.meta_objective(batch)
        objective.backward()

    step()  # warm-up
    algo.optimizer.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    fast = algo.adapt(batch).params
    return {"peak_mib": max(peak - before, 0) / 1024, "fast_mib": _fast_weight_bytes(fast) / 2**20,
            "step_s": seconds, "inner_loop": algo.inner_loop.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mf", "mlp"], choices=list(MODELS))
    parser.add_argument("--items", type=int, default=200_000, help="catalog size V")
    parser.add_argument("--dim", type=int, default=16, help="embedding size d")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="inner steps")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "TOUCHED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.touched = args.child[1] == "1"
        print(json.dumps(child(args.child[0], args)))
        return
    order = "first" if args.first_order else "second"
    print(f"torch {torch.__version__}; MAML {order} order K={args.steps}, adapt: all, "
          f"{args.meta_batch} tasks (support 20-90, query 10), V={args.items} items, d={args.dim}, "
          "float32, 1 thread")
    print(f"\n{'model':<8}{'tables':<14}{'inner loop':<14}{'peak MiB':>10}{'fast-weight MiB':>17}"
          f"{'step s':>9}")
    fields = [f"items={args.items}", f"dim={args.dim}", f"meta_batch={args.meta_batch}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name in args.models:
        for touched in (True, False):
            cmd = [sys.executable, __file__, "--items", str(args.items), "--dim", str(args.dim),
                   "--meta-batch", str(args.meta_batch), "--steps", str(args.steps),
                   "--seed", str(args.seed), *(["--first-order"] if args.first_order else []),
                   "--child", name, "1" if touched else "0"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            label = "touched rows" if touched else "full tables"
            if done.returncode:
                print(f"{name:<8}{label:<14}failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:<8}{label:<14}{r['inner_loop']:<14}{r['peak_mib']:>10.0f}"
                  f"{r['fast_mib']:>17.1f}{r['step_s']:>9.2f}")
            key = f"{name}_{'touched' if touched else 'full'}"
            fields += [f"peak_mib_{key}={r['peak_mib']:.0f}", f"fast_mib_{key}={r['fast_mib']:.1f}",
                       f"step_s_{key}={r['step_s']:.3f}"]
    print(" ".join(fields))


if __name__ == "__main__":
    main()
