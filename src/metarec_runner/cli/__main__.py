"""``python -m metarec_runner.cli``: the ``metarec`` command."""

from metarec_runner.cli.app import app

app()
