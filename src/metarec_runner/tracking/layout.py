"""How a run is laid out in MLflow: which config keys are params and which are tags, and which of
the evaluator's numbers become metrics (the rest go into tables).

The evaluator's in-memory summary (``EvalResult.summary``, ``metrics.json``) keeps every
number under its own name: ``test/<m>``, ``test/<m>_ci95``, ``test/ref/<scorer>/<m>``,
``test_k<k>/<m>``... MLflow gets a small, readable set (about 60 keys on the default toy run):

============================  ==========================================================
MLflow metric                 what
============================  ==========================================================
``train/<stat>``              per epoch (step = epoch): the algorithm's losses
``sys/train_tasks_per_sec``   per epoch: throughput (``sys/peak_gpu_mb`` on CUDA)
``val/<m>``                   per epoch: every validation metric (their intervals are in
                              ``history.csv``)
``val/best_<m>``              per epoch: the best monitored value so far
``val/best_epoch``            once: the selected epoch
``test/<m>``                  once (step = best epoch): the test means
``ci95/test/<m>``             once: their 95% interval half-widths over test users
``ref/constant/rmse``,        once: headline reference scorers (all of them, with their
``ref/random/<ranking m>``    intervals, are in the ``test_metrics`` table)
``test_k<k>/<headline m>``    once per k (``evaluator.shots``): headline few-shot results
                              (every metric at every k: ``few_shot.csv``)
``test_steps<s>/<headline>``  once per s (``evaluator.adaptation_steps``): the same for
                              the adaptation curve (``adaptation.csv``)
============================  ==========================================================

Params are the configuration (the flattened config, plus the group choices ``algo``,
``model``, ``dataset``, ``splitter``, ``evaluator`` as values such as ``algo=maml``); machine
paths (``paths.*``, data and output folders, the tracking URI, the artifact location) are
tags, so two runs of the same experiment on two machines have the same params.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

CI_PREFIX = "ci95/"  # ci95/test/<m>: the interval half-widths, apart from the means
REF_PREFIX = "ref/"  # ref/<scorer>/<m>: the headline reference scorers
REFERENCES = ("random", "constant", "popularity", "oracle")
CHOICE_PARAMS = ("algo", "model", "dataset", "splitter", "evaluator", "experiment", "coldstart")
RATING_METRICS = ("rmse", "mae")
_CI_SUFFIXES = ("_ci95", "_ci_lo", "_ci_hi")
_PATH_LEAVES = frozenset({"data_dir", "output_dir", "output_root", "cache_dir", "root", "path",
                          "tracking_uri", "artifact_location"})
_CURVE_SPLIT = re.compile(r"^test_(k|steps)\d+$")


def is_machine_path(key: str) -> bool:
    """Whether a flattened config key holds a path of this machine (logged as a tag)."""
    parts = key.split(".")
    return parts[0] == "paths" or parts[-1] in _PATH_LEAVES or parts[-1].endswith("_dir")


def split_params(flat: Mapping[str, object]) -> tuple[dict[str, str], dict[str, str]]:
    """``(params, tags)`` of a flattened config: machine paths go to the tags."""
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    for key, value in flat.items():
        (tags if is_machine_path(key) else params)[key] = str(value)
    return params, tags


def choice_params(choices: Mapping[str, str]) -> dict[str, str]:
    """The group choices as params (``algo: maml``), unset groups left out."""
    return {k: str(choices[k]) for k in CHOICE_PARAMS if choices.get(k) not in (None, "None", "null")}


def headline_metrics(names: Iterable[str], monitor: str | None = None) -> list[str]:
    """The metrics shown first and logged for every curve point: the monitored metric, RMSE
    when predicted, and one NDCG (at 10 when computed, else the first cut-off)."""
    names = list(names)
    out: list[str] = []
    base = monitor.split("/", 1)[-1] if monitor else None
    ndcg = [n for n in names if n.startswith("ndcg_at_")]
    for name in (base, "rmse", "ndcg_at_10" if "ndcg_at_10" in ndcg else (ndcg[0] if ndcg else None)):
        if name and name in names and name not in out:
            out.append(name)
    if not out and names:
        out.append(names[0])
    return out


def _base(name: str) -> str:
    for suffix in _CI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_metrics(summary: Mapping[str, float], headline: Sequence[str]) -> dict[str, float]:
    """The MLflow metrics of a test summary (see the module docstring): ``test/<m>``,
    ``ci95/test/<m>`` and the headline references; curve splits (``test_k<k>``,
    ``test_steps<s>``) keep only their headline metrics, without intervals."""
    refs = {f"constant/{m}" for m in RATING_METRICS if m in headline or m == "rmse"}
    refs |= {f"{r}/{m}" for r in ("random", "popularity") for m in headline if m not in RATING_METRICS}
    out: dict[str, float] = {}
    for key, value in summary.items():
        split, _, name = key.partition("/")
        if name.startswith(REF_PREFIX):
            if split == "test" and name[len(REF_PREFIX):] in refs:
                out[name] = value
            continue
        if _CURVE_SPLIT.match(split):
            if name in headline:
                out[key] = value
            continue
        if name.endswith("_ci95"):
            if name != "floor_rmse_ci95":
                out[f"{CI_PREFIX}{split}/{_base(name)}"] = value
        elif not name.endswith(_CI_SUFFIXES):
            out[key] = value
    return out


def epoch_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The per-epoch MLflow metrics of one history row: no interval columns, no constant noise
    floor, no seconds per step (all of them stay in ``history.csv``)."""
    drop = ("val/floor_rmse", "sys/sec_per_outer_step")
    return {k: v for k, v in metrics.items() if not k.endswith(_CI_SUFFIXES) and k not in drop}


def _cell(summary: Mapping[str, float], key: str) -> float:
    value = summary.get(key)
    return float(value) if value is not None else math.nan


def results_table(summary: Mapping[str, float], metric_names: Sequence[str], split: str = "test") -> pd.DataFrame:
    """One row per metric: ``metric, mean, ci95`` (``ci_lo``, ``ci_hi`` with a bootstrap) and
    the reference scorers' means (``random``, ``constant``, ``oracle``) on the same items.

    The oracle's RMSE and MAE are 0 (it scores the query items by their true rating); the
    constant's are the train-mean predictor's (``ref/constant/<m>``); random has none.
    """
    refs = [r for r in REFERENCES if any(k.startswith(f"{split}/ref/{r}/") for k in summary)]
    boot = any(k.endswith("_ci_lo") for k in summary)
    rows = []
    for m in metric_names:
        if f"{split}/{m}" not in summary:
            continue
        row: dict[str, object] = {"metric": m, "mean": _cell(summary, f"{split}/{m}"),
                                  "ci95": _cell(summary, f"{split}/{m}_ci95")}
        if boot:
            row["ci_lo"], row["ci_hi"] = _cell(summary, f"{split}/{m}_ci_lo"), _cell(summary, f"{split}/{m}_ci_hi")
        for r in refs:
            row[r] = _cell(summary, f"{split}/ref/{r}/{m}")
            if r == "oracle" and m in RATING_METRICS:
                row[r] = 0.0
        rows.append(row)
    return pd.DataFrame(rows, columns=["metric", "mean", "ci95", *(["ci_lo", "ci_hi"] if boot else []), *refs])


def dataset_input(name: str, digest: str, context: str, source: Mapping[str, str],
                  profile: Mapping[str, object] | None = None, tags: Mapping[str, str] | None = None):
    """An MLflow ``DatasetInput`` that describes a dataset without holding its data: ``name``,
    ``digest`` (at most 36 characters), a code source tagged with ``source``, a JSON
    ``profile``, linked with the context ``context`` (``mlflow.data.context``) and ``tags``."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag

    src = CodeDatasetSource(tags={k: str(v) for k, v in source.items()})
    entity = Dataset(name=name, digest=digest[:36], source_type=src._get_source_type(), source=src.to_json(),
                     schema=None, profile=json.dumps(dict(profile)) if profile is not None else None)
    input_tags = [InputTag("mlflow.data.context", context), *(InputTag(k, str(v)) for k, v in (tags or {}).items())]
    return DatasetInput(entity, input_tags)
