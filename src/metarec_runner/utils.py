"""Seeding, devices, and the provenance facts logged with every run."""

from __future__ import annotations

import platform
import random
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from metarec_runner.errors import ConfigError


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cpu``; ``cuda``; ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but CUDA is not available; use device=auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` | ``float64``."""
    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise ConfigError("dtype", f"unknown dtype {name!r}; use float32 or float64")
    return table[name]


def git_sha() -> str:
    """Commit of the metarec source tree (``+dirty`` if modified), or ``unknown`` when installed
    from a wheel or git is absent."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("metarec-runner", "torch", "numpy", "pandas", "hydra-core", "omegaconf", "mlflow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out
