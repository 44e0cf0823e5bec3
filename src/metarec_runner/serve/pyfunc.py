"""The best model of a run as an MLflow pyfunc model: ``mlflow models serve`` answers new users.

:func:`log_pyfunc_model` saves a pyfunc model (:class:`RecommenderModel`, with ``best.pt`` as its
one artifact) and logs it under the run's ``model/`` artifacts, so that::

    mlflow.pyfunc.load_model("runs:/<run id>/model").predict(frame, params={"n": 10})
    mlflow models serve -m runs:/<run id>/model --env-manager local -p 5001
    curl -X POST localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["item", "rating"], "data": [["50", 5], ["181", 4]]},
              "params": {"n": 5}}'

answer with the same table as :meth:`Recommender.recommend`.

Signature. Input: one user's support rows, columns ``item`` (raw item id, string or integer)
or ``title`` (string), and ``rating`` (a number; typed ``Any`` because MLflow would refuse JSON
integers for a ``double`` column), plus optional user-feature columns (``Any``; the first
non-empty value of each is the user's); rows without an item only carry features (a table of
feature rows alone, or no rows, is the zero-shot answer). Every column is optional; the model
checks the values itself and answers bad ones with one
:class:`~metarec_runner.serve.vocab.ServeError` line. Params: ``n`` (long, default 10).
Output: ``rank`` (long), ``item`` (string), ``title`` (string, empty where the dataset has
none), ``score`` (double).

Packaging: the model is MLflow's "models from code" (``python_model`` is the path of
:mod:`~metarec_runner.serve.pyfunc_entry`, which builds a :class:`RecommenderModel`), so nothing
is pickled, in keeping with the checkpoint's ``weights_only`` reads; ``best.pt`` is its one
artifact. It runs where ``metarec-runner`` is installed (the package is imported, not copied:
``code_paths`` would put a second copy before the installed one on ``sys.path``); its
``requirements.txt`` pins the versions it was saved with, and nothing is inferred or installed
(serve with ``--env-manager local``).
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

ARTIFACT = "checkpoint"
"""The pyfunc artifact key of ``best.pt``."""

MODEL_PATH = "model"
"""Where :func:`log_pyfunc_model` puts the model among the run's artifacts."""

ENTRY = Path(__file__).with_name("pyfunc_entry.py")
"""The model's code file (MLflow "models from code": nothing is pickled)."""


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """A pyfunc wrapper of :class:`~metarec_runner.serve.recommender.Recommender` (one user per call)."""

    def load_context(self, context: Any) -> None:
        """Rebuild the recommender from the model's ``checkpoint`` artifact (a ``best.pt``)."""
        from metarec_runner.checkpoint import load_checkpoint
        from metarec_runner.serve.recommender import Recommender

        path = Path(context.artifacts[ARTIFACT])
        self.recommender = Recommender.from_checkpoint(load_checkpoint(path), path=path)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Top-N table ``[rank, item, title, score]`` for the user whose support rows (and
        features) ``model_input`` holds; ``params["n"]`` items (default 10). Bad input raises an
        ``MlflowException`` whose message is the one-line :class:`ServeError` (a 400 over REST)."""
        from mlflow.exceptions import MlflowException

        from metarec_runner.errors import MetarecError

        try:
            return self._predict(model_input, params)
        except MetarecError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None

    def _predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None) -> pd.DataFrame:
        rec = self.recommender
        frame = pd.DataFrame(model_input)
        n = int((params or {}).get("n", 10))
        features: dict[str, str] = {}
        for name in rec.user_features:
            if name in frame.columns:
                given = [v for v in frame[name].tolist() if v is not None and str(v).strip() and str(v) != "nan"]
                if given:
                    features[name] = str(given[0])
        by = [c for c in ("item", "title") if c in frame.columns]
        ratings = None
        if by:  # the support rows: those that name an item (the rest carry features only)
            present = frame[by[0]].map(lambda v: v is not None and str(v).strip() not in ("", "nan"))
            rows = frame[present.to_numpy(bool)]
            ratings = rows[[*by, "rating"]] if "rating" in rows.columns else rows[by]
        out = rec.recommend(ratings, n=n, user_features=features)
        out["title"] = out["title"].fillna("")
        return out


def signature(user_features: tuple[str, ...]):
    """The model signature (see the module docstring)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = Schema([ColSpec(AnyType(), "item", required=False), ColSpec("string", "title", required=False),
                     ColSpec(AnyType(), "rating", required=False),
                     *[ColSpec(AnyType(), f, required=False) for f in user_features]])
    outputs = Schema([ColSpec("long", "rank"), ColSpec("string", "item"), ColSpec("string", "title"),
                      ColSpec("double", "score")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("n", "long", 10)]))


def requirements() -> list[str]:
    """Pinned requirements of the model (the running environment's versions; nothing inferred)."""
    pins = []
    for name in ("metarec-runner", "torch", "mlflow", "pandas", "numpy", "omegaconf", "hydra-core"):
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def save_pyfunc_model(path: str | Path, best_pt_path: str | Path) -> Path:
    """Save ``best.pt`` as a pyfunc model folder at ``path`` (which must not exist or be empty).

    Raises:
        CheckpointError: ``best_pt_path`` is not a readable metarec checkpoint (checked first,
            so a broken file is never packaged).
    """
    from metarec_runner.checkpoint import CheckpointError, load_checkpoint
    from metarec_runner.serve.vocab import Vocabulary

    ckpt = load_checkpoint(best_pt_path)
    if "vocabulary" not in ckpt.meta:
        raise CheckpointError(f"{best_pt_path}: no vocabulary (written before serving existed); train again")
    vocab = Vocabulary(ckpt.meta["vocabulary"])
    example = pd.DataFrame({"item": vocab.item_ids[:2], "rating": [vocab.rating_scale[1], vocab.rating_scale[0]]})
    mlflow.pyfunc.save_model(
        path=str(path), python_model=str(ENTRY), artifacts={ARTIFACT: str(best_pt_path)},
        signature=signature(vocab.user_fields), input_example=example, pip_requirements=requirements(),
        metadata={"metarec_run_id": str(ckpt.meta.get("run_id")), "metarec_algo": str(ckpt.meta.get("algo_class"))},
    )
    return Path(path)


def log_pyfunc_model(tracker_or_client: Any, run_id: str, best_pt_path: str | Path,
                     artifact_path: str = MODEL_PATH) -> str | None:
    """Log ``best.pt`` as the pyfunc model ``runs:/<run_id>/<artifact_path>``.

    Args:
        tracker_or_client: an :class:`~metarec_runner.tracking.mlflow_tracker.MlflowTracker` of
            the run, an ``MlflowClient``, or a tracking URI.
        run_id: the run to log into (finished or not).
        best_pt_path: the run's ``best.pt``.
        artifact_path: the artifact folder of the model.

    Returns:
        The model URI, or None when there is no run to log into (``logger=none``).
    """
    if not run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="metarec-pyfunc-") as tmp:
        local = save_pyfunc_model(Path(tmp) / artifact_path, best_pt_path)
        target = tracker_or_client
        if isinstance(target, str):
            from mlflow.tracking import MlflowClient

            target = MlflowClient(tracking_uri=target)
        if getattr(target, "run_id", None) == run_id:  # a tracker: logs into its own run
            target.log_artifacts(local, artifact_path)
        else:
            target.log_artifacts(run_id, str(local), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"
