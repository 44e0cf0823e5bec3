"""Processed-dataset cache: parquet frames + .npy arrays + one JSON manifest per dataset version.

Layout: ``<cache root>/<name>-<key>/`` holding ``ratings.parquet``, ``user_features.parquet``,
``item_features.parquet``, ``<user|item>_bag.<field>.npy``, ``meta.<entry>.npy`` (numpy arrays
found in ``metadata``, e.g. raw ids) and ``manifest.json`` (everything else, written last).
``key`` is the sha256 over the source files' sha256 sums, the loader arguments and the loader
code (:func:`code_version`). The cache root is ``$METAREC_CACHE_DIR``, else
``<data_dir>/.metarec-cache``, else (data dir read-only) ``$XDG_CACHE_HOME/metarec/processed``.

Source checksums have a fast path: ``checksums.json`` in the cache root remembers
``(size, mtime_ns, sha256)`` per file; a file whose size or mtime changed is hashed again, so an
edited file always changes the key. A cache is written to a temporary folder and renamed into
place (``os.replace``), so an interrupted write never leaves a partial cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from metarec_runner.data.interactions import Interactions
from metarec_runner.data.registry import data_dir as _registry_data_dir

CACHE_VERSION = 1
_FRAMES = ("ratings", "user_features", "item_features")
_CODE = ("cache", "encode", "interactions", "movielens", "recbole", "tabular")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir``, else ``$METAREC_DATA_DIR``, else ``$XDG_CACHE_HOME/metarec/data``."""
    return _registry_data_dir(data_dir)


def cache_root(data_dir: Path) -> Path:
    """Where processed caches of datasets under ``data_dir`` go (see the module docstring)."""
    env = os.environ.get("METAREC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:  # the mode bits too: root may write anywhere, but a read-only folder means "keep out"
        writable = os.access(data_dir, os.W_OK) and data_dir.stat().st_mode & stat.S_IWUSR
    except OSError:
        writable = False
    if writable:
        return data_dir / ".metarec-cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "metarec" / "processed"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def known_checksums(root: Path, paths: list[Path]) -> dict[str, str] | None:
    """sha256 of each file from the remembered stamps, or None if any file is new or changed."""
    try:
        stamps = json.loads((root / "checksums.json").read_text())
        out = {}
        for p in paths:
            size, mtime, sha = stamps[str(p.resolve())]
            if [size, mtime] != _stamp(p):
                return None
            out[str(p.resolve())] = sha
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_checksums(root: Path, stamps: Mapping[Path, tuple[list[int], str]]) -> None:
    """Add ``{path: ((size, mtime_ns), sha256)}`` to ``checksums.json`` (atomic replace)."""
    try:
        old = json.loads((root / "checksums.json").read_text())
    except (OSError, ValueError):
        old = {}
    old.update({str(p.resolve()): [*stamp, sha] for p, (stamp, sha) in stamps.items()})
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".checksums-")
    with os.fdopen(fd, "w") as f:
        json.dump(old, f)
    os.replace(tmp, root / "checksums.json")


@functools.cache
def code_version() -> str:
    """sha256 of the loader modules' source: editing a loader invalidates its old caches."""
    h = hashlib.sha256(str(CACHE_VERSION).encode())
    for module in _CODE:
        h.update((Path(__file__).parent / f"{module}.py").read_bytes())
    return h.hexdigest()[:16]


def cache_key(name: str, checksums: Mapping[str, str], args: Mapping[str, object]) -> str:
    """First 16 hex digits of sha256 over the loader code, name, file checksums and arguments."""
    blob = json.dumps({"code": code_version(), "name": name, "files": sorted(checksums.values()),
                       "args": args}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _folder(root: Path, name: str, key: str) -> Path:
    return root / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{key}"


def _plain(value: object) -> object:
    """JSON fallback: numpy scalars -> Python numbers, anything else -> str."""
    return value.item() if isinstance(value, np.generic) else str(value)


def save(data: Interactions, folder: Path) -> None:
    """Write ``data`` to ``folder`` atomically (temp folder beside it, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        for part in _FRAMES:
            frame = getattr(data, part)
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp / f"{part}.parquet")
        for kind, bags in (("user", data.user_bags), ("item", data.item_bags)):
            for field, arr in bags.items():
                np.save(tmp / f"{kind}_bag.{field}.npy", arr, allow_pickle=False)
        plain = {}
        for k, v in data.metadata.items():
            if isinstance(v, np.ndarray):
                np.save(tmp / f"meta.{k}.npy", v.astype(str) if v.dtype == object else v,
                        allow_pickle=False)
            elif k != "cache":
                plain[k] = v
        manifest = {"version": CACHE_VERSION, "name": data.name, "n_users": data.n_users,
                    "n_items": data.n_items, "cardinalities": data.cardinalities,
                    "user_bags": list(data.user_bags), "item_bags": list(data.item_bags),
                    "rating_scale": list(data.rating_scale), "metadata": plain,
                    "checksum": data.checksum()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, default=_plain))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "manifest.json").is_file():  # not a concurrent writer's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(folder: Path) -> Interactions | None:
    """The cached dataset in ``folder``, or None when absent, partial or from another version."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("version") != CACHE_VERSION:
            return None
        frames = {p: pq.read_table(folder / f"{p}.parquet").to_pandas() for p in _FRAMES}
        for part, n in (("user_features", manifest["n_users"]), ("item_features", manifest["n_items"])):
            if frames[part].shape[1] == 0:  # parquet keeps no row count without columns
                frames[part] = pd.DataFrame(index=pd.RangeIndex(n))
        bags = {kind: {f: np.load(folder / f"{kind}_bag.{f}.npy") for f in manifest[f"{kind}_bags"]}
                for kind in ("user", "item")}
        metadata = dict(manifest["metadata"])
        for path in folder.glob("meta.*.npy"):
            metadata[path.name[5:-4]] = np.load(path)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    return Interactions(
        name=manifest["name"], ratings=frames["ratings"], user_features=frames["user_features"],
        item_features=frames["item_features"], cardinalities=manifest["cardinalities"],
        user_bags=bags["user"], item_bags=bags["item"],
        rating_scale=tuple(manifest["rating_scale"]), metadata=metadata)


def cached(name: str, data_dir: Path, files: list[Path], args: Mapping[str, object],
           build: Callable[[], Interactions], enabled: bool = True) -> Interactions:
    """Load ``name`` from the cache, or ``build()`` it and store it.

    Args:
        files: the source files ``build`` reads (their checksums key the cache).
        args: the loader arguments that change the result (JSON-serialisable).
        build: reads the files; must put ``{"files": {role: {"path", "sha256", ...}}}`` in
            ``metadata`` (see :meth:`SourceFile.describe`).
        enabled: False = always build, never read or write the cache.

    ``metadata["cache"]`` says ``{"hit": bool, "dir": str | None}``.
    """
    if not enabled:
        data = build()
        data.metadata["cache"] = {"hit": False, "dir": None}
        return data
    root = cache_root(data_dir)
    stamps = {p: _stamp(p) for p in files if p.is_file()}
    sums = known_checksums(root, files)
    if sums is not None:
        folder = _folder(root, name, cache_key(name, sums, args))
        data = load(folder)
        if data is not None:
            data.metadata["cache"] = {"hit": True, "dir": str(folder)}
            return data
    data = build()
    by_path = {str(Path(f["path"]).resolve()): f["sha256"] for f in data.metadata["files"].values()}
    sums = {str(p.resolve()): by_path[str(p.resolve())] for p in files}
    folder = _folder(root, name, cache_key(name, sums, args))
    try:
        remember_checksums(root, {p: (stamps[p], sums[str(p.resolve())]) for p in stamps})
        if folder.exists():  # unreadable leftovers (load() returned None above)
            shutil.rmtree(folder, ignore_errors=True)
        save(data, folder)
    except OSError as e:
        warnings.warn(f"could not write the dataset cache {folder} ({e}); loading will not be "
                      f"faster next time (set METAREC_CACHE_DIR to a writable folder)", stacklevel=2)
        folder = None
    data.metadata["cache"] = {"hit": False, "dir": str(folder) if folder else None}
    return data
