"""The ``@hydra.main`` task function: compose -> build -> fit -> test -> log -> return a metric.

``metarec train`` rewrites ``sys.argv`` and calls :func:`main`, so multirun (``-m``), launchers,
``--cfg job`` and Hydra's output folders all work as in any Hydra app.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from metarec_runner.config.rules import check_config
from metarec_runner.errors import ConfigError, MetarecError, fail
from metarec_runner.evaluate.candidates import Catalog
from metarec_runner.evaluate.metric_specs import needs_ratings
from metarec_runner.report.plots import log_run_plots
from metarec_runner.runner import Runner
from metarec_runner.tracking import flatten_config
from metarec_runner.utils import git_sha, resolve_device, resolve_dtype, seed_everything, versions


def build(group: str, node: DictConfig, **kwargs):
    """Instantiate a config group's object; failures become one-line ConfigErrors naming ``group``.

    Runtime objects (``schema``, ``model``) are passed to the partially instantiated target, so
    Hydra never tries to turn them into config nodes.
    """
    target = node.get("_target_", "?")
    try:
        if kwargs:
            return instantiate(node, _partial_=True)(**kwargs)
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause.under(group) from None
        if isinstance(cause, MetarecError):
            raise cause from None
        raise ConfigError(group, f"cannot build {target}: {cause or e}") from None
    except ConfigError as e:
        raise e.under(group) from None
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise ConfigError(group, f"cannot build {target}: {e}") from None


def validate(cfg: DictConfig) -> None:
    """Every config value and cross-key rule (:func:`metarec_runner.config.rules.check_config`,
    which ``metarec train`` already ran before importing this module); raises ConfigError."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else ()
    check_config(cfg, overrides)


class Prepared:
    """Everything a run needs, built and checked before anything is written to the tracker."""

    def __init__(self, cfg: DictConfig) -> None:
        validate(cfg)
        if cfg.threads is not None:
            torch.set_num_threads(int(cfg.threads))
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype)
        seed_everything(cfg.split_seed)
        self.data = build("dataset", cfg.dataset)
        self.splits = build("splitter", cfg.splitter)(self.data)
        seed_everything(cfg.seed)
        self.trainer = build("trainer", cfg.trainer)
        self.val_tasks = self.splits.val  # what model selection sees (the split keeps its hash)
        k = self.trainer.val_support_size
        if k is not None:  # validate (select, tune) at k support items
            val = self.splits.val
            self.val_tasks = val.subset(val.support_sizes >= k).with_support_size(k)
            if len(self.val_tasks) == 0:
                raise ConfigError("trainer.val_support_size", f"no validation user has {k} support "
                                  "items; lower trainer.val_support_size")
        self.evaluator = build("evaluator", cfg.evaluator)
        known = [f"val/{m}" for m in self.evaluator.metric_names]
        if self.trainer.monitor not in known:
            raise ConfigError("trainer.monitor", f"{self.trainer.monitor!r} is not computed; choose one "
                              f"of {', '.join(known)}")
        train = self.splits.train
        train_mean = float((train.support_y.sum() + train.query_y.sum())
                           / max(train.support_y.numel() + train.query_y.numel(), 1))
        self.evaluator.bind(Catalog.from_interactions(self.data), rating_mean=train_mean)
        self.evaluator.check_tasks(self.val_tasks, "val")
        self.evaluator.check_tasks(self.splits.test, "test")
        mean = float(self.splits.train.support_y.mean())
        model = build("model", cfg.model, schema=self.data.schema, rating_mean=mean)
        self.model = model.to(device=self.device, dtype=self.dtype)
        # the feature-row layout, for algorithms that read raw fields (group_popularity)
        self.model.schema = self.data.schema
        self.algo = build("algo", cfg.algo, model=self.model)
        fits_once = self.algo.fits_once
        if (not fits_once and not getattr(self.algo, "predicts_ratings", True)
                and needs_ratings(self.trainer.monitor)):
            ranking = [m for m in known if not needs_ratings(m)]
            raise ConfigError(
                "trainer.monitor", f"{self.trainer.monitor} needs rating predictions and algo "
                f"{type(self.algo).__name__} does not predict ratings; choose one of {', '.join(ranking)}")
        if self.evaluator.adaptation_steps and not hasattr(self.algo, "eval_inner_steps"):
            raise ConfigError("evaluator.adaptation_steps", f"algo {type(self.algo).__name__} takes no inner "
                              "steps; set evaluator.adaptation_steps=[]")
        self.tracker = build("logger", cfg.logger)


def _tags(cfg: DictConfig, prep: Prepared) -> dict[str, str]:
    hc = HydraConfig.get()
    tags = {f"choice.{k}": str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    tags.update({
        "algo": str(hc.runtime.choices.get("algo")),
        "model": str(hc.runtime.choices.get("model")),
        "dataset": prep.data.name,
        "splitter": str(hc.runtime.choices.get("splitter")),
        "protocol": prep.evaluator.protocol,
        "split_hash": prep.splits.split_hash,
        "data_checksum": prep.data.checksum(),
        "git_sha": git_sha(),
        "device": str(prep.device),
        "output_dir": hc.runtime.output_dir,
        "overrides": " ".join(hc.overrides.task)[:5000],
    })
    tags.update({f"version.{k}": v for k, v in versions().items()})
    return tags


def _print_results(console: Console, summary: dict[str, float], metric_names: list[str]) -> None:
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


def _start_tracking(prep: Prepared, cfg: DictConfig, hc) -> None:
    """Open the run (a sweep's child when in a multirun) and log the params, once."""
    parent = None
    if hc.mode == RunMode.MULTIRUN:
        parent = type(prep.tracker).read_sweep_parent(hc.sweep.dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    params = flatten_config(resolved)
    params.update({f"split.{k}": str(v) for k, v in prep.splits.summary().items()})
    params["data.noise_floor_rmse"] = str(prep.data.noise_floor_rmse)
    params["inner_loop"] = getattr(prep.algo, "inner_loop_name", "none")  # the one inner loop, chosen once
    try:
        prep.tracker.start(params=params, tags=_tags(cfg, prep), parent=parent)
    except MetarecError:
        raise
    except Exception as e:  # the store is unreachable or refused the run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        uri = getattr(prep.tracker, "tracking_uri", "?")
        raise ConfigError("logger.tracking_uri", f"cannot start an MLflow run at {uri}: {first}") from None


def _curves(prep: Prepared, test_tasks, out_dir: Path, step: int, console: Console) -> list[str]:
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


def train_task(cfg: DictConfig) -> float:
    """Run one experiment; returns the best value of ``trainer.monitor`` (for sweepers)."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    try:
        prep = Prepared(cfg)
    except MetarecError as err:
        # nothing was tracked: remove the run folder Hydra created, so no half-written run remains
        shutil.rmtree(out_dir, ignore_errors=True)
        fail(err, 2)
    try:
        _start_tracking(prep, cfg, hc)
    except MetarecError as err:
        if prep.tracker.run_id:  # created, then failed while logging params
            prep.tracker.finish("FAILED")
        shutil.rmtree(out_dir, ignore_errors=True)
        fail(err, 2)
    console = Console(soft_wrap=True)
    splits = prep.splits
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        console.print(
            f"[bold]{cfg.run_name}[/]  data={prep.data.name} ({len(prep.data.ratings)} ratings)  "
            f"tasks train/val/test={len(splits.train)}/{len(splits.val)}/{len(splits.test)}  "
            f"split_hash={splits.split_hash}  device={prep.device}", highlight=False,
        )
        runner = Runner(prep.algo, prep.evaluator, prep.tracker, prep.trainer, prep.device, cfg.seed,
                        console=Console(stderr=True))
        fit = runner.fit(splits.train, prep.val_tasks)
        test = runner.test(splits.test) if cfg.evaluate_test else None
        extra_files = []
        if test is not None:
            prep.tracker.log_metrics(test.summary, step=fit.best_epoch)
            extra_files = _curves(prep, splits.test, out_dir, fit.best_epoch, console)
        else:  # tuning: the test users are never scored
            prep.tracker.set_tags({"test_users": "not scored (evaluate_test=false)"})
        if cfg.save_split:  # the exact tasks, reloadable with splitter=saved splitter.path=...
            from metarec_runner.tasks.saved import save_splits

            save_splits(splits, prep.data, out_dir / "split.parquet")
            extra_files.append("split.parquet")
        prep.tracker.log_metrics({"val/best_epoch": fit.best_epoch}, step=fit.best_epoch)
        (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
        (out_dir / "metrics.json").write_text(json.dumps(
            {"best_epoch": fit.best_epoch, "best_" + prep.trainer.monitor: fit.best_value,
             **(test.summary if test is not None else {})}, indent=2))
        import pandas as pd
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
        log_run_plots(prep.tracker, out_dir, pd.DataFrame(fit.history),
                      test.by_support if test is not None else None)  # never raises
        prep.tracker.finish("FINISHED")
    except KeyboardInterrupt:
        prep.tracker.finish("KILLED")
        raise
    except MetarecError as err:
        prep.tracker.set_tags({"error": str(err)[:5000]})
        prep.tracker.finish("FAILED")
        fail(err, 1)
    except BaseException:
        prep.tracker.finish("FAILED")
        raise
    if test is not None:
        _print_results(console, test.summary, [*prep.evaluator.metric_names, "floor_rmse"])
    console.print(f"best epoch {fit.best_epoch}: {prep.trainer.monitor}={fit.best_value:.4f}  "
                  f"outputs: {out_dir}", highlight=False)
    if prep.tracker.run_id:
        console.print(f"MLflow: {prep.tracker.run_url_hint}  (browse with `metarec ui`)", highlight=False)
    return float(fit.best_value) if math.isfinite(fit.best_value) else float("nan")
