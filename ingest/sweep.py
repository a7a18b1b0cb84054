"""Sweeps (``dpledger sweep CONFIG.toml``): a grid of training runs across local worker processes.

CONFIG::

    [base]                 # options of `dpledger train`, long names with underscores
    dataset = "digits"
    model = "mlp"
    epochs = 3
    max_grad_norm = 1.0

    [grid]                 # lists: the runs are their cartesian product
    seed = [0, 1, 2]
    noise_multiplier = [0.8, 1.2]

    [[runs]]               # optional explicit rows (each over [base]), e.g. a paper's table
    noise_multiplier = 2.0
    lr = 0.1
    run = "table1-row3"

Run names come from the values that vary (``s0-n0.8``) unless a row gives ``run``.
Each run is one task (:func:`ingest.tasks.train_in_lake`) that writes Parquet shards
into the lake; merging the lake into a database is the caller's next step (the
``dpledger sweep`` command merges it when all runs are done).
Runs already finished in the lake are skipped and incomplete ones resumed, so a
sweep can simply be run again after a crash.

``run(..., executor="ray")`` runs each config as a Ray task instead
(:mod:`ingest.ray_executor`), on a local cluster or on one at ``address``.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from dpledger.analysis.validate import ParameterError, whole
from dpledger.warehouse.errors import UserError

from .ray_executor import import_ray, parse_address, run_sweep_ray
from .tasks import train_in_lake
from .worker import TrainConfig, validate

ABBREVIATIONS = {"seed": "s", "noise_multiplier": "n", "target_epsilon": "e", "subset_ratio": "sub",
                 "batch_size": "b", "lr": "lr", "max_grad_norm": "c", "epochs": "ep"}


def _name_part(key: str, value) -> str:
    if key in ("model", "dataset"):
        return str(value)
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{ABBREVIATIONS.get(key, key + '_')}{text}"  # key_value: '=' would break the lake's hive folders


#: The most runs a sweep may have unless the caller says more (``max_runs``): the grid's
#: size is counted from its list lengths before any run is made.
MAX_RUNS = 10_000
#: The largest sweep config file read (a TOML file of a few kilobytes describes any sweep).
MAX_CONFIG_BYTES = 1 << 20


def expand(config: dict, where: str = "sweep config", max_runs: int = MAX_RUNS) -> list[TrainConfig]:
    """The runs of a sweep config (a parsed TOML document); more than ``max_runs`` runs
    (the product of the [grid] list lengths plus the [[runs]] rows) are refused before
    any is made."""
    max_runs = whole("max_runs", max_runs, 1)
    if not isinstance(config, dict):
        raise UserError(f"{where}: not a table of sections [base], [grid], [[runs]]")
    allowed = {"base", "grid", "runs"}
    extra = sorted(set(config) - allowed, key=str)
    if extra:
        raise UserError(f"{where}: unknown section [{extra[0]}] (sections: base, grid, runs)")
    base = config.get("base", {})
    grid = config.get("grid", {})
    explicit = config.get("runs", [])
    if not isinstance(base, dict):
        raise UserError(f"{where}: [base] must be a table of options")
    if not isinstance(grid, dict) or not isinstance(explicit, list):
        raise UserError(f"{where}: [grid] is a table of lists and [[runs]] a list of tables")
    base = dict(base)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: [grid] {key} must be a non-empty list")
    keys = list(grid)
    size = math.prod(len(grid[k]) for k in keys) if keys or not explicit else 0
    if size + len(explicit) > max_runs:
        raise UserError(f"{where}: the sweep has {size + len(explicit):,} runs, more than max_runs "
                        f"{max_runs:,}", "max_runs")
    prefix = base.pop("run", None)
    rows: list[tuple[dict, list[str]]] = []
    # no [grid]: product() of nothing is one empty combo, which is a run only if there are no [[runs]] either
    for combo in itertools.product(*(grid[k] for k in keys)) if keys or not explicit else ():
        rows.append(({**base, **dict(zip(keys, combo))}, [_name_part(k, v) for k, v in zip(keys, combo)]))
    for i, row in enumerate(explicit):
        if not isinstance(row, dict):
            raise UserError(f"{where}: [[runs]] entry {i + 1} is not a table")
        varying = [_name_part(k, v) for k, v in row.items() if k != "run"]
        rows.append(({**base, **row}, varying or [f"row{i + 1}"]))
    if not rows:
        rows.append((base, []))
    configs, names = [], set()
    for options, parts in rows:
        options = dict(options)
        if "run" not in options:
            options["run"] = "-".join(([str(prefix)] if prefix else []) + parts) or (str(prefix) if prefix else "run")
        cfg = TrainConfig.from_dict(options, where)
        try:
            validate(cfg)
        except (ParameterError, UserError) as exc:  # the option as the file spells it, not a flag
            raise UserError(f"{where}: run {cfg.run!r}: {exc}") from None
        if cfg.run in names:
            raise UserError(f"{where}: two runs are named {cfg.run!r}; give [[runs]] entries a run name")
        names.add(cfg.run)
        configs.append(cfg)
    return configs


def load_config(path: str | Path, max_runs: int = MAX_RUNS) -> list[TrainConfig]:
    """The runs of the sweep config file ``path`` (TOML, UTF-8); see :func:`expand`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such sweep config")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a sweep config")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: more than {MAX_CONFIG_BYTES:,} bytes; not a sweep config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}: not a text (UTF-8) file: line {line} has byte 0x{data[exc.start]:02x}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({' '.join(str(exc).split())})") from None
    return expand(doc, str(path), max_runs=max_runs)


def run_sweep(configs: list[TrainConfig], lake: str | Path, workers: int = 1,
              on_done: Callable[[dict, int, int], None] | None = None) -> list[dict]:
    """Run every config across ``workers`` processes into ``lake``; returns their summaries."""
    if workers < 1:
        raise UserError(f"workers {workers} must be at least 1", "workers")
    lake = Path(lake)
    lake.mkdir(parents=True, exist_ok=True)
    for cfg in configs:
        if cfg.run_dir is None:
            cfg.run_dir = str(lake / f"run_id={cfg.run}")
    threads = max(1, (os.cpu_count() or 1) // workers)
    results = []
    if workers == 1:
        for i, cfg in enumerate(configs):
            results.append(train_in_lake(asdict(cfg), str(lake), "w0", threads))
            if on_done:
                on_done(results[-1], i + 1, len(configs))
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(train_in_lake, asdict(cfg), str(lake), f"w{i}", threads): cfg for i, cfg in enumerate(configs)}
        for done, fut in enumerate(as_completed(futures), 1):
            results.append(fut.result())
            if on_done:
                on_done(results[-1], done, len(configs))
    order = {cfg.run: i for i, cfg in enumerate(configs)}
    return sorted(results, key=lambda r: order.get(r["run_id"], 0))


EXECUTORS = ("local", "ray")


def check_executor(executor: str, workers: int = 1, address: str | None = None) -> None:
    """Refuse a bad executor / workers / address combination before anything is written."""
    if executor not in EXECUTORS:
        raise UserError(f"executor {executor}: expected one of {', '.join(EXECUTORS)}", "executor")
    if workers < 1:
        raise UserError(f"workers {workers} must be at least 1", "workers")
    if executor == "local" and address is not None:
        raise UserError("address is the location of a Ray cluster: use it with executor ray", "address", "executor")
    if executor == "ray":
        if workers != 1:
            raise UserError(f"workers {workers} is for executor local; with Ray every run is a task and "
                            "the cluster runs as many at once as it has CPUs", "workers", "executor")
        import_ray()  # Ray not installed: say so now
        if address is not None:
            parse_address(address)  # HOST:PORT, auto or ray://...; whether it answers is checked on connecting


def run(configs: list[TrainConfig], lake: str | Path, executor: str = "local", workers: int = 1,
        address: str | None = None, on_done: Callable[[dict, int, int], None] | None = None) -> list[dict]:
    """Run a sweep on an executor: ``local`` (``workers`` processes) or ``ray`` (one Ray task per run;
    ``address`` names a running cluster, none starts a local one)."""
    check_executor(executor, workers, address)
    if executor == "ray":
        return run_sweep_ray(configs, lake, address=address, on_done=on_done)
    return run_sweep(configs, lake, workers, on_done=on_done)


__all__ = ["EXECUTORS", "MAX_RUNS", "check_executor", "expand", "load_config", "run", "run_sweep"]
