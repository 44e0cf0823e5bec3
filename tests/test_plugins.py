"""The plugin contract (README "Your own model or algorithm"): a model with only ``__init__`` and
``forward`` and a subclass of a built-in algorithm, both outside the package, found through
``_target_`` and ``hydra.searchpath``, train end to end through the CLI into the MLflow store."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.helpers import METAREC, metarec_env

PLUGIN = '''
import torch
from torch import nn

from metarec_runner.algos.maml import MAML


class ItemBiasModel(nn.Module):
    """score = mean rating + item bias + <user vector, item vector>."""

    def __init__(self, schema, rating_mean: float, dim: int = 8) -> None:
        super().__init__()
        n_items = schema.cardinalities[-1]  # the item id is the last column of a feature row
        self.bias = nn.Parameter(torch.zeros(n_items))
        self.items = nn.Parameter(0.1 * torch.randn(n_items, dim))
        self.user = nn.Parameter(torch.zeros(dim))
        self.mean = rating_mean

    def forward(self, x):
        item = x[..., -1]
        return self.mean + self.bias[item] + self.items[item] @ self.user


class MyMAML(MAML):
    """Inherits MAML's capabilities through the MRO."""
'''


def _plugin(tmp_path: Path) -> tuple[Path, Path]:
    pkg, conf = tmp_path / "pkg", tmp_path / "conf"
    pkg.mkdir()
    (pkg / "my_plugin.py").write_text(PLUGIN)
    (conf / "model").mkdir(parents=True)
    (conf / "algo").mkdir()
    (conf / "model" / "item_bias.yaml").write_text(
        "_target_: my_plugin.ItemBiasModel  # the plugin model\ndim: 8  # vector size\n")
    (conf / "algo" / "my_maml.yaml").write_text(textwrap.dedent("""\
        defaults:            # start from the built-in maml preset
          - maml
          - _self_
        _target_: my_plugin.MyMAML  # the plugin subclass
        adapt: all           # the plugin model has no body/head split
        touched_rows: false  # nor a field-embedding layer
        """))
    return pkg, conf


@pytest.mark.slow
def test_a_plugin_model_and_algorithm_train_end_to_end(tmp_path: Path) -> None:
    pkg, conf = _plugin(tmp_path)
    env = metarec_env(tmp_path / "out", PYTHONPATH=f"{pkg}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([*METAREC, "train", "+algo=my_maml", "model=item_bias",
                          f"hydra.searchpath=[file://{conf}]", "dataset.n_users=150",
                          "trainer.max_epochs=2", "trainer.progress=false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    # a foreign module gets no fast path: it is trained through functional_call on its forward
    assert run.data.params["inner_loop"] == "functional"
    assert run.data.tags["algo"] == "my_maml" and run.data.tags["model"] == "item_bias"
    assert 0.0 < run.data.metrics["test/rmse"] < 3.0
    # the plugin subclass keeps MAML's compatibility: the plugin model under adapt=head has no head
    bad = subprocess.run([*METAREC, "train", "+algo=my_maml", "model=item_bias", "algo.adapt=head",
                          f"hydra.searchpath=[file://{conf}]", "logger=none"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert bad.stderr.startswith("metarec: error: algo.")
