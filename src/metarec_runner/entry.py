"""The Hydra entry point of ``metarec train``, light to import.

Importing this module loads Hydra and OmegaConf only. The job itself
(:func:`metarec_runner.run.train_task`: torch, MLflow, the data and model code) is imported on
the first job, in the process that runs it: a sweep process whose launcher runs the jobs
elsewhere (joblib workers, Ray, SLURM) composes configs and opens the MLflow parent run without
spending seconds on imports it never uses.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from metarec_runner.paths import conf_dir


def train_job(cfg: DictConfig) -> float:
    """One ``metarec train`` job: :func:`metarec_runner.run.train_task` (returns the best value
    of ``trainer.monitor``, for sweepers)."""
    from metarec_runner.run import train_task

    return train_task(cfg)


def main() -> None:
    """Entry point for ``metarec train`` (reads overrides from ``sys.argv``)."""
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(train_job)()
