"""Per-example PLD accounting throughput (analysis.pld) beside the RDP fast path, on 10M and 100M rows.

For each size (``--points`` x ``--steps``; default 1,000 x 10,000 and 10,000 x 10,000) it
streams synthetic per-point per-step clipped-norm ratios (log-normal around 0.3 C, a
tail clipped at C; the same generator as bench/account.py) in chunks and times, in
one run:

* the PLD path: the rounded-up histogram (``pld.PldHistogram``) + table + Fourier
  composition + ε read-out (``pld.compose``), rows/s;
* the RDP fast path: the tent histogram (``composition.Histogram``) + table
  (``grid.tabulate``) + product + conversion (``composition.epsilon``), rows/s;
* the per-point dp_accounting loop on a sample of points (each point's distinct
  grid cells, ``from_gaussian_mechanism(...).self_compose(count)`` composed, at its
  default discretisation), with the per-cell PLDs cached across points (the most
  favourable form of that loop), scaled to all points.

Generation time is excluded. Peak memory is the process's max RSS (resource.getrusage).
Goals (2 cores): 100M rows in under 5 minutes and under 4 GiB, >= 100x the dp_accounting
loop. Exits 1 when a goal is missed.

    python bench/account_pld.py [--points 10000 --steps 10000] [--sample 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

Q, SIGMA, DELTA = 256 / 60_000, 1.0, 1e-5
CHUNK_STEPS = 500


def chunks(points: int, steps: int, seed: int = 0):
    """(point index, ratio) arrays for CHUNK_STEPS steps at a time."""
    rng = np.random.default_rng(seed)
    scale = np.log(0.3) + 0.4 * ((np.arange(points) % 97) / 97.0 - 0.5)
    for s0 in range(0, steps, CHUNK_STEPS):
        k = min(CHUNK_STEPS, steps - s0)
        idx = np.tile(np.arange(points), k)
        ratio = np.minimum(np.exp(np.tile(scale, k) + 0.8 * rng.standard_normal(idx.size)), 1.0)
        yield idx, ratio


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def fill(hist, points: int, steps: int) -> float:
    """Add the synthetic rows to ``hist`` chunk by chunk; the seconds spent adding."""
    spent = 0.0
    for idx, ratio in chunks(points, steps):
        t0 = time.perf_counter()
        hist.add(idx, ratio)
        spent += time.perf_counter() - t0
    return spent


def run_pld(points: int, steps: int):
    from dpledger.analysis import pld

    grid = pld.geometric_grid()
    hist = pld.PldHistogram(points, grid)
    t_hist = fill(hist, points, steps)
    t0 = time.perf_counter()
    table = pld.pld_table(Q, SIGMA, grid)
    res = pld.compose(table, hist.values, DELTA)
    t_comp = time.perf_counter() - t0
    return t_hist, t_comp, res, hist.values, grid


def run_rdp(points: int, steps: int):
    from dpledger.analysis import composition
    from dpledger.analysis import grid as rdp_grid

    hist = composition.Histogram(points, rdp_grid.DEFAULT_GRID)
    t_hist = fill(hist, points, steps)
    t0 = time.perf_counter()
    table = rdp_grid.tabulate(Q, SIGMA, rdp_grid.DEFAULT_GRID)
    eps, _ = composition.epsilon(hist.rdp(table), DELTA)
    return t_hist, time.perf_counter() - t0, eps


def dp_accounting_loop(hist: np.ndarray, grid: np.ndarray, sample: int):
    """Seconds per point of the per-point dp_accounting composition (cells cached), and the table time."""
    from dp_accounting.pld import privacy_loss_distribution as pldlib

    rows = hist[np.linspace(0, hist.shape[0] - 1, sample).astype(int)]
    cache, t_cells, t_points, eps = {}, 0.0, 0.0, []
    for row in rows:
        cells = np.flatnonzero(row[1:] > 0)
        t0 = time.perf_counter()
        for j in cells:
            if j not in cache:
                cache[j] = pldlib.from_gaussian_mechanism(SIGMA, sensitivity=float(grid[j]), sampling_prob=Q)
        t_cells += time.perf_counter() - t0
        t0 = time.perf_counter()
        total = None
        for j in cells:
            part = cache[j].self_compose(int(row[1 + j]))
            total = part if total is None else total.compose(part)
        eps.append(total.get_epsilon_for_delta(DELTA))
        t_points += time.perf_counter() - t0
    return t_points / len(rows), t_cells, len(cache), rows, np.array(eps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, nargs="*", default=[1_000, 10_000])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=2, help="points timed on the dp_accounting loop")
    args = ap.parse_args()
    ok = True
    for points in args.points:
        rows = points * args.steps
        print(f"== {points:,} points x {args.steps:,} steps = {rows:,} rows (q={Q:.5f}, sigma={SIGMA}, delta={DELTA})")
        h_pld, c_pld, res, hist, grid = run_pld(points, args.steps)
        t_pld = h_pld + c_pld
        print(f"PLD path : histogram {h_pld:6.1f} s + table/compose {c_pld:6.1f} s = {t_pld:6.1f} s  "
              f"{rows / t_pld:12,.0f} rows/s  peak RSS {peak_gib():.2f} GiB  "
              f"eps median {np.median(res.epsilon):.4f} (min {res.epsilon.min():.4f}, max {res.epsilon.max():.4f})")
        h_rdp, c_rdp, eps_rdp = run_rdp(points, args.steps)
        t_rdp = h_rdp + c_rdp
        print(f"RDP path : histogram {h_rdp:6.1f} s + table/compose {c_rdp:6.1f} s = {t_rdp:6.1f} s  "
              f"{rows / t_rdp:12,.0f} rows/s  peak RSS {peak_gib():.2f} GiB  eps median {np.median(eps_rdp):.4f}")
        print(f"PLD / RDP median eps: {np.median(res.epsilon / eps_rdp):.3f}; PLD <= RDP for "
              f"{np.mean(res.epsilon <= eps_rdp):.1%} of points; error budget: grid rho <= "
              f"{res.grid_rounding.max():.3f}, delta on tails <= {res.delta_tail.max():.1e}, "
              f"loss grid h in {sorted(set(np.round(res.interval, 8)))}")
        per_point, t_cells, n_cells, sampled, eps_ref = dp_accounting_loop(hist, grid, args.sample)
        loop_total = t_cells * len(grid) / max(n_cells, 1) + per_point * points
        mine = res.epsilon[np.linspace(0, points - 1, args.sample).astype(int)]
        print(f"dp_accounting loop, {args.sample} points: {per_point:7.1f} s/point (+ {t_cells:.1f} s for "
              f"{n_cells} cell PLDs) -> {loop_total / 3600:8.1f} h for all points; PLD path is "
              f"{loop_total / t_pld:,.0f}x faster; sampled eps ours/ref: "
              f"{', '.join(f'{a / b:.5f}' for a, b in zip(mine, eps_ref))}")
        if rows >= 100_000_000:
            goals = [("100M rows < 5 min", t_pld < 300), ("peak < 4 GiB", peak_gib() < 4),
                     (">= 100x dp_accounting loop", loop_total / t_pld >= 100)]
        else:
            goals = [(">= 100x dp_accounting loop", loop_total / t_pld >= 100), ("peak < 4 GiB", peak_gib() < 4)]
        print("goals: " + ", ".join(f"{name} ({'met' if met else 'MISSED'})" for name, met in goals))
        ok &= all(met for _, met in goals)
        sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
