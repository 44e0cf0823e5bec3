"""What a run leaves behind: the MLflow run's params and tags, the files in its folder, the table
on the terminal. Used by :func:`metarec_runner.run.train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from metarec_runner.errors import ConfigError, MetarecError
from metarec_runner.report.plots import log_run_plots
from metarec_runner.tracking import flatten_config
from metarec_runner.utils import git_sha, versions

if TYPE_CHECKING:
    from metarec_runner.prepare import Prepared
    from metarec_runner.resume import ResumePoint
    from metarec_runner.run import RunContext
    from metarec_runner.runner import FitResult


def run_tags(prep: Prepared, ctx: RunContext) -> dict[str, str]:
    """Tags: the group choices, protocol, hashes, provenance (git sha, versions), machine facts."""
    tags = {f"choice.{k}": v for k, v in ctx.choices.items()}
    tags.update({
        "algo": ctx.choices.get("algo", "None"),
        "model": ctx.choices.get("model", "None"),
        "dataset": prep.data.name,
        "splitter": ctx.choices.get("splitter", "None"),
        "protocol": prep.evaluator.protocol,
        "split_hash": prep.splits.split_hash,
        "data_checksum": prep.data.checksum(),
        "git_sha": git_sha(),
        "device": str(prep.device),
        "output_dir": str(ctx.output_dir),
        "overrides": " ".join(ctx.overrides)[:5000],
    })
    tags.update({f"version.{k}": v for k, v in versions().items()})
    return tags


def start_tracking(prep: Prepared, cfg: DictConfig, ctx: RunContext, point: ResumePoint | None) -> None:
    """Open the run (a sweep's child when in a multirun) and log the params, once; or, resuming a
    tracked run, reopen that run (same id) and leave its params as they are."""
    tracker = prep.tracker
    try:
        if point is not None and point.run_id and hasattr(tracker, "resume"):
            tracker.resume(point.run_id)
            tracker.set_tags({"output_dir": str(ctx.output_dir), "resumed_from": str(point.path),
                              "resumed_after_epoch": str(point.checkpoint.epoch)})
            return
        parent = type(tracker).read_sweep_parent(ctx.sweep_dir) if ctx.sweep_dir is not None else None
        params = flatten_config(OmegaConf.to_container(cfg, resolve=True))
        params.update({f"split.{k}": str(v) for k, v in prep.splits.summary().items()})
        params["data.noise_floor_rmse"] = str(prep.data.noise_floor_rmse)
        params["inner_loop"] = getattr(prep.algo, "inner_loop_name", "none")  # the one inner loop, chosen once
        tracker.start(params=params, tags=run_tags(prep, ctx), parent=parent)
    except MetarecError:
        raise
    except Exception as e:  # the store is unreachable or refused the run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        uri = getattr(tracker, "tracking_uri", "?")
        raise ConfigError("logger.tracking_uri", f"cannot start an MLflow run at {uri}: {first}") from None


def print_results(console: Console, summary: dict[str, float], metric_names: list[str]) -> None:
    """The test table: mean, 95% CI and the reference scorers, one row per metric."""
    from rich.table import Table

    table = Table(title="test metrics (mean over test users, 95% CI; reference scorers on the same items)")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("± 95% CI", justify="right")
    refs = [r for r in ("random", "constant", "oracle") if any(k.startswith(f"test/ref/{r}/") for k in summary)]
    for r in refs:
        table.add_column(r, justify="right")
    for m in metric_names:
        if f"test/{m}" in summary:
            cells = [f"{summary[f'test/ref/{r}/{m}']:.4f}" if f"test/ref/{r}/{m}" in summary else ""
                     for r in refs]
            table.add_row(m, f"{summary[f'test/{m}']:.4f}", f"{summary[f'test/{m}_ci95']:.4f}", *cells)
    console.print(table)


def evaluation_curves(prep: Prepared, test_tasks, out_dir: Path, step: int, console: Console) -> list[str]:
    """The few-shot and adaptation curves the evaluator asks for, logged and written as CSV."""
    from metarec_runner.evaluate.curves import adaptation_curve, few_shot_curve

    written = []
    if prep.evaluator.shots:
        shots = few_shot_curve(prep.evaluator, prep.algo, test_tasks, prep.device, prep.evaluator.shots)
        prep.tracker.log_metrics(shots.summary, step=step)
        shots.curve.to_csv(out_dir / "few_shot.csv", index=False)
        shots.per_task.to_csv(out_dir / "few_shot_per_task.csv", index=False)
        written += ["few_shot.csv", "few_shot_per_task.csv"]
        for k, n in shots.dropped.items():
            if n:
                console.print(f"few-shot k={k}: {n} of {len(test_tasks)} test users have fewer than "
                              f"{k} support items and are left out at k={k}", highlight=False)
    if prep.evaluator.adaptation_steps:
        frame, summary = adaptation_curve(prep.evaluator, prep.algo, test_tasks, prep.device,
                                          prep.evaluator.adaptation_steps)
        prep.tracker.log_metrics(summary, step=step)
        frame.to_csv(out_dir / "adaptation.csv", index=False)
        written.append("adaptation.csv")
    return written


def write_outputs(prep: Prepared, cfg: DictConfig, out_dir: Path, fit: FitResult, test, console: Console,
                  choices: dict[str, str] | None = None) -> None:
    """Log the test summary and curves, write the run's files and log them as artifacts; the
    plots are titled with the group ``choices`` (algo, model), the dataset and the seed."""
    splits = prep.splits
    extra_files: list[str] = []
    if test is not None:
        prep.tracker.log_metrics(test.summary, step=fit.best_epoch)
        extra_files = evaluation_curves(prep, splits.test, out_dir, fit.best_epoch, console)
    else:  # tuning: the test users are never scored
        prep.tracker.set_tags({"test_users": "not scored (evaluate_test=false)"})
    if cfg.save_split:  # the exact tasks, reloadable with splitter=saved splitter.path=...
        from metarec_runner.tasks.saved import save_splits

        save_splits(splits, prep.data, out_dir / "split.parquet")
        extra_files.append("split.parquet")
    prep.tracker.log_metrics({"val/best_epoch": fit.best_epoch}, step=fit.best_epoch)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
    (out_dir / "metrics.json").write_text(json.dumps(
        {"best_epoch": fit.best_epoch, "best_" + prep.trainer.monitor: fit.best_value,
         **(test.summary if test is not None else {})}, indent=2))
    files = ["config_resolved.yaml", "metrics.json", "history.csv", *extra_files]
    if test is not None:
        test.per_task.to_csv(out_dir / "per_task.csv", index=False)
        test.by_support.to_csv(out_dir / "by_support_size.csv", index=False)
        files += ["per_task.csv", "by_support_size.csv"]
    pd.DataFrame(fit.history).to_csv(out_dir / "history.csv", index=False)
    for name in files:
        prep.tracker.log_artifact(out_dir / name)
    if (out_dir / ".hydra").is_dir():
        prep.tracker.log_artifacts(out_dir / ".hydra", artifact_path="hydra")
    choices = choices or {}
    log_run_plots(prep.tracker, out_dir, pd.DataFrame(fit.history), test.by_support if test is not None else None,
                  algo=choices.get("algo"), model=choices.get("model"), dataset=prep.data.name, seed=cfg.seed,
                  best_epoch=fit.best_epoch, monitor=prep.trainer.monitor,
                  summary=test.summary if test is not None else None)  # never raises
