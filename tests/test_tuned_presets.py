"""Per-dataset cold-start presets: written from a finished search, composed as the study runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from metarec_runner.paths import conf_dir
from tests.helpers import compose

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tuned_preset.py"
DATASET_STUDIES = {"mlsmall": "coldstart_mlsmall", "lastfm": "coldstart_lastfm"}  # conf/coldstart/<dir>


def _fake_search(sweep: Path, values: list[float], best: dict) -> None:
    """A finished Optuna search's folder, as hydra-optuna-sweeper and metarec leave it."""
    sweep.mkdir(parents=True)
    (sweep / "optimization_results.yaml").write_text(yaml.safe_dump(
        {"name": "optuna", "best_params": best, "best_value": max(values)}))
    for n, value in enumerate(values):
        trial = sweep / f"{n}_ease-melu-lastfm_2k-s0"
        (trial / ".hydra").mkdir(parents=True)
        (trial / ".hydra" / "overrides.yaml").write_text(
            f"- algo.l2={100 + n}\n- +coldstart=ease\n- split_seed=0\n- experiment=coldstart_lastfm\n"
            "- +hparams_search=coldstart_ease\n- threads=1\n")
        (trial / "metrics.json").write_text(json.dumps({"best_epoch": 0, "best_val/ndcg_at_10": value}))
        (trial / "config_resolved.yaml").write_text(yaml.safe_dump({"dataset": {"name": "lastfm-2k"}}))


def test_tuned_preset_writes_the_best_trial_over_the_ml100k_preset(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    _fake_search(tmp_path / "sweep", [0.11, 0.17, 0.14], {"algo.l2": 123.456789, "algo.alpha": 0.5})
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "sweep"), "--conf", str(conf)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    written = conf / "coldstart" / "lastfm" / "ease.yaml"
    text = written.read_text()
    assert yaml.safe_load(text) == {"defaults": ["/coldstart/ease", "_self_"],
                                    "algo": {"l2": 123.5, "alpha": 0.5}}
    assert "3 trials" in text and "best trial 0.1700" in text and "0.110-0.170" in text
    assert "experiment=coldstart_lastfm +hparams_search=coldstart_ease" in text
    assert all("#" in line for line in text.splitlines())  # every key commented
    assert "EASE's lambda (Optuna)" in text  # the search preset's own comment on the knob
    # `latest`: the newest finished search under METAREC_OUTPUT_DIR, printed and not written
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "sweep", out / "multiruns" / "2026-12-01" / "10-00-00_000000")
    env = {**os.environ, "METAREC_OUTPUT_DIR": str(out)}
    written.unlink()
    printed = subprocess.run([sys.executable, str(SCRIPT), "latest", "--print", "--conf", str(conf)],
                             capture_output=True, text=True, check=False, env=env)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == text and not written.exists()


def test_tuned_preset_refuses_a_folder_that_is_no_search(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2
    assert "optimization_results.yaml not found" in done.stderr and len(done.stderr.splitlines()) == 1


def _dataset_presets() -> list[tuple[str, str]]:
    return [(d, p.stem) for d in DATASET_STUDIES for p in sorted((conf_dir() / "coldstart" / d).glob("*.yaml"))]


@pytest.mark.parametrize("dataset, algo", _dataset_presets())
def test_dataset_presets_override_only_their_searched_knobs(dataset: str, algo: str) -> None:
    """``+coldstart=<dataset>/<algo>`` is the ML-100K preset with the values the file names, and
    those are exactly the knobs its search preset searches."""
    experiment = DATASET_STUDIES[dataset]
    tuned = compose(f"experiment={experiment}", f"+coldstart={dataset}/{algo}", "logger=none")
    base = compose(f"experiment={experiment}", f"+coldstart={algo}", "logger=none")
    own = yaml.safe_load((conf_dir() / "coldstart" / dataset / f"{algo}.yaml").read_text())
    flat = _flatten({section: own[section] for section in ("algo", "model", "trainer") if section in own})
    search = yaml.safe_load((conf_dir() / "hparams_search" / f"coldstart_{algo}.yaml").read_text())
    searched = {k for k in search["hydra"]["sweeper"]["params"] if not k.startswith("+")}
    assert set(flat) == searched
    for key, value in flat.items():
        assert OmegaConf.select(tuned, key) == value
    # everything else is the ML-100K preset's
    for key in ("algo", "model", "trainer"):
        a, b = OmegaConf.to_container(tuned[key]), OmegaConf.to_container(base[key])
        for k in [k for k in flat if k.startswith(f"{key}.")]:
            _drop(a, k.split(".")[1:])
            _drop(b, k.split(".")[1:])
        assert a == b


@pytest.mark.parametrize("dataset, experiment", DATASET_STUDIES.items())
def test_dataset_studies_sweep_their_own_presets(dataset: str, experiment: str) -> None:
    cfg = compose(f"experiment={experiment}", "logger=none", hydra=True)
    swept = str(cfg.hydra.sweeper.params["+coldstart"]).split(",")
    for choice in swept:
        if choice != "popularity":  # popularity has no knob to tune
            assert choice.startswith(f"{dataset}/"), choice
            assert (conf_dir() / "coldstart" / f"{choice}.yaml").is_file()


def _flatten(tree: dict) -> dict:
    """``{"algo": {"meta_optimizer": {"lr": x}}}`` -> ``{"algo.meta_optimizer.lr": x}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten({f"{key}.{k}": v for k, v in value.items()}))
        else:
            out[key] = value
    return out


def _drop(tree: dict, path: list[str]) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree.pop(path[-1], None)
