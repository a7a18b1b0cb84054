"""``dpledger demo``, one of the README's two commands, run as the README runs it.

Checked against what does not come from dpledger: the step count and the run's ε
against Opacus's own accountant, the rows against steps × tracked points, the
report's files on disk.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import duckdb
from opacus.accountants import RDPAccountant

from dpledger.analysis.rdp import DEFAULT_ORDERS


def _demo(out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpledger", "demo", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_demo_trains_accounts_ranks_and_reports(tmp_path):
    out = tmp_path / "demo"
    r = _demo(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "per-example epsilon: min" in r.stdout and "5 points paying the most privacy" in r.stdout
    # in a pipe, progress is a line per phase on stderr, so the minutes after training are not silent
    assert [line for line in r.stderr.splitlines() if line.endswith("...")] == [
        "training MLP on digits with DP-SGD...", "accounting per-example epsilon...", "ranking the points...",
        "writing the report and its charts..."]

    con = duckdb.connect(str(out / "demo.duckdb"), read_only=True)
    try:
        (run_id, status, q, sigma, c, steps, delta, epochs), = con.execute(
            "SELECT run_id, status, sample_rate, noise_multiplier, max_grad_norm, steps, delta, epochs "
            "FROM runs").fetchall()
        n_points, rows, recorded = con.execute(
            "SELECT count(DISTINCT point_id), count(*), count(DISTINCT step) FROM point_steps").fetchall()[0]
        eps = [e for (e,) in con.execute("SELECT epsilon FROM point_epsilon WHERE run_id = ?", [run_id]).fetchall()]
    finally:
        con.close()
    assert status == "finished" and (sigma, c, epochs) == (1.0, 1.0, 8.0)
    assert steps == math.floor(epochs / q) == recorded  # Opacus's count; every step recorded
    assert rows == steps * n_points and len(eps) == n_points

    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    run_eps = acc.get_epsilon(delta=delta, alphas=list(DEFAULT_ORDERS))
    assert f"the run's data-independent epsilon is {run_eps:.3f}" in r.stdout
    assert max(eps) <= run_eps * (1 + 1e-9)  # no point pays more than the run's guarantee
    assert min(eps) < run_eps  # and some pay less

    html = (out / "report.html").read_text()
    assert "vega-lite" in html.lower() and "<script src=" not in html  # scripts inlined: opens offline
    assert list((out / "charts").glob("*.png"))

    again = _demo(out)  # the finished run is reused, not trained twice
    assert again.returncode == 0, again.stderr[-2000:]
    assert "trained before, reusing it" in again.stdout
