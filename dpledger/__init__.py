"""dpledger: a per-example privacy ledger for DP-SGD.

The public API, for notebooks and scripts::

    import dpledger
    con = dpledger.connect("dpledger.duckdb", read_only=True)   # DuckDB, views and UDFs
    eng = dpledger.engine("dpledger.duckdb", read_only=True)    # SQLAlchemy, for pandas/polars
    dpledger.budget(sample_rate=0.004, noise_multiplier=1.0, epochs=40, delta=1e-5)
    dpledger.account(con, ["my-run"])                           # per-example epsilon
    dpledger.rank(con, "my-run", highest=10)
    dpledger.report("dpledger.duckdb", "my-run", "report.html")
    dpledger.train(dpledger.TrainConfig(run="r1", epochs=2), "dpledger.duckdb")   # DP-SGD, norms tracked
    dpledger.sweep("study.toml", "dpledger.duckdb", workers=2)                   # a grid, merged

Names are loaded on first use, so ``import dpledger`` (and the CLI's start-up)
does not pay for torch, opacus or altair until they are needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    # the warehouse
    "connect": ("dpledger.warehouse.db", "connect"),
    "engine": ("dpledger.warehouse.engine", "engine"),
    "init": ("dpledger.warehouse.db", "init"),
    "UserError": ("dpledger.warehouse.errors", "UserError"),
    "ParameterError": ("dpledger.analysis.validate", "ParameterError"),
    # privacy
    "budget": ("dpledger.analysis.budget", "budget"),
    "steps_from_epochs": ("dpledger.analysis.budget", "steps_from_epochs"),
    "account": ("dpledger.warehouse.accounting", "account"),
    "rank": ("dpledger.warehouse.rank", "rank"),
    "report": ("dpledger.warehouse.report_frames", "report"),
    "links": ("dpledger.warehouse.point_links", "links"),
    # your own Opacus training loop
    "track": ("dpledger.ingest.tracker", "track"),
    "Ledger": ("dpledger.ingest.tracker", "Ledger"),
    # workflows
    "TrainConfig": ("dpledger.ingest.worker", "TrainConfig"),
    "train": ("dpledger.workflows", "train"),
    "sweep": ("dpledger.workflows", "sweep"),
    "account_lake": ("dpledger.lake_accounting", "account_lake"),
    "connect_merged": ("dpledger.workflows", "connect_merged"),
    "run_demo": ("dpledger.demo", "run_demo"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'dpledger' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
