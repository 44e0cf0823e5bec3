"""A thin ``train(cfg)``: prepare -> (resume) -> fit -> test -> log, and its Hydra task function.

:func:`train` is what ``metarec train`` runs, and what tests and Python users call::

    from metarec_runner import compose, train
    result = train(compose("+algo=maml", "trainer.max_epochs=3"))
    result.run_id, result.best_value, result.test["test/rmse"], result.checkpoint

It raises :class:`~metarec_runner.errors.MetarecError` on bad input. :func:`train_task` (the
``@hydra.main`` job behind ``metarec train``) turns that into one line and an exit code: 2 for an
error before anything was tracked (the run folder is removed: no half-written run), 1 after.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from metarec_runner.checkpoint import BEST, CheckpointSink
from metarec_runner.errors import ConfigError, MetarecError, fail
from metarec_runner.paths import discard_run_folder
from metarec_runner.prepare import Prepared, build, validate  # noqa: F401  (re-exported: run.Prepared)
from metarec_runner.resume import CHECKPOINT_ARTIFACTS, ResumePoint, check_fits, resolve
from metarec_runner.run_outputs import RunContext, start_tracking, write_outputs
from metarec_runner.runner import Runner
from metarec_runner.tracking.layout import epoch_metrics
from metarec_runner.utils import git_sha, versions


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_id: the MLflow run (``None`` with ``logger=none``).
        output_dir: the run's folder (config, metrics, per-task tables, checkpoints).
        best_epoch, best_value: the selected epoch and its ``trainer.monitor`` value.
        test: the test summary (``test/<metric>`` -> value), or ``None`` with ``evaluate_test=false``.
        checkpoint: ``best.pt``, or ``None`` with ``trainer.checkpoint=false``.
    """

    run_id: str | None
    output_dir: Path
    best_epoch: int
    best_value: float
    test: dict[str, float] | None
    checkpoint: Path | None


def compose(*overrides: str, output_dir: str | Path | None = None) -> DictConfig:
    """The project's config with ``overrides``, as ``metarec train`` composes it, ready for
    :func:`train` outside a Hydra app (``${hydra:...}`` values resolve; the run folder is
    ``output_dir``, default a new folder under ``paths.output_root/runs``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from metarec_runner.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[_plus_algo(o) for o in overrides],
                            return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir) if output_dir else ""
        cfg.hydra.overrides.task = list(overrides)
    return cfg


def _plus_algo(override: str) -> str:
    return "+" + override if override.startswith("algo=") else override


def job_context(cfg: DictConfig) -> tuple[DictConfig, RunContext]:
    """Outside a Hydra app: install ``cfg.hydra`` (from :func:`compose`) as Hydra's config, pick the
    run folder, and return the job config without the ``hydra`` node."""
    if "hydra" not in cfg:
        raise ConfigError("cfg", "has no hydra node; build it with metarec_runner.compose(...) or run "
                          "`metarec train`")
    out = cfg.hydra.runtime.output_dir
    if not out:  # paths.output_root reads ${hydra:runtime.cwd}: install a copy first
        HydraConfig.instance().set_config(copy.deepcopy(cfg))
        root = Path(OmegaConf.select(cfg, "paths.output_root")) / "runs" / datetime.now().strftime("%Y-%m-%d")
        root.mkdir(parents=True, exist_ok=True)
        name = str(OmegaConf.select(cfg, "run_name", default="run"))
        out = tempfile.mkdtemp(prefix=datetime.now().strftime("%H-%M-%S_%f_") + name + "_", dir=root)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = out
    Path(out).mkdir(parents=True, exist_ok=True)
    HydraConfig.instance().set_config(cfg)
    ctx = RunContext(Path(out), {k: str(v) for k, v in cfg.hydra.runtime.choices.items()
                                 if not str(k).startswith("hydra")}, tuple(cfg.hydra.overrides.task), None)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return job, ctx


def train(cfg: DictConfig) -> TrainResult:
    """Run one experiment: prepare, resume (``trainer.resume``), fit, test, log, checkpoint.

    Inside ``metarec train`` Hydra's config gives the folder and choices; from Python pass the
    result of :func:`compose`. Raises MetarecError (``exit_code`` 2: nothing was tracked) on bad
    input, and ends the tracked run FAILED (an error), KILLED (Ctrl+C, SIGTERM) or FINISHED.
    """
    if HydraConfig.initialized() and "hydra" not in cfg:
        ctx = RunContext.current()
    else:
        cfg, ctx = job_context(cfg)
    try:
        prep = Prepared(cfg, ctx.overrides)
        point = _resume_point(cfg, prep)
    except MetarecError as err:
        discard_run_folder(ctx.output_dir)  # nothing was tracked: no half-written run
        err.exit_code = 2
        raise
    try:
        start_tracking(prep, cfg, ctx, point)
    except MetarecError as err:
        if prep.tracker.run_id and point is None:  # created, then failed while logging params
            prep.tracker.finish("FAILED")
        discard_run_folder(ctx.output_dir)
        err.exit_code = 2
        raise
    from metarec_runner.tracking.lifecycle import terminate_as_interrupt

    console = Console(soft_wrap=True)
    try:
        with terminate_as_interrupt():
            fit, test = _fit_and_test(prep, cfg, ctx, point, console)
            best = ctx.output_dir / BEST
            if prep.tracker.run_id and best.is_file() and getattr(prep.tracker, "log_model", False):
                from metarec_runner.serve.pyfunc import log_pyfunc_model

                log_pyfunc_model(prep.tracker, prep.tracker.run_id, best)  # the MLflow model: runs:/<id>/model
        prep.tracker.finish("FINISHED")
    except KeyboardInterrupt:
        prep.tracker.finish("KILLED")
        raise
    except MetarecError as err:
        prep.tracker.set_tags({"error": str(err)[:5000]})
        prep.tracker.finish("FAILED")
        err.exit_code = 1
        raise
    except BaseException:
        prep.tracker.finish("FAILED")
        raise
    if ctx.sweep_dir is None:  # a sweep's job prints its one summary line instead
        console.print(f"best epoch {fit.best_epoch}: {prep.trainer.monitor}={fit.best_value:.4f}  "
                      f"outputs: {ctx.output_dir}", highlight=False)
        if prep.tracker.run_id:
            console.print(f"MLflow: {prep.tracker.run_url_hint}  (browse with `metarec ui`)", highlight=False)
    best = ctx.output_dir / BEST
    return TrainResult(prep.tracker.run_id or None, ctx.output_dir, fit.best_epoch, float(fit.best_value),
                       test.summary if test is not None else None, best if best.is_file() else None)


def _resume_point(cfg: DictConfig, prep: Prepared) -> ResumePoint | None:
    """The checkpoint ``trainer.resume`` names, checked against this run's config and data."""
    spec = prep.trainer.resume
    if not spec:
        return None
    tracker = prep.tracker
    point = resolve(str(spec), getattr(tracker, "tracking_uri", None), getattr(tracker, "experiment", None),
                    getattr(tracker, "run_name", None))
    check_fits(point, OmegaConf.to_container(cfg, resolve=True), prep.data.checksum(),
               prep.splits.split_hash, prep.trainer.resume_force)
    return point


def _checkpoint_sink(prep: Prepared, cfg: DictConfig, ctx: RunContext) -> CheckpointSink | None:
    if not prep.trainer.checkpoint:
        return None
    tracker = prep.tracker

    def log(paths: list[Path]) -> None:
        for path in paths:
            tracker.log_artifact(path, artifact_path=CHECKPOINT_ARTIFACTS)

    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "choices": ctx.choices,
            "overrides": [o for o in ctx.overrides if not o.lstrip("+~").startswith("trainer.resume")],
            "data_checksum": prep.data.checksum(), "split_hash": prep.splits.split_hash,
            "dataset": prep.data.name, "monitor": prep.trainer.monitor, "run_id": tracker.run_id or None,
            "vocabulary": prep.data.vocabulary(), "rating_mean": float(prep.splits.train.support_y.mean()),
            "algo_class": f"{type(prep.algo).__module__}.{type(prep.algo).__qualname__}",
            "git_sha": git_sha(), "versions": versions()}
    return CheckpointSink(ctx.output_dir, meta, prep.data.item_rows(), on_write=log)


def _fit_and_test(prep: Prepared, cfg: DictConfig, ctx: RunContext, point: ResumePoint | None,
                  console: Console):
    """Fit (continuing ``point``), test, and write and log every output file."""
    splits = prep.splits
    console.print(
        f"[bold]{cfg.run_name}[/]  data={prep.data.name} ({len(prep.data.ratings)} ratings)  "
        f"tasks train/val/test={len(splits.train)}/{len(splits.val)}/{len(splits.test)}  "
        f"split_hash={splits.split_hash}  device={prep.device}", highlight=False,
    )
    runner = Runner(prep.algo, prep.evaluator, prep.tracker, prep.trainer, prep.device, cfg.seed,
                    console=Console(stderr=True))
    if point is not None:
        _relog_missing(prep.tracker, point.checkpoint.meta.get("history", []))
    fit = runner.fit(splits.train, prep.val_tasks, _checkpoint_sink(prep, cfg, ctx),
                     point.checkpoint if point is not None else None)
    test = runner.test(splits.test) if cfg.evaluate_test else None
    write_outputs(prep, cfg, ctx.output_dir, fit, test, console, ctx.choices)
    return fit, test


def _relog_missing(tracker, history: list[dict]) -> None:
    """Log the checkpoint's epochs the MLflow run does not have yet (a kill between writing
    ``last.pt`` and logging): the resumed run's history has every epoch exactly once."""
    if not history or not getattr(tracker, "run_id", None):
        return
    logged = tracker.last_logged_step("train/loss") if hasattr(tracker, "last_logged_step") else None
    for entry in history:
        epoch = int(entry["epoch"])
        if logged is None or epoch > logged:
            tracker.log_metrics(epoch_metrics({k: v for k, v in entry.items() if k != "epoch"}), step=epoch)
    tracker.flush()


def train_task(cfg: DictConfig) -> float:
    """The ``@hydra.main`` job: :func:`train`, its errors as one line; returns the best value of
    ``trainer.monitor`` (for sweepers)."""
    try:
        result = train(cfg)
    except MetarecError as err:
        fail(err, getattr(err, "exit_code", 1))
    return float(result.best_value) if math.isfinite(result.best_value) else float("nan")
