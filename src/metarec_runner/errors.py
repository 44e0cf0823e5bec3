"""The project's own error types: one line that names the key, file or value and the fix."""

from __future__ import annotations

import sys
from typing import NoReturn


class MetarecError(Exception):
    """Base class for every error metarec reports as a one-line message (no traceback)."""


class ConfigError(MetarecError):
    """A config value is missing, unknown or impossible.

    Args:
        key: dotted config key, e.g. ``"inner_lr"`` or ``"algo.inner_lr"``.
        message: what is wrong and how to fix it.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def under(self, group: str) -> ConfigError:
        """The same error with ``group.`` prefixed to the key (``inner_lr`` -> ``algo.inner_lr``)."""
        if self.key.startswith(f"{group}."):
            return self
        return ConfigError(f"{group}.{self.key}", self.message)


class DataError(MetarecError):
    """Input data is missing, malformed, or left empty by a filter."""


class TrainingError(MetarecError):
    """Training diverged (NaN/inf loss or scores) or produced an unusable result."""


def require_positive(key: str, value: float) -> None:
    """Raise ConfigError unless ``value > 0``."""
    if not value > 0:
        raise ConfigError(key, f"must be > 0, got {value!r}; set {key} to a positive value")


def require_non_negative(key: str, value: float) -> None:
    """Raise ConfigError unless ``value >= 0``."""
    if not value >= 0:
        raise ConfigError(key, f"must be >= 0, got {value!r}; set {key} to zero or more")


def require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(key, f"unknown value {value!r}; choose one of {', '.join(choices)}")


class JobFailed(RuntimeError):
    """A sweep job stopped on a MetarecError (already printed); Hydra records the job FAILED and
    runs the sweep's other jobs."""


def fail(err: MetarecError | str, code: int) -> NoReturn:
    """Print the one-line error; exit a single run, or fail just this job of a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    print(f"metarec: error: {err}", file=sys.stderr)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(str(err)) from None
    sys.exit(code)
