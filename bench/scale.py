"""Accounting at scale over a Parquet lake: 100 million and 1 billion (point, step) rows.

Generates a lake in the layout the training workers write (``run_id=<id>/point_steps/
part-*.parquet`` plus ``run.json`` and a ``manifest.json`` listing the committed
shards), then composes per-example ε over it in place (``warehouse.lake.connect_lake``
+ ``warehouse.accounting.account``: DuckDB streams the Parquet shards out of core
with a memory limit and a spill directory) in a child process whose peak memory
(RSS) is reported. Beside it, the peer: a bare scan of the same rows and columns
(``SELECT count(*), sum(point_id), sum(grad_norm) FROM point_steps WHERE run_id = ...``
over the same lake view, in a fresh process). Prints seconds, rows/second and peak
memory for each size. Goals on this 2-core machine (issue #15): 1B rows composed in
under 60 s, peak memory at most 2 GiB; each printed with met/MISSED, and the script
exits with status 1 when one is missed.

    python bench/scale.py [--sizes 100M,1B] [--points 20000] [--lake DIR] [--keep] [--no-ray]

Then runs bench/scale_ray.py: the throughput of a 4-task local Ray sweep against the
same sweep in 1 task (``--no-ray`` skips it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

# bench/ingest.py is named like the `ingest` package; keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

Q, SIGMA, C, DELTA = 256 / 60_000, 1.0, 1.0, 1e-5
ROWS_PER_SHARD = 10_000_000


def make_lake(lake: Path, run_id: str, points: int, steps: int, seed: int = 0) -> float:
    """Shards of `steps_per_shard` steps x all points, like a worker's commits."""
    t0 = time.perf_counter()
    d = lake / f"run_id={run_id}"
    (d / "point_steps").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = max(1, ROWS_PER_SHARD // points)
    scale = np.exp(np.log(0.3) + 0.4 * (np.arange(points) % 97 / 97.0 - 0.5))  # each point its own scale
    shards = []
    for seq, s0 in enumerate(range(0, steps, per)):
        s1 = min(steps, s0 + per)
        n = (s1 - s0) * points
        norm = np.repeat(scale[None, :], s1 - s0, axis=0).ravel() * np.exp(0.8 * rng.standard_normal(n))
        table = pa.table({
            "run_id": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([run_id])),
            "step": np.repeat(np.arange(s0, s1, dtype=np.int64), points),
            "point_id": np.tile(np.arange(points, dtype=np.int64), s1 - s0),
            "grad_norm": norm,
            "norm_clipped": np.zeros(n, dtype=bool),
        })
        rel = f"point_steps/part-w0-{seq:06d}.parquet"
        pq.write_table(table, d / rel)
        shards.append({"seq": seq, "worker": "w0", "committed_step": s1 - 1,
                       "files": {"point_steps": {"path": rel, "rows": n}}})
    run = {"run_id": run_id, "dataset": "synthetic", "model": "bench", "sample_rate": Q, "noise_multiplier": SIGMA,
           "max_grad_norm": C, "steps": steps, "delta": DELTA, "private": True, "source": "bench", "n_train": points}
    (d / "run.json").write_text(json.dumps(run))
    (d / "manifest.json").write_text(json.dumps({"run_id": run_id, "committed_step": steps - 1, "status": "finished",
                                                 "shards": shards}))
    return time.perf_counter() - t0


def _account_child(lake: str, run_id: str, spill: str, out) -> None:
    from dpledger.warehouse import accounting
    from dpledger.warehouse.lake import connect_lake

    t0 = time.perf_counter()
    con = connect_lake(lake, memory_limit="4GB", temp_directory=spill)
    summary = accounting.account(con, [run_id])[0]
    elapsed = time.perf_counter() - t0
    con.close()
    out.send((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, summary))


SCAN_SQL = "SELECT count(*), sum(point_id), sum(grad_norm) FROM point_steps WHERE run_id = ?"


def _scan_child(lake: str, run_id: str, spill: str, out) -> None:
    from dpledger.warehouse.lake import connect_lake

    con = connect_lake(lake, memory_limit="4GB", temp_directory=spill)
    t0 = time.perf_counter()
    con.execute(SCAN_SQL, [run_id]).fetchall()
    elapsed = time.perf_counter() - t0
    con.close()
    out.send(elapsed)


def _in_child(target, *args):
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=target, args=(*args, send))
    child.start()
    result = recv.recv()
    child.join()
    return result


def measure(lake: Path, run_id: str, spill: Path):
    return _in_child(_account_child, str(lake), run_id, str(spill))


def scan(lake: Path, run_id: str, spill: Path) -> float:
    return _in_child(_scan_child, str(lake), run_id, str(spill))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100M,1B")
    ap.add_argument("--points", type=int, default=20_000)
    ap.add_argument("--lake", type=Path, default=None, help="lake folder [default: a temporary one]")
    ap.add_argument("--keep", action="store_true", help="keep the generated lake")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray sweep comparison")
    args = ap.parse_args()
    sizes = {"100M": 100_000_000, "1B": 1_000_000_000}
    root = args.lake or Path(tempfile.mkdtemp(prefix="dpledger-lake-"))
    goals: list[tuple[str, bool]] = []
    try:
        for name in args.sizes.split(","):
            rows = sizes[name]
            steps = rows // args.points
            run_id = f"bench-{name}"
            lake = root / name
            if not (lake / f"run_id={run_id}" / "manifest.json").exists():
                gen = make_lake(lake, run_id, args.points, steps)
                size = sum(f.stat().st_size for f in lake.rglob("*.parquet"))
                print(f"{name}: generated {rows:,} rows ({args.points:,} points x {steps:,} steps) as "
                      f"{size / 2**30:.1f} GiB of Parquet in {gen:.0f} s", flush=True)
            spill = root / "spill"
            spill.mkdir(exist_ok=True)
            peer = scan(lake, run_id, spill)
            elapsed, peak, summary = measure(lake, run_id, spill)
            print(f"{name}: bare scan of the lake ({SCAN_SQL.replace('?', repr(run_id))}): {peer:8.1f} s  "
                  f"{rows / peer:12,.0f} rows/s", flush=True)
            print(f"{name}: composed in {elapsed:8.1f} s  {rows / elapsed:12,.0f} rows/s  peak RSS "
                  f"{peak / 2**30:.2f} GiB  ({elapsed / peer:.1f}x the bare scan; epsilon median "
                  f"{summary['epsilon_median']:.4f}, data-independent {summary['run_epsilon']:.4f})", flush=True)
            if name == "1B":
                goals += [(f"1B rows in under 60 s ({elapsed:.1f} s)", elapsed < 60),
                          (f"peak RSS <= 2 GiB ({peak / 2**30:.2f} GiB)", peak <= 2 * 2**30)]
        if goals:
            print("goals: " + "; ".join(f"{text} {'met' if ok else 'MISSED'}" for text, ok in goals), flush=True)
    finally:
        if not args.keep and args.lake is None:
            shutil.rmtree(root, ignore_errors=True)
    if not args.no_ray:
        import subprocess

        print("Ray: 4 runs as 4 tasks vs 1 task (bench/scale_ray.py)", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("scale_ray.py"))], check=False)
    if not all(ok for _, ok in goals):
        sys.exit(1)


if __name__ == "__main__":
    main()
