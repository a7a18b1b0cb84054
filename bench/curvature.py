"""Input-curvature scoring throughput: analysis.curvature vs one plain input-gradient pass.

For a LeNet on 1x28x28 inputs (``models.nets.build_model("lenet", (1, 28, 28), 10)``,
or a small GroupNorm LeNet defined here if ``models.nets`` cannot be imported),
random data and N points (default 512), measures in one run the median wall time
(over rounds, after an untimed warm-up) of:

* plain     -- one forward + backward of the summed per-example loss w.r.t. the
               input (``torch.autograd.grad``): the unit of work;
* curvature -- ``input_curvature(model, x, y, n_probes=K)``: 1 + K such passes' worth.

and prints, from medians over interleaved rounds (each method once per round, so
other load on a shared machine falls on both alike), the points/second of both and the
ratio curvature/plain -- also from the fastest calls and from process CPU time. Goal:
ratio <= 2K, i.e. no more work than the probes require (1 + K is the ideal). Exit
status 1 if the goal is missed.

    python bench/curvature.py [--points 512] [--probes 10] [--device cpu|cuda]
                              [--chunk-size N] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when not installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dpledger.models.curvature import default_chunk_size, input_curvature  # noqa: E402

SHAPE = (1, 28, 28)
CLASSES = 10


def lenet() -> tuple[nn.Module, str]:
    try:
        from dpledger.models.nets import build_model
    except ImportError:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.GroupNorm(4, 16), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.GroupNorm(8, 32), nn.Tanh(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.Tanh(), nn.Linear(128, CLASSES),
        ), "bench-local GroupNorm LeNet"
    return build_model("lenet", SHAPE, CLASSES, seed=0), "models.nets lenet"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, device: torch.device, rounds: int, warmup: int) -> dict:
    """Per method, a list of (wall s, process CPU s) per call; methods alternate every round
    so that other load on a shared machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            out[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="rows per pass for input_curvature (default: analysis.curvature.default_chunk_size)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians over them")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model, label = lenet()
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.points, *SHAPE, generator=g).to(device)
    y = torch.randint(0, CLASSES, (args.points,), generator=g).to(device)

    def plain():
        xin = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xin), y, reduction="none").sum()
        return torch.autograd.grad(loss, xin)[0]

    def curv():
        return input_curvature(model, x, y, n_probes=args.probes, chunk_size=args.chunk_size)

    times = interleaved({"plain": plain, "curvature": curv}, device, args.repeats, args.warmup)
    wall = {k: [w for w, _ in v] for k, v in times.items()}
    cpu = {k: [c for _, c in v] for k, v in times.items()}
    mp, mc = statistics.median(wall["plain"]), statistics.median(wall["curvature"])
    ratio = mc / mp
    best_ratio = min(wall["curvature"]) / min(wall["plain"])
    cpu_ratio = statistics.median(cpu["curvature"]) / statistics.median(cpu["plain"])
    goal = 2 * args.probes
    res = curv()
    rows = args.chunk_size or default_chunk_size(args.points, args.probes)
    print(f"model: {label}; device {device}; threads {torch.get_num_threads()}; points {args.points}; "
          f"probes {args.probes}; rows per pass {rows}; rounds {args.repeats} (interleaved, after warm-up)")
    print(f"plain input-gradient pass : {mp * 1e3:9.1f} ms  {args.points / mp:10.0f} points/s  (median wall)")
    print(f"input_curvature           : {mc * 1e3:9.1f} ms  {args.points / mc:10.0f} points/s  (median wall)")
    print(f"ratio curvature/plain     : {ratio:6.2f} median wall; {best_ratio:.2f} fastest calls; "
          f"{cpu_ratio:.2f} median process CPU time")
    verdict = "met" if ratio <= goal else "MISSED"
    print(f"ideal {1 + args.probes} (1 + probes passes), goal <= {goal}: {verdict}")
    print(f"sanity: trace finite {bool(torch.isfinite(res.trace).all())}, "
          f"median trace {res.trace.median().item():.4g}, median score {res.score.median().item():.4g}")
    return 0 if ratio <= goal else 1


if __name__ == "__main__":
    sys.exit(main())
