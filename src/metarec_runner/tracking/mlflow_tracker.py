"""MLflow tracking through ``MlflowClient`` only: buffered metrics, immutable params, sweep parents.

``mlflow`` is imported lazily (it takes seconds), and no fluent ``mlflow.start_run`` state is
used, so several runs can be tracked one after another in one process (Hydra multirun).

Parallel jobs share a sqlite store safely: a new store is created once under a file lock, and
every store call is retried while sqlite reports ``database is locked``
(:mod:`metarec_runner.tracking.sqlite_store`). Every run, and a sweep's parent, carries its
pid, host and a heartbeat refreshed while it is open (:mod:`metarec_runner.tracking.lifecycle`),
so a run whose process died can be told from a running one (``metarec runs clean``).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metarec_runner.errors import MetarecError
from metarec_runner.tracking.flatten import flatten_config
from metarec_runner.tracking.lifecycle import HEARTBEAT_TAG, Heartbeat, liveness_tags
from metarec_runner.tracking.quiet import quiet_store_logs
from metarec_runner.tracking.sqlite_store import RetryingClient, ensure_store
from metarec_runner.tracking.ui_views import ensure_runs_view

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.tracking import MlflowClient

PARENT_FILE = "mlflow_parent.json"
PARENT_TAG = "mlflow.parentRunId"
STATUSES = ("FINISHED", "FAILED", "KILLED")
_METRIC_KEY = re.compile(r"^[/\w.\- :]+$")  # the characters MLflow accepts: no '@'


@dataclass(frozen=True)
class SweepParent:
    """The parent run of a sweep, shared with its jobs through ``mlflow_parent.json``."""

    run_id: str
    experiment_id: str
    tracking_uri: str


class MlflowTracker:
    """One MLflow run (or a sweep's parent run), written through ``MlflowClient``.

    Args:
        tracking_uri: explicit store URI, e.g. ``sqlite:////abs/mlflow.db`` (a relative sqlite
            path is made absolute against the current directory).
        experiment: experiment name, created on first use.
        run_name: the run's ``mlflow.runName``.
        artifact_location: artifact root, used only when the experiment is created; a local
            folder is ignored for a remote (http) tracking server, which stores artifacts itself.
        log_model: at the end of a run, log its ``best.pt`` as an MLflow pyfunc model
            (``runs:/<id>/model``: ``mlflow models serve`` answers over REST).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None = None,
                 artifact_location: str | None = None, log_model: bool = True) -> None:
        self.log_model = bool(log_model)  # log best.pt as an MLflow pyfunc model at the end of a run
        self.tracking_uri = _absolute_uri(tracking_uri)
        self.experiment, self.run_name = experiment, run_name
        self.artifact_location = artifact_location
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client_obj: MlflowClient | None = None
        self._buffer: list[tuple[str, float, int, int]] = []  # key, value, timestamp ms, step
        self._finished = False
        self._beats: dict[str, Heartbeat] = {}  # open run id (this run, a sweep parent) -> heartbeat

    @property
    def _client(self) -> MlflowClient:
        """The store's client: a sqlite store made ready once (under its lock), calls retried
        while sqlite reports busy."""
        if self._client_obj is None:
            from mlflow.tracking import MlflowClient

            quiet_store_logs()
            ensure_store(self.tracking_uri)
            client = MlflowClient(tracking_uri=self.tracking_uri)
            self._client_obj = RetryingClient(client, self.tracking_uri)  # type: ignore[assignment]
        return self._client_obj

    def _create_run(self, experiment_id: str, tags: Mapping[str, str], run_name: str | None) -> str:
        """Create a run tagged with this process's pid, host and a first heartbeat, start its
        heartbeat, and return its id."""
        run = self._client.create_run(experiment_id, tags={**tags, **liveness_tags()}, run_name=run_name)
        self._start_heartbeat(run.info.run_id)
        return run.info.run_id

    def _start_heartbeat(self, run_id: str) -> None:
        """Beat for ``run_id`` from a daemon thread (and from :meth:`flush`) until it ends."""
        beat = Heartbeat(lambda value: self._client.set_tag(run_id, HEARTBEAT_TAG, value))
        beat.start()
        self._beats[run_id] = beat

    def _end_run(self, run_id: str, status: str) -> None:
        """Stop the run's heartbeat, then end the run with ``status``."""
        if (beat := self._beats.pop(run_id, None)) is not None:
            beat.stop()
        self._client.set_terminated(run_id, status)

    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MlflowTracker.start() must be called first")
        return self.run_id

    def _batch(self, kind: str, items: Sequence[Any], size: int) -> None:
        """``log_batch`` ``items`` as ``kind`` (metrics/params/tags), ``size`` per call."""
        for i in range(0, len(items), size):
            self._client.log_batch(self._run(), **{kind: items[i:i + size]}, synchronous=True)

    def _ensure_experiment(self) -> str:
        """The experiment's id, creating it if absent.

        Race-free: when a parallel job creates the same name first, ``create_experiment`` fails
        (the name is unique in the store) and the experiment that job created is read instead.
        """
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                location = self.artifact_location
                remote = self.tracking_uri.startswith(("http://", "https://", "databricks"))
                if location is not None and "://" not in location:
                    # a local folder is the client's: a tracking server keeps its own artifact root
                    location = None if remote else Path(location).resolve().as_uri()
                created = self._client.create_experiment(self.experiment, location)
                ensure_runs_view(self._client, created, {})
                return created
            except Exception:  # already exists (MLflow's error, or the database's unique constraint)
                if (exp := self._client.get_experiment_by_name(self.experiment)) is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise MetarecError(
                f"MLflow experiment {self.experiment!r} is deleted in {self.tracking_uri}; "
                "restore it (`mlflow experiments restore`) or choose another experiment name")
        ensure_runs_view(self._client, exp.experiment_id, exp.tags)
        return exp.experiment_id

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
              parent: SweepParent | None = None) -> str:
        """Create the run, log ``params`` flattened (once) and return the run id.

        Args:
            params: the run's config, nested or flat (see :func:`flatten_config`).
            tags: extra run tags.
            parent: the sweep's parent run; the run becomes its child, in its experiment.
        """
        if self.run_id is not None:
            raise RuntimeError(f"run {self.run_id} already started; use a new MlflowTracker")
        from mlflow.entities import Param

        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent is None:
            self.experiment_id = self._ensure_experiment()
        elif _absolute_uri(parent.tracking_uri) != self.tracking_uri:
            raise MetarecError(
                f"sweep parent run {parent.run_id} is in {parent.tracking_uri} but this job "
                f"tracks to {self.tracking_uri}; use one tracking URI for the whole sweep")
        else:
            self.experiment_id, all_tags[PARENT_TAG] = parent.experiment_id, parent.run_id
        self.run_id = self._create_run(self.experiment_id, all_tags, self.run_name)
        self._batch("params", [Param(k, v) for k, v in flatten_config(params).items()], 100)
        return self.run_id

    def resume(self, run_id: str) -> str:
        """Reopen an existing run (``trainer.resume``: same id, its metric history continued).

        The run becomes RUNNING again and is tagged with this process's pid, host and a fresh
        heartbeat (so ``metarec runs clean`` sees the new process, not the dead one); its params
        are left as they are. Returns ``run_id``.

        Raises:
            MetarecError: no such run in this store, or the run is deleted.
        """
        if self.run_id is not None:
            raise RuntimeError(f"run {self.run_id} already started; use a new MlflowTracker")
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException:
            raise MetarecError(f"no MLflow run {run_id!r} in {self.tracking_uri} to resume") from None
        if run.info.lifecycle_stage != "active":
            raise MetarecError(f"MLflow run {run_id} is deleted in {self.tracking_uri}; restore it "
                               "(`mlflow runs restore --run-id ...`) before resuming it")
        self._client.update_run(run_id, status="RUNNING")
        self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in liveness_tags().items()],
                               synchronous=True)
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self._start_heartbeat(run_id)
        return run_id

    def last_logged_step(self, key: str) -> int | None:
        """The largest step at which metric ``key`` was logged to this run (``None``: never)."""
        history = self._client.get_metric_history(self._run(), key)
        return max((m.step for m in history), default=None)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer metrics in memory (no I/O); :meth:`flush` or :meth:`finish` writes them.

        Raises:
            ValueError: a name MLflow would reject, e.g. ``recall@10`` (use ``recall_at_10``).
        """
        now, step = int(time.time() * 1000), 0 if step is None else int(step)
        for key, value in metrics.items():
            if not _valid_metric_name(key):
                raise ValueError(f"metric name {key!r} is rejected by MLflow; use letters, "
                                 "digits, '_', '-', '.', ':', spaces and '/' between names")
            self._buffer.append((key, float(value), now, step))

    def flush(self) -> None:
        """Write the buffered metrics with ``log_batch`` (at most 1000 per call), and the
        heartbeat when one is due (in the same call)."""
        beat = self._beats.get(self.run_id) if self.run_id is not None else None
        value = beat.due() if beat is not None else None
        if not self._buffer and value is None:
            return
        from mlflow.entities import Metric, RunTag

        tags = [RunTag(HEARTBEAT_TAG, value)] if value is not None else []
        metrics = [Metric(*m) for m in self._buffer]
        for i in range(0, max(len(metrics), 1), 1000):
            self._client.log_batch(self._run(), metrics=metrics[i:i + 1000], tags=tags if i == 0 else [],
                                   synchronous=True)
        self._buffer.clear()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) run tags."""
        from mlflow.entities import RunTag

        self._batch("tags", [RunTag(k, str(v)) for k, v in tags.items()], 100)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy one local file into the run's artifacts, under ``artifact_path``."""
        self._client.log_artifact(self._run(), str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local directory's contents into the run's artifacts, under ``artifact_path``."""
        self._client.log_artifacts(self._run(), str(directory), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` to the artifact ``artifact_file`` (e.g. ``"config/resolved.yaml"``)."""
        self._client.log_text(self._run(), text, artifact_file)

    def log_table(self, frame: pd.DataFrame, artifact_file: str) -> None:
        """Write ``frame`` as CSV to ``artifact_file``; an unnamed RangeIndex is left out."""
        import pandas as pd

        plain_index = isinstance(frame.index, pd.RangeIndex) and frame.index.name is None
        self.log_text(frame.to_csv(index=not plain_index), artifact_file)

    def log_ui_table(self, frame: pd.DataFrame, artifact_file: str, run_id: str | None = None) -> None:
        """Log ``frame`` as MLflow's own table artifact (``MlflowClient.log_table``: a JSON file
        the UI shows as a table and compares across runs), to this run or ``run_id``."""
        self._client.log_table(run_id or self._run(), frame.reset_index(drop=True), artifact_file)

    def log_params_to(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log ``params`` (strings, at most 6000 characters each) to another run, e.g. a sweep's
        parent; a param is immutable, so each key is logged once."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(run_id, params=items[i:i + 100], synchronous=True)

    def log_dataset(self, name: str, digest: str, context: str, source: Mapping[str, str],
                    profile: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Record the run's input dataset (MLflow's Dataset column) without uploading any data
        (:func:`metarec_runner.tracking.layout.dataset_input`)."""
        from metarec_runner.tracking.layout import dataset_input

        self._client.log_inputs(self._run(), datasets=[dataset_input(name, digest, context, source, profile, tags)])

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, then end the run with ``status`` (FINISHED, FAILED or KILLED); idempotent."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if self._finished or self.run_id is None:
            return
        self._finished = True
        try:
            self.flush()
        except BaseException:
            status = "FAILED"  # metrics were lost: the run must not look complete
            raise
        finally:
            self._end_run(self.run_id, status)

    def open_sweep_parent(self, sweep_dir: str | Path, run_name: str,
                          tags: Mapping[str, str] | None = None,
                          params: Mapping[str, Any] | None = None) -> SweepParent:
        """Create the sweep's parent run (with ``tags`` and ``params``, e.g. the swept keys) and
        record it in ``sweep_dir/mlflow_parent.json``."""
        experiment_id = self._ensure_experiment()
        run_id = self._create_run(experiment_id, dict(tags or {}), run_name)
        if params:
            self.log_params_to(run_id, params)
        parent = SweepParent(run_id, experiment_id, self.tracking_uri)
        path = Path(sweep_dir) / PARENT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{PARENT_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(parent), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return parent

    @staticmethod
    def read_sweep_parent(sweep_dir: str | Path) -> SweepParent | None:
        """The parent recorded in ``sweep_dir``, or None when there is none."""
        path = Path(sweep_dir) / PARENT_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return SweepParent(*(str(data[k]) for k in ("run_id", "experiment_id", "tracking_uri")))
        except (ValueError, KeyError, TypeError) as err:
            raise MetarecError(f"{path} is not a valid sweep parent record ({err!r}); "
                               "delete it or run the sweep in a new directory") from err

    def close_sweep_parent(self, parent: SweepParent) -> None:
        """End the parent run: FAILED if any of its child runs FAILED, else FINISHED."""
        from mlflow.entities import ViewType

        query, failed, token = f"tags.`{PARENT_TAG}` = '{parent.run_id}'", False, None
        while True:
            page = self._client.search_runs([parent.experiment_id], query, ViewType.ALL,
                                            max_results=1000, page_token=token)
            failed = failed or any(r.info.status == "FAILED" for r in page)
            if not (token := page.token):
                break
        self.end_sweep_parent(parent, "FAILED" if failed else "FINISHED")

    def end_sweep_parent(self, parent: SweepParent, status: str) -> None:
        """End the parent run with ``status`` (FINISHED, FAILED or KILLED)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        self._end_run(parent.run_id, status)

    @property
    def run_url_hint(self) -> str:
        """Where to find the run: ``experiment <name> (id <id>), run <run_id>``."""
        return f"experiment {self.experiment} (id {self.experiment_id}), run {self.run_id}"


class NullTracker:
    """A tracker that records nothing (tracking disabled); same methods as MlflowTracker."""

    run_id: str | None = None
    experiment_id: str | None = None
    run_url_hint = "tracking disabled"

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
              parent: SweepParent | None = None) -> str:
        return ""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def resume(self, run_id: str) -> str:
        return ""

    def last_logged_step(self, key: str) -> int | None:
        return None

    def flush(self) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_table(self, frame: pd.DataFrame, artifact_file: str) -> None: ...
    def log_ui_table(self, frame: pd.DataFrame, artifact_file: str, run_id: str | None = None) -> None: ...
    def log_dataset(self, name: str, digest: str, context: str, source: Mapping[str, str],
                    profile: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def close_sweep_parent(self, parent: SweepParent | None) -> None: ...
    def open_sweep_parent(self, sweep_dir: str | Path, run_name: str,
                          tags: Mapping[str, str] | None = None) -> None: ...

    @staticmethod
    def read_sweep_parent(sweep_dir: str | Path) -> None: ...


def _absolute_uri(uri: str) -> str:
    """``uri`` with a relative ``sqlite:///`` path made absolute (Hydra jobs may change cwd)."""
    if not uri:
        raise MetarecError("the MLflow tracking URI is empty; set one, e.g. sqlite:////abs/mlflow.db")
    prefix = "sqlite:///"
    rest = uri[len(prefix):]
    if uri.startswith(prefix) and rest and not rest.startswith("/") and rest != ":memory:":
        return prefix + str(Path(rest).resolve())
    return uri


def _valid_metric_name(key: str) -> bool:
    """Whether MLflow accepts ``key`` as a metric name (checked at log time, not at flush)."""
    return bool(_METRIC_KEY.match(key)) and posixpath.normpath(key) == key and key != "." \
        and not key.startswith(("..", "/"))
