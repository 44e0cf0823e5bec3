"""Which ``best.pt`` a run spec names: a path, a run folder, an MLflow run id, or ``latest``.

Nothing is written to the tracking store: a sqlite store that does not exist is reported, not
created. A run whose folder (its ``output_dir`` tag) is gone is read from its artifacts
(``checkpoints/best.pt``, downloaded to a temporary folder).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from metarec_runner.checkpoint import BEST
from metarec_runner.resume import CHECKPOINT_ARTIFACTS
from metarec_runner.serve.vocab import ServeError

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_checkpoint(run: str | Path, tracking_uri: str | None = None) -> Path:
    """The ``best.pt`` that ``run`` names.

    Args:
        run: a ``best.pt`` (or any checkpoint) path, a run folder holding ``best.pt``, an MLflow
            run id, or ``latest`` (the newest FINISHED run of the store that has a ``best.pt``).
        tracking_uri: the store of run ids (default: the one ``metarec train`` writes to).

    Raises:
        ServeError: one line naming what was not found and what to give instead.
    """
    spec = str(run).strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / BEST).is_file():
            raise ServeError(f"{path}: no {BEST} in this folder; train with trainer.checkpoint=true or give a "
                             "run folder of `metarec train`")
        return path / BEST
    if path.is_file() or path.suffix == ".pt":
        return path  # load_checkpoint names a missing or corrupt file
    if spec != "latest" and not _RUN_ID.match(spec):
        raise ServeError(f"--run {spec!r}: no such file or folder, and not an MLflow run id; give a run id, "
                         "latest, a run folder or a best.pt path")
    client, uri = _client(tracking_uri)
    run_info = _latest(client, uri) if spec == "latest" else _get_run(client, spec, uri)
    return _checkpoint_of(client, run_info)


def _client(tracking_uri: str | None) -> tuple[Any, str]:
    from metarec_runner.paths import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ServeError(f"no MLflow store at {uri}; train a run first (`metarec train`) or pass --tracking-uri")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri), uri


def _get_run(client: Any, run_id: str, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ServeError(f"--run {run_id}: no such run in {uri}; give a run id (`metarec compare` lists "
                         "finished runs), latest, or a best.pt path") from None


def _latest(client: Any, uri: str) -> Any:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200) if experiments else []
    for run in runs:
        if _local_best(run) is not None or _has_artifact(client, run.info.run_id):
            return run
    raise ServeError(f"--run latest: no FINISHED run with a {BEST} in {uri}; train one with `metarec train` "
                     "or give a best.pt path")


def _local_best(run: Any) -> Path | None:
    folder = run.data.tags.get("output_dir")
    path = Path(folder) / BEST if folder else None
    return path if path is not None and path.is_file() else None


def _has_artifact(client: Any, run_id: str) -> bool:
    try:
        return any(Path(f.path).name == BEST for f in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS))
    except Exception:  # noqa: BLE001  (an artifact store that cannot be listed holds nothing for us)
        return False


def _checkpoint_of(client: Any, run: Any) -> Path:
    local = _local_best(run)
    if local is not None:
        return local
    run_id = run.info.run_id
    if not _has_artifact(client, run_id):
        raise ServeError(f"--run {run_id}: the run has no {BEST} (neither in its folder nor among its artifacts); "
                         "it was trained with trainer.checkpoint=false, before checkpoints existed, or is a "
                         "sweep's parent run")
    target = tempfile.mkdtemp(prefix="metarec-serve-")
    return Path(client.download_artifacts(run_id, f"{CHECKPOINT_ARTIFACTS}/{BEST}", target))
