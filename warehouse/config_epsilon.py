"""``config_epsilon``: per point over the accounted runs of one configuration.

Layer: ``warehouse`` (a derived-table job). For each point: the mean, min and max of
its per-run ε, and the ε of the expectation over runs (``rdp``: of the mean RDP curve,
through :func:`analysis.composition.epsilon`; ``gla``: the rule's own expectation, as
:mod:`warehouse.account_gla` computed it; ``pld``: NULL — the PLD accountant keeps no
per-run curve to average, so only mean/min/max over runs).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dpledger.analysis import composition

from .sqlutil import append_arrow


def refresh_config_epsilon(con, config_key: str, rule: str, gla_expected: dict | None = None) -> None:
    """Per point over the accounted runs of one configuration: mean/min/max ε and the ε of the expectation."""
    tbl = con.sql(
        "SELECT pe.point_id, pe.epsilon, pe.rdp, pe.delta, a.orders FROM point_epsilon pe "
        "JOIN runs r USING (run_id) JOIN accountings a ON a.run_id = pe.run_id AND a.rule = pe.rule "
        "WHERE r.config_key = $key AND pe.rule = $rule ORDER BY pe.point_id",
        params={"key": config_key, "rule": rule},
    ).to_arrow_table()
    con.execute("DELETE FROM config_epsilon WHERE config_key = ? AND rule = ?", [config_key, rule])
    if tbl.num_rows == 0:
        return
    point = tbl.column("point_id").to_numpy()
    eps = tbl.column("epsilon").to_numpy()
    deltas = tbl.column("delta").to_numpy()
    pids, start, counts = np.unique(point, return_index=True, return_counts=True)
    out = {"point_id": pids, "n_runs": counts.astype(np.int32)}
    out["epsilon_mean"] = np.add.reduceat(eps, start) / counts
    out["epsilon_min"] = np.minimum.reduceat(eps, start)
    out["epsilon_max"] = np.maximum.reduceat(eps, start)
    delta = float(deltas.min())  # runs of one configuration normally share delta; the smallest is the safe side
    if rule == "rdp":
        orders = np.asarray(tbl.column("orders")[0].as_py())
        curves = np.stack(tbl.column("rdp").to_numpy(zero_copy_only=False))
        mean_curve = np.add.reduceat(curves, start, axis=0) / counts[:, None]
        out["epsilon_expected"], out["best_order_expected"] = composition.epsilon(mean_curve, delta, orders)
    elif rule == "pld":
        out["epsilon_expected"] = np.full(len(pids), None, dtype=object)
        out["best_order_expected"] = np.full(len(pids), None, dtype=object)
    else:
        lookup = dict(zip(gla_expected["point_ids"].tolist(), range(len(gla_expected["point_ids"])))) if gla_expected else {}
        idx = [lookup.get(int(p)) for p in pids]
        out["epsilon_expected"] = np.array([gla_expected["epsilon_expected"][i] if i is not None else np.nan for i in idx])
        out["best_order_expected"] = np.array([gla_expected["best_order_expected"][i] if i is not None else np.nan for i in idx])
        delta = gla_expected["delta"] if gla_expected else delta
    rows = pa.table({
        "config_key": pa.array([config_key] * len(pids), pa.string()),
        "rule": pa.array([rule] * len(pids), pa.string()),
        "point_id": pa.array(pids.astype(np.int64)),
        "n_runs": pa.array(out["n_runs"]),
        "epsilon_mean": pa.array(out["epsilon_mean"], pa.float64()),
        "epsilon_min": pa.array(out["epsilon_min"], pa.float64()),
        "epsilon_max": pa.array(out["epsilon_max"], pa.float64()),
        "epsilon_expected": pa.array(list(out["epsilon_expected"]), pa.float64()),
        "best_order_expected": pa.array(list(out["best_order_expected"]), pa.float64()),
        "delta": pa.array(np.full(len(pids), delta)),
    })
    append_arrow(con, "config_epsilon", rows)
