"""Per-example gradient norms: models.grad_norms vs a plain backward and vs Opacus's ghost clipping.

Peer: Opacus 1.6's own per-example norms for fast gradient clipping,
``GradSampleModuleFastGradientClipping(model, use_ghost_clipping=True,
loss_reduction="sum")`` -- forward, backward of the summed loss (its hooks
write each parameter's ``_norm_sample``: the ghost norm for ``Linear``,
per-sample gradients and their norms for the other layers), then
``get_norm_sample()``. This is the path Opacus's ``make_private(...,
grad_sample_mode="ghost")`` takes before its second, clipped backward.

For ``mlp`` and ``lenet`` on 28x28 single-channel inputs (random data, 10
classes, N points; default 256) and ``resnet18`` on 3x32x32 inputs (CIFAR
shape; default 32 points, fewer timed calls: it is ~100x the work), measures in
one run -- rounds of short blocks of each method, each block after 0.3 s of
untimed calls -- the median (and fastest) wall time of:

* ours      -- ``GradNormTracker(model)(x, y)``: per-example norms and losses;
* plain     -- one forward + ``loss.backward()`` of the summed loss (no per-example anything);
* ghost     -- Opacus's ghost-clipping norms, as above (the peer);
* persample -- forward + backward through ``opacus.GradSampleModule`` (per-example
               gradients in ``p.grad_sample``), then their norms (Opacus's older path).

Goals (mlp and lenet, medians): ours/plain <= 1.2 and ghost/ours >= 1.5; the
largest relative difference between our norms and each Opacus path's must be
< 1e-4. resnet18 is reported without a goal. Exit status 1 if a goal is missed.

    python bench/grad_norms.py [--device cpu|cuda] [--points 256] [--resnet-points 32]
                               [--repeats 30] [--rounds 10] [--threads N] [--models mlp lenet resnet18]
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

CLASSES = 10
SHAPES = {"mlp": (1, 28, 28), "lenet": (1, 28, 28), "resnet18": (3, 32, 32)}
GOAL_MODELS = ("mlp", "lenet")     # resnet18: reported, no goal
GOAL_PLAIN = 1.2                   # ours / plain <= this
GOAL_GHOST = 1.5                   # ghost / ours >= this
MAX_REL_DIFF = 1e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, device: torch.device, points: int, repeats: int, warmup_s: float,
                rounds: int) -> dict:
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    shape = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(points, *shape, generator=g).to(device)
    y = torch.randint(0, CLASSES, (points,), generator=g).to(device)
    model = build_model(name, shape, CLASSES, seed=0).to(device)
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    fgc = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=1.0,
                                               use_ghost_clipping=True, loss_reduction="sum")
    tracker = GradNormTracker(model)

    def ours():
        return tracker(x, y).norms

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()

    def ghost():
        fgc.zero_grad(set_to_none=True)
        F.cross_entropy(fgc(x), y, reduction="sum").backward()
        return fgc.get_norm_sample()

    def persample():
        gsm.zero_grad(set_to_none=True)  # also drops p.grad_sample
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        sq = sum(p.grad_sample.reshape(points, -1).square().sum(dim=1)
                 for p in gsm.parameters() if p.requires_grad)
        return sq.sqrt()

    ref = ours().double()
    rel = {k: ((ref - fn().double()).abs() / ref).max().item() for k, fn in (("ghost", ghost), ("persample", persample))}

    fns = {"ours": ours, "plain": plain, "ghost": ghost, "persample": persample}
    times: dict[str, list[float]] = {k: [] for k in fns}
    # Short blocks of consecutive calls (as in training), in rounds so that drift in machine load
    # hits all methods alike. Each block starts with `warmup_s` seconds of untimed calls: right after
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
    tracker.close()
    return {"model": name, "points": points, "median": {k: statistics.median(v) for k, v in times.items()},
            "min": {k: min(v) for k, v in times.items()}, "rel_diff": rel}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--points", type=int, default=256, help="tracked points per call for mlp/lenet (default 256)")
    ap.add_argument("--resnet-points", type=int, default=32, help="tracked points per call for resnet18 (default 32)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per method, median reported (default 30)")
    ap.add_argument("--resnet-repeats", type=int, default=3, help="timed calls per method for resnet18 (default 3)")
    ap.add_argument("--warmup-s", type=float, default=0.3,
                    help="seconds of untimed calls before each block (default 0.3; at least one call)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of blocks, interleaving the methods (default 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet", "resnet18"], choices=list(SHAPES))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, first layer
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    device = torch.device(args.device)
    print(f"device={args.device} threads={torch.get_num_threads()} points={args.points} "
          f"(resnet18: {args.resnet_points}) repeats={args.repeats} (resnet18: {args.resnet_repeats}) "
          f"(median; {args.rounds} rounds of blocks) torch={torch.__version__}")
    print("peer: Opacus GradSampleModuleFastGradientClipping(use_ghost_clipping=True) forward+backward+"
          "get_norm_sample(); also plain forward+backward and Opacus GradSampleModule per-sample norms")
    print(f"goals (mlp, lenet; medians): ours/plain <= {GOAL_PLAIN} and ghost/ours >= {GOAL_GHOST}; "
          f"norms agree with both Opacus paths to < {MAX_REL_DIFF:g} relative; resnet18 reported, no goal")
    head = (f"{'model':<8} {'input':>11} {'ours ms':>9} {'plain ms':>9} {'ghost ms':>9} {'persample ms':>12} "
            f"{'ours/plain':>10} {'ghost/ours':>10}  {'goals':<6}  {'(min) ours/plain':>16} {'ghost/ours':>10}"
            f"  max rel diff vs ghost, persample")
    print(head)
    print("-" * len(head))
    ok = True
    for name in args.models:
        is_goal = name in GOAL_MODELS
        pts = args.points if is_goal else args.resnet_points
        reps = args.repeats if is_goal else args.resnet_repeats
        r = bench_model(name, device, pts, reps, args.warmup_s if is_goal else 0.0,
                        max(1, min(args.rounds, reps)))
        med, best = r["median"], r["min"]
        a, b = med["ours"] / med["plain"], med["ghost"] / med["ours"]
        agree = max(r["rel_diff"].values()) < MAX_REL_DIFF
        if is_goal:
            met = a <= GOAL_PLAIN and b >= GOAL_GHOST and agree
            ok &= met
            verdict = "met" if met else "MISSED"
        else:
            verdict = "-" if agree else "MISSED"
            ok &= agree
        shape = "x".join(map(str, SHAPES[name]))
        print(f"{name:<8} {f'{pts}x{shape}':>11} {1e3 * med['ours']:9.2f} {1e3 * med['plain']:9.2f} "
              f"{1e3 * med['ghost']:9.2f} {1e3 * med['persample']:12.2f} {a:10.3f} {b:10.2f}  {verdict:<6}  "
              f"{best['ours'] / best['plain']:16.3f} {best['ghost'] / best['ours']:10.2f}  "
              f"{r['rel_diff']['ghost']:.1e}, {r['rel_diff']['persample']:.1e}")
    print("the (min) columns use each method's fastest call, less sensitive to other load on the machine; "
          "resnet18 has no goal ('-')")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
