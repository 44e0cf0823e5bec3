"""Checkpoints: atomic writes, ``weights_only`` reads, and everything a resume or a reload needs.

A checkpoint is one ``torch.save`` file holding a dict of plain containers: tensors (the
algorithm's state, which includes the model, the optimizers and learned step sizes; RNG states),
numbers and strings. Everything that is not a tensor is also written as one JSON string under
``"meta"`` (the composed config, the dataset and split hashes, the vocabulary, the MLflow run id,
the history so far), so :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``:
no pickled object can run code, and a foreign or pickled payload is refused with one line.

Writes are atomic (:func:`atomic_save`: a temporary file in the same folder, ``fsync``, then
``os.replace``), so a kill at any moment leaves the previous checkpoint readable.

Layout of the saved dict (``FORMAT`` = ``"metarec-checkpoint/1"``)::

    format: str                    # FORMAT
    meta: str                      # JSON: epoch, best_epoch, best_value, stale, history, config,
                                   #       data_checksum, split_hash, vocabulary, run_id, versions
    algo: dict[str, Tensor | ...]  # MetaAlgorithm.state_dict() (model, optimizer(s), step sizes)
    best_algo: dict | None         # the best epoch's algorithm state (last.pt only, for resume)
    rng: dict[str, Tensor]         # torch CPU (+ CUDA) states, every torch.Generator of the
                                   # algorithm and the runner; python/numpy states are in meta
    item_rows: Tensor              # [V, C] int64 feature rows of every item (serving)
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarec_runner.errors import MetarecError

FORMAT = "metarec-checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(MetarecError):
    """A checkpoint file is missing, truncated, corrupt, foreign, or from another setting."""


@dataclass
class Checkpoint:
    """A checkpoint's contents (see the module docstring for the file layout).

    Attributes:
        algo: :meth:`MetaAlgorithm.state_dict` of the saved epoch.
        meta: the JSON part: ``epoch``, ``best_epoch``, ``best_value``, ``stale``, ``history``,
            ``config``, ``data_checksum``, ``split_hash``, ``vocabulary``, ``run_id``, ...
        best_algo: the best epoch's state, in ``last.pt`` (``None`` in ``best.pt``).
        rng: tensors of RNG states (``torch``, ``cuda.<i>``, ``gen.<owner>.<attr>``).
        item_rows: ``[V, C]`` int64 feature rows of every item, or ``None``.
    """

    algo: dict[str, Any]
    meta: dict[str, Any]
    best_algo: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    item_rows: torch.Tensor | None = None

    @property
    def epoch(self) -> int:
        return int(self.meta.get("epoch", 0))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    A reader sees the old file or the new one, never a partial write; the folder entry is
    fsynced too, so the rename survives a power loss on POSIX file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    return path


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` to ``path`` atomically (see :func:`atomic_save`)."""
    payload = {
        "format": FORMAT,
        "meta": json.dumps(ckpt.meta, default=_json_default, allow_nan=True),
        "algo": ckpt.algo,
        "best_algo": ckpt.best_algo,
        "rng": ckpt.rng,
        "item_rows": ckpt.item_rows,
    }
    return atomic_save(payload, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: one line naming the file when it is missing, truncated or corrupt, holds
            pickled objects (refused by ``weights_only``), or is not a metarec checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; give the path of a last.pt or best.pt")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "refused"
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True) ({first[:200]}); "
                              "it holds pickled objects, so it is not a metarec checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first[:200]}); use the "
                              "other checkpoint of the run (best.pt / last.pt) or train again") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: not a metarec checkpoint (format {found!r}, expected {FORMAT!r})")
    try:
        meta = json.loads(raw["meta"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({e})") from None
    return Checkpoint(algo=raw["algo"], meta=meta, best_algo=raw.get("best_algo"),
                      rng=raw.get("rng") or {}, item_rows=raw.get("item_rows"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def finite_or_none(value: float) -> float | None:
    """``value``, or ``None`` for NaN/inf (JSON has neither)."""
    return float(value) if math.isfinite(value) else None


# -- random number generators --------------------------------------------------------------------

def _generators(owner: object) -> dict[str, torch.Generator]:
    return {k: v for k, v in vars(owner).items() if isinstance(v, torch.Generator)}


def capture_rng(owners: dict[str, object]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states: ``(tensors, json)``.

    Tensors: torch's global CPU state, each CUDA device's, and every ``torch.Generator``
    attribute of each owner (``gen.<owner>.<attr>``). JSON: Python's and NumPy's global states.
    """
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    for name, owner in owners.items():
        for attr, gen in _generators(owner).items():
            tensors[f"gen.{name}.{attr}"] = gen.get_state()
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], owners: dict[str, object]) -> None:
    """Put back what :func:`capture_rng` captured (the same owners, by name)."""
    torch.set_rng_state(tensors["torch"].cpu())
    cuda = sorted(k for k in tensors if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].cpu() for k in cuda])
    for name, owner in owners.items():
        for attr, gen in _generators(owner).items():
            key = f"gen.{name}.{attr}"
            if key in tensors:
                gen.set_state(tensors[key].cpu())
    if "python" in meta:
        version, state, gauss = meta["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in meta:
        kind, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))




@dataclass
class CheckpointSink:
    """Where :meth:`Runner.fit` writes ``last.pt`` (every epoch) and ``best.pt`` (when the
    monitor improves), the static facts every checkpoint carries, and what to do after a write.

    Attributes:
        folder: the run's output folder.
        meta: JSON facts saved with every checkpoint (config, hashes, vocabulary, run id, ...).
        item_rows: ``[V, C]`` feature rows of every item, saved for serving.
        on_write: called with the paths just written (e.g. log them as MLflow artifacts).
    """

    folder: Path
    meta: dict[str, Any] = field(default_factory=dict)
    item_rows: torch.Tensor | None = None
    on_write: Any = None  # Callable[[list[Path]], None] | None

    def write(self, state: dict[str, Any], best_state: dict[str, Any] | None, progress: dict[str, Any],
              rng: tuple[dict[str, torch.Tensor], dict[str, Any]], improved: bool,
              last: bool = True) -> list[Path]:
        """Write ``last.pt`` (unless ``last`` is false) and ``best.pt`` when ``improved``.

        ``last.pt`` holds the epoch's state, the best state so far and the RNG states (for an
        exact resume); ``best.pt`` holds the best state alone (for reloading the model). A fitted-
        once algorithm writes ``best.pt`` only: there is nothing to resume. Returns the paths.
        """
        meta = {**self.meta, **progress, "rng": rng[1]}
        written = []
        if last:
            written.append(save_checkpoint(Checkpoint(algo=state, meta=meta, best_algo=best_state, rng=rng[0],
                                                      item_rows=self.item_rows), Path(self.folder) / LAST))
        if improved:
            best_meta = {k: v for k, v in meta.items() if k not in ("rng", "history", "stale")}
            written.append(save_checkpoint(Checkpoint(algo=state, meta=best_meta, item_rows=self.item_rows),
                                           Path(self.folder) / BEST))
        if self.on_write is not None:
            self.on_write(written)
        return written
