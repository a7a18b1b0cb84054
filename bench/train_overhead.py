"""Cost of tracking: a DP-SGD run on digits with every training point tracked at every
step, against the same run with tracking off, measured in the same process.

Prints the training-loop time of both, the slowdown (goal: under 2x), and the share of
the tracked run's step time spent building and committing rows (the logging/sink
share; goal: under 5%). Both runs use the DuckDB sink of `dpledger train`. The tracked
run clips each batch with the norms it has just tracked (the worker's default,
``reuse_norms``); a third run, tracked but clipping with Opacus's own per-sample pass,
shows what that reuse saves.

    python bench/train_overhead.py [--model mlp] [--epochs 20] [--repeats 3]
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


def one(tmp: Path, track: str, model: str, epochs: float, i: int, every: int = 1, reuse: bool = True) -> dict:
    from dpledger.ingest.sinks import DuckDBSink
    from dpledger.ingest.worker import TrainConfig, train

    name = f"{track}-{'reuse' if reuse else 'own'}-{i}"
    cfg = TrainConfig(run=name, dataset="digits", model=model, epochs=epochs, batch_size=64, lr=0.5,
                      noise_multiplier=1.0, max_grad_norm=1.0, track=track, track_every=every, seed=0,
                      reuse_norms=reuse)
    sink = DuckDBSink(tmp / f"{name}.duckdb")
    try:
        return train(cfg, sink, db_dir=tmp)
    finally:
        sink.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="best of N for each (runs interleaved)")
    ap.add_argument("--track-every", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        off, on, own = [], [], []
        for i in range(args.repeats):  # interleaved, so drifting machine load hits all three alike
            off.append(one(tmp, "none", args.model, args.epochs, i))
            on.append(one(tmp, "all", args.model, args.epochs, i, args.track_every))
            own.append(one(tmp, "all", args.model, args.epochs, i, args.track_every, reuse=False))
        best = lambda runs: min(runs, key=lambda s: s["timing"]["loop_s"])  # noqa: E731
        base, tracked, separate = best(off), best(on), best(own)
        b, t, o = base["timing"], tracked["timing"], separate["timing"]
        steps = tracked["steps"]
        every = "every step" if args.track_every == 1 else f"every {args.track_every} steps"
        print(f"{args.model} on digits, {steps} steps, {tracked['tracked_points']} points tracked {every}, "
              f"best of {args.repeats}")
        print(f"tracking off               : {b['loop_s']:7.2f} s  ({1e3 * b['loop_s'] / steps:6.1f} ms/step; "
              "Opacus per-sample clipping)")
        for label, r in (("tracking all, norms reused", t), ("tracking all, own clipping", o)):
            print(f"{label} : {r['loop_s']:7.2f} s  ({1e3 * r['loop_s'] / steps:6.1f} ms/step; norms "
                  f"{1e3 * r['track_s'] / steps:.1f} ms, rows+commits {1e3 * r['sink_s'] / steps:.1f} ms, "
                  f"evaluations {1e3 * r['eval_s'] / steps:.1f} ms)")
        slowdown = t["loop_s"] / b["loop_s"]
        share = t["sink_s"] / t["loop_s"]
        print(f"slowdown (tracked / untracked)          : {slowdown:.2f}x  "
              f"(goal < 2x: {'met' if slowdown < 2 else 'MISSED'})")
        print(f"  the same without reusing the norms    : {o['loop_s'] / b['loop_s']:.2f}x")
        print(f"logging/sink share of tracked step time : {100 * share:.1f}%  "
              f"(goal < 5%: {'met' if share < 0.05 else 'MISSED'})")


if __name__ == "__main__":
    main()
