r"""``dpledger.track``: a privacy ledger for your own Opacus training loop, in three lines.

::

    import dpledger                                                        # dpledger: 1/3
    model, optimizer, train_loader = privacy_engine.make_private(...)      # as before
    with dpledger.track(privacy_engine, model, optimizer, train_loader,   # dpledger: 2/3
                        run="mnist-s0", criterion=criterion) as ledger:
        for x, y in train_loader:                                          # your loop, unchanged
            optimizer.zero_grad(); criterion(model(x), y).backward(); optimizer.step()
    # (or ledger = dpledger.track(...) ... ledger.close())                 # dpledger: 3/3

What is recorded, per DP-SGD step (one *logical* step: one real ``optimizer.step()``,
so Opacus's ``BatchMemoryManager`` and its virtual steps give one step, not one per
physical batch):

* ``point_steps``: for every example of the step's Poisson batch, its point id, the
  L2 norm of its gradient *before clipping* -- the very number Opacus clips with,
  taken where Opacus computes it, so there is **no extra backward pass**: on the
  per-sample path (``GradSampleModule`` + ``DPOptimizer``) the norms of
  ``p.grad_sample`` per example, computed by the same operations as
  ``DPOptimizer.clip_and_accumulate``; on the ghost-clipping path
  (``grad_sample_mode="ghost"``: ``GradSampleModuleFastGradientClipping`` +
  ``DPOptimizerFastGradientClipping``) the tensor ``get_norm_sample()`` returns
  for the clipping coefficients -- its loss (when a ``criterion`` is given, or
  :meth:`Ledger.record_loss` is called) and ``sampled = true``;
* with ``every=K`` and ``points=N | ids``: every K-th step, the norms and losses of
  a fixed tracked set at that step's parameters (before the update), computed by
  :class:`dpledger.models.grad_norms.GradNormTracker` (ghost norms, no per-example
  gradients), ``sampled`` saying whether each was in the batch; the tracker touches
  neither ``.grad``, ``grad_sample``, the optimizer's state nor any random number
  generator the loop uses (its forward runs on a forked RNG), so the update is
  bit-identical with and without it;
* ``steps``: the batch size (actual, Poisson), mean loss, learning rate, wall time,
  peak memory and the time the tracked set took;
* ``points``: one row per example of the dataset (its point id, the label where the dataset
  has them as a tensor or ``.targets``), under ``dataset`` (default: the run's name);
* ``runs``: q (the data loader's sample rate), σ, C, the expected batch size, the
  planned steps (``epochs`` x batches per epoch when ``epochs`` is given, else the
  steps taken, filled in at the end), δ (``delta``/``target_delta``), the
  training-set size, ``private = true``, ``source = 'track'``, the status and a
  ``config`` with everything read from Opacus (optimizer and sampler classes,
  grad-sample mode, accountant, secure mode, the accountant's history and σ per
  step range if a scheduler changed it).

Coverage is batch-only by default: each point has a norm at the steps it was
sampled (about once an epoch); accounting holds each record until that point's next
one (the hold-last rule, :mod:`dpledger.warehouse.coverage`). ``runs.config``
says ``"coverage": "batch"`` (or ``"batch+tracked"``).

Which examples were in a batch: Opacus's loaders do not say, so the ledger reads the
index lists that the loader's batch sampler (Opacus's ``UniformWithReplacementSampler``,
or any batch sampler) yields. The sampler object is given a recording subclass of its
own class in place (``isinstance`` checks, ``len`` and its random draws are
unchanged; ``BatchMemoryManager`` keeps working, as it splits those lists), and each
real optimizer step takes the oldest recorded batch (several, when gradients of more
batches were accumulated). Index ``i`` of the dataset is point id ``i``, or
``ids[i]`` with ``ids=`` (a sequence as long as the dataset). A loop that draws its
batches any other way gets one warning and no point rows for the steps that do not
match.

Writing: through a :class:`dpledger.ingest.sinks.Sink` and the trainer's
:class:`dpledger.ingest.recorder.Recorder` (row buffers, commits every
``commit_seconds`` (default 5 s) or ``commit_every`` steps, atomically with the
committed step). Default: Parquet shards in the project's lake (``lake/`` beside
``$DPLEDGER_DB`` or ``./dpledger.duckdb``), which readers see live and
``dpledger ingest shards`` merges; ``lake=DIR`` another lake; ``db=PATH`` straight
into that DuckDB file (one writer holds it). Saving an Opacus checkpoint with
``privacy_engine.save_checkpoint`` commits the ledger first; so does
:meth:`Ledger.commit`.

Resume: ``track(..., resume=True)`` after restoring your checkpoint continues the run.
The step count is Opacus's: the accountant's history (restored by
``privacy_engine.load_checkpoint``) says how many steps the model has taken, or give
``start_step=``. Rows of steps already committed are never written again (a step
re-run after a resume from an older checkpoint keeps its first rows).

A ``with`` block marks the run ``failed`` when the loop raises (the rows of completed
steps are committed first), ``finished`` otherwise.

Refused, with one :class:`dpledger.UserError` naming the object: an optimizer that is
not Opacus's ``DPOptimizer``/``DPOptimizerFastGradientClipping``; per-layer or
adaptive clipping and distributed optimizers (the ledger's accounting assumes one
flat C); a ghost-clipping optimizer whose model (or criterion) does not lead to the
``GradSampleModuleFastGradientClipping``; a data loader without a batch sampler;
and, for the tracked set, a layer the norm tracker cannot handle (BatchNorm in
training mode) or a loss other than cross-entropy.
"""

from __future__ import annotations

import atexit
import copy
import math
import os
import resource
import socket
import sys
import time
import warnings
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dpledger.analysis.budget import steps_from_epochs
from dpledger.models.grad_norms import GradNormTracker
from dpledger.warehouse.db import default_lake, resolve_db_path
from dpledger.warehouse.errors import UserError

from .recorder import Recorder
from .sinks import DuckDBSink, ShardSink, Sink, safe_run_id

SOURCE = "track"


# ---------------------------------------------------------------------------------------------
# Which examples were in each batch: the batch sampler's index lists, recorded in order
# ---------------------------------------------------------------------------------------------

class _BatchFeed:
    """Index lists a batch sampler yielded, oldest first, tagged with the pass over the loader
    (an epoch) that drew them. A new pass drops what an abandoned earlier one left (batches
    drawn ahead by loader workers, or by a loop that stopped early)."""

    def __init__(self):
        self.queue: deque = deque()
        self.epoch = 0
        self.dropped = 0

    def new_epoch(self) -> int:
        self.epoch += 1
        stale = sum(1 for e, _ in self.queue if e != self.epoch)
        if stale:
            self.dropped += stale
            self.queue = deque((e, b) for e, b in self.queue if e == self.epoch)
        return self.epoch

    def push(self, epoch: int, batch) -> None:
        self.queue.append((epoch, batch))

    def pop(self):
        return self.queue.popleft()[1] if self.queue else None


_RECORDING: dict[type, type] = {}
_FEED_ATTR = "_dpledger_feed"


def _recording_class(cls: type) -> type:
    """A subclass of the batch sampler's class whose ``__iter__`` also hands each index list to
    the instance's feed (if any). Same draws, same ``len``, still an instance of ``cls``."""
    if cls not in _RECORDING:
        def __iter__(self, _base=cls):
            feed = self.__dict__.get(_FEED_ATTR)
            it = _base.__iter__(self)
            if feed is None:
                yield from it
                return
            epoch = feed.new_epoch()
            for batch in it:
                feed.push(epoch, batch)
                yield batch

        _RECORDING[cls] = type(cls.__name__, (cls,), {"__iter__": __iter__, "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__,
                                                      "_dpledger_recording_of": cls})
    return _RECORDING[cls]


def _batch_sampler(loader) -> Any:
    """The object that yields the loader's index lists (under a BatchMemoryManager's splitter too)."""
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None:
        return None
    inner = getattr(sampler, "sampler", None)
    if type(sampler).__name__ == "BatchSplittingSampler" and inner is not None:
        return inner  # BatchMemoryManager's loader: record the logical (Poisson) batches it splits
    return sampler


# ---------------------------------------------------------------------------------------------
# Reading a run's parameters from Opacus
# ---------------------------------------------------------------------------------------------

def _accountant_steps(privacy_engine) -> int:
    """Steps Opacus's accountant has counted (its history: (σ, q, steps) entries)."""
    acc = getattr(privacy_engine, "accountant", None)
    history = getattr(acc, "history", None) or []
    try:
        return int(sum(int(h[2]) for h in history))
    except (TypeError, ValueError, IndexError):
        return 0


def _accountant_history(privacy_engine) -> list | None:
    acc = getattr(privacy_engine, "accountant", None)
    history = getattr(acc, "history", None)
    if history is None:
        return None
    return [[float(s), float(q), int(n)] for s, q, n in history]


def _check_optimizer(optimizer) -> str:
    """The path the optimizer clips by: ``hooks`` (per-sample) or ``ghost``; else a UserError."""
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    name = type(optimizer).__name__
    if not isinstance(optimizer, DPOptimizer):
        raise UserError(f"optimizer {name}: not an Opacus DPOptimizer; pass the optimizer that "
                        "privacy_engine.make_private returned", "optimizer")
    if "Distributed" in name or "FSDP" in name or "DDP" in name:
        raise UserError(f"optimizer {name}: distributed training is not supported by dpledger.track "
                        "(each process sees only its own share of a batch)", "optimizer")
    if "PerLayer" in name or "AdaClip" in name:
        raise UserError(f"optimizer {name}: per-layer and adaptive clipping are not supported by "
                        "dpledger.track (its accounting assumes one flat clipping norm C); use "
                        "clipping='flat'", "optimizer")
    if not isinstance(optimizer.max_grad_norm, (int, float)):
        raise UserError(f"optimizer {name}: max_grad_norm {optimizer.max_grad_norm!r} is not one number "
                        "(per-layer clipping is not supported)", "optimizer")
    if isinstance(optimizer, DPOptimizerFastGradientClipping):
        return "ghost"
    if type(optimizer).clip_and_accumulate is not DPOptimizer.clip_and_accumulate:
        raise UserError(f"optimizer {name}: clips in its own way (clip_and_accumulate is overridden); "
                        "dpledger.track reads the norms of Opacus's DPOptimizer and "
                        "DPOptimizerFastGradientClipping only", "optimizer")
    return "hooks"


def _ghost_module(model, criterion):
    """The Opacus object that computes the per-example norms on the ghost path."""
    for candidate in (model, getattr(criterion, "module", None)):
        if candidate is not None and hasattr(candidate, "get_norm_sample") and hasattr(candidate, "get_clipping_coef"):
            return candidate
    raise UserError(f"model {type(model).__name__}: the optimizer clips by ghost clipping, but neither the "
                    "model nor the criterion is Opacus's GradSampleModuleFastGradientClipping; pass the model "
                    "(and criterion) privacy_engine.make_private(..., grad_sample_mode='ghost') returned",
                    "model")


def _unwrapped(model) -> torch.nn.Module:
    while type(model).__module__.startswith("opacus.") and isinstance(getattr(model, "_module", None),
                                                                      torch.nn.Module):
        model = model._module
    return model


def _labels(dataset, n: int) -> np.ndarray | None:
    """Class labels without loading every example: a TensorDataset's last tensor, or ``.targets``."""
    tensors = getattr(dataset, "tensors", None)
    cand = tensors[-1] if tensors else getattr(dataset, "targets", None)
    if cand is None:
        return None
    try:
        arr = np.asarray(cand.cpu().numpy() if isinstance(cand, torch.Tensor) else cand)
    except (TypeError, ValueError):
        return None
    if arr.ndim != 1 or len(arr) != n or not np.issubdtype(arr.dtype, np.integer):
        return None
    return arr.astype(np.int64)


def _peak_mem(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _NullLoss:
    """A Sink that stores unknown values (NaN in the row buffers: a loss no criterion gave, the
    test accuracy the tracker never measures) as NULL, then passes on."""

    COLUMNS = ("loss", "test_accuracy")

    def __init__(self, sink: Sink):
        self.inner = sink

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def commit(self, run_id: str, step: int, tables: dict) -> None:
        out = {}
        for name, t in tables.items():
            for col_name in self.COLUMNS:
                if t is not None and col_name in t.column_names and t.num_rows:
                    col = t.column(col_name)
                    nulls = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
                    t = t.set_column(t.column_names.index(col_name), col_name, nulls)
            out[name] = t
        self.inner.commit(run_id, step, out)


# ---------------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------------

class Ledger:
    """The recorder attached to one Opacus training loop; made by :func:`track`.

    Attributes: ``run_id``; ``step`` (the number of the next DP-SGD step, Opacus's
    count); ``mode`` (``hooks`` or ``ghost``); ``sink_s`` (seconds spent buffering and
    committing rows); ``track_s`` (seconds spent on the tracked set); ``rows_written``.
    """

    def __init__(self, privacy_engine, model, optimizer, data_loader, run: str | None = None, *,
                 criterion=None, db=None, lake=None, ids: Sequence[int] | None = None, every: int | None = None,
                 points=None, dataset: str | None = None, model_name: str | None = None,
                 delta: float | None = None, target_delta: float | None = None,
                 target_epsilon: float | None = None, epochs: float | None = None, steps: int | None = None,
                 seed: int | None = None, lr: float | None = None, resume: bool = False,
                 start_step: int | None = None, commit_seconds: float = 5.0, commit_every: int | None = None,
                 run_dir=None, config: dict | None = None, sink: Sink | None = None):
        self._closed = True  # until set up: close() on a half-made ledger does nothing
        self._patches: list = []
        self.mode = _check_optimizer(optimizer)
        self.optimizer, self.model, self.loader, self.engine = optimizer, model, data_loader, privacy_engine
        self.criterion = criterion
        self._ghost = _ghost_module(model, criterion) if self.mode == "ghost" else None

        # -- the run's parameters, from Opacus ------------------------------------------------
        sampler = _batch_sampler(data_loader)
        if sampler is None:
            raise UserError(f"data loader {type(data_loader).__name__}: it has no batch sampler (an "
                            "IterableDataset?), so the examples of a batch cannot be known", "data_loader")
        ds = data_loader.dataset
        try:
            n_train = len(ds)
        except TypeError:
            raise UserError(f"data loader {type(data_loader).__name__}: its dataset has no length", "data_loader")
        q = getattr(data_loader, "sample_rate", None) or getattr(sampler, "sample_rate", None)
        if q is None:
            q = 1 / len(data_loader)  # what PrivacyEngine.make_private accounts with
        q = float(q)
        poisson = type(sampler).__name__ in ("UniformWithReplacementSampler",
                                               "DistributedUniformWithReplacementSampler")
        sigma, c = float(optimizer.noise_multiplier), float(optimizer.max_grad_norm)
        if target_delta is not None and delta is not None and target_delta != delta:
            raise UserError(f"delta {delta} and target_delta {target_delta} differ; give one", "delta", "target_delta")
        delta = delta if delta is not None else target_delta
        if delta is not None and not 0 < delta < 1:
            raise UserError(f"delta {delta} is outside (0, 1)", "delta")
        try:
            per_epoch = len(data_loader)
        except TypeError:
            per_epoch = None
        if steps is None and epochs is not None:
            if not epochs > 0:
                raise UserError(f"epochs {epochs} must be positive", "epochs")
            # the loop's own count when whole epochs of a sized loader; else Opacus's rule
            steps = (int(epochs) * per_epoch if per_epoch and float(epochs).is_integer()
                     else steps_from_epochs(epochs, q))
        if steps is not None and not int(steps) >= 1:
            raise UserError(f"steps {steps} must be at least 1", "steps")
        self.steps_per_epoch = per_epoch or max(1, int(1 / q))
        base_lr = lr if lr is not None else optimizer.param_groups[0].get("lr")
        try:
            self.device = next(p.device for p in _unwrapped(model).parameters())
        except StopIteration:
            self.device = torch.device("cpu")

        # -- ids, the tracked set ---------------------------------------------------------------
        if ids is not None:
            ids = np.asarray(ids)
            if ids.ndim != 1 or len(ids) != n_train or not np.issubdtype(ids.dtype, np.integer):
                raise UserError(f"ids: expected {n_train} integer point ids (one per example of the dataset), "
                                f"got an array of shape {ids.shape} and type {ids.dtype}", "ids")
            ids = ids.astype(np.int64)
            if ids.min() < 0 or len(np.unique(ids)) != n_train:
                raise UserError("ids: point ids must be distinct and non-negative", "ids")
        self.ids = ids
        if every is not None and (int(every) != every or every < 1):
            raise UserError(f"every {every} must be a whole number of steps, at least 1", "every")
        if points is not None and every is None:
            every = 1
        if every is not None and points is None:
            raise UserError("every: give points (a number, or a list of point ids) to track every K steps",
                            "every", "points")
        self.every = int(every) if every is not None else None
        self._track_pos = self._track_ids = None
        if points is not None:
            self._track_pos = self._tracked_positions(points, n_train)
            self._track_ids = self._pid(self._track_pos)
            self._check_trackable(model, criterion)

        # -- the sink, the run -------------------------------------------------------------------
        run = safe_run_id(run or f"track-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        self.run_id = run
        if sum(x is not None for x in (db, lake, sink)) > 1:
            raise UserError("give db or lake (one of them)", "db", "lake")
        if sink is None:
            if db is not None:
                sink, base = DuckDBSink(db), Path(db).resolve().parent
            else:
                lake_dir = Path(lake) if lake is not None else default_lake(resolve_db_path(None))
                sink, base = ShardSink(lake_dir, worker=f"track-{socket.gethostname()}-{os.getpid()}"), \
                    lake_dir.resolve().parent
        else:
            base = Path(".").resolve()
        self._raw_sink = sink
        self.sink = _NullLoss(sink)
        try:
            exists = sink.run_exists(run)
            if exists and not resume:
                raise UserError(f"run '{run}' exists already; pass resume=True to continue it (after restoring "
                                "your checkpoint), or another run name", "run", "resume")
            stored = sink.stored_config(run) if exists else None
            if exists and not (stored or {}).get("track"):
                raise UserError(f"run '{run}' was not recorded by dpledger.track; cannot resume it", "resume")
            opacus_cfg = {
                "version": _opacus_version(), "grad_sample_mode": self.mode,
                "model_class": type(model).__name__, "module_class": type(_unwrapped(model)).__name__,
                "optimizer_class": type(optimizer).__name__,
                "base_optimizer_class": type(optimizer.original_optimizer).__name__,
                "data_loader_class": type(data_loader).__name__,
                "batch_sampler_class": type(sampler).__name__, "poisson_sampling": poisson,
                "sample_rate": q, "noise_multiplier": sigma, "max_grad_norm": c,
                "expected_batch_size": optimizer.expected_batch_size, "loss_reduction": optimizer.loss_reduction,
                "secure_mode": bool(getattr(optimizer, "secure_mode", False)),
                "accountant": (privacy_engine.accountant.mechanism()
                               if getattr(privacy_engine, "accountant", None) is not None else None),
                "batches_per_epoch": per_epoch,
            }
            if stored:
                before = stored.get("opacus", {})
                for key in ("sample_rate", "noise_multiplier", "max_grad_norm"):
                    if key in before and before[key] is not None and not math.isclose(before[key], opacus_cfg[key],
                                                                                       rel_tol=1e-9):
                        raise UserError(f"resume {run}: the run was recorded with {key} = {before[key]}, but "
                                        f"Opacus now has {opacus_cfg[key]}", "resume")
            self._committed = sink.committed_step(run) if exists else None
            accountant_steps = _accountant_steps(privacy_engine)
            if start_step is not None:
                if int(start_step) != start_step or start_step < 0:
                    raise UserError(f"start_step {start_step} must be a whole number >= 0", "start_step")
                start = int(start_step)
            else:
                start = accountant_steps
            self.step = start
            first_new = start if self._committed is None else max(start, self._committed + 1)
            if self._committed is not None and start > self._committed + 1:
                warnings.warn(f"dpledger: run {run}: rows are committed up to step {self._committed}, but training "
                              f"resumes at step {start}: steps {self._committed + 1}..{start - 1} have no rows "
                              "(commit when you checkpoint: privacy_engine.save_checkpoint or ledger.commit())",
                              stacklevel=3)
            n_tracked = 0 if self._track_ids is None else len(self._track_ids)
            self._config = {
                "track": {"every": self.every, "tracked_points": n_tracked, "ids_given": ids is not None,
                          "criterion": type(criterion).__name__ if criterion is not None else None,
                          "start_step": start, "accountant_steps_at_start": accountant_steps,
                          "resumed_after": self._committed},
                "coverage": "batch+tracked" if n_tracked else "batch",
                "opacus": opacus_cfg,
                "worker": {"host": socket.gethostname(), "pid": os.getpid()},
                "user": config or {},
            }
            self._run_dir = Path(run_dir) if run_dir else base / "runs" / run
            Recorder.make_folders(self._run_dir)
            self._run_row = {
                "run_id": run, "dataset": dataset or run, "model": model_name or type(_unwrapped(model)).__name__,
                "seed": seed, "n_train": n_train, "sample_rate": q,
                "batch_size": int(optimizer.expected_batch_size) if optimizer.expected_batch_size else None,
                "noise_multiplier": sigma, "max_grad_norm": c, "lr": float(base_lr) if base_lr is not None else None,
                "epochs": float(epochs) if epochs is not None else None,
                "steps": int(steps) if steps is not None else None, "delta": delta,
                "target_epsilon": target_epsilon, "private": True, "source": SOURCE, "status": "running",
                "run_dir": str(self._run_dir), "config": self._config,
            }
            self._points = self._points_table(dataset or run, ds, n_train)
            sink.begin(self._run_row, self._points, None)
            self.recorder = Recorder(self.sink, run, self._run_dir, commit_every=commit_every,
                                     commit_seconds=commit_seconds, start=first_new)
        except BaseException:
            sink.close()
            raise

        # -- state of the loop ---------------------------------------------------------------------
        self.sink_s = 0.0
        self.track_s = 0.0
        self.rows_written = 0
        self._feed = _BatchFeed()
        self._phys_norms: list[torch.Tensor] = []     # norms computed since the last optimizer.step() call
        self._phys_losses: list[torch.Tensor] = []    # per-example losses since then
        self._step_norms: list[torch.Tensor] = []     # per physical batch, of the logical step under way
        self._step_losses: list[torch.Tensor | None] = []
        self._pending: list[dict] = []                # finished steps not yet handed to the recorder
        self._last_step_end = time.perf_counter()
        self._sigmas: list[list] = [[start, sigma]]
        self._mismatched = 0
        self._warned: set[str] = set()
        self._tracker = None
        if self._track_pos is not None:
            self._track_x, self._track_y = self._tracked_data(data_loader, self._track_pos)
            self._tracker = GradNormTracker(model, chunk_size=1024)
        self._closed = False
        self._atexit = _at_exit(self)
        try:
            self._attach(sampler, privacy_engine)
        except BaseException:
            self._detach()
            self._closed = True
            sink.close()
            raise

    # -- setup helpers ---------------------------------------------------------------------------
    def _pid(self, pos: np.ndarray) -> np.ndarray:
        return self.ids[pos] if self.ids is not None else pos.astype(np.int64)

    def _tracked_positions(self, points, n: int) -> np.ndarray:
        if isinstance(points, (int, np.integer)) and not isinstance(points, bool):
            if points < 1:
                raise UserError(f"points {points}: give at least 1 point", "points")
            return np.arange(min(int(points), n), dtype=np.int64)
        wanted = np.asarray(list(points))
        if wanted.ndim != 1 or wanted.size == 0 or not np.issubdtype(wanted.dtype, np.integer):
            raise UserError("points: expected a number of points, or a non-empty list of point ids", "points")
        wanted = np.unique(wanted.astype(np.int64))
        if self.ids is None:
            bad = wanted[(wanted < 0) | (wanted >= n)]
            if bad.size:
                raise UserError(f"points: point id {bad[0]} is not in the dataset (0..{n - 1})", "points")
            return wanted
        where = {int(p): i for i, p in enumerate(self.ids)}
        missing = [int(p) for p in wanted if int(p) not in where]
        if missing:
            raise UserError(f"points: point id {missing[0]} is not one of ids", "points")
        return np.asarray([where[int(p)] for p in wanted], dtype=np.int64)

    @staticmethod
    def _check_trackable(model, criterion) -> None:
        for name, m in _unwrapped(model).named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                raise UserError(f"layer {name or type(m).__name__} ({type(m).__name__}): the tracked set's norm "
                                "tracker cannot handle BatchNorm, which mixes the examples of a batch; use "
                                "GroupNorm, or track without points", "points")
        base = getattr(criterion, "criterion", criterion)
        if base is not None and not isinstance(base, torch.nn.CrossEntropyLoss):
            raise UserError(f"criterion {type(base).__name__}: the tracked set's norms are of the cross-entropy "
                            "loss; track without points, or train with nn.CrossEntropyLoss", "points")

    @staticmethod
    def _tracked_data(loader, pos: np.ndarray):
        ds = loader.dataset
        items = [ds[int(i)] for i in pos]
        batch = loader.collate_fn(items) if loader.collate_fn is not None else torch.utils.data.default_collate(items)
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise UserError("points: the dataset's examples are not (input, label) pairs; the tracked set needs "
                            "them", "points")
        return batch[0], batch[1]

    def _points_table(self, dataset_name: str, ds, n: int) -> pa.Table:
        labels = _labels(ds, n)
        return pa.table({
            "dataset": pa.array([dataset_name] * n, pa.string()),
            "point_id": pa.array(self._pid(np.arange(n))),
            "label": pa.array(labels if labels is not None else [None] * n, pa.int64()),
            "split": pa.array(["train"] * n, pa.string()),
            "attrs": pa.array([None] * n, pa.string()),
            "thumbnail": pa.array([None] * n, pa.binary()),
        })

    # -- patches (instance attributes only; all undone by close) --------------------------------
    def _patch(self, obj, name: str, value) -> None:
        had = name in vars(obj)
        self._patches.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def _attach(self, sampler, privacy_engine) -> None:
        opt = self.optimizer
        original_pre_step = opt.pre_step
        self._patch(opt, "pre_step", lambda closure=None: self._pre_step(original_pre_step, closure))
        if self.mode == "hooks":
            if _opacus_version() in _CLIP_REPLICA_VERSIONS:
                # Opacus's own clipping, verbatim, keeping the norms it computes: nothing computed twice
                self._patch(opt, "clip_and_accumulate", _recording_clip(opt, self._phys_norms))
            else:  # another Opacus: the same norms by the same operations, then Opacus's own clipping
                original_clip = opt.clip_and_accumulate

                def clip_and_accumulate():
                    self._phys_norms.append(_per_sample_norms(opt))
                    return original_clip()

                self._patch(opt, "clip_and_accumulate", clip_and_accumulate)
        else:
            gsm = self._ghost
            original_norms = gsm.get_norm_sample

            def get_norm_sample():
                norms = original_norms()
                self._phys_norms.append(norms.detach())
                return norms

            self._patch(gsm, "get_norm_sample", get_norm_sample)
        # the batch sampler records its index lists
        cls = type(sampler)
        if getattr(cls, "_dpledger_recording_of", None) is not None:
            raise UserError(f"data loader {type(self.loader).__name__}: another ledger is attached to it; close "
                            "that one first", "data_loader")
        sampler.__dict__[_FEED_ATTR] = self._feed
        self._sampler, self._sampler_class = sampler, cls
        sampler.__class__ = _recording_class(cls)
        # losses, from the criterion's forward (Opacus's ghost criterion wraps a plain one)
        self._loss_hook = None
        base = getattr(self.criterion, "criterion", self.criterion)
        if isinstance(base, torch.nn.Module):
            none = None
            if self.mode == "hooks":  # a copy that gives per-example losses (made before the hook is added)
                none = copy.deepcopy(base)
                none.reduction = "none"

            def on_loss(module, args, kwargs, output):
                if not isinstance(output, torch.Tensor) or not output.requires_grad:
                    return  # evaluation (no gradient): not a training batch
                if output.dim() == 1:
                    self._phys_losses.append(output.detach())
                elif none is not None:
                    with torch.no_grad():
                        self._phys_losses.append(none(*args, **kwargs).detach())

            self._loss_hook = base.register_forward_hook(on_loss, with_kwargs=True)
        elif self.criterion is not None and not callable(self.criterion):
            raise UserError(f"criterion {type(self.criterion).__name__}: not a loss function", "criterion")
        # an Opacus checkpoint commits the ledger first, so resuming from it loses no row
        if privacy_engine is not None and hasattr(privacy_engine, "save_checkpoint"):
            original_save = privacy_engine.save_checkpoint

            def save_checkpoint(*args, **kwargs):
                self.commit()
                return original_save(*args, **kwargs)

            self._patch(privacy_engine, "save_checkpoint", save_checkpoint)

    def _detach(self) -> None:
        for obj, name, had, old in reversed(self._patches):
            if had:
                setattr(obj, name, old)
            else:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
        self._patches = []
        sampler = getattr(self, "_sampler", None)
        if sampler is not None:
            sampler.__class__ = self._sampler_class
            sampler.__dict__.pop(_FEED_ATTR, None)
            self._sampler = None
        if getattr(self, "_loss_hook", None) is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if getattr(self, "_tracker", None) is not None:
            self._tracker.close()
            self._tracker = None

    # -- the loop ------------------------------------------------------------------------------------
    def record_loss(self, losses: torch.Tensor) -> None:
        """Per-example losses of the physical batch about to be stepped (for loops whose loss
        is not an ``nn.Module`` criterion given to :func:`track`): call before ``optimizer.step()``."""
        self._phys_losses.append(torch.as_tensor(losses).detach().reshape(-1))

    def _pre_step(self, original, closure):
        real = original(closure)  # Opacus: clip (norms recorded), maybe noise, the accountant's hook
        if self._closed:
            return real
        norms = list(self._phys_norms)
        self._phys_norms.clear()  # in place: the clipping closure holds this list
        n = sum(len(t) for t in norms)
        losses = next((t for t in reversed(self._phys_losses) if len(t) == n), None)
        if n == 0:
            losses = torch.zeros(0)
        self._step_norms.extend(norms)
        self._step_losses.append(losses)
        self._phys_losses = []
        if real:
            self._finish_step()
        return real

    def _finish_step(self) -> None:
        t = self.step
        norm_parts, loss_parts = self._step_norms, self._step_losses
        self._step_norms, self._step_losses = [], []
        n = sum(len(x) for x in norm_parts)
        # the logical batch (or batches, when gradients of several were accumulated) this step took
        batch: list = []
        while True:
            b = self._feed.pop()
            if b is None:
                break
            batch.extend(b)
            if len(batch) >= n:
                break
        sigma = float(self.optimizer.noise_multiplier)
        if sigma != self._sigmas[-1][1]:
            self._sigmas.append([t, sigma])
        self.step = t + 1
        keep = self._committed is None or t > self._committed
        track_s = 0.0
        tracked = None
        if self._tracker is not None and t % self.every == 0 and keep:
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                res = self._tracker(self._track_x, self._track_y)
            tracked = (res.norms.detach(), res.losses.detach())
            track_s = time.perf_counter() - t0
            self.track_s += track_s
        now = time.perf_counter()
        wall = now - self._last_step_end
        self._last_step_end = now
        if not keep:
            return
        t0 = time.perf_counter()
        row = {"step": t, "batch_size": n, "wall_s": wall, "track_s": track_s,
               "lr": float(self.optimizer.param_groups[0].get("lr", float("nan"))), "mem": _peak_mem(self.device)}
        if len(batch) != n:
            self._mismatched += 1
            if "mismatch" not in self._warned:
                self._warned.add("mismatch")
                warnings.warn(f"dpledger: step {t}: Opacus clipped {n} examples, but the data loader given to "
                              f"track() drew {len(batch)}; no point rows for such steps (is the loop iterating "
                              "that loader, or a BatchMemoryManager over it?)", stacklevel=4)
            row.update(batch=None, norms=None, losses=None)
        else:
            row.update(batch=batch, norms=norm_parts,
                       losses=loss_parts if all(x is not None for x in loss_parts) else None)
        row["tracked"] = tracked
        self._pending.append(row)
        self.sink_s += time.perf_counter() - t0
        if self.recorder.due(t, last=False):
            self._flush(t)

    # -- committing ---------------------------------------------------------------------------------
    def _flush(self, step: int | None = None) -> None:
        """Hand the finished steps to the recorder and commit them (with the marker ``step``):
        the norms and losses of all of them leave the device in one copy."""
        if not self._pending:
            return
        t0 = time.perf_counter()
        rows, self._pending = self._pending, []
        step = rows[-1]["step"] if step is None else step
        norms, losses, steps, pids, sampled, keep = [], [], [], [], [], []
        spans = []  # per row: (offset, length) of its batch rows in the concatenated arrays, or None
        offset = 0
        for r in rows:
            if r["batch"] is None:
                spans.append(None)
                continue
            bp = self._pid(np.asarray(r["batch"], dtype=np.int64))
            k = len(bp)
            if k:
                norms.extend(r["norms"])
                losses.extend(r["losses"] if r["losses"] is not None else [torch.full((k,), float("nan"))])
            steps.append(np.full(k, r["step"], np.int64))
            pids.append(bp)
            sampled.append(np.ones(k, bool))
            kp = np.ones(k, bool)
            if k > 1 and len(np.unique(bp)) != k:  # a sampler with replacement: one row per example
                kp[:] = False
                kp[np.unique(bp, return_index=True)[1]] = True
            keep.append(kp)
            spans.append((offset, k))
            offset += k
            if r["tracked"] is not None:
                tn, tl = r["tracked"]
                out = ~np.isin(self._track_ids, bp)
                m = int(out.sum())
                if m:
                    ot = torch.as_tensor(out, device=tn.device)
                    norms.append(tn[ot])
                    losses.append(tl[ot])
                    steps.append(np.full(m, r["step"], np.int64))
                    pids.append(self._track_ids[out])
                    sampled.append(np.zeros(m, bool))
                    keep.append(np.ones(m, bool))
                    offset += m
        g = _to_numpy(norms, offset)
        lo = _to_numpy(losses, offset)
        if pids:
            kp = np.concatenate(keep)
            all_pids = np.concatenate(pids)[kp]
            self.recorder.add("point_steps", step=np.concatenate(steps)[kp], point_id=all_pids, grad_norm=g[kp],
                              norm_clipped=np.zeros(len(all_pids), bool), loss=lo[kp],
                              sampled=np.concatenate(sampled)[kp])
        mean = np.array([lo[sp[0]:sp[0] + sp[1]].mean() if sp is not None and sp[1] else np.nan for sp in spans])
        self.recorder.add("steps", step=np.array([r["step"] for r in rows], np.int64),
                          epoch=np.array([r["step"] / self.steps_per_epoch for r in rows]),
                          batch_size=np.array([r["batch_size"] for r in rows], np.int64),
                          loss=mean, lr=np.array([r["lr"] for r in rows]),
                          wall_s=np.array([r["wall_s"] for r in rows]),
                          peak_mem_bytes=np.array([r["mem"] for r in rows], np.int64),
                          test_accuracy=np.full(len(rows), np.nan), track_s=np.array([r["track_s"] for r in rows]))
        before = self.recorder.rows_written
        self.recorder.commit(step, {"step": step, "run_id": self.run_id, "source": SOURCE})
        self.rows_written += self.recorder.rows_written - before
        self.sink_s += time.perf_counter() - t0

    def commit(self) -> None:
        """Commit the rows of every finished step now (also done on a cadence, on an Opacus
        checkpoint and at the end)."""
        if not self._closed:
            self._flush()

    def close(self, status: str = "finished") -> None:
        """Commit what is left, record the steps taken, mark the run ``status`` (``finished`` or
        ``failed``) and undo every hook. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        try:
            try:
                self._flush()
            finally:
                self._detach()
            cfg = self._config
            cfg["track"]["steps_taken"] = self.step
            cfg["track"]["mismatched_steps"] = self._mismatched
            cfg["track"]["stale_batches_dropped"] = self._feed.dropped
            cfg["opacus"]["accountant_history"] = _accountant_history(self.engine)
            if len(self._sigmas) > 1:
                cfg["opacus"]["noise_multiplier_from_step"] = self._sigmas
            row = dict(self._run_row, config=cfg, status=status)
            if row["steps"] is None and self.step > 0 and status == "finished":
                row["steps"] = self.step
            self._raw_sink.begin(row, self._points, None)  # the final parameters and config
            self._raw_sink.finish(self.run_id, status)
        finally:
            self._raw_sink.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close("finished")
        else:
            try:
                self.close("failed")
            except Exception as inner:  # the loop's error is the one to see
                warnings.warn(f"dpledger: could not mark run {self.run_id} failed: {inner}")
        return False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Ledger(run={self.run_id!r}, mode={self.mode}, step={self.step}, {state})"


def _at_exit(ledger: Ledger):
    """An exit handler for a ledger the script never closed: its rows are committed and the run
    marked ``failed`` if the script ended by an uncaught exception (``sys.last_value``), else
    ``finished``. Holds the ledger weakly."""
    ref = weakref.ref(ledger)

    def handler():
        led = ref()
        if led is not None and not led._closed:
            failed = getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None
            try:
                led.close("failed" if failed else "finished")
            except Exception as exc:  # pragma: no cover - nothing to raise to at exit
                print(f"dpledger: could not close run {led.run_id} at exit: {exc}", file=sys.stderr)

    atexit.register(handler)
    return handler


# Opacus versions whose DPOptimizer.clip_and_accumulate _recording_clip reproduces line by line
_CLIP_REPLICA_VERSIONS = ("1.6.0",)


def _recording_clip(opt, out: list):
    """``DPOptimizer.clip_and_accumulate`` of Opacus 1.6.0 (the same operations in the same order,
    so the same clipped sum, bit for bit: a test checks it), bound to ``opt``, that also appends the
    per-example norms it clips with to ``out``."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def clip_and_accumulate():
        grad_samples = opt.grad_samples
        if len(grad_samples[0]) == 0:
            # Empty batch
            per_sample_clip_factor = torch.zeros((0,), device=grad_samples[0].device)
            per_sample_norms = per_sample_clip_factor
        else:
            per_param_norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]
            if per_param_norms:
                target_device = per_param_norms[0].device
                per_param_norms = [norm.to(target_device) for norm in per_param_norms]
            per_sample_norms = torch.stack(per_param_norms, dim=1).norm(2, dim=1)
            per_sample_clip_factor = (opt.max_grad_norm / (per_sample_norms + 1e-6)).clamp(max=1.0)
        out.append(per_sample_norms.detach())
        for p in opt.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = opt._get_flat_grad_sample(p)
            # gradients should match the dtype of the optimizer parameters
            grad_sample = grad_sample.to(p.dtype)
            clip_factor_on_device = per_sample_clip_factor.to(grad_sample.device).to(p.dtype)
            grad = torch.einsum("i,i...", clip_factor_on_device, grad_sample)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    return clip_and_accumulate


def _per_sample_norms(optimizer) -> torch.Tensor:
    """The per-example gradient norms ``DPOptimizer.clip_and_accumulate`` clips with, by the same
    operations (so the same float values): norms of ``p.grad_sample`` per parameter, then per example."""
    gs = optimizer.grad_samples
    if not gs:
        return torch.zeros(0)
    if len(gs[0]) == 0:
        return torch.zeros(0, device=gs[0].device)
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in gs]
    dev = per_param[0].device
    return torch.stack([x.to(dev) for x in per_param], dim=1).norm(2, dim=1).detach()


def _to_numpy(parts: list, n: int) -> np.ndarray:
    """Tensors (on any device) concatenated into one float64 array, with one copy to the host."""
    if not parts:
        return np.zeros(n, np.float64)
    dev = parts[0].device
    return torch.cat([x.reshape(-1).to(dev, torch.float64) for x in parts]).cpu().numpy()


def _opacus_version() -> str | None:
    try:
        import opacus

        return str(opacus.__version__)
    except Exception:  # pragma: no cover
        return None


def track(privacy_engine, model, optimizer, data_loader, run: str | None = None, **options) -> Ledger:
    """Record an Opacus training loop into the ledger: see the module's documentation.

    ``track(privacy_engine, model, optimizer, data_loader, run="name", *, criterion=None,
    db=None | lake=None, ids=None, every=None, points=None, dataset=None, model_name=None,
    delta=None (or target_delta), target_epsilon=None, epochs=None, steps=None, seed=None,
    resume=False, start_step=None, commit_seconds=5.0, commit_every=None, run_dir=None,
    config=None)`` after ``privacy_engine.make_private(...)`` (or
    ``make_private_with_epsilon``), with the objects it returned. Returns a :class:`Ledger`
    (a context manager; or call ``ledger.close()``).
    """
    return Ledger(privacy_engine, model, optimizer, data_loader, run, **options)


__all__ = ["Ledger", "track"]
