"""Download, verify and safely unpack a registry dataset into ``<data dir>/<name>/``.

The steps, all inside one temporary folder under the data dir (so the final move is a rename on
the same file system, and any failure leaves nothing behind):

1. stream the archive (resuming with HTTP ``Range`` + ``If-Range`` after a broken transfer when the
   server allows it, else restarting), up to ``retries`` attempts with exponential backoff;
2. check the size against the server's ``Content-Length`` and the digest against the pinned
   checksum (archives without one are refused unless ``allow_unverified``);
3. extract safely (:mod:`metarec_runner.data.archive`: no absolute paths, ``..``, links or
   devices, and a cap on the unpacked size);
4. ``os.replace`` the complete dataset folder into place.

Imports: standard library only at module level (rich is imported when a progress bar is shown).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

from metarec_runner.data.archive import CHUNK_BYTES, extract_archive
from metarec_runner.data.registry import Checksum, DatasetSpec, data_dir, get, is_present
from metarec_runner.errors import DataError

TIMEOUT_S = 60.0
"""Socket timeout of one connect or read."""
BACKOFF_S = 1.0
"""First wait between attempts; doubles per attempt, capped at ``MAX_BACKOFF_S``."""
MAX_BACKOFF_S = 30.0
MIN_DOWNLOAD_CAP = 64 << 20
"""A transfer may be at most 4x the registry's approximate size, or this, whichever is larger."""
STALE_TMP_S = 24 * 3600
"""Temp folders of killed runs older than this are removed by the next download."""
TMP_PREFIX = ".metarec-tmp-"
USER_AGENT = "metarec-dataset-downloader/0.1 (+urllib)"
_RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def download(
    name: str,
    root: str | os.PathLike[str] | None = None,
    url: str | None = None,
    force: bool = False,
    allow_unverified: bool = False,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Make dataset ``name`` present under ``<root>/<name>/`` and return that folder.

    Args:
        name: a registry name (``metarec data list``).
        root: the data dir; None = :func:`~metarec_runner.data.registry.data_dir`'s default.
        url: fetch from here instead of the publisher (a mirror, a local file path or
            ``file://`` URL, a test server); the pinned checksum still applies.
        force: download again even if a complete copy is present (replaced atomically).
        allow_unverified: accept an archive that has no pinned checksum.
        retries: attempts at the transfer in all (at least one).
        progress: show a rich progress bar on stderr.

    Raises:
        ConfigError: ``name`` is unknown (the message lists the known names).
        DataError: the transfer, the verification or the extraction failed (one line).
    """
    spec = get(name)
    root_dir = data_dir(root)
    final = root_dir / spec.name
    if not force and is_present(spec.name, root_dir):
        return final
    if spec.checksum is None and not allow_unverified:
        raise DataError(
            f"{spec.name}: no checksum is pinned for this archive, so it cannot be verified; "
            f"pass --allow-unverified (allow_unverified=True) to download it anyway"
        )
    source = _source_url(url or spec.url)
    try:
        root_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root_dir, spec.name)
        work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{spec.name}-", dir=root_dir))
    except OSError as e:
        raise DataError(f"cannot use data dir {root_dir}: {e.strerror or e}; "
                        f"pass --data-dir or set METAREC_DATA_DIR to a writable folder") from None
    try:
        archive = work / "archive"
        max_bytes = max(4 * spec.approx_bytes, MIN_DOWNLOAD_CAP)
        with _Bar(progress, f"{spec.name}") as bar:
            fetch(source, archive, retries=retries, max_bytes=max_bytes, bar=bar)
        digest = _check(archive, spec, source)
        extracted = work / "extracted"
        extract_archive(archive, extracted, label=source)
        archive.unlink()
        _install(_locate(extracted, spec, source), final, work)
    except OSError as e:  # local trouble: disk full, permissions
        raise DataError(f"{spec.name}: cannot write under {root_dir}: {e}; check free space and "
                        f"permissions, or pass --data-dir") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if digest is not None:
        print(f"warning: {spec.name} was not verified (no pinned checksum); its md5 is {digest}",
              file=sys.stderr)
    return final


# -- transfer ---------------------------------------------------------------------------------


class _Broken(Exception):
    """A transfer that may succeed when tried again."""


def fetch(url: str, dest: Path, *, retries: int = 3, max_bytes: int = 1 << 40,
          bar: _Bar | None = None) -> None:
    """Stream ``url`` into ``dest``, resuming or restarting after a broken transfer.

    A retry resumes with ``Range: bytes=<have>-`` and ``If-Range: <validator>`` when the first
    response carried a strong ETag or a Last-Modified date; a server that ignores the range
    (answers 200) or changed the file restarts from byte 0. The file must end up exactly as long
    as the server's ``Content-Length`` (or ``Content-Range`` total) says.

    Raises:
        DataError: a non-retryable HTTP status, more than ``max_bytes``, or every attempt failed.
    """
    bar = bar or _Bar(False, "")
    attempts = max(1, retries)
    validator: str | None = None
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            time.sleep(min(BACKOFF_S * 2 ** (attempt - 2), MAX_BACKOFF_S))
        have = dest.stat().st_size if dest.exists() else 0
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if have and validator:
            headers.update({"Range": f"bytes={have}-", "If-Range": validator})
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:  # our partial file is stale or complete nonsense: start over
                dest.unlink(missing_ok=True)
            elif e.code not in _RETRYABLE_HTTP:
                raise DataError(f"{url}: HTTP {e.code} {e.reason}; check the URL "
                                f"(or pass --url with a mirror)") from None
            last = e
            continue
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            if isinstance(getattr(e, "reason", e), ssl.SSLCertVerificationError):
                raise DataError(f"{url}: the TLS certificate check failed ({_reason(e)}); "
                                f"update the system's CA certificates, or pass --url with a "
                                f"mirror") from None
            last = e
            continue
        try:
            with resp:
                validator = validator or _validator(resp.headers)
                _stream(resp, dest, have, url, max_bytes, bar)
            return
        except _Broken as e:
            last = e.__cause__ or e
    raise DataError(f"{url}: download failed after {attempts} attempt(s): {_reason(last)}; "
                    f"check the connection and try again, or pass --url with a mirror")


def _stream(resp: Any, dest: Path, have: int, url: str, max_bytes: int, bar: _Bar) -> None:
    """Write one response body to ``dest`` (appending after a 206), checking the length."""
    status = getattr(resp, "status", None) or 200
    if status == 206:
        m = _CONTENT_RANGE.fullmatch((resp.headers.get("Content-Range") or "").strip())
        if not m or int(m.group(1)) != have:
            dest.unlink(missing_ok=True)
            raise _Broken("the server answered a different range than asked for")
        total = None if m.group(3) == "*" else int(m.group(3))
        mode = "ab"
    elif status == 200:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        have, mode = 0, "wb"
    else:
        raise DataError(f"{url}: unexpected HTTP {status}; check the URL")
    if total is not None and total > max_bytes:
        raise DataError(f"{url}: the server offers {total} bytes, more than the {max_bytes} "
                        f"expected for this dataset; check the URL")
    bar.reset(total, have)
    with open(dest, mode) as out:
        while True:
            try:
                chunk = resp.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as e:
                raise _Broken(str(e)) from e
            if not chunk:
                break
            have += len(chunk)
            if have > max_bytes:
                raise DataError(f"{url}: the transfer exceeds {max_bytes} bytes, far more than "
                                f"expected for this dataset; check the URL")
            out.write(chunk)
            bar.advance(len(chunk))
    if total is not None and have != total:
        raise _Broken(f"connection closed after {have} of {total} bytes")


def _validator(headers: Any) -> str | None:
    """A strong ETag, else Last-Modified: what ``If-Range`` needs to resume safely."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _reason(err: BaseException | None) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


def _source_url(url: str) -> str:
    """``url`` if http(s)/file, a local path as a ``file://`` URL; DataError otherwise."""
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https", "file"):
        return url
    if not scheme and Path(url).expanduser().is_file():
        return Path(url).expanduser().resolve().as_uri()
    raise DataError(f"--url {url!r}: use an http(s):// or file:// URL, or the path of an "
                    f"existing archive")


# -- verification -----------------------------------------------------------------------------


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of ``path`` with :mod:`hashlib` algorithm ``algorithm``."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def _check(archive: Path, spec: DatasetSpec, url: str) -> str | None:
    """Verify ``archive`` against the pinned checksum; md5 of an unverified archive (or None)."""
    if spec.checksum is None:
        return file_digest(archive, "md5")
    expected: Checksum = spec.checksum
    got = file_digest(archive, expected.algorithm)
    if got.lower() != expected.hexdigest.lower():
        archive.unlink(missing_ok=True)
        raise DataError(
            f"{spec.name}: checksum mismatch for {url}: expected {expected.algorithm} "
            f"{expected.hexdigest}, got {got}; the file was deleted: try again, or check the mirror"
        )
    return None


# -- installation -----------------------------------------------------------------------------


def _locate(extracted: Path, spec: DatasetSpec, label: str) -> Path:
    """The extracted folder holding every expected file.

    Looked for in ``spec.inner_dir``, then the archive's top level, then its only folder (so a
    mirror that repackages the files one level up or down still works).
    """
    candidates = [extracted / spec.inner_dir] if spec.inner_dir else []
    candidates.append(extracted)
    folders = [p for p in extracted.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
    if len(folders) == 1:
        candidates.append(folders[0])
    for folder in candidates:
        if folder.is_dir() and all((folder / f).is_file() for f in spec.files):
            return folder
    where = f"folder {spec.inner_dir!r}" if spec.inner_dir else "its top level"
    raise DataError(f"{label}: the archive lacks {', '.join(spec.files)} in {where}; is it the "
                    f"{spec.name} archive?")


def _install(src: Path, final: Path, work: Path) -> None:
    """Rename the complete folder ``src`` to ``final``; an old ``final`` goes into ``work``."""
    aside: Path | None = None
    if final.exists() or final.is_symlink():
        aside = work / "previous"
        os.replace(final, aside)
    try:
        os.replace(src, final)
    except OSError:
        if aside is not None:
            os.replace(aside, final)
        raise


def _remove_stale_tmp(root: Path, name: str) -> None:
    """Remove temp folders that killed downloads of ``name`` left more than a day ago."""
    cutoff = time.time() - STALE_TMP_S
    for p in root.glob(f"{TMP_PREFIX}{name}-*"):
        try:
            if p.is_dir() and not p.is_symlink() and p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# -- progress ---------------------------------------------------------------------------------


class _Bar:
    """A rich download bar on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled, self.label = enabled, label
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Self:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def reset(self, total: int | None, completed: int) -> None:
        if self._progress is not None:
            self._progress.reset(self._task, total=total, completed=completed)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)
