"""The ``metarec`` command line: one typer app (:mod:`metarec_runner.cli.app`) and its commands.

Importing this package loads typer and the standard library only (``metarec --help`` stays
fast); each command imports what it needs when it runs. Nothing below the command line imports
it.
"""

from metarec_runner.cli.app import app, normalize_overrides

__all__ = ["app", "normalize_overrides"]
