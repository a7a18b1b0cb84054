"""Sweep throughput on Ray: N runs as N tasks vs the same N runs one after another in 1 task.

Starts one local Ray cluster (127.0.0.1, usage stats off; ``--cpus``, default all
cores), warms its workers up (Python + torch imported in each, so neither side pays
worker start-up), then times, in the same process:

* **1 task**: one Ray task that trains the runs one after another (``ingest.tasks.train_in_lake``
  each, 1 torch thread), into its own lake;
* **N tasks**: ``ingest.ray_executor.run_sweep_ray``, one task per run, into another lake.

Prints runs/minute of each and the speedup. Each run uses one core, so the speedup is
bounded by the cores (2 on the development machine: expect <= 2x) and by the runs. It
also prints the parallelism the machine gives at that moment (the same number of
pure-Python loops as tasks at once vs in one task): on a shared machine other
processes take cores too, and the sweep cannot beat that figure.

    python bench/scale_ray.py [--runs 4] [--epochs 2] [--model mlp] [--cpus N] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from dpledger.ingest.ray_executor import run_sweep_ray, start_local, stop_local  # noqa: E402
from dpledger.ingest.tasks import train_in_lake  # noqa: E402
from dpledger.ingest.worker import TrainConfig  # noqa: E402


def configs(n: int, epochs: float, model: str) -> list[TrainConfig]:
    return [TrainConfig(run=f"bench-s{seed}", dataset="digits", model=model, epochs=epochs, seed=seed,
                        noise_multiplier=1.0, batch_size=64) for seed in range(n)]


def _sequential(cfg_dicts: list[dict], lake: str) -> list[dict]:
    return [train_in_lake(d, lake, "seq", 1) for d in cfg_dicts]


def _warm(_: int) -> int:
    import time

    import dpledger.ingest.worker  # noqa: F401 - torch, opacus, the datasets: what a run imports

    time.sleep(1.0)  # hold the worker so that the next warm-up task starts another one
    return os.getpid()


def _burn(seconds_of_work: int) -> int:
    total = 0
    for i in range(seconds_of_work * 15_000_000):
        total += i
    return total


def parallelism(ray, cpus: int) -> float:
    """What the machine gives now: ``cpus`` pure-Python loops as tasks at once vs the same in one task."""
    burn = ray.remote(num_cpus=1)(_burn)
    t = time.perf_counter()
    ray.get(burn.remote(cpus))
    one = time.perf_counter() - t
    t = time.perf_counter()
    ray.get([burn.remote(1) for _ in range(cpus)])
    return one / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=2, help="time each side this many times (alternating); best kept")
    args = ap.parse_args()

    import ray

    t0 = time.perf_counter()
    saved = start_local(num_cpus=args.cpus)
    try:
        print(f"local Ray {ray.__version__} cluster: {args.cpus} CPUs, node {ray.util.get_node_ip_address()}, "
              f"started in {time.perf_counter() - t0:.1f} s", flush=True)
        warm = ray.remote(num_cpus=1)(_warm)
        pids = set(ray.get([warm.remote(i) for i in range(args.cpus)]))
        print(f"warmed up {len(pids)} worker processes; parallelism available now "
              f"{parallelism(ray, args.cpus):.2f}x ({args.cpus} CPU-bound loops at once vs in sequence)", flush=True)
        one = ray.remote(num_cpus=1)(_sequential)
        t_one = t_many = float("inf")
        for rep in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="scale-ray-") as tmp:  # fresh lakes: nothing is skipped
                cfgs = configs(args.runs, args.epochs, args.model)
                for cfg in cfgs:
                    cfg.threads = 1  # as run_sweep_ray's tasks: one core each
                t = time.perf_counter()
                seq = ray.get(one.remote([asdict(c) for c in cfgs], str(Path(tmp) / "lake-1")))
                t_one = min(t_one, time.perf_counter() - t)
                t = time.perf_counter()
                par = run_sweep_ray(configs(args.runs, args.epochs, args.model), Path(tmp) / "lake-n")
                t_many = min(t_many, time.perf_counter() - t)
        for name, results in (("1 task", seq), (f"{args.runs} tasks", par)):
            bad = [r for r in results if r.get("status") != "finished"]
            if bad:
                raise SystemExit(f"{name}: {bad[0]['run_id']} {bad[0]['status']}: {bad[0].get('error')}")
        rows = sum(r["rows"] for r in par)
        assert rows == sum(r["rows"] for r in seq)
        steps = par[0]["steps"]
        print(f"{args.runs} runs of digits {args.model}, {args.epochs:g} epochs ({steps} steps, "
              f"{par[0]['tracked_points']} points tracked each, {rows} point-step rows in all)")
        print(f"best of {args.repeat}:")
        print(f"1 task  ({args.runs} runs in sequence): {t_one:6.1f} s  {60 * args.runs / t_one:6.1f} runs/minute")
        print(f"{args.runs} tasks (one run each):      {t_many:6.1f} s  {60 * args.runs / t_many:6.1f} runs/minute")
        print(f"speedup {t_one / t_many:.2f}x on {args.cpus} CPUs (at most min(CPUs, runs) = "
              f"{min(args.cpus, args.runs)}x; this machine has {os.cpu_count()} cores)")
    finally:
        stop_local(saved)


if __name__ == "__main__":
    main()
