"""What a training run records, and when it commits: row buffers, commit cadence, resume state.

:class:`Recorder` buffers the rows of the steps since the last commit (``point_steps``,
``steps``, ``evaluations``, ``checkpoints``), decides when a commit is due (every
``commit_every`` steps, else every ``commit_seconds``) and commits: first the resume
state of the step (model, optimizer and every RNG's state) under
``<run_dir>/state/step-<t>.pt``, then the rows and the progress marker in one
:meth:`ingest.sinks.Sink.commit`, then older resume states are removed. A crash after
the state is written but before the commit only repeats steps, so a run resumed from
the sink's committed step continues exactly as the uninterrupted run would have.

Checkpoints (the model's parameters at an evaluation step) are written under
``<run_dir>/checkpoints/``; every file goes through :func:`ingest.atomic.atomic_write`.

Every file of a run folder is read back with :func:`load_torch`, ``torch.load(...,
weights_only=True)``: tensors, numbers, strings and containers only, never arbitrary
Python objects, so a pickle planted in a run folder (a resume state, a checkpoint) is
refused with one line instead of running code. A resume state that is refused, or is
not shaped as :func:`capture_state` writes it, fails the resume; the run is not
restarted silently (delete the run's ``state/`` folder to give it up).
"""

from __future__ import annotations

import io
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from dpledger.warehouse.errors import UserError

from .atomic import atomic_write

# columns of each buffered table, in order (run_id is added first)
COLUMNS = {
    "point_steps": ("step", "point_id", "grad_norm", "norm_clipped", "loss", "sampled"),
    "steps": ("step", "epoch", "batch_size", "loss", "lr", "wall_s", "peak_mem_bytes", "test_accuracy", "track_s"),
    "evaluations": ("step", "point_id", "loss", "correct", "margin", "confidence_logit"),
    "checkpoints": ("step", "path"),
}


#: point_steps rows a background recorder hands to a staging sink at once (a Parquet row group)
STAGE_ROWS = 1 << 17


def save_torch(obj, path: Path) -> None:
    """``torch.save`` to ``path``, atomically; a failed write (disk full, permissions) is
    one clear :class:`UserError` and leaves no partial file (torch reports it as RuntimeError)."""
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise UserError(f"cannot write {path}: {detail}") from None


def load_torch(path: Path, map_location, what: str, *params: str):
    """``torch.load`` of a file dpledger wrote (``what`` names it in errors, ``params`` the
    parameters it names), tensors and plain types only (``weights_only=True``): anything
    else, a truncated or foreign file, is a one-line :class:`UserError`, and no code in the
    file runs."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}", *params) from None
    except Exception as exc:  # pickle.UnpicklingError (refused objects), RuntimeError (not a torch file), ...
        raise UserError(f"{what} {path} is not a file of tensors dpledger wrote; refused to load it "
                        f"({_why(exc)})", *params) from None


def _why(exc: Exception) -> str:
    """One line of ``torch.load``'s refusal: what it refused (its message otherwise spans lines
    and suggests ``weights_only=False``, which would run the file's code)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = next((line for line in lines if "unsupported" in line.lower()), None) \
        or next((line for line in lines if not line.startswith(("Weights only load failed", "Please file"))), None) \
        or type(exc).__name__
    return why.removeprefix("WeightsUnpickler error:").strip()[:200] or type(exc).__name__


def state_path(run_dir: Path, step: int) -> Path:
    """Where the resume state of ``step`` lives."""
    return run_dir / "state" / f"step-{step:08d}.pt"


def capture_state(step: int, dp, sampler) -> dict:
    """The resume state after ``step``: ``dp``'s model and base optimizer (a
    :class:`models.dp_step.DPSGD`), the batch sampler's, the noise's and torch's RNG."""
    return {"step": step, "model": dp.model.state_dict(), "optimizer": dp.base.state_dict(),
            "sampler": sampler.get_state(), "noise": dp.noise.get_state(), "torch": torch.get_rng_state()}


def load_state(run_dir: Path, run_id: str, step: int, device) -> dict:
    """The resume state saved with the commit of ``step``: a UserError if it is missing, is
    refused by :func:`load_torch`, or is not what :func:`capture_state` makes (``device`` is
    unused: the state is loaded on the CPU and :func:`restore_state` moves it)."""
    path = state_path(run_dir, step)
    if not path.exists():
        raise UserError(f"resume {run_id}: the saved state {path} is missing", "resume")
    # on the CPU: the generators' states must be CPU tensors; load_state_dict moves the rest
    state = load_torch(path, "cpu", f"resume {run_id}: the saved state", "resume")
    expected = {"step": int, "model": dict, "optimizer": dict, "sampler": torch.Tensor, "noise": torch.Tensor,
                "torch": torch.Tensor}
    wrong = [k for k, kind in expected.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if wrong or state["step"] != step:
        what = f"no valid {wrong[0]!r}" if wrong else f"step {state['step']}, not {step}"
        raise UserError(f"resume {run_id}: the saved state {path} is not a resume state of step {step} ({what})",
                        "resume")
    return state


def restore_state(state: dict, dp, sampler, path: Path | None = None) -> None:
    """Put back what :func:`capture_state` saved (a state that does not fit this run's model,
    optimizer or generators is a UserError naming ``path``)."""
    try:
        dp.model.load_state_dict(state["model"])
        dp.base.load_state_dict(state["optimizer"])
        sampler.set_state(state["sampler"])
        dp.noise.set_state(state["noise"])
        torch.set_rng_state(state["torch"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"the saved state{' ' + str(path) if path else ''} does not fit this run "
                        f"({first[:200]})") from None


@dataclass
class RowBuffers:
    """Rows not yet committed: per table, a list of dicts of equally long column arrays."""

    parts: dict[str, list] = field(default_factory=lambda: {name: [] for name in COLUMNS})
    point_rows: int = 0  # rows of point_steps buffered

    def add(self, table: str, **columns) -> None:
        self.parts[table].append(columns)
        if table == "point_steps":
            self.point_rows += len(np.atleast_1d(columns["step"]))

    def tables(self, run_id: str) -> dict[str, pa.Table | None]:
        """One Arrow table per buffered table (``None`` where nothing was buffered),
        ``run_id`` first as a one-entry dictionary column."""
        out = {}
        for name, cols in COLUMNS.items():
            parts = self.parts[name]
            if not parts:
                out[name] = None
                continue
            data = {c: np.concatenate([np.atleast_1d(p[c]) for p in parts]) for c in cols}
            n = len(data[cols[0]])
            run = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([run_id]))
            out[name] = pa.table({"run_id": run, **data})
        return out


class _Writer:
    """The recorder's background writer: one thread that runs its jobs in order (a bounded
    queue, so training waits rather than buffering without limit). The first job that
    fails stops the work: later jobs are dropped, and the error is raised on the training
    thread by the next :meth:`put` or :meth:`wait` (never a hang: the thread keeps taking
    jobs off the queue until it is stopped)."""

    def __init__(self, name: str, depth: int = 2):
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.busy_s = 0.0  # seconds the thread spent writing
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    t0 = time.perf_counter()
                    job()
                    self.busy_s += time.perf_counter() - t0
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self.error = exc
            finally:
                self.jobs.task_done()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, job) -> None:
        self.check()
        self.jobs.put(job)

    def wait(self) -> None:
        """Until every job put so far is done; raises the writer's error, if any."""
        self.jobs.join()
        self.check()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()


class Recorder:
    """Buffers a run's rows and commits them to ``sink`` with a resume state.

    ``start``: the first step this process runs (0, or the committed step + 1 on resume).

    ``background``: commits run on a writer thread (:class:`_Writer`), in order, so Parquet
    encoding and disk writes overlap training; the resume state is serialised on the
    training thread when the commit is asked for (the state of that step), and written
    by the writer before the rows and the marker, as without it. With a sink that can
    stage rows ahead of their commit (``sink.stage``, :class:`ingest.sinks.ShardSink`: into
    the next shard's temporary files, which a crash leaves to be dropped on resume), every
    ``stage_rows`` (default :data:`STAGE_ROWS`) buffered ``point_steps`` rows go to the writer at once, so a commit
    only has the rows since. :meth:`commit` with ``wait`` (the run's last commit) and
    :meth:`wait` return once everything asked for is committed; :meth:`close` stops the
    writer, finishing what was asked for unless it failed.
    """

    def __init__(self, sink, run_id: str, run_dir: Path, *, commit_every: int | None, commit_seconds: float,
                 start: int = 0, background: bool = False, stage_rows: int | None = None):
        self.sink, self.run_id, self.run_dir = sink, run_id, Path(run_dir)
        self.commit_every, self.commit_seconds = commit_every, commit_seconds
        self.buffers = RowBuffers()
        self.rows_written = 0
        self.sink_s = 0.0  # seconds the training thread spent buffering rows and committing (or waiting)
        self.last_commit_step, self.last_commit_time = start - 1, time.perf_counter()
        self.stage_rows = stage_rows or STAGE_ROWS
        self._staged_rows = 0  # point_steps rows handed to sink.stage since the last commit
        self._writer = _Writer(f"dpledger-writer-{run_id}") if background else None

    @property
    def writer_s(self) -> float:
        """Seconds the background writer spent writing (0 without one)."""
        return self._writer.busy_s if self._writer is not None else 0.0

    @staticmethod
    def make_folders(run_dir: Path) -> None:
        """The run's ``state/`` and ``checkpoints/`` folders."""
        (run_dir / "state").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)

    def add(self, table: str, **columns) -> None:
        """Buffer rows of ``table`` (a name of :data:`COLUMNS`)."""
        t0 = time.perf_counter()
        self.buffers.add(table, **columns)
        if (self._writer is not None and self.buffers.point_rows >= self.stage_rows
                and callable(getattr(self.sink, "stage", None))):
            self._stage()
        self.sink_s += time.perf_counter() - t0

    def _stage(self) -> None:
        """Hand the buffered point_steps rows to the writer, to be staged in the sink."""
        rows = RowBuffers()
        rows.parts["point_steps"], self.buffers.parts["point_steps"] = self.buffers.parts["point_steps"], []
        rows.point_rows, self.buffers.point_rows = self.buffers.point_rows, 0
        self._staged_rows += rows.point_rows
        run_id, sink = self.run_id, self.sink
        self._writer.put(lambda: sink.stage(run_id, {"point_steps": rows.tables(run_id)["point_steps"]}))

    def checkpoint(self, step: int, model_state: dict) -> Path:
        """Save the model's parameters after ``step`` and buffer its ``checkpoints`` row."""
        path = self.run_dir / "checkpoints" / f"step-{step:08d}.pt"
        save_torch(model_state, path)
        self.buffers.add("checkpoints", step=np.array([step], dtype=np.int64), path=np.array([str(path)]))
        return path

    def due(self, step: int, last: bool) -> bool:
        """Whether to commit after ``step`` (always after the run's ``last`` step). Raises the
        background writer's error, if it failed: the run stops at the step after."""
        if self._writer is not None:
            self._writer.check()
        if last:
            return True
        if self.commit_every:
            return step - self.last_commit_step >= self.commit_every
        return time.perf_counter() - self.last_commit_time >= self.commit_seconds

    def commit(self, step: int, state: dict, *, wait: bool = False) -> None:
        """Resume state first, then the buffered rows and the marker ``step``; then old states go.
        With a background writer the commit is queued (``wait``: and waited for)."""
        t0 = time.perf_counter()
        if self._writer is None:  # the rows stay buffered if the commit fails
            self._commit(step, lambda path: save_torch(state, path), self.buffers, self._staged_rows)
            self.buffers, self._staged_rows = RowBuffers(), 0
        else:
            buffers, staged, self.buffers, self._staged_rows = self.buffers, self._staged_rows, RowBuffers(), 0
            data = io.BytesIO()
            torch.save(state, data)  # this step's state, before training changes it
            self._writer.put(lambda: self._commit(step, lambda path: _save_bytes(data.getvalue(), path),
                                                  buffers, staged))
            if wait:
                self._writer.wait()
        self.last_commit_step, self.last_commit_time = step, time.perf_counter()
        self.sink_s += self.last_commit_time - t0

    def _commit(self, step: int, save_state, buffers: RowBuffers, staged: int) -> None:
        # resume state first: a crash after it but before the commit only repeats steps
        current = state_path(self.run_dir, step)
        save_state(current)
        tables = buffers.tables(self.run_id)
        self.sink.commit(self.run_id, step, tables)
        self.rows_written += staged + (tables["point_steps"].num_rows if tables["point_steps"] is not None else 0)
        for old in (self.run_dir / "state").glob("step-*.pt"):
            if old.name != current.name:
                old.unlink(missing_ok=True)

    def wait(self) -> None:
        """Until every commit asked for is done (raises the background writer's error, if any)."""
        if self._writer is not None:
            t0 = time.perf_counter()
            self._writer.wait()
            self.sink_s += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the background writer (after the commits asked for, unless it failed)."""
        if self._writer is not None:
            self._writer.stop()


def _save_bytes(data: bytes, path: Path) -> None:
    """A serialised resume state to ``path``, atomically, as :func:`save_torch` writes it."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    try:
        atomic_write(path, write)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


__all__ = ["COLUMNS", "STAGE_ROWS", "Recorder", "RowBuffers", "capture_state", "load_state", "load_torch", "restore_state", "save_torch", "state_path"]
