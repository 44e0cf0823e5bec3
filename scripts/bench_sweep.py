"""Wall time of one sweep with the joblib launcher against the default sequential launcher.

Both sweeps are the same command line (default: 4 algorithms x 2 seeds on the ML-100K peer
preset, 8 jobs), run one after the other in this invocation, each into its own output folder and
MLflow store:

    metarec train -m [hydra/launcher=joblib] +algo=maml,fomaml,reptile,global seed=0,1 \
        experiment=ml100k_recbole_metarec trainer.progress=false

Joblib jobs get one torch thread each (metarec's ThreadsPerJob callback); sequential jobs keep
torch's default (every core). Before timing, the dataset is loaded once so its parquet cache
exists and neither sweep pays the first parse. After each sweep the script checks that its
MLflow parent run has every job as a FINISHED child. Target: joblib <= 0.65x sequential on
2 cores. Besides the whole sweeps it prints the jobs phase alone (Hydra's log line of the first
job to the sweep-comparison line): the part that parallel jobs can shorten.

Usage::

    METAREC_DATA_DIR=/path/to/data python scripts/bench_sweep.py          # full: 10 epochs a job
    METAREC_DATA_DIR=/path/to/data python scripts/bench_sweep.py --max-epochs 1   # quick check
    python scripts/bench_sweep.py --experiment none --algos maml,global --max-epochs 2  # toy data

The last line of output is space-separated ``name=value`` pairs (machine-readable).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

TARGET_RATIO = 0.65


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", default="maml,fomaml,reptile,global", help="swept +algo values")
    p.add_argument("--seeds", default="0,1", help="swept seeds")
    p.add_argument("--experiment", default="ml100k_recbole_metarec",
                   help="experiment preset ('none': the toy catalog)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="trainer.max_epochs per job (default: the preset's)")
    p.add_argument("--n-jobs", type=int, default=-1, help="joblib workers (-1: every core)")
    p.add_argument("--order", choices=("sequential-first", "joblib-first"),
                   default="sequential-first", help="which sweep runs first")
    p.add_argument("--out", default=None, help="folder for both sweeps (default: a temporary one)")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for both sweeps")
    return p.parse_args(argv)


def sweep_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides both sweeps share."""
    out = [f"+algo={args.algos}", f"seed={args.seeds}", "trainer.progress=false"]
    if args.experiment != "none":
        out.append(f"experiment={args.experiment}")
    if args.max_epochs is not None:
        out.append(f"trainer.max_epochs={args.max_epochs}")
    return out + list(args.extra)


def warm_data_cache(args: argparse.Namespace) -> None:
    """Load the sweep's dataset once (writes its parquet cache), outside the timings."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from metarec_runner.paths import conf_dir

    overrides = ["+algo=global", "logger=none"]
    if args.experiment != "none":
        overrides.append(f"experiment={args.experiment}")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides + list(args.extra))
    instantiate(cfg.dataset)


def run_sweep(name: str, launcher: list[str], overrides: list[str], root: Path) -> dict[str, object]:
    """Run one sweep in a fresh process; its wall time and the parent's children."""
    out = root / name
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env["METAREC_OUTPUT_DIR"] = str(out)
    cmd = [sys.executable, "-m", "metarec_runner.cli", "train", "-m", *launcher, *overrides]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    (root / f"{name}.log").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode != 0:
        sys.exit(f"bench_sweep: the {name} sweep failed (exit {res.returncode}); see "
                 f"{root / (name + '.log')}: {res.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": wall, "jobs_s": jobs_seconds(res.stdout),
            **check_children(f"sqlite:///{out}/mlflow.db")}


_HYDRA_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[HYDRA\] (.*)$")


def jobs_seconds(log: str) -> float:
    """Seconds from the launcher's first job line (``#0 : ...``) to the sweep-comparison line
    in a sweep's Hydra log: the jobs phase, without the sweep process's start and end."""
    stamps = {}
    for line in log.splitlines():
        m = _HYDRA_LINE.match(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        text = m.group(2).strip()
        if text.startswith("#0 :") and "start" not in stamps:
            stamps["start"] = when
        elif text.startswith("sweep comparison"):
            stamps["end"] = when
    if len(stamps) < 2:
        return float("nan")
    return (stamps["end"] - stamps["start"]).total_seconds()


def check_children(uri: str) -> dict[str, object]:
    """The sweep's parent run id, its number of children and how many FINISHED."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, "", ViewType.ALL, max_results=1000)
    parents = [r for r in runs if r.info.run_name.startswith("sweep:")]
    if len(parents) != 1:
        sys.exit(f"bench_sweep: expected one sweep parent in {uri}, found {len(parents)}")
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return {"parent": parent.info.run_id, "parent_status": parent.info.status,
            "children": len(children),
            "finished": sum(r.info.status == "FINISHED" for r in children)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = sweep_overrides(args)
    n_jobs_expected = len(args.algos.split(",")) * len(args.seeds.split(","))
    root = Path(args.out or tempfile.mkdtemp(prefix="metarec-bench-sweep-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"bench_sweep: {n_jobs_expected} jobs per sweep, {cores} cores, outputs in {root}")
    t = time.perf_counter()
    warm_data_cache(args)
    print(f"data cache warm ({time.perf_counter() - t:.1f} s)")

    sweeps = {"sequential": [],
              "joblib": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}"]}
    order = ["sequential", "joblib"] if args.order == "sequential-first" else ["joblib", "sequential"]
    results = {name: run_sweep(name, sweeps[name], overrides, root) for name in order}

    seq, par = results["sequential"], results["joblib"]
    ratio = par["wall_s"] / seq["wall_s"]
    print(f"\n{'launcher':<12}{'wall s':>10}{'children':>10}{'finished':>10}  parent")
    for name in ("sequential", "joblib"):
        r = results[name]
        print(f"{name:<12}{r['wall_s']:>10.1f}{r['children']:>10}{r['finished']:>10}  "
              f"{r['parent']} ({r['parent_status']})")
    ok_children = all(r["children"] == n_jobs_expected and r["finished"] == n_jobs_expected
                      and r["parent_status"] == "FINISHED" for r in results.values())
    print(f"joblib / sequential = {ratio:.3f} (target <= {TARGET_RATIO} on 2 cores)")
    jobs_ratio = par["jobs_s"] / seq["jobs_s"]
    print(f"jobs phase alone (first job launched -> sweep comparison written): sequential "
          f"{seq['jobs_s']:.1f} s, joblib {par['jobs_s']:.1f} s, ratio {jobs_ratio:.3f}")
    pairs = {
        "sequential_s": f"{seq['wall_s']:.1f}", "joblib_s": f"{par['wall_s']:.1f}",
        "ratio": f"{ratio:.3f}", "target_ratio": TARGET_RATIO,
        "sequential_jobs_s": f"{seq['jobs_s']:.1f}", "joblib_jobs_s": f"{par['jobs_s']:.1f}",
        "jobs_ratio": f"{jobs_ratio:.3f}",
        "target_met": ratio <= TARGET_RATIO, "jobs": n_jobs_expected,
        "children_sequential": seq["children"], "children_joblib": par["children"],
        "children_ok": ok_children, "cores": cores, "n_jobs": args.n_jobs,
        "max_epochs": args.max_epochs if args.max_epochs is not None else "preset",
        "experiment": args.experiment, "order": args.order,
    }
    print(" ".join(f"{k}={v}" for k, v in pairs.items()))
    return 0 if ok_children else 1


if __name__ == "__main__":
    raise SystemExit(main())
