"""How a run's recorded norms cover its steps: the one coverage rule, in Python.

Layer: ``warehouse`` (reads ``point_steps``; the ratio is :func:`analysis.composition.clipped_ratio`).
The rule, "hold last": each recorded norm of a point stands for the steps until that
point's next record, or until the run's last step. The SQL view
``sql/views/point_step_coverage.sql`` is the same rule for SQL users; the Python jobs
(accounting, report) all read coverage through :func:`coverage` and :func:`stream`,
which split runs by the view's shapes:

* ``dense`` — every point at every step 0..T-1 (each row covers 1 step);
* ``uniform`` — every point at the same steps (covers from the run's step list);
* ``ragged`` — anything else (covers per point, through the view's window).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np

from dpledger.analysis.composition import clipped_ratio

from .runs import RunInfo

FILL = "hold-last: each recorded norm stands for the steps until the next recorded step of that point"


@dataclass
class Coverage:
    """How one run's records cover its steps (the shapes of sql/views/point_step_coverage.sql)."""

    shape: str                # dense / uniform / ragged
    point_ids: np.ndarray     # sorted
    step_covers: dict | None  # uniform: {"steps": recorded steps, "covers": steps each stands for}
    recorded_steps: int       # distinct recorded steps
    run_steps: int            # the run's steps (at least the last recorded step + 1)

    @property
    def checkpoints_only(self) -> bool:
        """Fewer recorded steps than the run has: norms at checkpoints, held in between."""
        return self.recorded_steps < self.run_steps


def point_ids(con, run_ids: list[str]) -> np.ndarray:
    """The sorted ids of the points with records in any of ``run_ids``."""
    return con.sql(
        "SELECT DISTINCT point_id FROM point_steps WHERE run_id IN (SELECT unnest($runs)) ORDER BY point_id",
        params={"runs": run_ids},
    ).to_arrow_table().column(0).to_numpy()


def coverage(con, run: RunInfo) -> Coverage:
    """The shape of ``run``'s records and what :func:`stream` needs to give each row its covers.

    Rows are unique per (run, step, point) (the loader checks it), so a run with as many
    rows as ids in [min id, max id] times steps in [first, last] has every such point at
    every such step: its shape and ids follow from count, min and max alone (DuckDB keeps
    those cheap), with no DISTINCT over the rows. Anything else counts distinct ids and steps.
    """
    n_rows, first, last, lo_id, hi_id = con.execute(
        "SELECT count(*), min(step), max(step), min(point_id), max(point_id) FROM point_steps WHERE run_id = ?",
        [run.run_id]).fetchall()[0]
    run_steps = max(int(run.steps or 0), int(last if last is not None else -1) + 1)
    if n_rows and first >= 0 and n_rows == (hi_id - lo_id + 1) * (last - first + 1):
        pids = np.arange(lo_id, hi_id + 1, dtype=np.int64)
        n_steps = last - first + 1
        steps = np.arange(first, last + 1, dtype=np.int64)
    else:
        pids = point_ids(con, [run.run_id])
        n_steps = int(con.execute("SELECT count(DISTINCT step) FROM point_steps WHERE run_id = ?",
                                  [run.run_id]).fetchall()[0][0]) if n_rows else 0
        steps = None
    if n_rows != len(pids) * n_steps:
        return Coverage("ragged", pids, None, n_steps, run_steps)
    if first == 0 and n_steps == run_steps:
        return Coverage("dense", pids, None, n_steps, run_steps)
    if steps is None:
        steps = con.sql("SELECT DISTINCT step FROM point_steps WHERE run_id = $run ORDER BY step",
                        params={"run": run.run_id}).to_arrow_table().column(0).to_numpy()
    covers = np.diff(np.append(steps, run_steps))
    return Coverage("uniform", pids, {"steps": steps, "covers": covers}, n_steps, run_steps)


def stream(con, run: RunInfo, cov: Coverage, batch_rows: int = 1 << 20, only=None, steps: bool = True,
           prefetch: bool = False, prepare=None):
    """Batches of (point index into ``cov.point_ids``, step, ratio r, steps covered) of one run.

    ``covers`` is None for a dense run (every row covers 1). The numbers of the view
    point_step_coverage, read without joining the fact table to anything for the dense
    and uniform shapes (a string join per row costs more than the whole histogram);
    ragged runs go through the view's window. ``only``: restrict to these point ids.

    ``steps=False``: the caller needs no steps; a dense run's step column is then not read
    (step is None). ``prefetch``: DuckDB reads the next batches in a thread while the caller
    works on this one (DuckDB releases the GIL while it reads); the caller must not use
    ``con`` until the generator is exhausted or closed. ``prepare(idx, ratio, covers)``:
    yield what it returns instead (run in the reader thread with ``prefetch``: numpy's
    elementwise work releases the GIL, so it overlaps the caller's).
    """
    table = "point_step_coverage" if cov.shape == "ragged" else "point_steps"
    extra = ", covers" if cov.shape == "ragged" else ""
    read_step = steps or cov.shape == "uniform"
    where = " AND point_id IN (SELECT unnest($ids))" if only is not None else ""
    params = {"run": run.run_id}
    if only is not None:
        params["ids"] = [int(p) for p in only]
    sql = f"SELECT point_id, {'step' if read_step else 'NULL'}, grad_norm{extra} FROM {table} WHERE run_id = $run{where}"
    pids = cov.point_ids
    contiguous = len(pids) > 0 and pids[-1] - pids[0] + 1 == len(pids)
    lookup = None
    if cov.shape == "uniform" and len(cov.step_covers["steps"]):
        first, last = int(cov.step_covers["steps"][0]), int(cov.step_covers["steps"][-1])
        if last - first < 1 << 24:  # covers of each recorded step by one gather, not a binary search
            lookup = np.zeros(last - first + 1)
            lookup[cov.step_covers["steps"] - first] = cov.step_covers["covers"]

    def convert(batch):
        pid = batch.column(0).to_numpy()
        step = batch.column(1).to_numpy() if read_step else None
        idx = pid - pids[0] if contiguous else np.searchsorted(pids, pid)
        ratio = clipped_ratio(batch.column(2).to_numpy(), run.max_grad_norm)
        if cov.shape == "dense":
            covers = None
        elif cov.shape == "uniform":
            if lookup is not None:
                covers = lookup[step - first]
            else:
                covers = cov.step_covers["covers"][np.searchsorted(cov.step_covers["steps"], step)].astype(np.float64)
        else:
            covers = batch.column(3).to_numpy().astype(np.float64)
        return (idx, step, ratio, covers) if prepare is None else prepare(idx, ratio, covers)

    reader = con.sql(sql, params=params).to_arrow_reader(batch_size=batch_rows)
    batches = _prefetched(reader, convert) if prefetch else map(convert, reader)
    try:
        yield from batches
    finally:
        if prefetch:
            batches.close()
        reader.close()


_END = object()


def _prefetched(reader, convert=None, depth: int = 8):
    """The reader's batches (each passed through ``convert``), read ahead by a thread (at most
    ``depth`` waiting); an error in the thread is raised here; closing the generator stops the thread."""
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in reader:
                if not put(batch if convert is None else convert(batch)):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=read, name="dpledger-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
