"""Tasks/s of the batched core against the per-task reference loop, per algorithm and scope.

Data and model (``--data peer``, the default): the ML-100K peer preset
(``experiment=ml100k_recbole_metarec``: 466 training tasks, support 3-90 ratings, query 10,
MeLU-sized model: 7 fields (genres and title words as bags) x embedding 32 -> MLP 64-64 -> 1),
built by the runner's own code path (Hydra compose + ``run.Prepared``); ``METAREC_DATA_DIR``
must hold ml-100k. ``--data synthetic`` uses random tasks on MeLU's ML-1M schema instead
(8 fields, support 20-90).

Variants: algorithm (``maml`` second order K=5, ``fomaml`` K=1, ``reptile`` K=5, ``metasgd``
second order K=1) x scope (``head``; ``all`` on touched embedding rows; ``all`` on full
per-task tables), 32 tasks a meta-batch. Timed work per meta-batch: the outer gradient (the
MAML family: meta-objective + ``backward()``; Reptile: ``Reptile.meta_gradients``), no
optimizer step, against the per-task loops in ``algos.reference`` (which always adapt full
tensors). Batched and loop measurements alternate within every round (the order flips each
round, 1 and 2 threads interleaved) so machine noise hits both; the table reports medians over
rounds. Before timing, each variant asserts both sides give the same outer gradient (float64,
relative 1e-8

Peak memory: an RSS delta, measured in a separate process started with
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then maps every block over 64 KiB on its own and unmaps
it when freed, so the resident size follows the live tensors; not used for the timings, where it
would add page faults): the peak resident set size (VmHWM, reset through
``/proc/self/clear_refs``) during one outer gradient minus the resident size just before it,
1 thread, after one warm-up step.

Meta-epoch: the wall time of one pass over the 466 training tasks per algorithm at its config
defaults (``algo.meta_step`` on every meta-batch, optimizer included), built exactly as
``metarec train +algo=<algo> experiment=ml100k_recbole_metarec`` builds it (peer data only).

Usage::

    METAREC_DATA_DIR=/path/to/data python scripts/bench_meta_step.py     # 5 rounds, a few minutes
    python scripts/bench_meta_step.py --quick          # 2 rounds, 2 meta-batches, 1 thread
    python scripts/bench_meta_step.py --data synthetic --threads 1
    python scripts/bench_meta_step.py --data synthetic --device cuda   # GPU: tasks/s, peak GPU memory

With ``--device cuda`` every tensor lives on the GPU, timings synchronize the device, the thread
count is moot (reported as 1) and peak memory is ``torch.cuda.max_memory_allocated`` during one
outer gradient minus the memory allocated before it.

The last line of output is space-separated ``name=value`` pairs (machine-readable), among them
``speedup_<algo>_<scope>_t<threads>`` and the three targets' ratios.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from metarec_runner.algos.base import SupportSGD
from metarec_runner.algos.maml import MAML
from metarec_runner.algos.metasgd import MetaSGD
from metarec_runner.algos.reference import per_task_meta_loss, per_task_reptile_gradients
from metarec_runner.algos.reptile import Reptile
from metarec_runner.data.interactions import FeatureSchema
from metarec_runner.models.preference import PreferenceEstimator
from metarec_runner.tasks.synthetic import random_taskset
from metarec_runner.tasks.taskset import TaskBatch, TaskSet

META_BATCH = 32
INNER_LR = 0.05
PEER = ["experiment=ml100k_recbole_metarec", "logger=none", "trainer.progress=false",
        "dtype=float32"]
# MeLU's MovieLens-1M fields with cardinalities of the same order (synthetic data only)
SYNTHETIC_SCHEMA = FeatureSchema(
    ("gender", "age", "occupation", "zip", "rate", "genre", "director", "actor"),
    (2, 7, 21, 3402, 6, 25, 2186, 8030),
)


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration."""

    algo: str  # maml | fomaml | reptile | metasgd
    scope: str  # head | touched | full
    steps: int

    @property
    def key(self) -> str:
        return f"{self.algo}_{'all_' if self.scope != 'head' else ''}{self.scope}"

    @property
    def label(self) -> str:
        scope = {"head": "head", "touched": "all, touched rows", "full": "all, full tables"}
        return f"{self.algo} K={self.steps}, {scope[self.scope]}"


STEPS = {"maml": 5, "fomaml": 1, "reptile": 5, "metasgd": 1}
VARIANTS = tuple(Variant(a, s, STEPS[a]) for a in STEPS for s in ("head", "touched", "full"))
TARGETS = {  # name: (variant key, required speedup at 1 thread)
    "target_maml_head_k5_2nd": ("maml_head", 3.0),
    "target_fomaml_head_k1": ("fomaml_head", 5.0),
    "target_maml_all_touched": ("maml_all_touched", 2.5),
}


def make_algo(v: Variant, model: nn.Module) -> SupportSGD:
    """The variant's algorithm on a private copy of ``model`` (plain SGD outer optimizer)."""
    model = copy.deepcopy(model)
    kw = {"adapt": "head" if v.scope == "head" else "all", "inner_lr": INNER_LR,
          "inner_steps": v.steps, "touched_rows": v.scope != "full"}
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    if v.algo == "reptile":
        return Reptile(model, sgd, **kw)
    cls = MetaSGD if v.algo == "metasgd" else MAML
    return cls(model, sgd, first_order=v.algo == "fomaml", **kw)


def batched_step(algo: SupportSGD, batch: TaskBatch) -> None:
    algo.optimizer.zero_grad(set_to_none=True)
    if isinstance(algo, Reptile):
        algo.meta_gradients(batch)
        return
    objective, _ = algo.meta_objective(batch)
    objective.backward()


def loop_step(algo: SupportSGD, batch: TaskBatch) -> None:
    algo.optimizer.zero_grad(set_to_none=True)
    if isinstance(algo, Reptile):
        per_task_reptile_gradients(algo, batch)
        return
    loss = per_task_meta_loss(algo, batch, algo.step_sizes(), algo.inner_steps,
                              getattr(algo, "first_order", False))
    loss.backward()


def _grads(algo: SupportSGD) -> torch.Tensor:
    params = [*algo.model.parameters(), *getattr(algo, "step_size", {}).values()]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])


def check_equal_work(v: Variant, model: nn.Module, batch: TaskBatch) -> None:
    """Assert both sides give the same outer gradient, in float64 (relative 1e-8)."""
    algo = make_algo(v, copy.deepcopy(model).double())
    batch = batch.to(batch.support_y.device, torch.float64)
    grads = []
    for step in (batched_step, loop_step):
        step(algo, batch)
        grads.append(_grads(algo))
    scale = grads[1].abs().max().item()
    err = (grads[0] - grads[1]).abs().max().item()
    assert err <= 1e-8 * max(scale, 1e-6), f"{v.key}: outer gradients differ: {err:.3g} (scale {scale:.3g})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_tasks_per_s(step: Callable, algo: SupportSGD, batches: list[TaskBatch]) -> float:
    device = batches[0].support_y.device
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        step(algo, batch)
    _sync(device)
    return sum(b.size for b in batches) / (time.perf_counter() - start)


def peak_cuda_delta_mib(step: Callable, algo: SupportSGD, batch: TaskBatch) -> float:
    """Peak GPU memory allocated during one ``step`` above what was allocated before, MiB."""
    device = batch.support_y.device
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(algo, batch)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    algo.optimizer.zero_grad(set_to_none=True)
    return max(peak - before, 0) / 2**20


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_delta_mib(step: Callable, algo: SupportSGD, batch: TaskBatch) -> float | None:
    """Peak RSS increase during one ``step`` (VmHWM reset via clear_refs), MiB; None if the
    kernel does not allow the reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    step(algo, batch)
    peak = _status_kib("VmHWM")
    algo.optimizer.zero_grad(set_to_none=True)
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024


# -- data ---------------------------------------------------------------------------------------


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from metarec_runner.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _prepare(*overrides: str):
    from metarec_runner.run import Prepared

    return Prepared(_compose(*overrides))


def load_data(kind: str, seed: int, device: str = "cpu",
              n_tasks: int = META_BATCH * 8) -> tuple[TaskSet, nn.Module, str]:
    """``(training tasks, model, description)`` for ``--data``."""
    if kind == "peer":
        prep = _prepare("+algo=maml", *PEER, f"device={device}", f"seed={seed}")
        train = prep.splits.train
        sizes = train.support_sizes
        desc = (f"peer preset ml100k_recbole_metarec: {len(train)} training tasks, support "
                f"{int(sizes.min())}-{int(sizes.max())}, query {int(train.query_sizes.max())}, "
                f"fields {list(prep.model.fields)}, table rows {prep.model.embedding.weight.shape[0]}")
        return train, prep.model, desc
    tasks = random_taskset(SYNTHETIC_SCHEMA, n_tasks, support=(20, 90), query=(10, 10),
                           seed=seed)
    torch.manual_seed(seed)
    model = PreferenceEstimator(SYNTHETIC_SCHEMA, embedding_dim=32, hidden=(64, 64),
                                fields=list(SYNTHETIC_SCHEMA.names), rating_mean=3.0).to(device)
    return tasks, model, "synthetic MeLU ML-1M schema: support 20-90, query 10"


def meta_epoch_seconds(algos: list[str], rounds: int, seed: int, device: str = "cpu") -> dict[str, float]:
    """Median wall time of one meta-epoch per algorithm (config defaults, peer preset, 1 thread)."""
    runs = {}
    for name in algos:
        algo_name, *extra = name.split(":")
        prep = _prepare(f"+algo={algo_name}", *PEER, "threads=1", f"device={device}", f"seed={seed}",
                        *extra)
        runs[name] = prep
    samples: dict[str, list[float]] = {n: [] for n in algos}
    for r in range(rounds):
        for name in (algos if r % 2 == 0 else algos[::-1]):
            prep = runs[name]
            train = prep.splits.train
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + r))
            _sync(prep.device)
            start = time.perf_counter()
            for chunk in order.split(prep.trainer.meta_batch_size):
                prep.algo.meta_step(train.batch(chunk).to(prep.device, prep.dtype))
            _sync(prep.device)
            samples[name].append(time.perf_counter() - start)
    return {n: statistics.median(v) for n, v in samples.items()}


def measure_memory(args: argparse.Namespace) -> dict[tuple[str, str], float | None]:
    """Peak-RSS deltas per variant and side, from a child process (see the module docstring)."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--memory-json"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        print(f"memory measurement failed: {done.stderr.strip().splitlines()[-1:]}")
        return {}
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {tuple(k.split("/")): v for k, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("peer", "synthetic"), default="peer")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--threads", type=int, nargs="+", default=None, choices=(1, 2),
                        help="torch intra-op thread counts (default 1 2; 1 with --quick)")
    parser.add_argument("--batches", type=int, default=None,
                        help="meta-batches per timed measurement (default 4; 2 with --quick)")
    parser.add_argument("--algos", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--no-epoch", action="store_true", help="skip the meta-epoch timing")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, batches and threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--meta-batch", type=int, default=META_BATCH,
                        help="tasks a meta-batch (the targets are stated for 32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the tensors live (cuda: GPU timings, peak GPU memory)")
    parser.add_argument("--memory-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    n_batches = args.batches or (2 if args.quick else 4)
    threads = args.threads or ([1] if args.quick or args.device == "cuda" else [1, 2])
    variants = [v for v in VARIANTS if v.algo in args.algos]

    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    size = args.meta_batch
    tasks, model, desc = load_data(args.data, args.seed, args.device,
                                   n_tasks=size * max(8, n_batches))
    if len(tasks) < size * n_batches:
        parser.error(f"--meta-batch {size} x {n_batches} batches needs {size * n_batches} "
                     f"training tasks; the data has {len(tasks)}")
    order = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(args.seed + 1))
    batches = [tasks.batch(order[i * size:(i + 1) * size]).to(device, torch.float32)
               for i in range(n_batches)]
    pad = sum(int(b.support_mask.shape[1]) * b.size for b in batches)
    real = sum(int(b.support_mask.sum()) for b in batches)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {where}; {desc}")
    print(f"rounds={rounds}, threads={threads}, {n_batches} meta-batches x {size} tasks "
          f"(padding {1 - real / pad:.0%} of support rows); batched: meta_objective/meta_gradients "
          "(MAML chunks=2); loop: algos.reference per-task loops (full tensors)")

    if args.memory_json:  # the child process of measure_memory
        out = {}
        for v in variants:
            algo = make_algo(v, model)
            for side, step in (("batched", batched_step), ("loop", loop_step)):
                step(algo, batches[0])  # warm-up
                out[f"{v.key}/{side}"] = peak_rss_delta_mib(step, algo, batches[0])
        print(json.dumps(out))
        return
    if device.type == "cuda":  # in process: the CUDA allocator keeps its own statistics
        memory = {}
        for v in variants:
            algo = make_algo(v, model)
            for side, step in (("batched", batched_step), ("loop", loop_step)):
                step(algo, batches[0])  # warm-up
                memory[(v.key, side)] = peak_cuda_delta_mib(step, algo, batches[0])
    else:
        memory = measure_memory(args)
    algos = {v.key: make_algo(v, model) for v in variants}
    for v in variants:
        check_equal_work(v, model, batches[0])
        for step in (batched_step, loop_step):
            step(algos[v.key], batches[0])  # warm-up

    samples: dict[tuple[str, int, str], list[float]] = {}
    for r in range(rounds):
        for t in threads:
            torch.set_num_threads(t)
            for v in variants:
                sides = [("batched", batched_step), ("loop", loop_step)]
                if r % 2:
                    sides.reverse()
                for side, step in sides:
                    rate = time_tasks_per_s(step, algos[v.key], batches)
                    samples.setdefault((v.key, t, side), []).append(rate)
    torch.set_num_threads(1)

    fields = [f"data={args.data}", f"device={args.device}", f"meta_batch={size}",
              f"rounds={rounds}"]
    header = f"{'variant':<34}{'thr':>4}{'batched/s':>11}{'loop/s':>9}{'speedup':>9}{'peak MiB b/l':>15}"
    print("\n" + header)
    speed: dict[tuple[str, int], float] = {}
    for v in variants:
        for t in threads:
            fast = statistics.median(samples[(v.key, t, "batched")])
            slow = statistics.median(samples[(v.key, t, "loop")])
            speed[(v.key, t)] = fast / slow
            mem_b, mem_l = memory.get((v.key, "batched")), memory.get((v.key, "loop"))
            mem = "n/a" if mem_b is None or mem_l is None else f"{mem_b:.0f}/{mem_l:.0f}"
            print(f"{v.label:<34}{t:>4}{fast:>11.0f}{slow:>9.0f}{fast / slow:>8.2f}x"
                  f"{mem if t == threads[0] else '':>15}")
            fields += [f"batched_{v.key}_t{t}={fast:.1f}", f"loop_{v.key}_t{t}={slow:.1f}",
                       f"speedup_{v.key}_t{t}={fast / slow:.2f}"]
        if memory.get((v.key, "batched")) is not None and memory.get((v.key, "loop")) is not None:
            kind = "cuda" if device.type == "cuda" else "rss"
            fields += [f"peak_{kind}_delta_mib_{v.key}_batched={memory[(v.key, 'batched')]:.0f}",
                       f"peak_{kind}_delta_mib_{v.key}_loop={memory[(v.key, 'loop')]:.0f}"]
    if device.type == "cuda":
        print("(peak MiB: torch.cuda.max_memory_allocated increase during one outer gradient, "
              "batched/loop)")
    else:
        print("(peak MiB: peak-RSS increase during one outer gradient, 1 thread, batched/loop; "
              "child process with MALLOC_MMAP_THRESHOLD_=65536)")

    if 1 in threads and device.type == "cpu" and size == META_BATCH:  # CPU, 32 tasks
        print("\ntargets (1 thread):")
        for name, (key, need) in TARGETS.items():
            if (key, 1) in speed:
                got = speed[(key, 1)]
                print(f"  {name:<26} {got:5.2f}x  (target >= {need}x)  "
                      f"{'met' if got >= need else 'MISSED'}")
                fields.append(f"{name}={got:.2f}")
        if ("maml_head", 1) in speed:  # the key earlier versions of this script printed
            fields.append(f"speedup_k5_second_order={speed[('maml_head', 1)]:.2f}")

    if args.data == "peer" and not args.no_epoch:
        epoch_algos = [*args.algos, "maml:algo.adapt=all"]
        seconds = meta_epoch_seconds(epoch_algos, 1 if args.quick else 3, args.seed, args.device)
        print(f"\none meta-epoch on the peer preset ({len(tasks)} tasks, config defaults, "
              "1 thread, optimizer step included):")
        for name, sec in seconds.items():
            print(f"  {name:<22} {sec:6.2f} s  ({len(tasks) / sec:.0f} tasks/s)")
            key = name.replace(":algo.adapt=", "_")
            fields.append(f"epoch_s_{key}={sec:.2f}")
    print(" ".join(fields))


if __name__ == "__main__":
    main()
