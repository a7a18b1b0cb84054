"""Getting rows into the warehouse: file importers now; training workers and their sinks."""

from .gla_csv import ingest_gla_csv
from .steps_file import ingest_steps

__all__ = ["ingest_gla_csv", "ingest_steps"]
