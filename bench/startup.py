"""Start-up time of the light commands: `dpledger --help` and `dpledger runs` (issue #12).

Builds a demo-sized warehouse (one run, 1,437 points x 179 steps, ingested as `dpledger
ingest steps` would, so the run's epsilon is remembered by the writer), then times, as
fresh processes, interleaved, ``--repeats`` times each:

* peer    -- ``python -c "import duckdb"``: the interpreter plus the database library,
             the floor any command that reads the warehouse pays;
* ``dpledger --help``;
* ``dpledger runs --db W``: the run listing with its data-independent epsilon.

Prints the median and fastest wall time of each and the goals (both commands under
0.5 s on this 2-core machine); exit status 1 if a goal is missed.

    python bench/startup.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ingest.py is named like the `ingest` package; keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

GOAL_S = 0.5


def build(db: Path, points: int = 1437, steps: int = 179) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpledger import warehouse
    from dpledger.ingest import ingest_steps

    path = db.parent / "steps.parquet"
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"step": np.repeat(np.arange(steps), points), "point_id": np.tile(np.arange(points), steps),
                             "grad_norm": rng.gamma(2.0, 0.5, points * steps)}), path)
    con = warehouse.connect(db)
    try:
        ingest_steps(con, path, "demo", sample_rate=64 / points, noise_multiplier=1.0, max_grad_norm=1.0,
                     delta=1e-5, dataset="digits")
    finally:
        con.close()


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    dpledger = shutil.which("dpledger") or str(Path(sys.executable).with_name("dpledger"))
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "w.duckdb"
        build(db)
        cmds = {
            'peer: python -c "import duckdb"': [sys.executable, "-c", "import duckdb"],
            "dpledger --help": [dpledger, "--help"],
            "dpledger runs": [dpledger, "runs", "--db", str(db)],
        }
        for cmd in cmds.values():  # warm the file cache
            timed(cmd)
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                times[name].append(timed(cmd))
    print(f"start-up, {args.repeats} fresh processes each (median / fastest wall seconds):")
    for name, ts in times.items():
        print(f"  {name:32s} {statistics.median(ts):6.3f} s  {min(ts):6.3f} s")
    missed = []
    for name in ("dpledger --help", "dpledger runs"):
        med = statistics.median(times[name])
        ok = med < GOAL_S
        if not ok:
            missed.append(name)
        print(f"goal: {name} under {GOAL_S} s (median {med:.3f} s): {'met' if ok else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
