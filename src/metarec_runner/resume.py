"""``trainer.resume=<path|run id|latest>``: find the ``last.pt`` to continue, and check it fits.

A resumed run continues the same MLflow run (same run id, metric history continued, no step logged
twice) from the last completed epoch. It must be the same experiment: the composed config (apart
from the keys in :data:`MAY_DIFFER`), the dataset checksum and the split hash must equal the
checkpoint's; ``trainer.resume_force=true`` overrides that check. A run that is still RUNNING
with a live process on this host is refused; one whose process is gone is taken over.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarec_runner.checkpoint import LAST, Checkpoint, CheckpointError, load_checkpoint

MAY_DIFFER = ("trainer.resume", "trainer.resume_force", "trainer.max_epochs", "trainer.progress",
              "logger", "paths", "threads", "run_name", "hydra")
"""Config keys (and key prefixes) a resumed run may change: where it logs, how long it runs."""

CHECKPOINT_ARTIFACTS = "checkpoints"
"""The MLflow artifact folder of ``last.pt`` and ``best.pt``."""


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to continue from, and the MLflow run it belongs to (``None``: untracked)."""

    checkpoint: Checkpoint
    path: Path
    run_id: str | None


def flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for a nested dict (lists stay values)."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flat(value, name) if isinstance(value, dict) else {name: value})
    return out


def _may_differ(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_DIFFER)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that differs, except :data:`MAY_DIFFER`."""
    a, b = flat(saved), flat(current)
    keys = sorted(k for k in set(a) | set(b) if not _may_differ(k) and a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys]


def check_fits(point: ResumePoint, config: dict[str, Any], data_checksum: str, split_hash: str,
               force: bool) -> None:
    """Refuse (CheckpointError, one line) a checkpoint of another config, dataset or split."""
    if force:
        return
    meta = point.checkpoint.meta
    fix = "resume with the same settings, or add trainer.resume_force=true to resume anyway"
    if meta.get("data_checksum") != data_checksum:
        raise CheckpointError(f"{point.path}: trained on dataset checksum {meta.get('data_checksum')}, this run "
                              f"has {data_checksum}; {fix}")
    if meta.get("split_hash") != split_hash:
        raise CheckpointError(f"{point.path}: trained on split {meta.get('split_hash')}, this run has "
                              f"{split_hash}; {fix}")
    diff = config_differences(meta.get("config") or {}, config)
    if diff:
        more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
        raise CheckpointError(f"{point.path}: another config: {diff[0]}{more}; {fix}")


def process_alive(tags: dict[str, str]) -> bool:
    """Whether the run's recorded process (``metarec.pid`` on ``metarec.host``) still runs here
    (not this process, and not a zombie: :func:`~metarec_runner.tracking.stale_runs.pid_alive`)."""
    from metarec_runner.tracking.lifecycle import HOST_TAG, PID_TAG
    from metarec_runner.tracking.stale_runs import pid_alive

    pid, host = tags.get(PID_TAG, ""), tags.get(HOST_TAG)
    if not pid.isdigit() or host != socket.gethostname():
        return False
    return int(pid) != os.getpid() and pid_alive(int(pid))


def resolve(spec: str, tracking_uri: str | None, experiment: str | None, run_name: str | None) -> ResumePoint:
    """The ``last.pt`` that ``trainer.resume`` names (``best.pt`` lookups for serving and
    re-evaluation: :func:`metarec_runner.serve.locate.resolve_checkpoint`).

    Args:
        spec: a checkpoint path, a run folder holding a ``last.pt``, an MLflow run id, or
            ``latest``: the newest unfinished run of this experiment with this run name.
        tracking_uri, experiment, run_name: the run's store, experiment and name (``None`` when
            untracked: then only paths work).
    """
    filename = LAST
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / filename
    if path.suffix == ".pt" or path.exists():
        ckpt = load_checkpoint(path)
        return ResumePoint(ckpt, path, ckpt.meta.get("run_id") or None)
    if tracking_uri is None:
        raise CheckpointError(f"trainer.resume: {spec!r} is not a checkpoint file or run folder (and logger=none "
                              "has no run ids); give the path of a last.pt")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if spec == "latest":
        run = _latest(client, experiment, run_name)
    else:
        try:
            run = client.get_run(spec)
        except MlflowException:
            raise CheckpointError(f"trainer.resume: no run {spec!r} in {tracking_uri}; give a run id "
                                  "(metarec compare lists them), a last.pt path, or latest") from None
    if run.info.status == "RUNNING" and process_alive(run.data.tags):
        raise CheckpointError(f"trainer.resume: run {run.info.run_id} is still running (pid "
                              f"{run.data.tags.get('metarec.pid')}); stop it first")
    path = _checkpoint_path(client, run, filename)
    return ResumePoint(load_checkpoint(path), path, run.info.run_id)


def _latest(client: Any, experiment: str | None, run_name: str | None):
    exp = client.get_experiment_by_name(experiment) if experiment else None
    if exp is None:
        raise CheckpointError(f"trainer.resume=latest: no experiment {experiment!r} in the store yet; "
                              "give a run id or a last.pt path")
    name = f" and tags.`mlflow.runName` = '{run_name}'" if run_name else ""
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.status != 'FINISHED'{name}",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if _local(run, LAST) is not None or _has_artifact(client, run, LAST):
            return run
    raise CheckpointError(f"trainer.resume=latest: no unfinished run named {run_name!r} with a checkpoint in "
                          f"experiment {experiment!r}; give a run id or a last.pt path")


def _local(run, filename: str) -> Path | None:
    folder = run.data.tags.get("output_dir")
    path = Path(folder) / filename if folder else None
    return path if path is not None and path.is_file() else None


def _has_artifact(client: Any, run, filename: str) -> bool:
    try:
        listed = client.list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACTS)
    except Exception:  # noqa: BLE001  (an artifact store that cannot be listed has none for us)
        return False
    return any(Path(f.path).name == filename for f in listed)


def _checkpoint_path(client: Any, run, filename: str) -> Path:
    local = _local(run, filename)
    if local is not None:
        return local
    if not _has_artifact(client, run, filename):
        raise CheckpointError(f"run {run.info.run_id} has no {filename} (neither in "
                              f"{run.data.tags.get('output_dir', 'its output folder')} nor among its "
                              "artifacts); it was trained before checkpoints existed or with trainer.checkpoint=false")
    target = tempfile.mkdtemp(prefix="metarec-checkpoint-")
    return Path(client.download_artifacts(run.info.run_id, f"{CHECKPOINT_ARTIFACTS}/{filename}", target))

