"""Flatten a nested config into MLflow params: dot keys and string values of bounded length."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ELLIPSIS = "..."


def flatten_config(cfg: Mapping, prefix: str = "", max_len: int = 500) -> dict[str, str]:
    """Flatten nested mappings into ``{"a.b.c": "value"}``.

    Lists and tuples become their ``str`` repr (``"[5, 10]"``), ``None`` becomes ``"None"``,
    and every value longer than ``max_len`` is cut to exactly ``max_len`` characters ending
    in ``"..."``. Keys starting with ``_`` (``_target_``) are kept: they name the class. An
    empty nested mapping is kept as ``"{}"`` so that its key still shows up.

    Args:
        cfg: a plain nested mapping (convert OmegaConf first with
            ``OmegaConf.to_container(cfg, resolve=True)``).
        prefix: prepended to every key, joined with a dot (``"algo"`` -> ``"algo.lr"``).
        max_len: the longest value kept; MLflow rejects param values over 500 characters.

    Returns:
        A flat ``dict`` of string keys to string values, in the config's order.
    """
    if max_len < len(ELLIPSIS):
        raise ValueError(f"max_len must be at least {len(ELLIPSIS)}, got {max_len}")
    flat: dict[str, str] = {}
    _flatten_into(flat, cfg, prefix, max_len)
    return flat


def _flatten_into(flat: dict[str, str], node: Mapping, prefix: str, max_len: int) -> None:
    """Add the leaves of ``node`` to ``flat`` under ``prefix``."""
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            _flatten_into(flat, value, name, max_len)
        else:
            flat[name] = _truncate(_to_str(value), max_len)


def _to_str(value: Any) -> str:
    """The string MLflow stores for one leaf value."""
    if isinstance(value, Mapping):
        return "{}"
    return str(value)


def _truncate(text: str, max_len: int) -> str:
    """Cut ``text`` to ``max_len`` characters, the last three being ``"..."``."""
    if len(text) <= max_len:
        return text
    return text[: max_len - len(ELLIPSIS)] + ELLIPSIS
