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
    Column("config_key", String),
    Column("committed_step", BigInteger),
    Column("run_dir", String),
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
    Column("track_s", Double),
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
    Column("confidence_logit", Double),
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
    Column("score", Double),
    Column("seed", Integer),
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

accountings = Table(
    "accountings",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("rule", String, primary_key=True),
    Column("delta", Double, nullable=False),
    Column("exact", Boolean, nullable=False),
    Column("grid_size", Integer),
    Column("orders", ARRAY(Double), nullable=False),
    Column("fill", String, nullable=False),
    Column("holder_p", Double),
    Column("max_order", Integer),
    Column("legacy_scaling", Boolean, nullable=False),
    Column("bounded_orders", ARRAY(Double)),
    Column("computed_at", DateTime),
)

point_epsilon = Table(
    "point_epsilon",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("point_id", BigInteger, primary_key=True),
    Column("rule", String, primary_key=True),
    Column("epsilon", Double),
    Column("best_order", Double),
    Column("delta", Double, nullable=False),
    Column("exact", Boolean, nullable=False),
    Column("steps_covered", BigInteger, nullable=False),
    Column("order_at_edge", Boolean, nullable=False),
    Column("rdp", ARRAY(Double)),
)

config_epsilon = Table(
    "config_epsilon",
    metadata,
    Column("config_key", String, primary_key=True),
    Column("rule", String, primary_key=True),
    Column("point_id", BigInteger, primary_key=True),
    Column("n_runs", Integer, nullable=False),
    Column("epsilon_mean", Double),
    Column("epsilon_min", Double),
    Column("epsilon_max", Double),
    Column("epsilon_expected", Double),
    Column("best_order_expected", Double),
    Column("delta", Double),
)

rdp_grid = Table(
    "rdp_grid",
    metadata,
    Column("sample_rate", Double, primary_key=True),
    Column("noise_multiplier", Double, primary_key=True),
    Column("grid_size", Integer, primary_key=True),
    Column("alpha", Double, primary_key=True),
    Column("j", Integer, primary_key=True),
    Column("rho", Double, nullable=False),
    Column("bounded", Boolean, nullable=False),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("path", String, nullable=False),
)

fits = Table(
    "fits",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("method", String, primary_key=True),
    Column("holdout_k", Integer, primary_key=True),
    Column("n_points", BigInteger, nullable=False),
    Column("n_records", BigInteger, nullable=False),
    Column("params", JSON),
    Column("metrics", JSON),
    Column("computed_at", DateTime),
)
