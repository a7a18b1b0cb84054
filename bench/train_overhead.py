"""Cost of tracking (issue #15): a DP-SGD run on digits with every training point tracked at
every step, against its peer, the same run with tracking off, measured in the same process.

Goals (issue #15): the tracked run's training loop is under 1.3x its peer's (the tracked
slowdown), and the logging/sink share (building rows and committing them, the recorder's own
clock) is under 5% of the tracked run's loop time. Both are judged on ``dpledger train``'s
default path: the lake (:class:`ingest.sinks.ShardSink`, committed Parquet shards under the
run's lock). The database sink (``--sink database``, :class:`ingest.sinks.DuckDBSink`) is
measured and printed too, each sink against an untracked peer writing to the same sink.

Method: one warm-up run of each condition (imports, the allocator), then ``--repeats`` rounds;
each round runs every condition once, in an order that rotates from round to round, so load
from other processes drifts onto all of them alike. Printed per condition: the median loop
time and its spread (min-max over the rounds); the slowdown is the median of the per-round
ratios (tracked / untracked of the same round), with their spread. The tracked runs clip each
batch with the norms they have just tracked (``reuse_norms``, the worker's default);
``--own-clipping`` adds a tracked run clipping with Opacus's own per-sample pass.

Exits with status 1 when a goal is missed.

    python bench/train_overhead.py [--model mlp] [--epochs 20] [--repeats 5] [--sinks lake,database]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

# bench/ingest.py is named like the `ingest` package; keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

warnings.filterwarnings("ignore", message="Full backward hook")

GOAL_SLOWDOWN = 1.3   # issue #15: tracked / untracked loop time
GOAL_SINK = 0.05      # rows + commits, share of the tracked loop time
SINKS = {"lake": "lake (ShardSink, default)", "database": "database (DuckDBSink)"}


def one(tmp: Path, sink_kind: str, track: str, model: str, epochs: float, name: str, every: int = 1,
        reuse: bool = True) -> dict:
    """One training run, as `dpledger train` makes it with that sink; its summary."""
    from dpledger.ingest.sinks import DuckDBSink, ShardSink
    from dpledger.ingest.worker import TrainConfig, train

    cfg = TrainConfig(run=name, dataset="digits", model=model, epochs=epochs, batch_size=64, lr=0.5,
                      noise_multiplier=1.0, max_grad_norm=1.0, track=track, track_every=every, seed=0,
                      reuse_norms=reuse)
    sink = ShardSink(tmp / "lake", worker="train") if sink_kind == "lake" else DuckDBSink(tmp / f"{name}.duckdb")
    try:
        return train(cfg, sink, db_dir=tmp)
    finally:
        sink.close()


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (each runs every condition once)")
    ap.add_argument("--track-every", type=int, default=1)
    ap.add_argument("--sinks", default="lake,database", help="comma-separated: lake (the default path), database")
    ap.add_argument("--own-clipping", action="store_true",
                    help="also a tracked run clipping with Opacus's per-sample pass (lake)")
    args = ap.parse_args()
    sinks = [s.strip() for s in args.sinks.split(",") if s.strip()]
    if not sinks or any(s not in SINKS for s in sinks):
        ap.error(f"--sinks: choose from {', '.join(SINKS)}")
    conds = [(s, t, True) for s in sinks for t in ("none", "all")]
    if args.own_clipping:
        conds.append((sinks[0], "all", False))
    runs: dict[tuple, list[dict]] = {c: [] for c in conds}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k, (s, t, reuse) in enumerate(conds):  # warm-up, discarded
            one(tmp, s, t, args.model, 1, f"warm-{k}", args.track_every, reuse)
        for i in range(args.repeats):
            for j in range(len(conds)):
                s, t, reuse = c = conds[(i + j) % len(conds)]
                runs[c].append(one(tmp, s, t, args.model, args.epochs, f"{s}-{t}-{int(reuse)}-{i}",
                                   args.track_every, reuse))
    loop = {c: [r["timing"]["loop_s"] for r in rs] for c, rs in runs.items()}
    tracked = runs[conds[1]][0]
    steps = tracked["steps"]
    every = "every step" if args.track_every == 1 else f"every {args.track_every} steps"
    print(f"{args.model} on digits, {steps} steps, batch 64, {tracked['tracked_points']} points tracked {every}; "
          f"{args.repeats} rounds, conditions interleaved (order rotating); median (min-max) of the rounds")
    ok = True
    judged = "lake" if "lake" in sinks else sinks[0]  # the goals' path: the default, unless not measured
    for s in sinks:
        off, on = (s, "none", True), (s, "all", True)
        ratios = [a / b for a, b in zip(loop[on], loop[off])]
        slowdown = statistics.median(ratios)
        shares = [r["timing"]["sink_s"] / r["timing"]["loop_s"] for r in runs[on]]
        share = statistics.median(shares)
        default = s == judged
        print(f"sink: {SINKS[s]}")
        for label, c in (("peer: tracking off", off), ("tracking all, norms reused", on)):
            rs = runs[c]
            per = lambda key: 1e3 * statistics.median(r["timing"][key] for r in rs) / steps  # noqa: E731
            print(f"  {label:<27}: {statistics.median(loop[c]):6.2f} s ({spread(loop[c])})  "
                  f"{1e3 * statistics.median(loop[c]) / steps:5.2f} ms/step  [norms {per('track_s'):.2f} ms, "
                  f"rows+commits {per('sink_s'):.2f} ms, evaluations {per('eval_s'):.2f} ms]")
        goal = f"goal < {GOAL_SLOWDOWN}x, issue #15" + ("" if default else "; informative, not the default path")
        met = slowdown < GOAL_SLOWDOWN
        print(f"  slowdown (tracked / untracked)   : {slowdown:.2f}x ({spread(ratios)})  "
              f"({goal}: {'met' if met else 'MISSED'})")
        share_met = share < GOAL_SINK
        print(f"  logging/sink share of tracked loop: {100 * share:.1f}% ({spread([100 * x for x in shares], '{:.1f}')}%)"
              f"  (goal < {100 * GOAL_SINK:.0f}%: {'met' if share_met else 'MISSED'})")
        if default:
            ok &= met and share_met
    if args.own_clipping:
        own = conds[-1]
        ratios = [a / b for a, b in zip(loop[own], loop[(own[0], "none", True)])]
        print(f"tracking all, Opacus's own clipping ({own[0]}): {statistics.median(loop[own]):.2f} s, "
              f"{statistics.median(ratios):.2f}x ({spread(ratios)}) untracked: what reusing the norms saves")
    print(f"issue #15 goals on the {'default path' if judged == 'lake' else 'measured path'} ({judged}): "
          f"{'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
