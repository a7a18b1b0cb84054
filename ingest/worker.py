"""One DP-SGD training run that records, for tracked training points, the per-example
gradient norm and loss at every step (or every k-th step).

DP-SGD is Opacus's (``GradSampleModule`` + ``DPOptimizer``): per-example gradients
clipped at C, summed, Gaussian noise of std σC, divided by the expected batch size.
At tracked steps the tracker has already computed every batch member's gradient norm
at the step's parameters (untracked members of the batch are added to its input), which
is all clipping needs: the clipped sum is then one weighted backward over the batch and
Opacus's ghost-clipping optimizer (``DPOptimizerFastGradientClipping``) adds the noise,
from the same generator, and steps (``reuse_norms``; the update equals the per-sample
path's to float rounding, which a test checks). Untracked steps, and models with
stochastic layers, use the per-sample path.
Batches are drawn by Poisson sampling (each example independently with rate
q = batch_size / n) from a seeded generator, so which points were in each step's
batch is known and recorded (``point_steps.sampled``).

At each tracked step, before the update, :class:`models.grad_norms.GradNormTracker`
computes every tracked point's gradient norm (before clipping, at that step's
parameters) and loss, whether or not the point was sampled. Rows are committed to a
sink (:mod:`ingest.sinks`) every ``commit_every`` steps together with a progress
marker and a resume state (model, optimizer and every RNG's state, written first),
so ``resume`` continues from the last committed step exactly as the uninterrupted
run would have: no duplicate and no missing step.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

# Opacus registers full backward hooks; our inputs never require grad, which torch notes
# on every backward. Harmless here.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

from dpledger.warehouse.errors import UserError

from .sinks import safe_run_id


# Layers that draw randomness in train mode: the tracked forward and the clipping pass
# would draw different masks, so such models clip with Opacus's own per-sample pass.
_STOCHASTIC = (torch.nn.modules.dropout._DropoutNd,)


def _clipped_step(model: torch.nn.Module, optimizer, xb: torch.Tensor, yb: torch.Tensor,
                  norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    r"""One DP-SGD update whose clipping factors come from already computed per-example norms.

    With ``n_i`` the norms of the batch's per-example gradients at the current parameters,
    ``w_i = min(1, C / (n_i + 1e-6))`` (Opacus's clip factor, epsilon included) and
    ``∇_θ Σ_i w_i ℓ_i = Σ_i w_i ∇_θ ℓ_i`` is the clipped sum: one weighted backward over
    the batch, the second pass of ghost clipping (Li et al. 2021; Bu et al. 2022). Opacus's
    hooks are off during it. ``optimizer`` (a ``DPOptimizerFastGradientClipping``) adds
    N(0, σ²C²) noise, divides by the expected batch size and steps. Returns the batch's
    summed (unweighted) loss.
    """
    from dpledger.models.grad_norms import opacus_hooks_off

    weights = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    with opacus_hooks_off(model):
        losses = F.cross_entropy(model(xb), yb, reduction="none")
        (losses * weights.to(losses.dtype)).sum().backward()
    for p in model.parameters():
        if p.requires_grad and p.grad is None:  # empty batch (or an unused parameter): the sum is zero
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses.detach().sum()


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
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{where}: unknown option '{unknown[0]}' (options: {', '.join(sorted(names))})")
        return cls(**d)


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


def validate(cfg: TrainConfig) -> None:
    """Refuse impossible options with the flag's name (before any data is read)."""
    checks = [
        (cfg.epochs > 0, f"--epochs {cfg.epochs} must be positive"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be at least 1"),
        (cfg.lr > 0, f"--lr {cfg.lr} must be positive"),
        (cfg.momentum >= 0, f"--momentum {cfg.momentum} must be >= 0"),
        (cfg.max_grad_norm > 0, f"--max-grad-norm {cfg.max_grad_norm} must be positive"),
        (0 < cfg.delta < 1, f"--delta {cfg.delta} is outside (0, 1)"),
        (cfg.track_every >= 1, f"--track-every {cfg.track_every} must be at least 1"),
        (cfg.commit_every is None or cfg.commit_every >= 1, f"--commit-every {cfg.commit_every} must be at least 1"),
        (cfg.commit_seconds > 0, f"--commit-seconds {cfg.commit_seconds} must be positive"),
        (cfg.eval_every is None or cfg.eval_every >= 1, f"--eval-every {cfg.eval_every} must be at least 1"),
        (cfg.subset_ratio is None or 0 < cfg.subset_ratio <= 1, f"--subset-ratio {cfg.subset_ratio} is outside (0, 1]"),
        (cfg.threads is None or cfg.threads >= 1, f"--threads {cfg.threads} must be at least 1"),
        (0 < cfg.test_fraction < 1, f"--test-fraction {cfg.test_fraction} is outside (0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if not cfg.disable_dp:
        if (cfg.noise_multiplier is None) == (cfg.target_epsilon is None):
            raise UserError("give --noise-multiplier or --target-epsilon (one of them), or --disable-dp")
        if cfg.noise_multiplier is not None and not cfg.noise_multiplier > 0:
            raise UserError(f"--noise-multiplier {cfg.noise_multiplier} must be positive")
        if cfg.target_epsilon is not None and not cfg.target_epsilon > 0:
            raise UserError(f"--target-epsilon {cfg.target_epsilon} must be positive")
    if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise UserError(f"--device {cfg.device}: expected cpu or cuda")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: no CUDA GPU is available here")
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
    from dpledger.models.datasets import DatasetError, load_dataset

    try:
        return load_dataset(cfg.dataset, cfg.data_path, seed=cfg.data_seed, n_train=cfg.n_train,
                            n_test=cfg.n_test, test_fraction=cfg.test_fraction)
    except DatasetError as exc:
        raise UserError(f"--dataset {cfg.dataset}: {exc}") from None


def build(cfg: TrainConfig, ds):
    from dpledger.models.nets import ModelError, build_model

    try:
        return build_model(cfg.model, ds.input_shape, ds.num_classes, seed=cfg.seed)
    except ModelError as exc:
        raise UserError(f"--model {cfg.model}: {exc}") from None


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
            raise UserError(f"--track {spec}: give at least 1 point")
        return members[: min(n, len(members))]
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--track {spec}: expected all, a number, or a file of point ids (no such file)")
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


def _atomic_torch_save(obj, path: Path) -> None:
    """Save to a temporary name, then rename; a failed write (disk full, permissions)
    is one clear error and leaves no partial file (torch reports it as RuntimeError)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        detail = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise UserError(f"cannot write {path}: {detail}") from None


@dataclass
class _Buffers:
    point_steps: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)

    def tables(self, run_id: str) -> dict[str, pa.Table]:
        def concat(parts, schema_cols):
            if not parts:
                return None
            cols = {c: np.concatenate([np.atleast_1d(p[c]) for p in parts]) for c in schema_cols}
            n = len(next(iter(cols.values())))
            cols = {"run_id": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([run_id])),
                    **cols}
            return pa.table(cols)

        return {
            "point_steps": concat(self.point_steps, ["step", "point_id", "grad_norm", "norm_clipped", "loss", "sampled"]),
            "steps": concat(self.steps, ["step", "epoch", "batch_size", "loss", "lr", "wall_s", "peak_mem_bytes",
                                         "test_accuracy", "track_s"]),
            "evaluations": concat(self.evaluations, ["step", "point_id", "loss", "correct", "margin",
                                                     "confidence_logit"]),
            "checkpoints": concat(self.checkpoints, ["step", "path"]),
        }


def evaluate_points(model, x, y, batch: int = 2048) -> dict[str, np.ndarray]:
    """Per-point loss, correctness, margin (true logit minus the best other) and the
    LiRA confidence logit log p_y - log Σ_{k≠y} p_k, in eval mode, no gradients."""
    was_training = model.training
    model.eval()
    out = {k: [] for k in ("loss", "correct", "margin", "confidence_logit")}
    with torch.no_grad():
        for i in range(0, len(y), batch):
            logits = model(x[i:i + batch]).double()
            yy = y[i:i + batch]
            logp = torch.log_softmax(logits, dim=1)
            true_logp = logp.gather(1, yy[:, None]).squeeze(1)
            others = logits.clone()
            others.scatter_(1, yy[:, None], float("-inf"))
            other_logp = logp.clone()
            other_logp.scatter_(1, yy[:, None], float("-inf"))
            out["loss"].append((-true_logp).cpu().numpy())
            out["correct"].append((logits.argmax(1) == yy).cpu().numpy())
            out["margin"].append((logits.gather(1, yy[:, None]).squeeze(1) - others.max(1).values).cpu().numpy())
            out["confidence_logit"].append((true_logp - torch.logsumexp(other_logp, dim=1)).cpu().numpy())
    model.train(was_training)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def train(cfg: TrainConfig, sink, *, resume: bool = False, db_dir: Path | None = None,
          on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) one training run into ``sink``; returns a summary."""
    if not resume:
        validate(cfg)
    run_id = cfg.run or default_run_name(cfg)
    cfg.run = safe_run_id(run_id)
    exists = sink.run_exists(run_id)
    if resume:
        if not exists:
            raise UserError(f"--resume {run_id}: no such run to resume")
        stored = sink.stored_config(run_id) or {}
        train_opts = stored.get("train")
        if not train_opts:
            raise UserError(f"--resume {run_id}: the run was not made by `dpledger train` (no stored options)")
        cfg = TrainConfig.from_dict(train_opts, f"run {run_id}")
        validate(cfg)
    elif exists:
        raise UserError(f"run '{run_id}' exists already; use --resume {run_id} or another --run name")

    previous_threads = torch.get_num_threads()
    # Small models run fastest single-threaded: their ops are too small to split, and
    # idle OpenMP threads spin on a busy machine (200 ms instead of 5 ms a step, measured).
    torch_threads = cfg.threads or (1 if cfg.model in ("logreg", "mlp") else previous_threads)
    torch.set_num_threads(torch_threads)
    try:
        return _train(cfg, sink, resume, db_dir, on_progress, torch_threads)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: TrainConfig, sink, resume: bool, db_dir: Path | None, on_progress, torch_threads: int) -> dict:
    run_id = cfg.run
    device = torch.device(cfg.device)
    ds = load_data(cfg)
    n_all = ds.n_train
    members = np.arange(n_all)
    if cfg.subset_ratio is not None:
        rng = np.random.default_rng([cfg.seed, 7919])
        members = np.flatnonzero(rng.random(n_all) < cfg.subset_ratio)
        if members.size == 0:
            raise UserError(f"--subset-ratio {cfg.subset_ratio} leaves no training point")
    n = len(members)
    if cfg.batch_size > n:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({n} points)")
    q = cfg.batch_size / n
    steps_per_epoch = max(1, int(1 / q))  # as Opacus's Poisson data loader
    total = max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    eval_every = cfg.eval_every or steps_per_epoch
    private = not cfg.disable_dp
    sigma = None
    if private:
        if cfg.target_epsilon is not None:
            from opacus.accountants.utils import get_noise_multiplier

            from dpledger.analysis.rdp import DEFAULT_ORDERS

            try:
                sigma = float(get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=cfg.delta,
                                                   sample_rate=q, steps=total, accountant="rdp",
                                                   alphas=list(DEFAULT_ORDERS)))
            except ValueError as exc:
                raise UserError(f"--target-epsilon {cfg.target_epsilon}: {exc}") from None
        else:
            sigma = float(cfg.noise_multiplier)
    track_ids = tracked_points(cfg.track, members, n_all)
    # with a subset, the non-members among the selection are evaluated (not tracked): memorization needs them
    selection = track_ids if cfg.subset_ratio is None else tracked_points(cfg.track, np.arange(n_all), n_all)
    eval_ids = np.union1d(track_ids, selection)

    run_dir = Path(cfg.run_dir) if cfg.run_dir else (db_dir or Path(".")) / "runs" / run_id
    (run_dir / "state").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    key = dataset_key(cfg)
    config = {"train": asdict(cfg), "noise_multiplier_resolved": sigma, "steps_per_epoch": steps_per_epoch,
              "worker": {"host": socket.gethostname(), "pid": os.getpid()},
              "tracked_points": int(len(track_ids)), "dataset_source": ds.source, "torch_threads": torch_threads}
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

    # ------------------------------------------------------------------ model and DP-SGD
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    from dpledger.models.grad_norms import GradNormTracker

    model = build(cfg, ds).to(device)
    sampler_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003)
    torch.manual_seed(cfg.seed + 2_000_003)
    base_opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    shared_opt = None
    if private:
        train_model = GradSampleModule(model, loss_reduction="sum")
        dp_args = dict(noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
                       expected_batch_size=max(1, int(round(q * n))), loss_reduction="mean", generator=noise_gen)
        optimizer = DPOptimizer(base_opt, **dp_args)
        if cfg.reuse_norms and not any(isinstance(m, _STOCHASTIC) for m in model.modules()):
            # Opacus's ghost-clipping optimizer: it takes p.grad as the already clipped sum,
            # adds the same noise from the same generator, scales and steps.
            shared_opt = DPOptimizerFastGradientClipping(base_opt, **dp_args)
    else:
        train_model, optimizer = model, base_opt

    start = 0
    if resume:
        committed = sink.committed_step(run_id)
        if committed is not None:
            state_path = run_dir / "state" / f"step-{committed:08d}.pt"
            if not state_path.exists():
                raise UserError(f"--resume {run_id}: resume state {state_path} is missing")
            state = torch.load(state_path, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            base_opt.load_state_dict(state["optimizer"])
            sampler_gen.set_state(state["sampler"])
            noise_gen.set_state(state["noise"])
            torch.set_rng_state(state["torch"])
            start = committed + 1
        if start >= total:
            sink.finish(run_id, "finished")
            return {"run_id": run_id, "status": "finished", "steps": total, "resumed_from": start, "rows": 0}
    sink.begin(run_row, points, membership)

    x_members = ds.x_train[members].to(device)
    y_members = ds.y_train[members].to(device)
    member_pos = {int(p): i for i, p in enumerate(members)}
    track_pos = torch.as_tensor([member_pos[int(p)] for p in track_ids], dtype=torch.long, device=device)
    x_track, y_track = x_members[track_pos], y_members[track_pos]
    x_eval = ds.x_train[eval_ids].to(device)
    y_eval = ds.y_train[eval_ids].to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    tracker = GradNormTracker(model, chunk_size=4096)
    # member position -> row of the tracker's output (-1: not tracked); untracked members of
    # a batch are appended as extra rows when the tracked norms clip the batch
    row_of = torch.full((n,), -1, dtype=torch.long, device=device)
    row_of[track_pos] = torch.arange(len(track_pos), device=device)
    # the same for every tracked step (never modified: the buffers only concatenate them)
    track_point_ids, not_clipped = track_ids.astype(np.int64), np.zeros(len(track_ids), bool)
    track_pos_cpu = track_pos.cpu()
    buf = _Buffers()
    rows_written = 0
    last_loss = float("nan")
    timing = {"loop_s": 0.0, "track_s": 0.0, "sink_s": 0.0, "eval_s": 0.0}
    loop_start = last_commit_time = time.perf_counter()
    last_commit_step = start - 1
    try:
        for t in range(start, total):
            t0 = time.perf_counter()
            mask = torch.rand(n, generator=sampler_gen) < q
            batch = mask.nonzero().squeeze(1).to(device)
            track_s = 0.0
            tracked_now = len(track_ids) > 0 and t % cfg.track_every == 0
            shared = tracked_now and shared_opt is not None
            xb, yb = x_members[batch], y_members[batch]
            if tracked_now:
                t1 = time.perf_counter()
                xs, ys, batch_rows = x_track, y_track, None
                if shared:
                    batch_rows = row_of[batch]
                    missing = batch_rows < 0
                    if bool(missing.any()):
                        extra = batch[missing]
                        batch_rows = batch_rows.clone()
                        batch_rows[missing] = len(track_ids) + torch.arange(len(extra), device=device)
                        xs, ys = torch.cat([x_track, x_members[extra]]), torch.cat([y_track, y_members[extra]])
                res = tracker(xs, ys)
                track_s = time.perf_counter() - t1
                timing["track_s"] += track_s
                t1 = time.perf_counter()
                k = len(track_ids)
                buf.point_steps.append({
                    "step": np.full(k, t, dtype=np.int64), "point_id": track_point_ids,
                    "grad_norm": res.norms[:k].double().cpu().numpy(), "norm_clipped": not_clipped,
                    "loss": res.losses[:k].double().cpu().numpy(), "sampled": mask[track_pos_cpu].numpy(),
                })
                timing["sink_s"] += time.perf_counter() - t1
            model.train()
            optimizer.zero_grad(set_to_none=True)
            if shared:
                loss_sum = _clipped_step(model, shared_opt, xb, yb, res.norms[batch_rows], cfg.max_grad_norm)
            elif private:
                out = train_model(xb)
                loss_sum = F.cross_entropy(out, yb, reduction="sum")
                loss_sum.backward()
                optimizer.step()
            elif len(batch):
                out = train_model(xb)
                loss_sum = F.cross_entropy(out, yb, reduction="sum")
                (loss_sum / len(batch)).backward()
                optimizer.step()
            last_loss = float(loss_sum.item() / len(batch)) if len(batch) else float("nan")
            test_acc = float("nan")
            if (t + 1) % eval_every == 0 or t == total - 1:
                t1 = time.perf_counter()
                ev = evaluate_points(model, x_eval, y_eval)
                buf.evaluations.append({"step": np.full(len(eval_ids), t, dtype=np.int64),
                                        "point_id": eval_ids.astype(np.int64), **ev})
                test_acc = float(evaluate_points(model, x_test, y_test)["correct"].mean()) if len(y_test) else float("nan")
                ckpt = run_dir / "checkpoints" / f"step-{t:08d}.pt"
                _atomic_torch_save(model.state_dict(), ckpt)
                buf.checkpoints.append({"step": np.array([t], dtype=np.int64), "path": np.array([str(ckpt)])})
                timing["eval_s"] += time.perf_counter() - t1
            buf.steps.append({
                "step": np.array([t], dtype=np.int64), "epoch": np.array([t / steps_per_epoch]),
                "batch_size": np.array([len(batch)], dtype=np.int64), "loss": np.array([last_loss]),
                "lr": np.array([cfg.lr]), "wall_s": np.array([time.perf_counter() - t0]),
                "peak_mem_bytes": np.array([_rss_peak_bytes(cfg.device)], dtype=np.int64),
                "test_accuracy": np.array([test_acc]), "track_s": np.array([track_s]),
            })
            due = (t - last_commit_step >= cfg.commit_every if cfg.commit_every
                   else time.perf_counter() - last_commit_time >= cfg.commit_seconds)
            if due or t == total - 1:
                t1 = time.perf_counter()
                # resume state first: a crash after it but before the commit only repeats steps
                _atomic_torch_save({"step": t, "model": model.state_dict(), "optimizer": base_opt.state_dict(),
                                    "sampler": sampler_gen.get_state(), "noise": noise_gen.get_state(),
                                    "torch": torch.get_rng_state()}, run_dir / "state" / f"step-{t:08d}.pt")
                tables = buf.tables(run_id)
                sink.commit(run_id, t, tables)
                rows_written += tables["point_steps"].num_rows if tables["point_steps"] is not None else 0
                for old in (run_dir / "state").glob("step-*.pt"):
                    if old.name != f"step-{t:08d}.pt":
                        old.unlink(missing_ok=True)
                buf = _Buffers()
                last_commit_step, last_commit_time = t, time.perf_counter()
                timing["sink_s"] += last_commit_time - t1
                if on_progress:
                    on_progress({"step": t + 1, "total": total, "loss": last_loss, "test_accuracy": test_acc,
                                 "sigma": sigma, "q": q, "delta": cfg.delta})
    except BaseException:
        try:
            sink.finish(run_id, "failed")
        except Exception:  # the sink may be what failed; the marker still says what is committed
            pass
        raise
    finally:
        tracker.close()
    timing["loop_s"] = time.perf_counter() - loop_start
    sink.finish(run_id, "finished")
    return {"run_id": run_id, "status": "finished", "steps": total, "resumed_from": start, "rows": rows_written,
            "timing": timing,
            "sample_rate": q, "noise_multiplier": sigma, "tracked_points": int(len(track_ids)),
            "test_accuracy": test_acc if not math.isnan(test_acc) else None, "run_dir": str(run_dir)}
