"""dpledger: a per-example privacy ledger for DP-SGD.

The public API, for notebooks and scripts::

    import dpledger
    con = dpledger.connect("dpledger.duckdb", read_only=True)   # DuckDB, views and UDFs
    eng = dpledger.engine("dpledger.duckdb", read_only=True)    # SQLAlchemy, for pandas/polars
    dpledger.budget(sample_rate=0.004, noise_multiplier=1.0, epochs=40, delta=1e-5)
    dpledger.account(con, ["my-run"])                           # per-example epsilon
    dpledger.rank(con, "my-run", highest=10)
    dpledger.report("dpledger.duckdb", "my-run", "report.html")

Names are loaded on first use, so ``import dpledger`` (and the CLI's start-up)
does not pay for torch, opacus or altair until they are needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "UserError": ("dpledger.warehouse.errors", "UserError"),
    "connect": ("dpledger.warehouse.db", "connect"),
    "init": ("dpledger.warehouse.db", "init"),
    "engine": ("dpledger.warehouse.engine", "engine"),
    "account": ("dpledger.warehouse.accounting", "account"),
    "rank": ("dpledger.warehouse.accounting", "rank"),
    "budget": ("dpledger.warehouse.accounting", "budget"),
    "report": ("dpledger.warehouse.report", "report"),
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
