"""Per-example accounting throughput: `dpledger account` (fast path) on 100M rows, beside a bare scan.

Generates ``--points`` x ``--steps`` (default 10,000 x 10,000 = 100 million) per-point
per-step gradient norms into a temporary warehouse, then measures, in the same run:

* the peer: a bare DuckDB scan of the same rows and the columns the fast path reads,
  ``SELECT count(*), sum(point_id), sum(grad_norm) FROM point_steps WHERE run_id = 'bench'``,
  in a fresh process on a fresh connection, like the accounting (twice, before and
  after it; the faster one is the peer);
* the fast path (`dpledger.account`, tabulated grid) in a fresh process: seconds,
  rows/second and the peak memory (RSS) of that process. Its modules are imported
  before the clock starts, as the peer's ``import duckdb`` is (their import time,
  a start-up cost that ``bench/startup.py`` covers, is printed beside it); the grid of
  (q, σ) is tabulated inside the timed call, as on a warehouse's first accounting;
* the exact path (per-row RDP at every order, `analysis.composition.step_rdp`) on a sample of rows, scaled to all rows;
* a per-row loop calling Opacus's ``compute_rdp`` on a sample, scaled to all rows.

Goals (2 cores, issue #15): the fast path within 10x the bare scan, peak memory at most
2 GiB, and >= 10,000x the per-row Opacus loop. Prints each goal with met/MISSED and
exits with status 1 when one is missed.

    python bench/account.py [--points 10000] [--steps 10000] [--sample 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path



def generate(db: Path, points: int, steps: int, q: float, sigma: float) -> float:
    from dpledger import warehouse

    t0 = time.perf_counter()
    con = warehouse.connect(db)
    con.execute(
        "INSERT INTO runs (run_id, dataset, sample_rate, noise_multiplier, max_grad_norm, steps, delta, private, "
        "status, source) VALUES ('bench', 'synthetic', ?, ?, 1.0, ?, 1e-5, true, 'finished', 'bench')",
        [q, sigma, steps],
    )
    con.execute("UPDATE runs SET config_key = run_config_key(dataset, model, sample_rate, noise_multiplier, "
                "max_grad_norm, steps)")
    # log-normal norms around 0.3 C, a quarter of them clipped; each point its own scale
    con.execute(
        f"""INSERT INTO point_steps (run_id, step, point_id, grad_norm, norm_clipped)
        SELECT 'bench', s.range, p.range,
               exp(ln(0.3) + 0.4 * ((p.range % 97) / 97.0 - 0.5)
                   + 0.8 * sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random())), false
        FROM range({steps}) s, range({points}) p"""
    )
    con.close()
    return time.perf_counter() - t0


def _account_child(db: str, out) -> None:
    # The accounting's modules (numpy, scipy, dpledger's) are imported before the clock starts,
    # as the peer's duckdb is: a per-row benchmark, not a start-up one (bench/startup.py); the
    # import time is reported beside it.
    t0 = time.perf_counter()
    import dpledger

    account = dpledger.account  # the lazy import of the accounting modules
    imported = time.perf_counter() - t0
    con = dpledger.connect(db)
    t0 = time.perf_counter()
    summary = account(con, ["bench"])
    elapsed = time.perf_counter() - t0
    con.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.send((elapsed, peak, summary[0]["epsilon_median"], imported))


#: The peer: what any per-point job must at least do, read the rows of the run's points and norms once.
SCAN_SQL = "SELECT count(*), sum(point_id), sum(grad_norm) FROM point_steps WHERE run_id = 'bench'"


def _scan_child(db: str, out) -> None:
    import duckdb

    con = duckdb.connect(db, read_only=True)
    t0 = time.perf_counter()
    con.sql(SCAN_SQL).fetchall()
    elapsed = time.perf_counter() - t0
    con.close()
    out.send(elapsed)


def in_child(target, *args):
    """``target(*args, pipe)``'s one message, run in a fresh (spawned) process."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=target, args=(*args, send))
    child.start()
    result = recv.recv()
    child.join()
    return result


def sample_rows(db: Path, n: int, seed: int = 0):
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute(f"SELECT least(grad_norm, 1.0) FROM point_steps USING SAMPLE {n} ROWS (reservoir, {seed})"
                       ).fetchnumpy()
    con.close()
    return next(iter(rows.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=2_000, help="rows timed on the exact path")
    ap.add_argument("--opacus-sample", type=int, default=100, help="rows timed on the per-row Opacus loop")
    args = ap.parse_args()
    q, sigma = 256 / 60_000, 1.0
    rows = args.points * args.steps
    from dpledger.analysis import composition, rdp
    from opacus.accountants.analysis.rdp import compute_rdp

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        gen = generate(db, args.points, args.steps, q, sigma)
        size = db.stat().st_size
        print(f"generated {rows:,} point_steps rows ({args.points:,} points x {args.steps:,} steps, "
              f"{size / 2**30:.2f} GiB on disk) in {gen:.1f} s")

        scan_before = in_child(_scan_child, str(db))
        fast, peak, median, imported = in_child(_account_child, str(db))
        scan_after = in_child(_scan_child, str(db))
        scan = min(scan_before, scan_after)
        print(f"peer: bare DuckDB scan ({SCAN_SQL}), fresh process: {scan:.2f} s "
              f"(before the accounting {scan_before:.2f} s, after {scan_after:.2f} s; the faster is the peer)")
        print(f"fast path (dpledger account)      : {fast:7.2f} s  {rows / fast:14,.0f} rows/s  "
              f"peak RSS {peak / 2**30:.2f} GiB  (median epsilon {median:.4f}; imports before it, not timed, "
              f"as the peer's: {imported:.2f} s)")
        print(f"fast path / bare scan             : {fast / scan:7.1f}x")

        ratios = sample_rows(db, args.sample)
        t0 = time.perf_counter()
        composition.step_rdp(q, sigma, ratios, rdp.DEFAULT_ORDERS)
        per_row_exact = (time.perf_counter() - t0) / len(ratios)
        exact_total = per_row_exact * rows
        print(f"exact path, {len(ratios):,} sampled rows   : {per_row_exact * 1e6:9.1f} us/row -> "
              f"{exact_total:10.0f} s for all rows; fast path is {exact_total / fast:,.0f}x faster")

        few = ratios[: args.opacus_sample]
        t0 = time.perf_counter()
        for r in few:
            if r > 0:
                compute_rdp(q=q, noise_multiplier=sigma / r, steps=1, orders=list(rdp.DEFAULT_ORDERS))
        per_row_opacus = (time.perf_counter() - t0) / len(few)
        opacus_total = per_row_opacus * rows
        print(f"per-row Opacus compute_rdp loop     : {per_row_opacus * 1e3:9.2f} ms/row -> "
              f"{opacus_total / 86400:10.1f} days for all rows; fast path is {opacus_total / fast:,.0f}x faster")
        goals = [
            (f"fast path <= 10x the bare scan ({fast / scan:.1f}x: {fast:.2f} s vs {scan:.2f} s)", fast <= 10 * scan),
            (f"peak RSS <= 2 GiB ({peak / 2**30:.2f} GiB)", peak <= 2 * 2**30),
            (f">= 10,000x the per-row Opacus loop ({opacus_total / fast:,.0f}x)", opacus_total / fast >= 1e4),
        ]
        print("goals: " + "; ".join(f"{text} {'met' if ok else 'MISSED'}" for text, ok in goals))
    sys.stdout.flush()
    if not all(ok for _, ok in goals):
        sys.exit(1)


if __name__ == "__main__":
    main()
