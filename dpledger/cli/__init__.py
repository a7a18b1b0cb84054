"""The ``dpledger`` command line (typer), split by command group; see :mod:`dpledger.cli.app`."""

from .app import app, entry, main

__all__ = ["app", "entry", "main"]
