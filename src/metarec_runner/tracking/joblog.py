"""The job log: every line a job prints (stdout and stderr) also goes to ``metarec.log`` in its
run folder, Hydra's job log file, and at the end of the job to the MLflow run as an artifact.

:class:`JobLog` is installed by the ``MlflowSweepParent`` Hydra callback when a job starts (in
the job's own process, also under joblib) and removed when it ends. The terminal is untouched:
the streams are wrapped, and only whole printed lines are copied, without colours and without
the redraws of a progress bar (a line a carriage return or an erase-line code rewrites is
never a printed line). :func:`bind_run` (called when the job's MLflow run starts) names the run
the log is uploaded to.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

LOG_FILE = "metarec.log"  # Hydra's job log file (hydra.job.name = metarec)
LOGGER = "metarec.console"
_CSI = re.compile(r"\x1b\[[0-9;?]*([A-Za-z])|\x1b\][^\x07]*\x07|(\r)(?!\n)|(\n)")
_RESETS = frozenset("AKJ")  # cursor up, erase in line, erase in display: the line is redrawn

_active: JobLog | None = None


class _Tee:
    """A text stream that writes through to ``stream`` and logs every completed line."""

    def __init__(self, stream: TextIO, logger: logging.Logger) -> None:
        self._stream, self._logger = stream, logger
        self._line: list[str] = []
        self._lock = threading.RLock()
        self._feeding = False  # a write from inside logging (its own error report) is not fed back

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        with self._lock:
            if not self._feeding:
                self._feeding = True
                try:
                    self._feed(text)
                finally:
                    self._feeding = False
        return written

    def _feed(self, text: str) -> None:
        pos = 0
        for match in _CSI.finditer(text):
            self._line.append(text[pos:match.start()])
            pos = match.end()
            if match.group(3):  # a newline: the line is done
                line = "".join(self._line).rstrip()
                self._line.clear()
                if line.strip():
                    self._logger.info(line)
            elif match.group(2) or (match.group(1) or "") in _RESETS:  # \r, erase, cursor up
                self._line.clear()
        self._line.append(text[pos:])

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the real stream's
        return getattr(self._stream, name)


class JobLog:
    """Copies a job's printed lines into ``<run folder>/metarec.log`` while installed."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOG_FILE
        self.run: tuple[str, str] | None = None  # (tracking uri, run id) to upload to
        self._logger = logging.getLogger(f"{LOGGER}.{id(self)}")
        self._logger.propagate = False  # not to Hydra's console handler: the line is on screen already
        self._logger.setLevel(logging.INFO)
        self._handler: logging.Handler | None = None
        self._streams: tuple[TextIO, TextIO] | None = None

    def install(self) -> JobLog:
        """Start copying: wrap ``sys.stdout`` and ``sys.stderr``; the active log from now on."""
        global _active
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        self._logger.addHandler(self._handler)
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._logger), _Tee(sys.stderr, self._logger)  # type: ignore[assignment]
        _active = self
        atexit.register(self.close)  # a single run that fails exits without Hydra's on_job_end
        return self

    def close(self) -> Path | None:
        """Stop copying, close the file and upload it to the bound MLflow run (never raises).
        Returns the log file, or None when it was not installed."""
        global _active
        if self._streams is None:
            return None
        atexit.unregister(self.close)
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Tee):
                stream.flush()
        if isinstance(sys.stdout, _Tee) and isinstance(sys.stderr, _Tee):
            sys.stdout, sys.stderr = self._streams
        self._streams = None
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
        if _active is self:
            _active = None
        self._upload()
        return self.path

    def _upload(self) -> None:
        if self.run is None or not self.path.is_file():
            return
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=self.run[0]).log_artifact(self.run[1], str(self.path))
        except Exception as err:  # noqa: BLE001 - the log is on disk; the run is complete without it
            logging.getLogger(__name__).warning("metarec.log not logged to MLflow: %s", err)


def bind_run(tracking_uri: str | None, run_id: str | None) -> None:
    """The MLflow run the active job log (if any) is uploaded to when the job ends."""
    if _active is not None and tracking_uri and run_id:
        _active.run = (tracking_uri, run_id)


def active() -> JobLog | None:
    """The job log installed in this process, if any."""
    return _active
