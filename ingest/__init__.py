"""Getting rows in: file importers (:mod:`.gla_csv`, :mod:`.steps_file`, :mod:`.memorization`,
:mod:`.shards`), the training worker (:mod:`.worker`, :mod:`.recorder`) and its sinks
(:mod:`.sinks`), sweeps (:mod:`.sweep`, :mod:`.tasks`, :mod:`.ray_executor`) and the
checkpoint scorers (:mod:`.norm_scoring`, :mod:`.curvature_scoring`).

Imports ``dpledger.models``, ``dpledger.analysis`` and the store API of
``dpledger.warehouse`` (errors, sqlutil, runs, db, tables, lake); never the warehouse's
jobs nor the ``dpledger`` face.
"""

from .gla_csv import ingest_gla_csv
from .steps_file import ingest_steps

__all__ = ["ingest_gla_csv", "ingest_steps"]
