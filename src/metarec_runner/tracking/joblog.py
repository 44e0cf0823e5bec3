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
import contextlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

LOG_FILE = "metarec.log"  # Hydra's job log file (hydra.job.name = metarec)
LOGGER = "metarec.console"
_CSI = re.compile(r"\x1b\[[0-9;?]*([A-Za-z])|\x1b\][^\x07]*\x07|(\r)(?!\n)|(\n)")
_RESETS = frozenset("AKJ")  # cursor up, erase in line, erase in display: the line is redrawn

_active: JobLog | None = None


_LINE_ENDS = re.compile(r"(\r\n|\r|\n)")


class _Tee:
    """A text stream that writes through to ``stream`` and logs every completed line.

    With a ``prefix`` (``"[job 3] "``), every line written to the terminal starts with it, also
    after a carriage return, so the lines of jobs running side by side can be told apart; the
    log file gets the lines without it.
    """

    def __init__(self, stream: TextIO, logger: logging.Logger, prefix: str = "") -> None:
        self._stream, self._logger, self.prefix = stream, logger, prefix
        self._line: list[str] = []
        self._lock = threading.RLock()
        self._feeding = False  # a write from inside logging (its own error report) is not fed back
        self._at_line_start = True

    def _prefixed(self, text: str) -> str:
        parts: list[str] = []
        for piece in _LINE_ENDS.split(text):
            if not piece:
                continue
            if _LINE_ENDS.fullmatch(piece):
                self._at_line_start = True
            elif self._at_line_start:
                parts.append(self.prefix)
                self._at_line_start = False
            parts.append(piece)
        return "".join(parts)

    def write(self, text: str) -> int:
        with self._lock:
            self._stream.write(self._prefixed(text) if self.prefix else text)
        written = len(text)
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

    def __init__(self, out_dir: str | Path, terminal_prefix: str = "") -> None:
        """``terminal_prefix`` starts every line this job prints to the terminal (``"[job 3] "``
        for jobs that share it with others); ``metarec.log`` gets the lines without it."""
        self.path = Path(out_dir) / LOG_FILE
        self.terminal_prefix = terminal_prefix
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
        sys.stdout = _Tee(sys.stdout, self._logger, self.terminal_prefix)  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self._logger, self.terminal_prefix)  # type: ignore[assignment]
        _active = self
        atexit.register(self.close)  # a single run that fails exits without Hydra's on_job_end
        return self

    @contextlib.contextmanager
    def unprefixed(self) -> Iterator[None]:
        """Lines printed inside go to the terminal without the prefix (the job's own summary
        line, which starts with its number already)."""
        tees = [stream for stream in (sys.stdout, sys.stderr) if isinstance(stream, _Tee)]
        saved = [tee.prefix for tee in tees]
        for tee in tees:
            tee.prefix = ""
        try:
            yield
        finally:
            for tee, prefix in zip(tees, saved, strict=True):
                tee.prefix = prefix

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
