"""``python -m dpledger`` runs the command line."""

from dpledger.cli import entry

entry()
