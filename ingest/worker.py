"""One DP-SGD training run that records, for tracked training points, the per-example
gradient norm and loss at every step (or every k-th step).

The entry points are :class:`TrainConfig` (a run's options, by the names of
``dpledger train``'s flags) and :func:`train`, which runs (or resumes) one run into a
sink (:mod:`ingest.sinks`). The work is in three parts:

* setup (:func:`plan_run`): the data, the members of the training set, the sample
  rate q = batch_size / n, the number of steps (:func:`analysis.budget.steps_from_epochs`,
  ⌊epochs / q⌋), the noise multiplier (given, or found for ``target_epsilon``), the
  tracked and evaluated points, and the rows that describe the run;
* the loop (:func:`_loop`): Poisson batches (each example independently with rate q)
  from a seeded generator, so which points were in each step's batch is known and
  recorded (``point_steps.sampled``); at tracked steps, before the update,
  :class:`models.grad_norms.GradNormTracker` computes every tracked point's gradient
  norm (before clipping, at that step's parameters) and loss, whether or not the point
  was sampled; then one DP-SGD update (:class:`models.dp_step.DPSGD`); per-point
  evaluation (:func:`models.evaluation.evaluate_points`) and a checkpoint every
  ``eval_every`` steps;
* the recorder (:class:`ingest.recorder.Recorder`): row buffers, commits every
  ``commit_every`` steps (or ``commit_seconds``) with a progress marker and a resume
  state written first, so ``resume`` continues from the last committed step exactly
  as the uninterrupted run would have: no duplicate and no missing step. Commits run
  on the recorder's background writer thread, in order (and the lake's Parquet rows are
  staged ahead of their commit as they accumulate); the run's last commit is waited
  for, and a writer's error stops the run with that error.

DP-SGD is Opacus's (``GradSampleModule`` + ``DPOptimizer``). At tracked steps the
tracker has already computed every batch member's gradient norm at the step's
parameters (untracked members of the batch are added to its input), which is all
clipping needs: the clipped sum is then one weighted backward over the batch and
Opacus's ghost-clipping optimizer adds the noise, from the same generator, and steps
(``reuse_norms``; the update equals the per-sample path's to float rounding, which a
test checks). On models whose trainable layers are all ``nn.Linear`` (logreg, mlp) even that
backward is skipped: the clipped sum is formed from the layers' inputs and output gradients
of the tracker's own pass (:class:`_LinearCapture`). Untracked steps, and models with
stochastic layers, use the per-sample path.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import resource
import socket
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, get_args, get_type_hints

import numpy as np
import pyarrow as pa
import torch

# Opacus registers full backward hooks; our inputs never require grad, which torch notes
# on every backward. Harmless here.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

from dpledger.analysis.budget import steps_from_epochs
from dpledger.analysis.rdp import DEFAULT_ORDERS
from dpledger.analysis.validate import ParameterError, in_range, positive
from dpledger.analysis.validate import whole as _whole
from dpledger.models.datasets import DatasetError, load_dataset
from dpledger.models.dp_step import DPSGD
from dpledger.models.evaluation import accuracy, evaluate_points
from dpledger.models.grad_norms import GradNormTracker
from dpledger.models.nets import ModelError, build_model
from dpledger.warehouse.errors import UserError

from .readers import MAX_INDEX
from .recorder import Recorder, capture_state, load_state, restore_state
from .sinks import Sink, safe_run_id
from .steps_file import MAX_STEPS, check_run_parameters


class _LinearCapture:
    """The input rows and output gradients of every ``nn.Linear`` while the norm tracker runs.

    The tracker (:class:`models.grad_norms.GradNormTracker`) runs one forward over the tracked
    points and one backward of the summed losses to the layers' outputs: on a model whose only
    trainable modules are ``nn.Linear`` layers on ``(B, d)`` inputs, that is all the clipped sum
    of a batch needs, ``∇W = Σ_i w_i g_i a_iᵀ`` and ``∇b = Σ_i w_i g_i`` (``a_i`` a layer's input
    row, ``g_i`` the gradient of example i's loss at its output, ``w_i`` its clip factor). So the
    clipping pass at tracked steps is a few small matrix products instead of a second forward and
    backward over the batch (:meth:`grads`). Captured by a forward hook and a gradient hook on the
    output that only read; :meth:`grads` returns None when anything is missing, and checks what it
    read against the tracker's own norms (``‖∇W_i‖² + ‖∇b_i‖² = (‖a_i‖² + 1) ‖g_i‖²`` summed over
    layers) at its first calls and every :attr:`CHECK_EVERY`-th: if they ever disagree the capture
    is off for good (the caller then clips with a weighted backward, as without it).
    """

    CHECK_EVERY = 50

    def __init__(self, model: torch.nn.Module):
        params = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        self.layers = [m for m in params if type(m) is torch.nn.Linear]
        self.usable = bool(self.layers) and len(self.layers) == len(params) and len(
            {id(p) for p in model.parameters()}) == sum(1 for m in params for _ in m.parameters(recurse=False))
        self.active = False
        self.n_grads = 0
        self.calls: dict[torch.nn.Module, list[list]] = {}
        self._handles = [m.register_forward_hook(self._record) for m in self.layers] if self.usable else []

    def _record(self, module, args, output) -> None:
        if not self.active or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        entry = [args[0].detach() if args and isinstance(args[0], torch.Tensor) else None, None]
        self.calls.setdefault(module, []).append(entry)
        output.register_hook(lambda g, entry=entry: entry.__setitem__(1, g))  # reads; returns None

    def start(self) -> None:
        self.calls = {}
        self.active = self.usable

    def stop(self) -> None:
        self.active = False

    def grads(self, rows: torch.Tensor, norms: torch.Tensor, max_grad_norm: float, n_rows: int) -> list | None:
        """``[(param, clipped-sum gradient)]`` of the examples at ``rows`` of the tracked input
        (``n_rows`` long), clipped with ``norms`` (theirs); None if the capture is not usable."""
        calls, self.calls = self.calls, {}
        if not self.usable:
            return None
        parts = []
        checking = self.n_grads < 2 or self.n_grads % self.CHECK_EVERY == 0
        self.n_grads += 1
        check = torch.zeros(len(rows), dtype=torch.float64, device=norms.device)
        for m in self.layers:
            got = calls.get(m)
            if not got or any(a is None or g is None or a.dim() != 2 or g.shape != (a.shape[0], m.out_features)
                              for a, g in got):
                return None
            a = torch.cat([a for a, _ in got]) if len(got) > 1 else got[0][0]
            g = torch.cat([g for _, g in got]) if len(got) > 1 else got[0][1]
            if a.shape[0] != n_rows:
                return None
            a, g = a[rows], g[rows]
            if checking:
                g2 = torch.linalg.vector_norm(g, dim=1).double().square()
                if m.weight.requires_grad:
                    check += torch.linalg.vector_norm(a, dim=1).double().square() * g2
                if m.bias is not None and m.bias.requires_grad:
                    check += g2
            parts.append((m, a, g))
        if checking and len(rows) and not torch.allclose(check.sqrt(), norms.double(), rtol=1e-3, atol=1e-6):
            self.close()  # not what the norms were computed from: never used again
            return None
        weights = (max_grad_norm / (norms + 1e-6)).clamp_(max=1.0).to(parts[0][2].dtype).unsqueeze(1)
        out = []
        for m, a, g in parts:
            wg = g.mul_(weights)  # g is this call's own copy (rows picked out above)
            if m.weight.requires_grad:
                out.append((m.weight, torch.mm(wg.t(), a)))
            if m.bias is not None and m.bias.requires_grad:
                out.append((m.bias, wg.sum(dim=0)))
        return out

    def close(self) -> None:
        self.usable = self.active = False
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def _closing(capture):
    try:
        yield capture
    finally:
        if capture is not None:
            capture.close()


def _captured_step(dp, grads: list, n: int, loss_sum: torch.Tensor) -> float:
    """One DP-SGD update whose clipped sum is ``grads`` (:meth:`_LinearCapture.grads`): the
    tail of :func:`models.dp_step.clipped_step` (Opacus's ghost-clipping optimizer adds the
    noise from the run's generator, scales and steps); returns the batch's mean loss."""
    dp.model.train()
    dp.optimizer.zero_grad(set_to_none=True)
    for p, g in grads:
        p.grad = g.to(p.dtype).reshape(p.shape)
    for p in dp.model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    dp.shared.step()
    dp.shared.zero_grad(set_to_none=True)
    return float(loss_sum.item() / n) if n else float("nan")


@dataclass
class TrainConfig:
    """Options of one run, by the names of ``dpledger train``'s flags."""

    run: str | None = None
    dataset: str = "digits"
    data_path: str | None = None
    model: str = "mlp"
    epochs: float = 5.0
    batch_size: int = 64
    lr: float = 0.5
    momentum: float = 0.0
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    seed: int = 0
    disable_dp: bool = False
    track: str = "all"
    track_every: int = 1
    reuse_norms: bool = True          # clip tracked steps' batches with the tracked norms (see module doc)
    eval_every: int | None = None
    commit_every: int | None = None   # steps per commit; None: every commit_seconds
    commit_seconds: float = 5.0
    n_train: int | None = None
    n_test: int | None = None
    subset_ratio: float | None = None
    data_seed: int = 0
    test_fraction: float = 0.2
    device: str = "cpu"
    threads: int | None = None
    run_dir: str | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        """A config from a mapping (a sweep file's table, a stored run's options), each
        value of its option's type: a number for a number, text for text, true/false for
        a switch (``where`` names the source in messages)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise UserError(f"{where}: unknown option '{unknown[0]}' (options: {', '.join(sorted(names))})")
        for key, value in d.items():
            problem = _type_problem(_OPTION_TYPES[key], value)
            if problem:
                raise UserError(f"{where}: {key} = {_show(value)} {problem}")
        return cls(**d)


def _option_types() -> dict[str, set[type]]:
    hints = get_type_hints(TrainConfig)
    return {name: {t for t in (get_args(hint) or (hint,)) if t is not type(None)} | (
        {type(None)} if type(None) in get_args(hint) else set()) for name, hint in hints.items()}


def _show(value) -> str:
    """A value as a config file spells it (true, 'five', 1.5), cut short."""
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_problem(types: set[type], value) -> str | None:
    """Why ``value`` is not of one of ``types`` (None if it is)."""
    if value is None:
        return None if type(None) in types else "must be given a value"
    if bool in types:
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(value, (bool, np.bool_)):  # a bool is an int in Python; not in a config
        pass
    elif int in types and isinstance(value, numbers.Integral):
        return None
    elif float in types and isinstance(value, numbers.Real):
        return None
    elif str in types and isinstance(value, str):
        return None
    if float in types:
        return "must be a number"
    if int in types:
        return "must be a whole number"
    return "must be text"


_OPTION_TYPES = _option_types()
_OPTION_TYPES["track"] = {str, int}  # all, none, a file, or a number of points (track = 100 in a sweep file)


#: TrainConfig fields that say how a run is executed, not what it computes: a stored run
#: may be continued with other values of these.
EXECUTION_FIELDS = ("run", "run_dir", "threads", "device", "commit_every", "commit_seconds")


def differing_options(stored: dict, cfg: TrainConfig) -> list[str]:
    """The options (``name stored -> new``) in which ``cfg`` differs from a stored run's
    ``train`` options: a run's identity is its whole configuration, not its name."""
    mine = asdict(cfg)
    return [f"{name} {stored.get(name)!r} -> {mine[name]!r}" for name in mine
            if name not in EXECUTION_FIELDS and stored.get(name, mine[name]) != mine[name]]


def default_run_name(cfg: TrainConfig) -> str:
    parts = [cfg.dataset, cfg.model, f"s{cfg.seed}"]
    if cfg.disable_dp:
        parts.append("nodp")
    elif cfg.noise_multiplier is not None:
        parts.append(f"n{cfg.noise_multiplier:g}")
    elif cfg.target_epsilon is not None:
        parts.append(f"e{cfg.target_epsilon:g}")
    if cfg.subset_ratio is not None:
        parts.append(f"sub{cfg.subset_ratio:g}")
    return "-".join(parts)


#: Documented ranges of the numeric options (besides those of
#: :func:`ingest.steps_file.check_run_parameters`: noise_multiplier, max_grad_norm, delta).
MAX_EPOCHS = 1e6
MAX_LR = 1e6
MAX_TARGET_EPSILON = 1e6
MAX_SEED = 2**63 - 1
MAX_THREADS = 4096
#: Tracked points from which the norm tracker runs on the process's threads (see plan_run()).
PARALLEL_TRACKED_POINTS = 512


def validate(cfg: TrainConfig) -> None:
    """Refuse impossible options, naming the option (before any data is read); raises
    :class:`~dpledger.analysis.validate.ParameterError` for a number outside its range
    (every number must be finite): epochs in (0, :data:`MAX_EPOCHS`]; batch_size >= 1;
    lr in (0, :data:`MAX_LR`]; momentum in [0, 1]; max_grad_norm, noise_multiplier, delta
    as :func:`ingest.steps_file.check_run_parameters`; target_epsilon in (0,
    :data:`MAX_TARGET_EPSILON`]; seed and data_seed in [0, :data:`MAX_SEED`]; track_every,
    commit_every, eval_every >= 1; commit_seconds > 0; n_train >= 1, n_test >= 0;
    subset_ratio in (0, 1]; test_fraction in (0, 1); threads in [1, :data:`MAX_THREADS`]."""
    for name, types in _OPTION_TYPES.items():
        problem = _type_problem(types, getattr(cfg, name))
        if problem:
            raise ParameterError(f"{name} {_show(getattr(cfg, name))} {problem}", name)
    def whole(name, value, low=1, high=None):  # numpy integers are whole numbers too
        return _whole(name, int(value) if isinstance(value, numbers.Integral) else value, low, high)

    in_range("epochs", positive("epochs", cfg.epochs), 0, MAX_EPOCHS)
    whole("batch_size", cfg.batch_size, 1, MAX_INDEX)
    in_range("lr", positive("lr", cfg.lr), 0, MAX_LR)
    in_range("momentum", cfg.momentum, 0, 1, low_open=False)
    positive("commit_seconds", cfg.commit_seconds)
    whole("seed", cfg.seed, 0, MAX_SEED)
    whole("data_seed", cfg.data_seed, 0, MAX_SEED)
    whole("track_every", cfg.track_every, 1)
    for name in ("commit_every", "eval_every", "n_train"):
        if getattr(cfg, name) is not None:
            whole(name, getattr(cfg, name), 1)
    if cfg.n_test is not None:
        whole("n_test", cfg.n_test, 0)
    if cfg.threads is not None:
        whole("threads", cfg.threads, 1, MAX_THREADS)
    if cfg.subset_ratio is not None:
        in_range("subset_ratio", cfg.subset_ratio, 0, 1)
    in_range("test_fraction", cfg.test_fraction, 0, 1, high_open=True)
    check_run_parameters(max_grad_norm=cfg.max_grad_norm, delta=cfg.delta)
    if not cfg.disable_dp:
        if (cfg.noise_multiplier is None) == (cfg.target_epsilon is None):
            raise UserError("give noise_multiplier or target_epsilon (one of them), or disable_dp",
                            "noise_multiplier", "target_epsilon", "disable_dp")
        if cfg.noise_multiplier is not None:
            check_run_parameters(noise_multiplier=cfg.noise_multiplier)
        if cfg.target_epsilon is not None:
            in_range("target_epsilon", positive("target_epsilon", cfg.target_epsilon), 0, MAX_TARGET_EPSILON)
    if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise UserError(f"device {cfg.device}: expected cpu or cuda", "device")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {cfg.device}: no CUDA GPU is available here", "device")
    if cfg.run is not None:
        safe_run_id(cfg.run)


def dataset_key(cfg: TrainConfig) -> str:
    """The name points are stored under: a point id means the same example across runs
    only for the same split, so non-default split options are part of the name."""
    extra = []
    if cfg.data_seed != 0:
        extra.append(f"split_seed={cfg.data_seed}")
    if cfg.test_fraction != 0.2 and cfg.dataset in ("digits", "mnist5k", "synthetic", "npz"):
        extra.append(f"test_fraction={cfg.test_fraction:g}")
    return cfg.dataset + (":" + ",".join(extra) if extra else "")


def load_data(cfg: TrainConfig):
    """The run's dataset (:func:`models.datasets.load_dataset`)."""
    try:
        return load_dataset(cfg.dataset, cfg.data_path, seed=cfg.data_seed, n_train=cfg.n_train,
                            n_test=cfg.n_test, test_fraction=cfg.test_fraction)
    except DatasetError as exc:
        raise UserError(f"dataset {cfg.dataset}: {exc}", "dataset") from None


def build(cfg: TrainConfig, ds):
    """The run's model, initialised from its seed (:func:`models.nets.build_model`)."""
    try:
        return build_model(cfg.model, ds.input_shape, ds.num_classes, seed=cfg.seed)
    except ModelError as exc:
        raise UserError(f"model {cfg.model}: {exc}", "model") from None


def tracked_points(spec: str, members: np.ndarray, n_all: int) -> np.ndarray:
    """Point ids to track: ``all`` members, ``none``, the first ``N`` members, or ids from a file."""
    spec = str(spec)
    if spec == "all":
        return members
    if spec == "none":
        return np.zeros(0, dtype=np.int64)
    if spec.isdigit():
        n = int(spec)
        if n < 1:
            raise UserError(f"track {spec}: give at least 1 point", "track")
        return members[: min(n, len(members))]
    path = Path(spec)
    if not path.exists():
        raise UserError(f"track {spec}: expected all, a number, or a file of point ids (no such file)", "track")
    ids = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split(",")[0].strip()
        if not text or text.startswith("#") or (lineno == 1 and not text.lstrip("-").isdigit()):
            continue  # blank, comment, or a header such as "point_id"
        if not text.lstrip("-").isdigit():
            raise UserError(f"{path}: line {lineno}: '{text}' is not a point id")
        value = int(text)
        if not 0 <= value < n_all:
            raise UserError(f"{path}: line {lineno}: point id {value} is outside 0..{n_all - 1}")
        ids.append(value)
    if not ids:
        raise UserError(f"{path}: no point ids in the file")
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    kept = np.intersect1d(ids, members)
    if kept.size == 0:
        raise UserError(f"{path}: none of the listed points is in this run's training set")
    return kept


def _rss_peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _noise_multiplier(cfg: TrainConfig, q: float, steps: int) -> float | None:
    """σ: none without DP, the given one, or Opacus's for ``target_epsilon`` over ``steps``."""
    if cfg.disable_dp:
        return None
    if cfg.target_epsilon is None:
        return float(cfg.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier  # opacus is slow to import: only when needed

    try:
        return float(get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=cfg.delta,
                                          sample_rate=q, steps=steps, accountant="rdp",
                                          alphas=list(DEFAULT_ORDERS)))
    except ValueError as exc:
        raise UserError(f"target_epsilon {cfg.target_epsilon}: {exc}", "target_epsilon") from None


@dataclass
class RunPlan:
    """What the setup of a run decides before any training: data, sizes, ids and its rows."""

    cfg: TrainConfig
    ds: object                  # models.datasets.Dataset
    members: np.ndarray         # point ids of the training set (all, or the subset)
    q: float                    # sample rate
    steps_per_epoch: int        # batches an epoch draws, as Opacus's Poisson loader: floor(1/q)
    total: int                  # steps of the run
    eval_every: int
    sigma: float | None         # noise multiplier (None without DP)
    track_ids: np.ndarray       # tracked points (members)
    eval_ids: np.ndarray        # evaluated points (tracked, and with a subset the non-members selected)
    run_dir: Path
    run_row: dict               # the ``runs`` row
    points: pa.Table            # the ``points`` rows
    membership: pa.Table | None  # the ``membership`` rows of a subset run
    tracker_threads: int = 1    # torch threads while the norm tracker runs (see plan_run())

    @property
    def n(self) -> int:
        return len(self.members)


def plan_run(cfg: TrainConfig, db_dir: Path | None, torch_threads: int, process_threads: int | None = None) -> RunPlan:
    """Read the data and decide everything about the run that does not need the model.

    ``process_threads``: the caller's torch threads, which the norm tracker takes when it tracks
    :data:`PARALLEL_TRACKED_POINTS` or more points (default: ``torch_threads``)."""
    run_id = cfg.run
    ds = load_data(cfg)
    n_all = ds.n_train
    members = np.arange(n_all)
    if cfg.subset_ratio is not None:
        rng = np.random.default_rng([cfg.seed, 7919])
        members = np.flatnonzero(rng.random(n_all) < cfg.subset_ratio)
        if members.size == 0:
            raise UserError(f"subset_ratio {cfg.subset_ratio} leaves no training point", "subset_ratio")
    n = len(members)
    if cfg.batch_size > n:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the training set ({n} points)", "batch_size")
    q = cfg.batch_size / n
    steps_per_epoch = max(1, int(1 / q))  # as Opacus's Poisson data loader
    total = steps_from_epochs(cfg.epochs, q)
    if total < 1:
        raise UserError(f"epochs {cfg.epochs} at sample rate {q:g} is less than one step", "epochs")
    if total > MAX_STEPS:
        raise UserError(f"epochs {cfg.epochs} at sample rate {q:g} is {total} steps, more than {MAX_STEPS}", "epochs")
    sigma = _noise_multiplier(cfg, q, total)
    private = sigma is not None
    track_ids = tracked_points(cfg.track, members, n_all)
    # with a subset, the non-members among the selection are evaluated (not tracked): memorization needs them
    selection = track_ids if cfg.subset_ratio is None else tracked_points(cfg.track, np.arange(n_all), n_all)
    eval_ids = np.union1d(track_ids, selection)
    # The tracker runs one forward and backward over every tracked point: with that many, its
    # ops are large enough to split even where the model steps on one thread (logreg, mlp).
    # Fixed per run, never timed, so a seed gives the same norms and updates on a machine.
    many = len(track_ids) >= PARALLEL_TRACKED_POINTS
    tracker_threads = (cfg.threads or max(torch_threads, process_threads or 0)) if many else torch_threads

    run_dir = Path(cfg.run_dir) if cfg.run_dir else (db_dir or Path(".")) / "runs" / run_id
    Recorder.make_folders(run_dir)
    key = dataset_key(cfg)
    config = {"train": asdict(cfg), "noise_multiplier_resolved": sigma, "steps_per_epoch": steps_per_epoch,
              "worker": {"host": socket.gethostname(), "pid": os.getpid()},
              "tracked_points": int(len(track_ids)), "dataset_source": ds.source, "torch_threads": torch_threads,
              "tracker_threads": tracker_threads}
    run_row = {
        "run_id": run_id, "dataset": key, "model": cfg.model, "seed": cfg.seed, "n_train": n, "sample_rate": q,
        "batch_size": cfg.batch_size, "noise_multiplier": sigma, "max_grad_norm": cfg.max_grad_norm if private else None,
        "lr": cfg.lr, "epochs": float(cfg.epochs), "steps": total, "delta": cfg.delta,
        "target_epsilon": cfg.target_epsilon, "private": private, "source": "train", "status": "running",
        "run_dir": str(run_dir), "config": config,
    }
    labels = ds.y_train.numpy()
    thumbs = dict(zip(eval_ids.tolist(), ds.thumbnails("train", eval_ids.tolist()))) if ds.raw_train is not None else {}
    points = pa.table({
        "dataset": pa.array([key] * n_all, pa.string()),
        "point_id": pa.array(np.arange(n_all, dtype=np.int64)),
        "label": pa.array(labels.astype(np.int64)),
        "split": pa.array(["train"] * n_all, pa.string()),
        "attrs": pa.array([json.dumps(a) for a in ds.attrs_train] if ds.attrs_train else [None] * n_all, pa.string()),
        "thumbnail": pa.array([thumbs.get(i) for i in range(n_all)], pa.binary()),
    })
    membership = None
    if cfg.subset_ratio is not None:
        in_train = np.zeros(n_all, dtype=bool)
        in_train[members] = True
        membership = pa.table({"run_id": pa.array([run_id] * n_all, pa.string()),
                               "point_id": pa.array(np.arange(n_all, dtype=np.int64)), "in_train": in_train})
    return RunPlan(cfg, ds, members, q, steps_per_epoch, total, cfg.eval_every or steps_per_epoch, sigma,
                   track_ids, eval_ids, run_dir, run_row, points, membership, tracker_threads)


def _resolve(cfg: TrainConfig, sink: Sink, resume: bool) -> TrainConfig:
    """The options of the run: ``cfg`` checked, or on ``resume`` those the sink stored."""
    if not resume:
        validate(cfg)
    run_id = cfg.run or default_run_name(cfg)
    cfg.run = safe_run_id(run_id)
    exists = sink.run_exists(run_id)
    if resume:
        if not exists:
            raise UserError(f"resume {run_id}: no such run", "resume")
        stored = sink.stored_config(run_id) or {}
        train_opts = stored.get("train")
        if not train_opts:
            raise UserError(f"resume {run_id}: the run was not made by `dpledger train` (no stored options)",
                            "resume")
        cfg = TrainConfig.from_dict(train_opts, f"run {run_id}")
        validate(cfg)
    elif exists:
        raise UserError(f"run '{run_id}' exists already; use resume {run_id} or another run name", "resume")
    return cfg


def train(cfg: TrainConfig, sink: Sink, *, resume: bool = False, db_dir: Path | None = None,
          on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) one training run into ``sink``; returns a summary.

    ``db_dir``: the folder run folders go under when ``cfg.run_dir`` is not given.
    ``on_progress`` is called after each commit with the step, the total, the loss
    and the test accuracy, σ, q and δ.
    """
    cfg = _resolve(cfg, sink, resume)
    previous_threads = torch.get_num_threads()
    # Small models run fastest single-threaded: their ops are too small to split, and
    # idle OpenMP threads spin on a busy machine (200 ms instead of 5 ms a step, measured).
    torch_threads = cfg.threads or (1 if cfg.model in ("logreg", "mlp") else previous_threads)
    torch.set_num_threads(torch_threads)
    try:
        return _run(plan_run(cfg, db_dir, torch_threads, previous_threads), sink, resume, on_progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(plan: RunPlan, sink: Sink, resume: bool, on_progress) -> dict:
    """Build the model and DP-SGD, restore a resume state, and train from there."""
    cfg, run_id = plan.cfg, plan.cfg.run
    device = torch.device(cfg.device)
    model = build(cfg, plan.ds).to(device)
    sampler = torch.Generator().manual_seed(cfg.seed)
    noise = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003)
    torch.manual_seed(cfg.seed + 2_000_003)
    dp = DPSGD.build(model, lr=cfg.lr, momentum=cfg.momentum, private=plan.sigma is not None,
                     noise_multiplier=plan.sigma, max_grad_norm=cfg.max_grad_norm,
                     expected_batch_size=max(1, int(round(plan.q * plan.n))), noise=noise,
                     reuse_norms=cfg.reuse_norms)
    start = 0
    if resume:
        committed = sink.committed_step(run_id)
        if committed is not None:
            restore_state(load_state(plan.run_dir, run_id, committed, device), dp, sampler)
            start = committed + 1
        if start >= plan.total:
            sink.finish(run_id, "finished")
            return {"run_id": run_id, "status": "finished", "steps": plan.total, "resumed_from": start, "rows": 0}
    sink.begin(plan.run_row, plan.points, plan.membership)
    # commits on a background writer thread (the run's last one is waited for in the loop)
    recorder = Recorder(sink, run_id, plan.run_dir, commit_every=cfg.commit_every,
                        commit_seconds=cfg.commit_seconds, start=start, background=True)
    try:
        try:
            timing, test_acc = _loop(plan, dp, sampler, recorder, start, on_progress)
        finally:
            recorder.close()  # the commits asked for are written (unless the writer failed) before the status
    except BaseException:
        try:
            sink.finish(run_id, "failed")
        except Exception:  # the sink may be what failed; the marker still says what is committed
            pass
        raise
    sink.finish(run_id, "finished")
    return {"run_id": run_id, "status": "finished", "steps": plan.total, "resumed_from": start,
            "rows": recorder.rows_written, "timing": timing,
            "sample_rate": plan.q, "noise_multiplier": plan.sigma, "tracked_points": int(len(plan.track_ids)),
            "test_accuracy": test_acc if not math.isnan(test_acc) else None, "run_dir": str(plan.run_dir)}


def _loop(plan: RunPlan, dp, sampler: torch.Generator, recorder: Recorder, start: int,
          on_progress) -> tuple[dict, float]:
    """Steps ``start`` .. ``total - 1``; returns the timing and the last test accuracy."""
    cfg, n, total, q = plan.cfg, plan.n, plan.total, plan.q
    device = torch.device(cfg.device)
    ds, members, track_ids, eval_ids = plan.ds, plan.members, plan.track_ids, plan.eval_ids
    x_members = ds.x_train[members].to(device)
    y_members = ds.y_train[members].to(device)
    member_pos = {int(p): i for i, p in enumerate(members)}
    track_pos = torch.as_tensor([member_pos[int(p)] for p in track_ids], dtype=torch.long, device=device)
    x_track, y_track = x_members[track_pos], y_members[track_pos]
    x_eval = ds.x_train[eval_ids].to(device)
    y_eval = ds.y_train[eval_ids].to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    k = len(track_ids)
    # member position -> row of the tracker's output (-1: not tracked); untracked members of
    # a batch are appended as extra rows when the tracked norms clip the batch
    row_of = torch.full((n,), -1, dtype=torch.long, device=device)
    row_of[track_pos] = torch.arange(k, device=device)
    # the same for every tracked step (never modified: the buffers only concatenate them)
    track_point_ids, not_clipped = track_ids.astype(np.int64), np.zeros(k, bool)
    track_pos_cpu = track_pos.cpu()
    timing = {"loop_s": 0.0, "track_s": 0.0, "sink_s": 0.0, "eval_s": 0.0}
    test_acc = float("nan")
    loop_start = time.perf_counter()
    # at tracked steps the clipped sum comes from the tracker's own pass where the model allows it
    capture = _LinearCapture(dp.model) if dp.shared is not None and k > 0 else None
    with GradNormTracker(dp.model, chunk_size=4096) as tracker, _closing(capture):
        for t in range(start, total):
            t0 = time.perf_counter()
            mask = torch.rand(n, generator=sampler) < q
            batch = mask.nonzero().squeeze(1).to(device)
            track_s = 0.0
            tracked_now = k > 0 and t % cfg.track_every == 0
            shared = tracked_now and dp.shared is not None
            batch_norms = grads = None
            if tracked_now:
                t1 = time.perf_counter()
                xs, ys, batch_rows = x_track, y_track, None
                if shared:
                    batch_rows = row_of[batch]
                    missing = batch_rows < 0
                    if bool(missing.any()):
                        extra = batch[missing]
                        batch_rows = batch_rows.clone()
                        batch_rows[missing] = k + torch.arange(len(extra), device=device)
                        xs, ys = torch.cat([x_track, x_members[extra]]), torch.cat([y_track, y_members[extra]])
                if shared and capture is not None:
                    capture.start()
                threads = torch.get_num_threads()
                torch.set_num_threads(plan.tracker_threads)
                try:
                    res = tracker(xs, ys)
                finally:
                    torch.set_num_threads(threads)
                    if capture is not None:
                        capture.stop()
                track_s = time.perf_counter() - t1
                timing["track_s"] += track_s
                recorder.add("point_steps", step=np.full(k, t, dtype=np.int64), point_id=track_point_ids,
                             grad_norm=res.norms[:k].double().cpu().numpy(), norm_clipped=not_clipped,
                             loss=res.losses[:k].double().cpu().numpy(), sampled=mask[track_pos_cpu].numpy())
                if shared:
                    batch_norms = res.norms[batch_rows]
                    if capture is not None:
                        grads = capture.grads(batch_rows, batch_norms, cfg.max_grad_norm, len(xs))
            if grads is not None:
                last_loss = _captured_step(dp, grads, len(batch), res.losses[batch_rows].sum())
            else:
                last_loss = dp.step(x_members[batch], y_members[batch], batch_norms)
            test_acc = float("nan")
            if (t + 1) % plan.eval_every == 0 or t == total - 1:
                t1 = time.perf_counter()
                ev = evaluate_points(dp.model, x_eval, y_eval)
                recorder.add("evaluations", step=np.full(len(eval_ids), t, dtype=np.int64),
                             point_id=eval_ids.astype(np.int64), **ev)
                test_acc = accuracy(dp.model, x_test, y_test)
                recorder.checkpoint(t, dp.model.state_dict())
                timing["eval_s"] += time.perf_counter() - t1
            recorder.add("steps", step=np.array([t], dtype=np.int64), epoch=np.array([t / plan.steps_per_epoch]),
                         batch_size=np.array([len(batch)], dtype=np.int64), loss=np.array([last_loss]),
                         lr=np.array([cfg.lr]), wall_s=np.array([time.perf_counter() - t0]),
                         peak_mem_bytes=np.array([_rss_peak_bytes(cfg.device)], dtype=np.int64),
                         test_accuracy=np.array([test_acc]), track_s=np.array([track_s]))
            if recorder.due(t, last=t == total - 1):
                recorder.commit(t, capture_state(t, dp, sampler), wait=t == total - 1)
                if on_progress:
                    on_progress({"step": t + 1, "total": total, "loss": last_loss, "test_accuracy": test_acc,
                                 "sigma": plan.sigma, "q": q, "delta": cfg.delta})
    recorder.wait()  # everything committed (a no-op after the last step's commit)
    timing["sink_s"] = recorder.sink_s
    timing["writer_s"] = recorder.writer_s
    timing["loop_s"] = time.perf_counter() - loop_start
    return timing, test_acc
