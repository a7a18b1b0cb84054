"""``dpledger watch``: running runs, live, refreshed from the ledger (read-only)."""

from __future__ import annotations

import json as jsonlib
import math
import sys
import time
from datetime import datetime
from typing import Annotated, Optional

import typer

from dpledger.warehouse.errors import UserError

from .common import DbOption, JsonOption, app, connected, err

INTERVAL_RANGE = (0.1, 3600.0)

COLUMNS = [  # header, field(s), format
    ("run", "run_id"), ("status", "status"), ("step", "step"), ("steps/s", "steps_per_s"), ("loss", "loss"),
    ("test acc", "test_accuracy"), ("eps", "epsilon"), ("eps/ex min", "epsilon_min"), ("5%", "epsilon_p05"),
    ("median", "epsilon_median"), ("95%", "epsilon_p95"), ("max", "epsilon_max"), ("at cap", "points_at_cap"),
]


def _num(v, fmt: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def cells(row: dict) -> list[str]:
    """The table's cells of one run."""
    planned = row.get("steps")
    acc = _num(row["test_accuracy"], ".3f")
    if row["test_accuracy"] is not None:
        acc += f" @{row['test_accuracy_step']}"
    cap = "-" if row["points_at_cap"] is None else f"{row['points_at_cap']}/{row['points']}"
    return [row["run_id"], row["status"] or "-", f"{row['step']}/{planned if planned is not None else '?'}",
            _num(row["steps_per_s"], ".3g"), _num(row["loss"]), acc, _num(row["epsilon"]),
            *(_num(row[k]) for k in ("epsilon_min", "epsilon_p05", "epsilon_median", "epsilon_p95", "epsilon_max")),
            cap]


def plain_table(frame: list[dict]) -> str:
    """One refresh as fixed-width text (for a pipe or a log)."""
    rows = [[h for h, _ in COLUMNS]] + [cells(r) for r in frame]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def rich_table(frame: list[dict], caption: str):
    from rich.table import Table

    t = Table(caption=caption, caption_justify="left")
    for i, (header, _) in enumerate(COLUMNS):
        t.add_column(header, justify="left" if i < 2 else "right", no_wrap=i > 0)
    for r in frame:
        t.add_row(*cells(r))
    return t


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


@app.command()
def watch(
    run: Annotated[Optional[list[str]], typer.Argument(help="Runs to watch (default: every running run).", show_default=False)] = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes (0.1 to 3600).")] = 5.0,
    count: Annotated[Optional[int], typer.Option(help="Stop after N refreshes (default: when no watched run is running).", show_default=False)] = None,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Watch runs as they train: steps, speed, loss, accuracy, data-independent epsilon so far, and
    per-example epsilon so far (min / 5% / median / 95% / max, and points at the cap: recorded at the
    clip every step). Reads the ledger (the database and the lake's committed shards) read-only, anew
    each refresh; stops when no watched run is running (after a last refresh), after --count
    refreshes, or on Ctrl-C. Per-example epsilon is an upper bound on a coarse grid of 256 cells
    (`dpledger account` gives the stored, tighter number). --json: one JSON line per refresh."""
    from dpledger.warehouse.live import LIVE_GRID, LiveCache, running_run_ids, watch_frame
    from dpledger.warehouse.runs import load_runs

    lo, hi = INTERVAL_RANGE
    if not (lo <= interval <= hi):  # NaN fails too
        raise UserError(f"interval {interval:g}: expected {lo:g} to {hi:g} seconds", "interval")
    if count is not None and count < 1:
        raise UserError(f"count {count}: expected at least 1", "count")
    from rich.console import Console

    console = Console()
    live_view = None if json or not console.is_terminal else _LazyLive(console)
    cache, watched, n = LiveCache(), list(dict.fromkeys(run or [])), 0
    try:
        while True:
            started = time.monotonic()
            frame = None
            with connected(db, read_only=True) as con:
                if not run:  # every running run, and those seen running before (their last refresh)
                    watched = list(dict.fromkeys(watched + running_run_ids(con)))
                runs = load_runs(con, watched) if watched else []
                if not cache.missing(runs, LIVE_GRID):
                    frame = watch_frame(con, watched, cache=cache, grid=LIVE_GRID) if watched else []
            if frame is None:  # new (q, sigma): tabulate with the warehouse closed (a writer may need it), then read
                cache.prepare(runs, LIVE_GRID)
                with connected(db, read_only=True) as con:
                    frame = watch_frame(con, watched, cache=cache, grid=LIVE_GRID)
            n += 1
            if not frame and not json:
                err("no running runs to watch" if not run else "no runs to watch")
                break
            stamp = datetime.now().strftime("%H:%M:%S")
            if json:
                sys.stdout.write(jsonlib.dumps(_clean(frame), allow_nan=False) + "\n")
                sys.stdout.flush()
            elif live_view is not None:
                live_view.update(rich_table(frame, f"{stamp}  refresh {n}, every {interval:g} s; Ctrl-C stops"))
            else:
                sys.stdout.write(f"{stamp}  refresh {n}\n{plain_table(frame)}\n\n")
                sys.stdout.flush()
            if not frame:
                err("no running runs to watch" if not run else "no runs to watch")
                break
            if (count is not None and n >= count) or not any(r["status"] == "running" for r in frame):
                break
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        if live_view is not None:
            live_view.stop()


class _LazyLive:
    """rich's ``Live`` on the terminal, started by the first table (nothing to clear before)."""

    def __init__(self, console):
        self.console, self.view = console, None

    def update(self, renderable) -> None:
        if self.view is None:
            from rich.live import Live

            self.view = Live(console=self.console, auto_refresh=False, transient=False)
            self.view.start()
        self.view.update(renderable, refresh=True)

    def stop(self) -> None:
        if self.view is not None:
            self.view.stop()
