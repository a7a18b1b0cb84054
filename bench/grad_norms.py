"""Per-example gradient norms: models.grad_norms vs a plain backward and vs Opacus.

For ``mlp`` and ``lenet`` on 28x28 single-channel inputs (random data, 10
classes) and N tracked points (default 256), measures in one run (rounds of short blocks
of each, each block after 0.3 s of untimed calls) the median wall time of:

* ours      -- ``GradNormTracker(model)(x, y)``: per-example norms and losses;
* plain     -- one forward + ``loss.backward()`` of the summed loss (no per-example anything);
* opacus    -- forward + backward through ``opacus.GradSampleModule`` (per-example
               gradients in ``p.grad_sample``), then their norms.

and prints ours/plain (goal: <= 1.5) and opacus/ours (goal: >= 2) from the
medians -- and from each method's fastest call, which other load on a shared
machine disturbs less -- with the largest relative difference between our norms
and Opacus's as a sanity check. Exit status 1 if a goal is missed.

    python bench/grad_norms.py [--device cpu|cuda] [--points 256] [--repeats 30] [--rounds 10] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when not installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dpledger.models.grad_norms import GradNormTracker  # noqa: E402
from dpledger.models.nets import build_model  # noqa: E402

SHAPE = (1, 28, 28)
CLASSES = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, device: torch.device, points: int, repeats: int, warmup_s: float,
                rounds: int) -> dict:
    from opacus import GradSampleModule

    g = torch.Generator().manual_seed(0)
    x = torch.randn(points, *SHAPE, generator=g).to(device)
    y = torch.randint(0, CLASSES, (points,), generator=g).to(device)
    model = build_model(name, SHAPE, CLASSES, seed=0).to(device)
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    tracker = GradNormTracker(model)

    def ours():
        return tracker(x, y).norms

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()

    def opacus():
        gsm.zero_grad(set_to_none=True)  # also drops p.grad_sample
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        sq = sum(p.grad_sample.reshape(points, -1).square().sum(dim=1)
                 for p in gsm.parameters() if p.requires_grad)
        return sq.sqrt()

    fns = {"ours": ours, "plain": plain, "opacus": opacus}
    times: dict[str, list[float]] = {k: [] for k in fns}
    # Short blocks of consecutive calls (as in training), in rounds so that drift in machine load
    # hits all three alike. Each block starts with `warmup_s` seconds of untimed calls: right after
    # switching methods the previous kernels' thread pools are still spinning (OpenMP block time,
    # ~0.2 s) and take the cores, which would make a 2 ms call look 50x slower.
    per_block = -(-repeats // rounds)
    for _ in range(rounds):
        for k, fn in fns.items():
            t_end = time.perf_counter() + warmup_s
            fn()
            while time.perf_counter() < t_end:
                fn()
            for _ in range(per_block):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
    rel = ((ours().double() - opacus().double()).abs() / opacus().double()).max().item()
    tracker.close()
    return {"model": name, "median": {k: statistics.median(v) for k, v in times.items()},
            "min": {k: min(v) for k, v in times.items()}, "rel_diff": rel}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--points", type=int, default=256, help="tracked points per call (default 256)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per method, median reported (default 30)")
    ap.add_argument("--warmup-s", type=float, default=0.3,
                    help="seconds of untimed calls before each block (default 0.3; at least one call)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of blocks, interleaving the methods (default 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet"])
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, first layer
    device = torch.device(args.device)
    print(f"device={args.device} threads={torch.get_num_threads()} points={args.points} "
          f"repeats={args.repeats} (median; {args.rounds} rounds of blocks) torch={torch.__version__}")
    head = (f"{'model':<7} {'ours ms':>8} {'plain ms':>9} {'opacus ms':>10} {'ours/plain':>11} "
            f"{'opacus/ours':>12}  {'goals':<6}  {'(min) ours/plain':>16} {'opacus/ours':>12}  norms vs opacus")
    print(head)
    print("-" * len(head))
    ok = True
    for name in args.models:
        r = bench_model(name, device, args.points, args.repeats, args.warmup_s, max(1, min(args.rounds, args.repeats)))
        med, best = r["median"], r["min"]
        a, b = med["ours"] / med["plain"], med["opacus"] / med["ours"]
        met = a <= 1.5 and b >= 2.0
        ok &= met
        print(f"{name:<7} {1e3 * med['ours']:8.2f} {1e3 * med['plain']:9.2f} {1e3 * med['opacus']:10.2f} "
              f"{a:11.2f} {b:12.2f}  {'met' if met else 'MISSED':<6}  "
              f"{best['ours'] / best['plain']:16.2f} {best['opacus'] / best['ours']:12.2f}  "
              f"max rel diff {r['rel_diff']:.1e}")
    print("goals: ours/plain <= 1.5 and opacus/ours >= 2 (medians); the (min) columns use each method's "
          "fastest call, less sensitive to other load on the machine")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
