"""Where metarec finds its configs and writes its outputs (shared by the CLI and the runs)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FROZEN_CONF_ENV = "METAREC_FROZEN_CONF_DIR"  # set by frozen_conf_dir while a sweep runs


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
    """The primary config folder: ``METAREC_CONF_DIR``, else the one shipped with the package;
    inside a sweep, the copy of it the sweep took at its start (:func:`frozen_conf_dir`).

    Whoever composes these configs asks for this folder first, so it also registers the
    resolvers they use (:func:`register_resolvers`).
    """
    register_resolvers()
    frozen = os.environ.get(FROZEN_CONF_ENV)  # a running sweep's copy (frozen_conf_dir), where it exists
    if frozen and Path(frozen).is_dir():
        return Path(frozen)
    env = os.environ.get("METAREC_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent / "conf"
    return path.resolve()


@contextmanager
def frozen_conf_dir(source: Path) -> Iterator[Path]:
    """A private copy of the config folder ``source`` for as long as the block runs.

    A sweep composes each job's config only when the launcher gets to that job (Hydra's basic
    launcher and the Optuna sweeper compose one job at a time), from the files on disk. So an edit
    under ``conf/`` while a sweep runs would change or break the jobs still to come.
    ``metarec train -m`` composes from this copy, taken when the sweep starts, and so every job
    runs the configs the sweep was started with. Folders added with ``hydra.searchpath`` are
    still read live.

    The jobs read it too (:func:`conf_dir`, through ``METAREC_FROZEN_CONF_DIR``: the option names
    of the capability checks), in this process and in local workers. A worker on another machine
    (Ray, SLURM) does not have the copy and reads its own ``conf/``, as before.
    """
    before = os.environ.get(FROZEN_CONF_ENV)
    with tempfile.TemporaryDirectory(prefix="metarec-conf-") as tmp:
        frozen = Path(tmp) / "conf"
        shutil.copytree(source, frozen, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        os.environ[FROZEN_CONF_ENV] = str(frozen)
        try:
            yield frozen
        finally:
            if before is None:
                os.environ.pop(FROZEN_CONF_ENV, None)
            else:
                os.environ[FROZEN_CONF_ENV] = before


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
