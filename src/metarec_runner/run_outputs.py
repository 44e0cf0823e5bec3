"""What a run leaves behind: the MLflow run's params and tags, the files in its folder, the table
on the terminal. Used by :func:`metarec_runner.run.train`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from metarec_runner.errors import ConfigError, MetarecError
from metarec_runner.report.plots import log_run_plots
from metarec_runner.tracking import flatten_config, layout
from metarec_runner.utils import git_sha, versions

if TYPE_CHECKING:
    from metarec_runner.prepare import Prepared
    from metarec_runner.resume import ResumePoint
    from metarec_runner.runner import FitResult


@dataclass(frozen=True)
class RunContext:
    """What Hydra knows about this job: its folder, the group choices, the command line."""

    output_dir: Path
    choices: dict[str, str]
    overrides: tuple[str, ...]
    sweep_dir: Path | None  # the sweep's folder in a multirun, else None

    @classmethod
    def current(cls) -> RunContext:
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        return cls(output_dir=Path(hc.runtime.output_dir),
                   choices={k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
                   overrides=tuple(hc.overrides.task), sweep_dir=Path(hc.sweep.dir) if multirun else None)


def run_tags(prep: Prepared, ctx: RunContext, path_tags: dict[str, str] | None = None) -> dict[str, str]:
    """Tags: the group choices, protocol, hashes, provenance (git sha, versions), machine facts
    and the machine paths of the config (``paths.*``, data and output folders, the tracking URI)."""
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
    tags.update({k: v[:5000] for k, v in (path_tags or {}).items()})
    return tags


def run_params(prep: Prepared, cfg: DictConfig, ctx: RunContext) -> tuple[dict[str, str], dict[str, str]]:
    """``(params, path tags)``: the flattened config without its machine paths, the group
    choices (``algo=maml``), the split's counts, the noise floor and the inner loop."""
    params, path_tags = layout.split_params(flatten_config(OmegaConf.to_container(cfg, resolve=True)))
    params.update(layout.choice_params(ctx.choices))
    params.update({f"split.{k}": str(v) for k, v in prep.splits.summary().items()})
    params["data.noise_floor_rmse"] = str(prep.data.noise_floor_rmse)
    params["inner_loop"] = getattr(prep.algo, "inner_loop_name", "none")  # the one inner loop, chosen once
    return params, path_tags


def log_dataset(prep: Prepared, cfg: DictConfig, ctx: RunContext) -> None:
    """The run's dataset as an MLflow input (name, checksum as digest, counts; no data uploaded),
    in the context of its splitter, tagged with the split hash and split seed."""
    data = prep.data
    prep.tracker.log_dataset(
        data.name, data.checksum(), context=ctx.choices.get("splitter", "split"),
        source={"loader": str(OmegaConf.select(cfg, "dataset._target_", default="")),
                "config": ctx.choices.get("dataset", data.name)},
        profile={"ratings": len(data.ratings), "users": data.n_users, "items": data.n_items},
        tags={"split_hash": prep.splits.split_hash, "split_seed": str(cfg.split_seed)})


def start_tracking(prep: Prepared, cfg: DictConfig, ctx: RunContext, point: ResumePoint | None) -> None:
    """Open the run (a sweep's child when in a multirun) and log the params and the dataset,
    once; or, resuming a tracked run, reopen that run (same id) and leave its params as they are."""
    from metarec_runner.tracking.joblog import bind_run

    tracker = prep.tracker
    try:
        if point is not None and point.run_id and hasattr(tracker, "resume"):
            tracker.resume(point.run_id)
            tracker.set_tags({"output_dir": str(ctx.output_dir), "resumed_from": str(point.path),
                              "resumed_after_epoch": str(point.checkpoint.epoch)})
            bind_run(getattr(tracker, "tracking_uri", None), tracker.run_id)
            return
        parent = type(tracker).read_sweep_parent(ctx.sweep_dir) if ctx.sweep_dir is not None else None
        params, path_tags = run_params(prep, cfg, ctx)
        tracker.start(params=params, tags=run_tags(prep, ctx, path_tags), parent=parent)
        log_dataset(prep, cfg, ctx)
        bind_run(getattr(tracker, "tracking_uri", None), tracker.run_id)
    except MetarecError:
        raise
    except Exception as e:  # the store is unreachable or refused the run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        uri = getattr(tracker, "tracking_uri", "?")
        raise ConfigError("logger.tracking_uri", f"cannot start an MLflow run at {uri}: {first}") from None


class PrintedSummary(dict):
    """A test summary whose table is on the terminal already (:func:`write_outputs` prints it
    before the few-shot and adaptation curves), so :func:`print_results` does not repeat it."""


def in_sweep() -> bool:
    """Whether this is a job of a Hydra multirun (one line per job, no per-job tables)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def print_results(console: Console, summary: dict[str, float], metric_names: list[str]) -> None:
    """The test table: mean, 95% CI and the reference scorers, one row per metric (the oracle's
    RMSE and MAE are 0; the constant's are the train-mean predictor's). Not in a sweep (each job
    gets one line there), and not twice."""
    if isinstance(summary, PrintedSummary) or in_sweep():
        return
    from rich.table import Table

    frame = layout.results_table(summary, metric_names)
    table = Table(title="test metrics (mean over test users, 95% CI; reference scorers on the same items)")
    for i, col in enumerate(frame.columns):
        table.add_column("± 95% CI" if col == "ci95" else str(col), justify="left" if i == 0 else "right")
    for row in frame.itertuples(index=False):
        table.add_row(row[0], *("" if pd.isna(v) else f"{v:.4f}" for v in row[1:]))
    console.print(table)


def _curve_table(console: Console, title: str, frame: pd.DataFrame, key: str, headline: list[str]) -> None:
    """A curve's summary: one row per point (k or steps), the headline metrics' mean ± CI."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column(key, justify="right")
    for m in headline:
        table.add_column(m, justify="right")
    if "n_users" in frame.columns:
        table.add_column("users", justify="right")
    for point, rows in frame.groupby(key, sort=True):
        by = rows.set_index("metric")
        cells = [f"{by.loc[m, 'mean']:.4f} ± {by.loc[m, 'ci95']:.4f}" if m in by.index else "" for m in headline]
        if "n_users" in frame.columns:
            cells.append(str(int(rows["n_users"].iloc[0])))
        table.add_row(str(point), *cells)
    console.print(table)


def evaluation_curves(prep: Prepared, test_tasks, out_dir: Path, step: int, console: Console) -> list[str]:
    """The few-shot and adaptation curves the evaluator asks for: one line per point while they
    run (on stderr), a summary table after (not in a sweep), ``few_shot.csv``,
    ``few_shot_per_task.csv`` and ``adaptation.csv`` written, their headline metrics logged."""
    import time

    from metarec_runner.evaluate.curves import FewShot, adaptation_curve, few_shot_curve

    quiet = in_sweep()
    progress = Console(stderr=True, quiet=quiet)
    headline = layout.headline_metrics(prep.evaluator.metric_names, prep.trainer.monitor)
    written = []
    shots = prep.evaluator.shots
    if shots:
        parts = []
        for i, k in enumerate(shots, 1):
            start = time.perf_counter()
            parts.append(few_shot_curve(prep.evaluator, prep.algo, test_tasks, prep.device, (k,)))
            shown = "  ".join(f"{m}={parts[-1].summary[f'test_k{k}/{m}']:.4f}" for m in headline
                              if f"test_k{k}/{m}" in parts[-1].summary)
            progress.print(f"few-shot {i}/{len(shots)}: k={k}  {shown}  ({time.perf_counter() - start:.1f} s)",
                           highlight=False, soft_wrap=True)
        curve = FewShot(pd.concat([p.curve for p in parts], ignore_index=True),
                        pd.concat([p.per_task for p in parts if len(p.per_task)], ignore_index=True)
                        if any(len(p.per_task) for p in parts) else pd.DataFrame(),
                        {k: v for p in parts for k, v in p.summary.items()},
                        {k: v for p in parts for k, v in p.dropped.items()})
        prep.tracker.log_metrics(layout.test_metrics(curve.summary, headline), step=step)
        curve.curve.to_csv(out_dir / "few_shot.csv", index=False)
        curve.per_task.to_csv(out_dir / "few_shot_per_task.csv", index=False)
        written += ["few_shot.csv", "few_shot_per_task.csv"]
        for k, n in curve.dropped.items():
            if n:
                console.print(f"few-shot k={k}: {n} of {len(test_tasks)} test users have fewer than "
                              f"{k} support items and are left out at k={k}", highlight=False)
        if not quiet:
            _curve_table(console, "few-shot: test users' support cut to k items", curve.curve, "shots", headline)
    if prep.evaluator.adaptation_steps:
        progress.print(f"adaptation curve: {len(prep.evaluator.adaptation_steps)} evaluations "
                       f"(inner steps {list(prep.evaluator.adaptation_steps)})...", highlight=False, soft_wrap=True)
        frame, summary = adaptation_curve(prep.evaluator, prep.algo, test_tasks, prep.device,
                                          prep.evaluator.adaptation_steps)
        prep.tracker.log_metrics(layout.test_metrics(summary, headline), step=step)
        frame.to_csv(out_dir / "adaptation.csv", index=False)
        written.append("adaptation.csv")
        if not quiet:
            _curve_table(console, "adaptation: test metrics after s inner steps", frame, "steps", headline)
    return written


def log_test_summary(prep: Prepared, summary: dict[str, float], out_dir: Path, step: int) -> list[str]:
    """Log a test summary in the MLflow layout (:mod:`metarec_runner.tracking.layout`): the
    means, ``ci95/test/<m>``, the headline references, and the whole table as ``test_metrics``
    (``test_metrics.csv`` in the run folder, ``test_metrics.json`` as MLflow's table). Returns
    the files written."""
    names = [*prep.evaluator.metric_names, "floor_rmse"]
    headline = layout.headline_metrics(prep.evaluator.metric_names, prep.trainer.monitor)
    prep.tracker.log_metrics(layout.test_metrics(summary, headline), step=step)
    table = layout.results_table(summary, names)
    table.to_csv(out_dir / "test_metrics.csv", index=False)
    prep.tracker.log_ui_table(table, "test_metrics.json")
    return ["test_metrics.csv"]


def write_outputs(prep: Prepared, cfg: DictConfig, out_dir: Path, fit: FitResult, test, console: Console,
                  choices: dict[str, str] | None = None) -> None:
    """Log the test summary and curves, write the run's files and log them as artifacts; the
    plots are titled with the group ``choices`` (algo, model), the dataset and the seed. The
    test table is printed here (before the curves run), not again by :func:`print_results`."""
    splits = prep.splits
    extra_files: list[str] = []
    if test is not None:
        extra_files = log_test_summary(prep, test.summary, out_dir, fit.best_epoch)
        print_results(console, test.summary, [*prep.evaluator.metric_names, "floor_rmse"])
        test.summary = PrintedSummary(test.summary)
        extra_files += evaluation_curves(prep, splits.test, out_dir, fit.best_epoch, console)
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
