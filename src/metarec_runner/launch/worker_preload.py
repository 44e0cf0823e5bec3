"""What every sweep job imports, loaded once in the fork server of the joblib launcher's workers.

Imported by :class:`~metarec_runner.launch.callbacks.PrewarmWorkers`'s fork server, never by
a job itself: the workers forked from that server start with these modules in memory instead of
importing them afresh (several seconds each: torch, the ``torch._dynamo`` that ``torch.optim``
imports on its first optimizer, MLflow's client, matplotlib with its font cache, metarec's run
module). Drawing one small figure here also loads the fonts and the Agg renderer.

Nothing here starts a thread or touches torch's thread pools, so forking from it is safe.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch._dynamo  # noqa: F401  (torch.optim imports it on the first optimizer)
from mlflow.tracking import MlflowClient  # noqa: F401  (the tracker's client)

import metarec_runner.run  # noqa: F401  (the job: data, models, algorithms, evaluation)


def _draw_once() -> None:
    """Render one tiny figure with a legend (fonts, text layout, PNG writer)."""
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1], label="x")
    ax.legend()
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


try:
    _draw_once()
except Exception:  # noqa: BLE001, S110  (a warm-up only: the fork server must not die of it)
    pass
