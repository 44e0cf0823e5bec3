"""The README's distributed sweeps for real: the Ray command on a local Ray, and the SLURM
preset's resources through submitit's local executor (no cluster needed). Each sweep runs 2
jobs and must leave one FINISHED parent with 2 FINISHED children in the one MLflow store the
sweep process opened, although every job ran in another process (a Ray worker, a submitit job).

The commands are the README's own (found by tests/test_readme_commands.py's extraction), shrunk
by appended overrides (one seed, the tiny toy catalog) the way that module shrinks sweeps.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import METAREC, metarec_env
from tests.test_readme_commands import COMMANDS, ROOT, TOY_TINY, program, strip_comment

pytestmark = pytest.mark.slow


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _readme_command(pattern: str) -> list[str]:
    """The arguments after ``metarec`` of the one README command matching ``pattern``."""
    found = [c for c in COMMANDS if c.doc == "README.md" and re.search(pattern, c.text)]
    assert len(found) == 1, [c.id for c in found]
    prog, args = program(strip_comment(found[0].text))
    assert prog == "metarec", found[0].text
    return args


def _sweep(out: Path):
    """(parent, children) of the only sweep in ``out``'s store, every run of the store in it."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "", ViewType.ALL,
                              max_results=1000)
    parents = [r for r in runs if r.info.run_name.startswith("sweep:")]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(runs) == len(children) + 1, "runs outside the sweep"
    return parents[0], children


def _check_two_finished_children(out: Path, res: subprocess.CompletedProcess) -> list:
    assert res.returncode == 0, f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-5000:]}"
    parent, children = _sweep(out)
    assert parent.info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.tags["algo"] for c in children) == ["maml", "reptile"]
    for child in children:
        assert child.info.experiment_id == parent.info.experiment_id
        assert child.data.params["seed"] == "0" and child.data.params["trainer.max_epochs"] == "1"
        assert "test/rmse" in child.data.metrics
    assert len({c.data.tags["output_dir"] for c in children}) == 2  # one folder per job
    return children


@pytest.mark.skipif(not (_has("ray") and _has("hydra_plugins.hydra_ray_launcher")),
                    reason="ray / hydra-ray-launcher not installed (pip install 'metarec-runner[ray]')")
def test_readme_ray_sweep(tmp_path: Path) -> None:
    args = _readme_command(r"hydra/launcher=ray_local")
    assert "hydra.launcher.ray.init.address=auto" not in args  # a local Ray, started by the sweep
    out = tmp_path / "outputs"
    env = metarec_env(out, RAY_USAGE_STATS_ENABLED="0")
    res = subprocess.run([*METAREC, *args, "seed=0", *TOY_TINY], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    children = _check_two_finished_children(out, res)
    assert "Started a local Ray instance" in res.stderr  # the jobs really ran as Ray tasks
    assert all(c.data.params["threads"] == "1" for c in children)  # one torch thread per Ray job


def _local_variant_of_the_slurm_preset(conf: Path) -> dict:
    """conf/hydra/launcher/slurm.yaml as a submitit *local* launcher config under ``conf``: the
    keys every submitit executor takes are kept, the SLURM-only keys are dropped."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf

    preset = yaml.safe_load((ROOT / "conf/hydra/launcher/slurm.yaml").read_text())
    assert preset.pop("defaults") == ["submitit_slurm", "_self_"]
    shared = set(BaseQueueConf.__dataclass_fields__)
    kept = {k: v for k, v in preset.items() if k in shared}
    dropped = set(preset) - shared
    assert dropped <= set(SlurmQueueConf.__dataclass_fields__) - shared, dropped  # only SLURM's own keys
    assert {"timeout_min", "cpus_per_task", "mem_gb", "submitit_folder"} <= set(kept)
    (conf / "hydra" / "launcher").mkdir(parents=True)
    (conf / "hydra" / "launcher" / "slurm_local.yaml").write_text(
        yaml.safe_dump({"defaults": ["submitit_local", "_self_"], **kept}))
    return kept


@pytest.mark.skipif(not _has("hydra_plugins.hydra_submitit_launcher"),
                    reason="hydra-submitit-launcher not installed (pip install 'metarec-runner[slurm]')")
def test_slurm_preset_through_submitit_local(tmp_path: Path) -> None:
    """The README's SLURM command with the preset's resources on submitit's LocalExecutor (the
    preset itself cannot take `hydra.launcher._target_=...LocalLauncher`: its SLURM-only keys,
    partition and array_parallelism, are refused by the local executor and cannot be deleted)."""
    args = _readme_command(r"hydra/launcher=slurm\b")
    kept = _local_variant_of_the_slurm_preset(tmp_path / "my_conf")
    args = ["hydra/launcher=slurm_local" if a == "hydra/launcher=slurm" else a for a in args
            if not a.startswith("hydra.launcher.partition=")]  # a SLURM partition; no such thing locally
    out = tmp_path / "outputs"
    res = subprocess.run([*METAREC, *args, f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "seed=0",
                          *TOY_TINY], cwd=tmp_path, env=metarec_env(out), capture_output=True, text=True,
                         timeout=900, check=False)
    _check_two_finished_children(out, res)
    assert "Submitit 'local' sweep output dir" in res.stdout + res.stderr
    # every job ran as a submitit job: its pickled call and logs in the preset's submitit_folder
    assert kept["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    logs = list(out.glob("multiruns/*/*/.submitit/*/*_log.out"))
    assert len(logs) == 2, logs
