"""``dpledger demo``: the whole path on bundled data, in one call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from warehouse.db import connect

from .steps_file import ingest_steps


def synthetic_norms(n_points: int = 500, n_steps: int = 300, seed: int = 0) -> pd.DataFrame:
    """Per-point, per-step gradient norms shaped like DP-SGD's: most points' norms shrink
    as training fits them, a few hard points (every 50th) stay large throughout."""
    rng = np.random.default_rng(seed)
    step = np.repeat(np.arange(n_steps), n_points)
    point = np.tile(np.arange(n_points), n_steps)
    scale = np.where(point % 50 == 0, 3.0, 1.5 * np.exp(-step / (n_steps / 3)) + 0.05)
    norm = rng.gamma(4.0, scale / 4.0)
    return pd.DataFrame({"step": step, "point_id": point, "grad_norm": norm})


def run_demo(out_dir: str | Path = "dpledger-demo") -> dict:
    """Generate per-point norms, ingest them into ``out_dir/demo.duckdb``, return a summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    norms = out / "synthetic-norms.parquet"
    synthetic_norms().to_parquet(norms, index=False)
    db = out / "demo.duckdb"
    con = connect(db)
    try:
        result = ingest_steps(con, norms, "demo", sample_rate=0.01, noise_multiplier=1.0,
                              max_grad_norm=1.0, dataset="synthetic")
        top = con.sql(
            "SELECT point_id, avg(least(grad_norm, r.max_grad_norm)) AS mean_clipped_norm "
            "FROM point_steps JOIN runs r USING (run_id) WHERE run_id = 'demo' "
            "GROUP BY point_id ORDER BY mean_clipped_norm DESC, point_id LIMIT 10"
        ).to_arrow_table()
    finally:
        con.close()
    return {"db": str(db), "ingest": result, "top_points": top}
