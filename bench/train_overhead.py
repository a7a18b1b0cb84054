"""Cost of tracking: a DP-SGD run on digits with every training point tracked at every
step, against the same run with tracking off, measured in the same process.

Prints the training-loop time of both, the slowdown (goal: under 2x), and the share of
the tracked run's step time spent building and committing rows (the logging/sink
share; goal: under 5%). Both runs use the DuckDB sink of `dpledger train`.

    python bench/train_overhead.py [--model mlp] [--epochs 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

# bench/ingest.py is named like the `ingest` package; keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

warnings.filterwarnings("ignore", message="Full backward hook")


def one(tmp: Path, track: str, model: str, epochs: float, i: int, every: int = 1) -> dict:
    from ingest.sinks import DuckDBSink
    from ingest.worker import TrainConfig, train

    cfg = TrainConfig(run=f"{track}-{i}", dataset="digits", model=model, epochs=epochs, batch_size=64, lr=0.5,
                      noise_multiplier=1.0, max_grad_norm=1.0, track=track, track_every=every, seed=0)
    sink = DuckDBSink(tmp / f"{track}-{i}.duckdb")
    try:
        return train(cfg, sink, db_dir=tmp)
    finally:
        sink.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each")
    ap.add_argument("--track-every", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        off, on = [], []
        for i in range(args.repeats):
            off.append(one(tmp, "none", args.model, args.epochs, i))
            on.append(one(tmp, "all", args.model, args.epochs, i, args.track_every))
        base = min(off, key=lambda s: s["timing"]["loop_s"])
        tracked = min(on, key=lambda s: s["timing"]["loop_s"])
        b, t = base["timing"], tracked["timing"]
        steps = tracked["steps"]
        every = "every step" if args.track_every == 1 else f"every {args.track_every} steps"
        print(f"{args.model} on digits, {steps} steps, {tracked['tracked_points']} points tracked {every}")
        print(f"tracking off : {b['loop_s']:7.2f} s  ({1e3 * b['loop_s'] / steps:6.1f} ms/step)")
        print(f"tracking all : {t['loop_s']:7.2f} s  ({1e3 * t['loop_s'] / steps:6.1f} ms/step; norms "
              f"{1e3 * t['track_s'] / steps:.1f} ms, rows+commits {1e3 * t['sink_s'] / steps:.1f} ms, "
              f"evaluations {1e3 * t['eval_s'] / steps:.1f} ms)")
        slowdown = t["loop_s"] / b["loop_s"]
        share = t["sink_s"] / t["loop_s"]
        print(f"slowdown (tracked / untracked)        : {slowdown:.2f}x  (goal < 2x: {'met' if slowdown < 2 else 'MISSED'})")
        print(f"logging/sink share of tracked step time: {100 * share:.1f}%  (goal < 5%: {'met' if share < 0.05 else 'MISSED'})")


if __name__ == "__main__":
    main()
