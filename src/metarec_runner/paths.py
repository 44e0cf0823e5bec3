"""Where metarec finds its configs and writes its outputs (shared by the CLI and the runs)."""

from __future__ import annotations

import os
from pathlib import Path


def register_resolvers() -> None:
    """The OmegaConf resolvers metarec's configs use (idempotent):

    ``${metarec.direction:<metric>}``: ``maximize`` or ``minimize`` from the metric's declared
    direction (:mod:`metarec_runner.evaluate.metric_specs`), e.g. the Optuna preset's
    ``hydra.sweeper.direction: ${metarec.direction:${trainer.monitor}}``.

    ``${metarec.seeds:<seed>,<split_seed>}``: the run name's seed part, ``s3`` (split seed 0,
    the default) or ``s3-split2``, so the runs of a split-seed sweep are told apart by name.
    """
    from omegaconf import OmegaConf

    from metarec_runner.evaluate.metric_specs import sweeper_direction

    if not OmegaConf.has_resolver("metarec.direction"):
        OmegaConf.register_new_resolver("metarec.direction", sweeper_direction)
    if not OmegaConf.has_resolver("metarec.seeds"):
        OmegaConf.register_new_resolver("metarec.seeds", seed_suffix)


def seed_suffix(seed: object, split_seed: object = 0) -> str:
    """``s<seed>``, plus ``-split<split_seed>`` when the split seed is not 0."""
    return f"s{seed}" if str(split_seed) in ("0", "None") else f"s{seed}-split{split_seed}"


def conf_dir() -> Path:
    """The primary config folder: ``METAREC_CONF_DIR``, else the one shipped with the package.

    Whoever composes these configs asks for this folder first, so it also registers the
    resolvers they use (:func:`register_resolvers`).
    """
    register_resolvers()
    env = os.environ.get("METAREC_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent / "conf"
    return path.resolve()


def output_root() -> Path:
    """``METAREC_OUTPUT_DIR``, else ``./outputs`` (mirrors ``conf/paths/default.yaml``)."""
    env = os.environ.get("METAREC_OUTPUT_DIR")
    return Path(env).resolve() if env else Path.cwd().resolve() / "outputs"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the sqlite store under :func:`output_root`
    (mirrors ``conf/logger/mlflow.yaml``)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_root()}/mlflow.db"


def group_options(group: str) -> list[str]:
    """Names of the YAML files in a config group folder (``algo`` -> ``["finetune", ...]``)."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def discard_run_folder(folder: str | Path) -> None:
    """Remove a run's folder after an error that stopped it before anything was tracked, and the
    date folder (``runs/<date>``) and ``runs/`` above it when that leaves them empty: an error
    before training writes nothing. A sweep's folder (``multiruns/<date>/<time>``) is kept while
    other jobs may write to it."""
    import shutil

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):
        if parent.name == "multiruns" or parent.parent.name == "multiruns":
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
