"""dpledger's warehouse: the DuckDB database, its schema, UDFs and query layer.

    >>> import warehouse
    >>> con = warehouse.connect("dpledger.duckdb")             # read-write, schema current
    >>> eng = warehouse.engine("dpledger.duckdb", read_only=True)  # SQLAlchemy, notebooks
"""

from .db import DEFAULT_DB, ENV_DB, connect, init, resolve_db_path
from .engine import engine
from .errors import UserError

__all__ = ["DEFAULT_DB", "ENV_DB", "UserError", "connect", "engine", "init", "resolve_db_path"]
