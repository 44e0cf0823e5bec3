"""Many processes, one sqlite MLflow store: create it once under a file lock, retry busy writes.

MLflow creates a sqlite store's tables (its Alembic migrations) the first time any client opens
a new file, with no coordination between processes: jobs that start together into a new
``mlflow.db`` run the migrations side by side and most of them fail (``duplicate column name:
step``, ``table _alembic_tmp_experiments already exists``, or a half-migrated schema).

:func:`ensure_store` prepares a sqlite store once per process, before the first run: it takes an
exclusive lock on ``<db>.lock`` (``fcntl.flock``; the ``filelock`` package where there is no
``fcntl``), opens the store there (which runs the migrations when the file is new and creates
MLflow's default experiment), and lets go. Processes that come later wait on the lock and then
find the store ready, so they only read its schema. The lock is the kernel's, released when its
holder exits however it exits, and the lock file stays (removing it would race the waiters).

:func:`retrying` calls the store again when sqlite answers ``database is locked`` (a writer
could not get the write lock in time; MLflow's own ``busy_timeout`` waits 20 s, but sqlite gives
up at once when waiting could deadlock, a read transaction upgrading to a write): bounded
exponential backoff with jitter, :data:`RETRIES` attempts, then :class:`TrackingStoreError`
naming the store (a MetarecError: one line, not blamed on ``logger.tracking_uri``). MLflow's
writes (``create_run``, ``log_batch``, ``set_tag``, ``set_terminated``) are one transaction
each, rolled back when it fails, so a retry never writes twice.

Journal mode: the store stays in sqlite's default rollback journal, **not WAL**. WAL lets
readers and one writer proceed together, but needs every process on one host (its index lives
in shared memory, ``<db>-shm``) and may corrupt a store on a network filesystem, where sqlite
files do get shared (SLURM jobs on NFS), and it changes the file for every later reader (the
``-wal`` and ``-shm`` files, write access even to read). With the lock and the retries, jobs on
one machine lose no runs in rollback mode (``tests/test_store_parallel.py``: 4 writers into a
new and into an existing store, 4 ``metarec train`` processes into a new store); many concurrent
writers, several machines or a shared team store belong on an MLflow tracking server (README).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from metarec_runner.errors import MetarecError

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRIES = 8  # attempts of one store call while sqlite reports busy (about 10 s of backoff in all)
BACKOFF_S = 0.05  # the first pause; doubled each attempt, capped at BACKOFF_CAP_S, with jitter
BACKOFF_CAP_S = 3.0
LOCK_TIMEOUT_S = 600.0  # the longest wait for another process to finish creating the store
_BUSY = ("database is locked", "database table is locked", "sqlite_busy", "database is busy")
_ready: set[str] = set()  # the store URIs this process has already prepared
_ready_lock = threading.Lock()


class TrackingStoreError(MetarecError):
    """The MLflow store stayed busy (or its lock unavailable) longer than metarec waits."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores and ``:memory:``."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    rest = uri[len(prefix):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


def is_busy_error(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is sqlite's busy/locked answer."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(marker in str(current).lower() for marker in _BUSY):
            return True
        current = current.__cause__ or current.__context__
    return False


def retrying(call: Callable[..., T], *args: Any, what: str = "", **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, called again (backoff with jitter) while the store is busy.

    Args:
        call: one store operation (e.g. ``client.log_batch``); it must be one transaction.
        what: the store, for the error message (e.g. the tracking URI).

    Raises:
        TrackingStoreError: still busy after :data:`RETRIES` attempts.
        Exception: any other error of ``call``, unchanged and at once.
    """
    for attempt in range(1, RETRIES + 1):
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if not is_busy_error(err):
                raise
            if attempt == RETRIES:
                name = getattr(call, "__name__", "call")
                raise TrackingStoreError(
                    f"the MLflow store {what or '?'} stayed locked by other writers ({name}, "
                    f"{RETRIES} attempts); with many parallel jobs use an MLflow tracking server "
                    "(logger.tracking_uri=http://HOST:5000)") from err
            pause = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (attempt - 1))
            time.sleep(pause * random.uniform(0.5, 1.5))
            log.debug("MLflow store busy (%s), attempt %d of %d", err, attempt, RETRIES)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


class RetryingClient:
    """An ``MlflowClient`` whose every method is called through :func:`retrying`."""

    def __init__(self, client: Any, what: str) -> None:
        self._inner, self._what = client, what

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private names, and copy/pickle probing an unset instance
            raise AttributeError(name)
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return retrying(attr, *args, what=self._what, **kwargs)

        call.__name__ = name
        return call


@contextmanager
def file_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent, never removed) for the block.

    Raises:
        TrackingStoreError: not acquired within ``timeout`` seconds.
    """
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the filelock package (a dependency of torch)
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(path), timeout=timeout):
                yield
        except Timeout:
            raise TrackingStoreError(f"waited {timeout:.0f} s for {path}; another process is "
                                     "still creating the MLflow store") from None
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline, pause = time.monotonic() + timeout, 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TrackingStoreError(
                        f"waited {timeout:.0f} s for {path}; another process is still creating "
                        "the MLflow store") from None
                time.sleep(pause)
                pause = min(0.2, pause * 2)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def ensure_store(uri: str) -> None:
    """Make a sqlite store ready (tables migrated, default experiment present) under its lock.

    Once per process and URI; other stores (http, postgres, ...) are left to MLflow. When the
    lock file cannot be created (a read-only folder) the store is opened without it.

    Raises:
        TrackingStoreError: the lock was not acquired in time, or the store stayed busy.
    """
    path = sqlite_path(uri)
    if path is None or uri in _ready:
        return
    with _ready_lock:  # one thread of this process prepares; the others find it done
        if uri in _ready:
            return
        # import the store's code (about 1 s) before taking the lock, so that an existing store
        # holds the lock for tens of milliseconds, not for other processes' imports
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        from mlflow.tracking import MlflowClient  # noqa: F401

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
        with ExitStack() as stack:
            try:
                stack.enter_context(file_lock(lock))
            except OSError as err:
                log.warning("no lock %s (%s): opening the MLflow store without it", lock, err)
            retrying(_open_store, uri, what=uri)
        _ready.add(uri)


def _open_store(uri: str) -> None:
    """Open the store as MLflow does (migrating a new file) and read it once."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
