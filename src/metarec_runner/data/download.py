"""Download, verify and safely unpack a registry dataset into ``<data dir>/<name>/``.

The steps, all inside one temporary folder under the data dir (so the final move is a rename on
the same file system, and any failure leaves nothing behind):

1. stream the archive (resuming with HTTP ``Range`` + ``If-Range`` after a broken transfer when the
   server allows it, else restarting), up to ``retries`` attempts with exponential backoff;
2. check the size against the server's ``Content-Length`` and the digest against the pinned
   checksum (archives without one are refused unless ``allow_unverified``);
3. extract, rejecting absolute paths, ``..`` components, links, devices and archives that would
   unpack to more than ``MAX_EXPANSION`` x their size (at least ``MIN_UNPACK_CAP``);
4. ``os.replace`` the complete dataset folder into place.

Imports: standard library only at module level (rich is imported when a progress bar is shown).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import re
import shutil
import ssl
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Any, Self

from metarec_runner.data.registry import Checksum, DatasetSpec, data_dir, get, is_present
from metarec_runner.errors import DataError

CHUNK_BYTES = 1 << 20
"""Read/write block size."""
TIMEOUT_S = 60.0
"""Socket timeout of one connect or read."""
BACKOFF_S = 1.0
"""First wait between attempts; doubles per attempt, capped at ``MAX_BACKOFF_S``."""
MAX_BACKOFF_S = 30.0
MAX_EXPANSION = 20
"""Unpacked bytes may be at most this many times the archive's size ..."""
MIN_UNPACK_CAP = 64 << 20
"""... or this many bytes, whichever is larger (zip-bomb guard)."""
MAX_MEMBERS = 100_000
"""Most entries an archive may hold."""
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
        cap = max(MAX_EXPANSION * archive.stat().st_size, MIN_UNPACK_CAP)
        extract_archive(archive, extracted, max_total=cap, label=source)
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


# -- extraction -------------------------------------------------------------------------------


def extract_archive(archive: Path, dest: Path, *, max_total: int, label: str = "") -> None:
    """Unpack a zip or tar (gz/bz2/xz) archive into ``dest`` (created; must not exist), safely.

    Rejects, before writing anything: absolute or drive paths, ``..`` components, symlinks,
    hardlinks, devices/FIFOs, encrypted zip entries, more than ``MAX_MEMBERS`` entries and a
    declared unpacked size above ``max_total``; while writing, also caps actual bytes.

    Raises:
        DataError: naming ``label`` (the archive's URL) and the offending entry.
    """
    label = label or str(archive)
    with open(archive, "rb") as f:
        magic = f.read(4)
    try:
        if magic[:2] == b"PK":
            _extract_zip(archive, dest, max_total, label)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, max_total, label)
        else:
            raise DataError(f"{label}: not a zip or tar archive; check the URL")
    except DataError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, gzip.BadGzipFile,
            EOFError, NotImplementedError, RuntimeError, FileExistsError, NotADirectoryError,
            IsADirectoryError) as e:
        raise DataError(f"{label}: corrupt or unsupported archive ({e}); try the download "
                        f"again with --force") from None


class _Budget:
    """Counts unpacked bytes against the cap."""

    def __init__(self, cap: int, label: str) -> None:
        self.cap, self.label, self.used = cap, label, 0

    def declare(self, n: int, entry: str) -> None:
        self.used += n
        if self.used > self.cap:
            raise DataError(f"{self.label}: unpacks to more than {self.cap} bytes (at {entry!r}); "
                            f"refusing a possible zip bomb")


def _safe_relpath(name: str, label: str) -> PurePosixPath | None:
    """The entry's path relative to the extraction folder; None for the folder itself."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or re.match(r"[A-Za-z]:", raw) or "\x00" in raw:
        raise DataError(f"{label}: archive entry {name!r} has an absolute path; refusing to "
                        f"extract it")
    parts = raw.split("/")
    if ".." in parts:
        raise DataError(f"{label}: archive entry {name!r} climbs out with '..'; refusing to "
                        f"extract it")
    kept = [p for p in parts if p not in ("", ".")]
    return PurePosixPath(*kept) if kept else None


def _copy(src: IO[bytes], target: Path, limit: int, entry: str, label: str) -> None:
    """Copy at most ``limit`` bytes (the entry's declared size) into a new file ``target``."""
    written = 0
    with open(target, "xb") as out:
        while block := src.read(CHUNK_BYTES):
            written += len(block)
            if written > limit:
                raise DataError(f"{label}: entry {entry!r} is larger than it declares; "
                                f"refusing a possible zip bomb")
            out.write(block)


def _extract_zip(archive: Path, dest: Path, max_total: int, label: str) -> None:
    budget = _Budget(max_total, label)
    plan: list[tuple[zipfile.ZipInfo, PurePosixPath | None]] = []
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise DataError(f"{label}: more than {MAX_MEMBERS} entries; refusing it")
        for info in infos:
            rel = _safe_relpath(info.filename, label)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise DataError(f"{label}: archive entry {info.filename!r} is a symlink; "
                                f"refusing to extract it")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise DataError(f"{label}: archive entry {info.filename!r} is not a regular "
                                f"file or folder; refusing to extract it")
            if info.flag_bits & 0x1:
                raise DataError(f"{label}: archive entry {info.filename!r} is encrypted")
            budget.declare(info.file_size, info.filename)
            plan.append((info, rel))
        dest.mkdir()
        for info, rel in plan:
            if rel is None:
                continue
            target = dest.joinpath(*rel.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                _copy(src, target, info.file_size, info.filename, label)


def _extract_tar(archive: Path, dest: Path, max_total: int, label: str) -> None:
    budget = _Budget(max_total, label)
    plan: list[tuple[tarfile.TarInfo, PurePosixPath | None]] = []
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if len(plan) >= MAX_MEMBERS:
                raise DataError(f"{label}: more than {MAX_MEMBERS} entries; refusing it")
            rel = _safe_relpath(member.name, label)
            if member.issym() or member.islnk():
                raise DataError(f"{label}: archive entry {member.name!r} is a link; refusing to "
                                f"extract it")
            if not (member.isreg() or member.isdir()):
                raise DataError(f"{label}: archive entry {member.name!r} is not a regular file "
                                f"or folder; refusing to extract it")
            budget.declare(member.size, member.name)
            plan.append((member, rel))
        dest.mkdir()
        for member, rel in plan:
            if rel is None:
                continue
            target = dest.joinpath(*rel.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            if src is None:  # unreachable for regular files
                raise DataError(f"{label}: cannot read entry {member.name!r}")
            with src:
                _copy(src, target, member.size, member.name, label)


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
