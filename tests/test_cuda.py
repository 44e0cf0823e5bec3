"""The CUDA path: every algorithm with every model it supports trains and tests on a GPU and
gives the CPU's numbers (float64, same seeds). Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from metarec_runner.algos.compat import builtin_classes, compatible
from metarec_runner.paths import group_options
from tests.helpers import compose
from tests.test_runner import _fit_test

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)"),
]

#: the reference scorers (random, constant, oracle, ...) do not train; the toy run tests them
TRAINED = ["maml", "fomaml", "reptile", "metasgd", "melu", "protonet", "matchingnet", "global",
           "finetune"]
ALGOS, MODELS = builtin_classes("algo"), builtin_classes("model")
ADAPT = {a: compose(f"+algo={a}", "logger=none").algo.get("adapt") for a in TRAINED}  # the presets'
PAIRS = [(a, m) for a in TRAINED for m in group_options("model")
         if compatible(ALGOS[a], MODELS[m], ADAPT[a])
         and not (a == "melu" and m != "melu")]  # the melu preset pins its own model
SHORT = ["trainer.max_epochs=2", "dtype=float64"]


def _same(cpu: dict, gpu: dict, tol: float = 1e-6) -> list[str]:
    """Keys whose values differ by more than ``tol`` (NaN equals NaN; timings ignored)."""
    bad = []
    for key, a in cpu.items():
        if key.startswith("sys/") or "seconds" in key or "per_s" in key:
            continue
        b = gpu[key]
        if not (math.isnan(a) and math.isnan(b)) and abs(a - b) > tol * max(1.0, abs(a)):
            bad.append(f"{key}: cpu {a} cuda {b}")
    return bad


@pytest.mark.parametrize(("algo", "model"), PAIRS, ids=[f"{a}-{m}" for a, m in PAIRS])
def test_cuda_matches_cpu(algo, model):
    overrides = [f"+algo={algo}", *SHORT] + ([] if algo == "melu" else [f"model={model}"])
    _, _, cpu = _fit_test(*overrides, "device=cpu")
    prep, _, gpu = _fit_test(*overrides, "device=cuda")
    assert prep.device.type == "cuda"
    assert next(prep.algo.model.parameters()).device.type == "cuda"
    assert not _same(cpu.summary, gpu.summary), _same(cpu.summary, gpu.summary)


@pytest.mark.parametrize("scope", ["algo.adapt=all", "algo.adapt=all algo.touched_rows=false"])
def test_cuda_all_parameter_adaptation_matches_cpu(scope):
    overrides = ["+algo=maml", *SHORT, *scope.split()]
    _, _, cpu = _fit_test(*overrides, "device=cpu")
    _, _, gpu = _fit_test(*overrides, "device=cuda")
    assert not _same(cpu.summary, gpu.summary), _same(cpu.summary, gpu.summary)


def test_device_auto_picks_the_gpu():
    prep, _, result = _fit_test("+algo=fomaml", "trainer.max_epochs=1", "device=auto")
    assert prep.device.type == "cuda" and math.isfinite(result.summary["test/rmse"])
