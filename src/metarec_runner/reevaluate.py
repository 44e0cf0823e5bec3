"""``metarec evaluate --run <id|latest|path> evaluator=... evaluator.shots=...``: a saved model under
another protocol, without retraining.

The run's config is composed again from the overrides it was trained with plus the new ones, which
may change only the evaluation (:data:`MAY_CHANGE`). The data and split are rebuilt and must have
the checkpoint's checksum and split hash; the algorithm is loaded from ``best.pt``; the test users
are scored under the new evaluator, and the results are logged into a child run of the original
(tag ``mlflow.parentRunId``), with the same files a training run writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console

from metarec_runner.checkpoint import CheckpointError, load_checkpoint
from metarec_runner.errors import ConfigError, MetarecError
from metarec_runner.paths import discard_run_folder
from metarec_runner.prepare import Prepared
from metarec_runner.resume import ResumePoint, config_differences
from metarec_runner.run import compose, job_context
from metarec_runner.run_outputs import (
    RunContext,
    evaluation_curves,
    log_test_summary,
    print_results,
    run_tags,
)
from metarec_runner.serve.locate import resolve_checkpoint
from metarec_runner.tracking import flatten_config

MAY_CHANGE = ("evaluator", "logger", "device", "threads", "dtype")
"""Keys (and groups) ``metarec evaluate`` may override: how the saved model is evaluated and logged."""


_MODEL_KEYS = ("dataset", "splitter", "model", "algo", "seed", "split_seed")
"""What must compose exactly as it did in training, or the saved weights mean something else."""


@dataclass(frozen=True)
class Reevaluation:
    """What :func:`evaluate_saved` returns: the child run, its folder and the test summary."""

    run_id: str | None
    parent_run_id: str | None
    output_dir: Path
    summary: dict[str, float]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override that would change the trained model, the data or the split."""
    for override in overrides:
        key = _key(override)
        if "=" not in override or not any(key == k or key.startswith(k + ".") for k in MAY_CHANGE):
            raise ConfigError(key or override, f"metarec evaluate changes only {', '.join(MAY_CHANGE)} "
                              f"(got {override!r}); to change anything else, train again")


def evaluate_saved(spec: str, overrides: list[str], tracking_uri: str | None = None,
                   console: Console | None = None) -> Reevaluation:
    """Re-evaluate the saved best model of run ``spec`` (a run id, ``latest``, a run folder or a
    ``best.pt``) with ``overrides`` applied to its evaluation; raises MetarecError on bad input."""
    console = console or Console(soft_wrap=True)
    check_overrides(overrides)
    from metarec_runner.paths import default_tracking_uri

    path = resolve_checkpoint(spec, tracking_uri or default_tracking_uri())
    ckpt = load_checkpoint(path)
    point = ResumePoint(ckpt, path, ckpt.meta.get("run_id") or None)
    meta = ckpt.meta
    if "overrides" not in meta:
        raise CheckpointError(f"{point.path}: saved without its overrides (an older metarec); train it again")
    uri = ["logger.tracking_uri=" + tracking_uri] if tracking_uri else []
    cfg, ctx = job_context(compose(*meta["overrides"], *uri, *overrides, "trainer.checkpoint=false"))
    try:
        prep = Prepared(cfg, ctx.overrides)
        for name, saved, now in (("dataset checksum", meta.get("data_checksum"), prep.data.checksum()),
                                 ("split hash", meta.get("split_hash"), prep.splits.split_hash)):
            if saved != now:
                raise CheckpointError(f"{point.path}: trained on {name} {saved}, the data here give {now}; "
                                      "point METAREC_DATA_DIR at the data it was trained on")
        now = OmegaConf.to_container(cfg, resolve=True)
        diff = config_differences({k: meta["config"].get(k) for k in _MODEL_KEYS}, {k: now.get(k) for k in _MODEL_KEYS})
        if diff:
            raise CheckpointError(f"{point.path}: its config composes differently now ({diff[0]}); the config "
                                  "files changed since it was trained")
        prep.algo.load_state_dict(point.checkpoint.algo)
    except MetarecError:
        discard_run_folder(ctx.output_dir)
        raise
    parent_id = point.run_id
    _start_child(prep, cfg, ctx, parent_id, point.path)
    try:
        result = prep.evaluator.evaluate(prep.algo, prep.splits.test, "test", prep.device)
        step = int(meta.get("best_epoch", 0))
        files = log_test_summary(prep, result.summary, ctx.output_dir, step)
        print_results(console, result.summary, [*prep.evaluator.metric_names, "floor_rmse"])
        files += evaluation_curves(prep, prep.splits.test, ctx.output_dir, step, console)
        result.per_task.to_csv(ctx.output_dir / "per_task.csv", index=False)
        (ctx.output_dir / "metrics.json").write_text(json.dumps(result.summary, indent=2))
        (ctx.output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg,
                                                                                                  resolve=True)))
        for name in ["per_task.csv", "metrics.json", "config_resolved.yaml", *files]:
            prep.tracker.log_artifact(ctx.output_dir / name)
        prep.tracker.finish("FINISHED")
    except KeyboardInterrupt:
        prep.tracker.finish("KILLED")
        raise
    except BaseException:
        prep.tracker.finish("FAILED")
        raise
    console.print(f"re-evaluated {point.path} under protocol={prep.evaluator.protocol}  outputs: "
                  f"{ctx.output_dir}", highlight=False)
    if prep.tracker.run_id:
        console.print(f"MLflow: {prep.tracker.run_url_hint} (child of run {parent_id})", highlight=False)
    return Reevaluation(prep.tracker.run_id or None, parent_id, ctx.output_dir, result.summary)


def _start_child(prep: Prepared, cfg, ctx: RunContext, parent_id: str | None, source: Path) -> None:
    """Open the child run of the original (or an unparented run when it was untracked)."""
    tracker = prep.tracker
    if not hasattr(tracker, "tracking_uri"):
        return
    from metarec_runner.tracking.mlflow_tracker import SweepParent

    parent = None
    if parent_id:
        from mlflow.tracking import MlflowClient

        try:
            original = MlflowClient(tracker.tracking_uri).get_run(parent_id)
        except Exception:  # noqa: BLE001  (the original lives in another store: no parent link)
            original = None
        if original is not None:
            parent = SweepParent(parent_id, original.info.experiment_id, tracker.tracking_uri)
            tracker.run_name = f"{original.info.run_name}-eval-{prep.evaluator.protocol}"
    params = flatten_config({"evaluator": OmegaConf.to_container(cfg.evaluator, resolve=True)})
    tags = {**run_tags(prep, ctx), "evaluated_from": str(source), "reevaluation": "true"}
    try:
        tracker.start(params=params, tags=tags, parent=parent)
    except MetarecError:
        raise
    except Exception as e:  # the store is unreachable or refused the run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("logger.tracking_uri", f"cannot start an MLflow run at {tracker.tracking_uri}: "
                          f"{first}") from None
