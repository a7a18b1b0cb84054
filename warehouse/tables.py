"""SQLAlchemy Core declarations of the warehouse tables.

duckdb-engine 0.17 cannot reflect tables from duckdb 2.0, so the tables are declared
here, column for column as ``sql/schema`` creates them; ``tests/test_schema.py``
checks that the two agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Integer,
    JSON,
    LargeBinary,
    MetaData,
    String,
    Table,
    DateTime,
)
from sqlalchemy.types import ARRAY

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("dataset", String),
    Column("model", String),
    Column("seed", BigInteger),
    Column("n_train", BigInteger),
    Column("sample_rate", Double),
    Column("batch_size", BigInteger),
    Column("noise_multiplier", Double),
    Column("max_grad_norm", Double),
    Column("lr", Double),
    Column("epochs", Double),
    Column("steps", BigInteger),
    Column("delta", Double),
    Column("target_epsilon", Double),
    Column("private", Boolean),
    Column("status", String),
    Column("source", String),
    Column("created_at", DateTime),
    Column("updated_at", DateTime),
    Column("config", JSON),
)

points = Table(
    "points",
    metadata,
    Column("dataset", String, primary_key=True),
    Column("point_id", BigInteger, primary_key=True),
    Column("label", BigInteger),
    Column("split", String),
    Column("attrs", JSON),
    Column("thumbnail", LargeBinary),
)

membership = Table(
    "membership",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("point_id", BigInteger, primary_key=True),
    Column("in_train", Boolean, nullable=False),
)

steps = Table(
    "steps",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("epoch", Double),
    Column("batch_size", BigInteger),
    Column("loss", Double),
    Column("lr", Double),
    Column("wall_s", Double),
    Column("peak_mem_bytes", BigInteger),
    Column("test_accuracy", Double),
)

point_steps = Table(
    "point_steps",
    metadata,
    Column("run_id", String, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("point_id", BigInteger, nullable=False),
    Column("grad_norm", Double, nullable=False),
    Column("norm_clipped", Boolean, nullable=False),
    Column("loss", Double),
    Column("sampled", Boolean),
)

evaluations = Table(
    "evaluations",
    metadata,
    Column("run_id", String, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("point_id", BigInteger, nullable=False),
    Column("loss", Double),
    Column("correct", Boolean),
    Column("margin", Double),
)

curvature = Table(
    "curvature",
    metadata,
    Column("run_id", String, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("point_id", BigInteger, nullable=False),
    Column("curvature", Double),
    Column("n_probes", Integer),
    Column("h", Double),
)

memorization = Table(
    "memorization",
    metadata,
    Column("dataset", String, primary_key=True),
    Column("point_id", BigInteger, primary_key=True),
    Column("score", Double),
    Column("source", String, primary_key=True),
)

ingests = Table(
    "ingests",
    metadata,
    Column("sha256", String, primary_key=True),
    Column("kind", String, primary_key=True),
    Column("target", String, primary_key=True),
    Column("path", String, nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("run_ids", ARRAY(String)),
    Column("ingested_at", DateTime),
)
