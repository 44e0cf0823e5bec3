"""A run's signs of life: who writes it (pid, host), a heartbeat, and SIGTERM as an interrupt.

Every run metarec opens carries three tags from its first write: ``metarec.pid``,
``metarec.host`` (``socket.gethostname()``) and ``metarec.heartbeat``, a unix timestamp in
seconds. :class:`Heartbeat` keeps the timestamp fresh, at most every :data:`HEARTBEAT_S`
seconds, from two places: the tracker's ``flush()`` (once per epoch; the tag rides in the same
``log_batch`` as the metrics, so it costs no extra call) and a daemon thread that wakes every
:data:`HEARTBEAT_S` / 3 seconds and writes only when no beat went out for :data:`HEARTBEAT_S`,
so long epochs, long test passes and artifact uploads still beat. The thread is what makes the
heartbeat mean "the process is alive"; a hung main thread keeps beating (its pid is alive too).
:mod:`metarec_runner.tracking.stale_runs` reads these tags to end the runs whose process died
(``metarec runs clean``).

:func:`terminate_as_interrupt` turns SIGTERM (``kill``, SLURM's ``scancel``, a container stop)
into :class:`Terminated`, a ``KeyboardInterrupt``, so the code that ends a run KILLED on Ctrl+C
also ends it on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

PID_TAG = "metarec.pid"
HOST_TAG = "metarec.host"
HEARTBEAT_TAG = "metarec.heartbeat"
HEARTBEAT_S = 30.0  # the most often a heartbeat is written, and about how often it is
STOP_WAIT_S = 5.0  # how long stop() waits for a beat being written


def heartbeat_value(now: float | None = None) -> str:
    """The heartbeat tag's value: unix seconds with milliseconds, e.g. ``"1764589000.123"``."""
    return f"{time.time() if now is None else now:.3f}"


def liveness_tags() -> dict[str, str]:
    """The tags a run starts with: this process's pid and host, and a first heartbeat."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(), HEARTBEAT_TAG: heartbeat_value()}


class Heartbeat:
    """Refreshes one run's heartbeat, at most every ``interval_s`` seconds.

    Args:
        write: sets the run's heartbeat tag to the value it is given (an MLflow call).
        interval_s: the least time between two beats, and the thread's period (a third of it).
        clock: the time source (unix seconds).
    """

    def __init__(self, write: Callable[[str], None], interval_s: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self._write, self.interval_s, self._clock = write, float(interval_s), clock
        self._last = clock()  # the run was created with a heartbeat (liveness_tags)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def due(self) -> str | None:
        """Claim the next beat when one is due: its tag value (the caller writes it), else None."""
        with self._lock:
            now = self._clock()
            if now - self._last < self.interval_s:
                return None
            self._last = now
            return heartbeat_value(now)

    def beat(self) -> bool:
        """Write a beat if one is due; a failed write is logged, never raised. True if written."""
        value = self.due()
        if value is None:
            return False
        try:
            self._write(value)
        except Exception as err:  # noqa: BLE001 - a missed beat must never fail the run
            log.debug("heartbeat not written: %s", err)
            return False
        return True

    def start(self) -> None:
        """Start the daemon thread that beats while the run is open (once)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="metarec-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s / 3):
            self.beat()

    def stop(self) -> None:
        """Stop the thread (waiting up to :data:`STOP_WAIT_S` for a beat being written)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread is not None and self._thread.is_alive()


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM inside :func:`terminate_as_interrupt`."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main
    thread; the previous handler is restored on exit.

    Only the first SIGTERM raises: later ones, while the interrupted code ends its run, are
    logged and ignored (SIGKILL, or SLURM's kill after its grace period, still ends the process).
    Outside the main thread, where Python cannot set signal handlers, the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            log.warning("SIGTERM again while ending the run: ignored (SIGKILL stops the process)")
            return
        received.append(signum)
        _pending.append(signum)  # for raise_if_terminated, should this raise be swallowed
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    _pending.clear()
    try:
        yield
    finally:
        _pending.clear()
        # None: a handler not installed from Python; the default action is the closest match
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


_pending: list[int] = []  # a SIGTERM received inside terminate_as_interrupt, not yet acted on


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` if a SIGTERM arrived inside :func:`terminate_as_interrupt`.

    The handler raises at once, but an exception raised while Python runs a finalizer
    (``__del__``, a weakref callback) is printed and dropped, and that SIGTERM would be lost.
    The training loop calls this after every step, so such a signal still ends the run.
    """
    if _pending:
        signum = _pending[0]
        _pending.clear()
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")
