"""``dpledger demo``: the whole path on bundled data, in one call.

Trains an MLP with DP-SGD (Opacus, Poisson sampling, σ = 1, C = 1) on scikit-learn's
8x8 digits, tracking every training point at every step; accounts per-example ε;
ranks the points; writes an HTML report (and PNGs). Offline, a minute or two on
2 CPU cores. Running it again reuses the finished run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dpledger.ingest.sinks import DuckDBSink
from dpledger.ingest.worker import TrainConfig, train
from dpledger.warehouse.accounting import account
from dpledger.warehouse.db import connect
from dpledger.warehouse.rank import rank, rank_summary
from dpledger.warehouse.report_frames import build_report

DEMO_RUN = "demo-digits-mlp"


def demo_config(epochs: float = 8.0) -> TrainConfig:
    return TrainConfig(run=DEMO_RUN, dataset="digits", model="mlp", epochs=epochs, batch_size=64, lr=0.5,
                       max_grad_norm=1.0, noise_multiplier=1.0, delta=1e-5, seed=0, track="all", track_every=1)


def run_demo(out_dir: str | Path = "dpledger-demo", epochs: float = 8.0,
             on_progress: Callable[[dict], None] | None = None,
             on_phase: Callable[[str], None] | None = None) -> dict:
    """Train, account, rank and report into ``out_dir``; returns a summary.

    ``on_progress`` gets the training steps; ``on_phase`` a line as each later phase starts.
    """
    phase = on_phase or (lambda text: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "demo.duckdb"
    sink = DuckDBSink(db)
    try:
        status = sink.con.execute("SELECT status FROM runs WHERE run_id = ?", [DEMO_RUN]).fetchall()
        if status and status[0][0] == "finished":
            trained = {"run_id": DEMO_RUN, "status": "finished", "reused": True}
        else:
            trained = train(demo_config(epochs), sink, resume=bool(status), db_dir=out, on_progress=on_progress)
        phase("accounting per-example epsilon")
        accounted = account(sink.con, [DEMO_RUN])[0]
    finally:
        sink.close()
    con = connect(db, read_only=True)
    try:
        phase("ranking the points")
        lowest = rank(con, DEMO_RUN, lowest=5)
        highest = rank(con, DEMO_RUN, highest=5)
        notes = rank_summary(con, DEMO_RUN)["notes"]
        phase("writing the report and its charts")
        rep = build_report(con, DEMO_RUN, out / "report.html", png_dir=out / "charts")
    finally:
        con.close()
    return {"db": str(db), "train": trained, "account": accounted, "lowest": lowest, "highest": highest,
            "rank_notes": notes, "report": rep}
