"""Safe unpacking of a downloaded zip or tar (gz/bz2/xz) archive.

Everything is checked before a byte is written: absolute or drive paths, ``..`` components,
symlinks, hardlinks, devices/FIFOs, encrypted zip entries, more than ``MAX_MEMBERS`` entries and
a declared unpacked size above the cap (``MAX_EXPANSION`` x the archive's size, at least
``MIN_UNPACK_CAP``: a zip-bomb guard); while writing, the actual bytes are capped too.

Imports: standard library only.
"""

from __future__ import annotations

import gzip
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from metarec_runner.errors import DataError

CHUNK_BYTES = 1 << 20
"""Read/write block size."""
MAX_EXPANSION = 20
"""Unpacked bytes may be at most this many times the archive's size ..."""
MIN_UNPACK_CAP = 64 << 20
"""... or this many bytes, whichever is larger (zip-bomb guard)."""
MAX_MEMBERS = 100_000
"""Most entries an archive may hold."""


def unpack_cap(archive: Path) -> int:
    """The most bytes ``archive`` may unpack to: ``MAX_EXPANSION`` x its size, at least
    ``MIN_UNPACK_CAP``."""
    return max(MAX_EXPANSION * archive.stat().st_size, MIN_UNPACK_CAP)



def extract_archive(archive: Path, dest: Path, *, max_total: int | None = None,
                    label: str = "") -> None:
    """Unpack a zip or tar (gz/bz2/xz) archive into ``dest`` (created; must not exist), safely.

    Rejects, before writing anything: absolute or drive paths, ``..`` components, symlinks,
    hardlinks, devices/FIFOs, encrypted zip entries, more than ``MAX_MEMBERS`` entries and a
    declared unpacked size above ``max_total`` (default :func:`unpack_cap`); while writing, also
    caps actual bytes.

    Raises:
        DataError: naming ``label`` (the archive's URL) and the offending entry.
    """
    label = label or str(archive)
    if max_total is None:
        max_total = unpack_cap(archive)
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
