"""Saved splits: write the exact tasks of a run to one parquet file and reload them later.

One row per support or query row of every task: ``split`` (train/val/test), ``task`` (position
in its TaskSet), ``role`` (support/query), ``order`` (position inside the set), ``user``,
``item``, ``rating`` (float32, exactly the task's target, e.g. a 0/1 label or a sampled
negative) and ``expected_rating`` (query rows, when the data has it). The parquet schema
metadata (key ``metarec``) holds the split hash, the data checksum and name, each split's
``task_kind`` and ``task_ids`` (so tasks without rows survive). Feature rows are not stored:
they are rebuilt with :meth:`Interactions.feature_rows` from the user and item codes, which is
why reloading refuses data whose checksum differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from metarec_runner.data.interactions import Interactions
from metarec_runner.errors import ConfigError, DataError
from metarec_runner.tasks.taskset import TaskSet, TaskSplits

SPLITS = ("train", "val", "test")
ROLES = ("support", "query")
FORMAT_VERSION = 1
META_KEY = b"metarec"


def _rows(part: TaskSet, split: str) -> pd.DataFrame:
    """The support and query rows of one TaskSet as a frame (columns as the module describes)."""
    frames = []
    for role, x, y, off in (("support", part.support_x, part.support_y, part.support_offsets),
                            ("query", part.query_x, part.query_y, part.query_offsets)):
        sizes = (off[1:] - off[:-1]).numpy()
        task = np.repeat(np.arange(len(part), dtype=np.int64), sizes)
        order = np.arange(len(task), dtype=np.int64) - np.repeat(off[:-1].numpy(), sizes)
        frame = pd.DataFrame({
            "split": split, "task": task, "role": role, "order": order,
            "user": x[:, -2].numpy(), "item": x[:, -1].numpy(), "rating": y.numpy().astype(np.float32),
        })
        expected = part.query_expected if role == "query" else None
        frame["expected_rating"] = (expected.numpy().astype(np.float32) if expected is not None
                                    else np.full(len(frame), np.nan, dtype=np.float32))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def save_splits(splits: TaskSplits, data: Interactions, path: Path) -> None:
    """Write ``splits`` (built from ``data``) to the parquet file ``path`` (parents are created)."""
    path = Path(path)
    parts = dict(zip(SPLITS, (splits.train, splits.val, splits.test), strict=True))
    frame = pd.concat([_rows(p, s) for s, p in parts.items()], ignore_index=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "split_hash": splits.split_hash,
        "data_checksum": data.checksum(),
        "data_name": data.name,
        "task_kind": {s: p.task_kind for s, p in parts.items()},
        "has_expected": {s: p.query_expected is not None for s, p in parts.items()},
        "task_ids": {s: p.task_ids.tolist() for s, p in parts.items()},
        "summary": splits.summary(),
    }
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_split_metadata(path: Path) -> dict:
    """The ``metarec`` metadata of a saved split file (split_hash, data_checksum, ...)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("splitter.path", f"no saved split at {path}; point splitter.path to a file "
                          f"written by save_splits (a run's split artifact)")
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet split file ({e})") from None
    if META_KEY not in raw:
        raise DataError(f"{path}: parquet file without metarec split metadata; save it with save_splits")
    return json.loads(raw[META_KEY])


def _taskset(rows: pd.DataFrame, data: Interactions, task_ids: list[int], kind: str, expected: bool) -> TaskSet:
    """Rebuild one TaskSet from its saved rows (any order) and task ids."""
    n = len(task_ids)
    out: dict[str, torch.Tensor] = {}
    for role in ROLES:
        r = rows[rows["role"] == role].sort_values(["task", "order"], kind="stable")
        sizes = np.bincount(r["task"].to_numpy(np.int64), minlength=n)
        offsets = torch.zeros(n + 1, dtype=torch.long)
        offsets[1:] = torch.from_numpy(np.cumsum(sizes))
        out[f"{role}_x"] = data.feature_rows(r["user"].to_numpy(np.int64), r["item"].to_numpy(np.int64))
        out[f"{role}_y"] = torch.from_numpy(r["rating"].to_numpy(np.float32).copy())
        out[f"{role}_offsets"] = offsets
        if role == "query" and expected:
            out["query_expected"] = torch.from_numpy(r["expected_rating"].to_numpy(np.float32).copy())
    return TaskSet(task_ids=torch.tensor(task_ids, dtype=torch.long), task_kind=kind,
                   query_expected=out.pop("query_expected", None), **out)


def load_splits(path: Path, data: Interactions) -> TaskSplits:
    """Reload a saved split against ``data``; refuses data whose checksum differs."""
    path = Path(path)
    meta = read_split_metadata(path)
    checksum = data.checksum()
    if meta["data_checksum"] != checksum:
        raise DataError(
            f"{path}: split saved from data with checksum {meta['data_checksum']} "
            f"({meta.get('data_name')}), but dataset {data.name!r} has checksum {checksum}; "
            f"load the same dataset with the same settings, or split again")
    frame = pq.read_table(path).to_pandas()
    parts = [_taskset(frame[frame["split"] == s], data, meta["task_ids"][s], meta["task_kind"][s],
                      meta["has_expected"][s]) for s in SPLITS]
    splits = TaskSplits(*parts)
    if splits.split_hash != meta["split_hash"]:
        raise DataError(f"{path}: reloaded tasks hash to {splits.split_hash}, not the saved "
                        f"{meta['split_hash']}; the file is damaged, save the split again")
    return splits


class SavedSplit:
    """Splitter that reloads the tasks saved by :func:`save_splits` (``splitter=saved``).

    Args:
        path: the parquet file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def __call__(self, data: Interactions) -> TaskSplits:
        """The saved train / validation / test tasks, identical (same split_hash) to the saved ones."""
        return load_splits(self.path, data)
