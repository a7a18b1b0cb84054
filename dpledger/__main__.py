"""``python -m dpledger`` runs the command line."""

from dpledger.cli import entry

if __name__ == "__main__":
    entry()
