"""A launcher or sweeper option whose Hydra plugin is missing names the plugin and the pip
command, in one line, instead of Hydra's "Could not load 'hydra/launcher/ray'"."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

import pytest

from metarec_runner.cli import train as train_entry
from tests.helpers import METAREC

# option on the command line -> (the plugin's distribution, the extra that installs it, the
# config Hydra cannot load without it, the plugin's name in the line)
PLUGIN_OPTIONS = {
    "hydra/launcher=ray_local": ("hydra-ray-launcher", "ray", "hydra/launcher/ray",
                                 "the Ray launcher"),
    "hydra/launcher=slurm": ("hydra-submitit-launcher", "slurm", "hydra/launcher/submitit_slurm",
                             "the submitit (SLURM) launcher"),
    "+hparams_search=maml_optuna": ("hydra-optuna-sweeper", "optuna", "hydra/sweeper/optuna",
                                    "the Optuna sweeper"),
}


@pytest.mark.parametrize("distribution, extra", sorted(v[:2] for v in PLUGIN_OPTIONS.values()))
def test_the_extra_is_read_from_the_installed_metadata(distribution, extra):
    assert train_entry.extra_providing(distribution) == extra
    assert train_entry.extra_providing("not-a-dependency") is None


@pytest.mark.parametrize("option", sorted(PLUGIN_OPTIONS))
def test_a_missing_plugin_names_the_pip_install(option, monkeypatch):
    distribution, extra, missing, title = PLUGIN_OPTIONS[option]
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == distribution:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr("sys.argv", ["metarec", "-m", option, "+algo=maml"])
    line = train_entry.missing_plugin_line(missing)
    assert line == (f"{option} needs {title} ({distribution}), which is not installed; install "
                    f'it with pip install "metarec-runner[{extra}]"')
    assert train_entry.missing_plugin_line("hydra/launcher/joblib") is None


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(PLUGIN_OPTIONS))
def test_an_unregistered_plugin_is_one_line_through_the_cli(option, tmp_path: Path):
    # a regular (empty) hydra_plugins package first on the path shadows the namespace package
    # the plugins install into, so Hydra finds none of them, as when they are not installed
    shadow = tmp_path / "shadow" / "hydra_plugins"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    res = subprocess.run([*METAREC, "train", "-m", option, "+algo=maml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    distribution = PLUGIN_OPTIONS[option][0]
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith(f"metarec: error: {option} needs ")
    assert f"({distribution} " in lines[0] and "import hydra_plugins." in lines[0]
    assert not (tmp_path / "outputs").exists()  # nothing written
