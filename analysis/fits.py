r"""Filling per-step clipped-norm ratios between recorded checkpoints, and judging the fills.

DP-SGD charges example x at step t the per-step RDP ρ(r_t) of its clipped-norm ratio
r_t = min(‖g_t(x)‖, C)/C ∈ [0, 1] (:func:`analysis.rdp.rdp_of_sensitivity`), summed over
every step 0..T-1. Norms are often recorded only at checkpoints t_0 < t_1 < … < t_{n-1}
of each point, so r_t must be *filled* in between before composing. Every fill here maps
(point, step) → r ∈ [0, 1]; outside a point's records it holds the (fitted) value at its
first record before t_0 and at its last record after t_{n-1}.

Methods (``METHODS``):

* ``step`` — hold the last record (piecewise constant, right-continuous):
  r(t) = r_i for t_i <= t < t_{i+1}. This is what the warehouse has always done.
* ``linear`` — r(t) = r_i + (r_{i+1} - r_i)(t - t_i)/(t_{i+1} - t_i).
* ``pchip`` — the monotone piecewise-cubic Hermite interpolant of Fritsch and Carlson
  (:class:`scipy.interpolate.PchipInterpolator`) through each point's records: on each
  interval r(t) = Σ_{m=0..3} c_m (t - t_i)^{3-m} with c_3 = r_i. It overshoots nothing (a
  monotone run of records stays monotone, and each interval stays between its two
  records), so it stays in [0, 1] on its own. Points sharing the same recorded steps are
  interpolated together (one scipy call per distinct step pattern).

  These three reproduce every record exactly and are evaluated by the same vectorised
  code: the coefficients of every interval of every point are stored in one flat array,
  and a query (p, t) finds its interval by one binary search on the key p·S + t.

* ``offset`` — a shared shape plus a per-point offset, in logit space:

      logit r_{p}(t) = f(t) + a_p,     f piecewise linear on knots κ_1 < … < κ_K,

  fitted jointly by least squares over all points' records
  min_{f, a} Σ_{p,i} (logit r̃_{p,i} - f(t_{p,i}) - a_p)² + λ (N/K) Σ_j (f_{j-1} - 2f_j + f_{j+1})²,
  r̃ = clip(r, ε, 1-ε), with the gauge Σ_p a_p = 0 (so f is the "typical point"). The
  offsets are eliminated (a_p = mean_i of that point's residuals) and the K×K Schur
  system for f is solved directly. Knots are the distinct recorded steps, or ``knots``
  quantiles of them when there are more. A point with 2 records (or 1) gets a_p from
  those alone and borrows f's shape from all the others: the point of the method.

  Why logit and not log r: (i) logit is a bijection of (0, 1) onto ℝ, so every offset
  gives an admissible ratio, while an additive offset in log r pushes points with a
  large offset above 1, and the clip at 1 then cuts the curve flat; (ii) for small r,
  logit r = log r + O(r), so where per-step costs are small the offset is the same
  *multiplicative* gradient-scale factor that log space would give (per-example
  gradient norms of one model differ mostly by a scale); (iii) near the clip
  (r → 1) logit saturates just as min(‖g‖, C)/C does, instead of treating a clipped
  record (true ratio ≥ 1, censored) as an exact measurement of log r = 0. The price is
  the clamp ε (default 1e-6) for records that are exactly 0 or 1; it is an option.

* ``nn`` — a small neural regressor (torch, CPU, seeded): an MLP with two hidden layers
  (SiLU) maps [u, u², sin(πku), cos(πku) for k = 1..K_f, the point's mean record, a learned
  per-point embedding e_p] to a logit, r = sigmoid(·), with u = (t - t_min)/(t_max - t_min)
  over all records. Trained by Adam on the squared error in r over the recorded
  checkpoints (full batch, or random mini-batches of ``batch_size`` when there are more
  records), cosine-decayed learning rate. A regression: it does not pass through the
  records. Torch runs on ``threads`` (default 1) threads inside the fit and restores the
  caller's setting and global RNG state. Evaluation splits the first layer into a
  per-step and a per-point part, so a dense fill costs about the second layer: ~1.8 M
  (point, step) cells/s on one core here (10,000 points × 9,360 steps in ~50 s).
  Measured at 10,000 points × 50 records: fit ~10 s; ``holdout`` (two fits, three dense
  fills, compositions) ~130 s, against ~40 s for ``linear`` or ``offset``.

Evaluation (:func:`holdout`, :func:`compare`): every k-th record of every point
(index i with i % k == k - 1, never a point's first or last record) is held out, the
method is fitted on the rest, and the held-out ratios are predicted. Reported:

* per-step cost errors at one order α (``cost_order``, default 8): |ρ_α(r̂) - ρ_α(r)| —
  mean and max absolute, and mean and max relative to ρ_α(r) (zero true costs skipped;
  a true r of 1e-10 has a cost near 1e-22, so these explode wherever a tiny record is
  predicted anything but tiny: ``cost_mre_above_floor``/``cost_max_rel_above_floor``
  repeat them over the records whose true cost is at least 1% of a full-norm step's);
* per-point ε errors: each point's fill over steps 0..n_steps-1 is composed with the
  tabulated fast path of :mod:`analysis.grid` (tent histogram of r × the RDP table: a
  conservative upper bound, within ~1e-5 of exact at 1,024 cells) and converted with
  :func:`analysis.rdp.epsilon_from_rdp`; the fit without the held-out records is
  compared with (a) the same method fitted on all records (``eps_*``) and (b) the
  ``step`` fill of all records (``eps_step_*``).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import grid as gridmod
from . import rdp

METHODS = ("step", "linear", "pchip", "offset", "nn")

#: Default order of the per-step cost errors in :func:`holdout`.
COST_ORDER = 8.0

# Points × steps evaluated at once when filling for composition (bounds memory).
_FILL_CHUNK = 1 << 22


# --------------------------------------------------------------------------- input


@dataclass
class _Records:
    """All points' records, flattened point by point (steps ascending within a point)."""

    steps: np.ndarray  # (N,) float64
    values: np.ndarray  # (N,) float64
    point: np.ndarray  # (N,) int64, the point of each record
    start: np.ndarray  # (P + 1,) offsets: point p's records are start[p]:start[p+1]
    t_min: float
    t_max: float

    @property
    def n_points(self) -> int:
        return len(self.start) - 1

    @functools.cached_property
    def counts(self) -> np.ndarray:
        return np.diff(self.start)

    @functools.cached_property
    def first(self) -> np.ndarray:
        return self.steps[self.start[:-1]]

    @functools.cached_property
    def last(self) -> np.ndarray:
        return self.steps[self.start[1:] - 1]

    @property
    def span(self) -> float:
        return self.t_max - self.t_min + 1.0

    @functools.cached_property
    def keys(self) -> np.ndarray:
        """Sort keys point·span + (step - t_min): ascending over the flat records."""
        return self.point * self.span + (self.steps - self.t_min)

    def per_point(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        s = [self.steps[a:b] for a, b in zip(self.start[:-1], self.start[1:])]
        v = [self.values[a:b] for a, b in zip(self.start[:-1], self.start[1:])]
        return s, v


def _split(arr, name: str) -> list[np.ndarray]:
    if isinstance(arr, np.ndarray):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array (n_points, n_records) or a list of 1-D arrays, "
                             f"got an array of shape {arr.shape}")
        rows = list(arr)
    elif isinstance(arr, (list, tuple)):
        rows = []
        for i, row in enumerate(arr):
            try:
                a = np.asarray(row, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name}[{i}] is not numeric: {exc}") from None
            if a.ndim != 1:
                raise ValueError(f"{name}[{i}] must be 1-D, got shape {a.shape}")
            rows.append(a)
    else:
        raise ValueError(f"{name} must be a 2-D array or a list of 1-D arrays, got {type(arr).__name__}")
    try:
        return [np.asarray(r, dtype=np.float64) for r in rows]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not numeric: {exc}") from None


def _records(steps, values) -> _Records:
    s_rows, v_rows = _split(steps, "steps"), _split(values, "values")
    if len(s_rows) != len(v_rows):
        raise ValueError(f"steps has {len(s_rows)} points but values has {len(v_rows)}")
    if not s_rows:
        raise ValueError("no points: steps and values are empty")
    for p, (s, v) in enumerate(zip(s_rows, v_rows)):
        if s.shape != v.shape:
            raise ValueError(f"point {p}: {s.size} steps but {v.size} values")
        if s.size == 0:
            raise ValueError(f"point {p} has no records")
    s_all, v_all = np.concatenate(s_rows), np.concatenate(v_rows)
    counts = np.array([len(s) for s in s_rows])
    point = np.repeat(np.arange(len(s_rows)), counts)
    bad = ~np.isfinite(s_all)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"point {point[i]}: step {s_all[i]} is not finite")
    bad = ~np.isfinite(v_all)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"point {point[i]} at step {s_all[i]:g}: value {v_all[i]} is not finite (NaN or inf)")
    bad = (v_all < 0) | (v_all > 1)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"point {point[i]} at step {s_all[i]:g}: value {v_all[i]:g} is outside [0, 1] "
                         "(r is the clipped-norm ratio min(norm, C)/C)")
    if np.any(s_all < 0):
        i = int(np.flatnonzero(s_all < 0)[0])
        raise ValueError(f"point {point[i]}: step {s_all[i]:g} is negative")
    start = np.concatenate([[0], np.cumsum(counts)])
    inc = np.diff(s_all) > 0
    same_point = point[1:] == point[:-1]
    bad = same_point & ~inc
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"point {point[i]}: steps must be strictly increasing, "
                         f"got {s_all[i]:g} then {s_all[i + 1]:g}")
    return _Records(s_all, v_all, point.astype(np.int64), start.astype(np.int64),
                    float(s_all.min()), float(s_all.max()))


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown fill method {method!r}; choose one of {', '.join(METHODS)}")


def _unused(method: str, options: dict) -> None:
    if options:
        raise ValueError(f"method {method!r} takes no option(s) {', '.join(sorted(options))}")


# --------------------------------------------------------------------------- fits


@dataclass
class Fit:
    """A fitted fill: ``predict`` r at (point, step) pairs, ``fill`` dense steps 0..n-1."""

    method: str
    params: dict
    _rec: _Records = field(repr=False)
    _eval: Any = field(repr=False)  # (point_index, clipped steps) -> r

    @property
    def n_points(self) -> int:
        return self._rec.n_points

    def predict(self, point_index, steps) -> np.ndarray:
        """r at each (point, step) pair (arrays broadcast together), clipped to [0, 1].

        Before a point's first record the fit's value at that record is held, after its
        last record the value at the last.
        """
        p = np.asarray(point_index)
        t = np.asarray(steps, dtype=np.float64)
        p, t = np.broadcast_arrays(p, t)
        shape = p.shape
        p, t = p.ravel(), t.ravel()
        if p.size and not np.issubdtype(p.dtype, np.integer):
            if not np.all(np.isfinite(p.astype(np.float64))) or np.any(p != np.round(p)):
                raise ValueError("point_index must hold integers")
        p = p.astype(np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.n_points):
            raise ValueError(f"point_index out of range: the fit has {self.n_points} points (0..{self.n_points - 1})")
        if not np.all(np.isfinite(t)):
            raise ValueError("steps to predict must be finite")
        tc = np.clip(t, self._rec.first[p], self._rec.last[p])
        out = self._eval(p, tc) if p.size else np.empty(0)
        return np.clip(out, 0.0, 1.0).reshape(shape)

    def fill(self, n_steps: int, points=None) -> np.ndarray:
        """Dense r of shape (n_points, n_steps) for steps 0..n_steps-1 (``points``: a subset, in order)."""
        if int(n_steps) != n_steps or n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
        n_steps = int(n_steps)
        pts = np.arange(self.n_points) if points is None else np.asarray(points, dtype=np.int64)
        t = np.arange(n_steps, dtype=np.float64)
        return self.predict(pts[:, None], t[None, :])


def _locate(rec: _Records, p: np.ndarray, tc: np.ndarray) -> np.ndarray:
    """Index of the last record of point p at or before step tc (tc within the point's range)."""
    keys = rec.keys
    q = p * rec.span + (tc - rec.t_min)
    idx = np.searchsorted(keys, q, side="right") - 1
    return np.clip(idx, rec.start[p], rec.start[p + 1] - 1)


def _piecewise_eval(rec: _Records, coef: np.ndarray):
    """Evaluator of per-interval cubics: coef[i] = (c0, c1, c2, c3) on [t_i, t_{i+1}]."""

    def ev(p, tc):
        idx = _locate(rec, p, tc)
        dt = tc - rec.steps[idx]
        c = coef[idx]
        return ((c[:, 0] * dt + c[:, 1]) * dt + c[:, 2]) * dt + c[:, 3]

    return ev


def _interp_coefficients(rec: _Records, method: str) -> np.ndarray:
    n = rec.steps.size
    coef = np.zeros((n, 4))
    coef[:, 3] = rec.values
    last = np.zeros(n, dtype=bool)
    last[rec.start[1:] - 1] = True
    inner = np.flatnonzero(~last)  # intervals [i, i+1] within a point
    if method == "step":
        return coef
    if method == "linear":
        coef[inner, 2] = (rec.values[inner + 1] - rec.values[inner]) / (rec.steps[inner + 1] - rec.steps[inner])
        return coef
    # pchip: one scipy call per distinct pattern of recorded steps
    from scipy.interpolate import PchipInterpolator

    s_rows, v_rows = rec.per_point()
    groups: dict[bytes, list[int]] = {}
    for p, s in enumerate(s_rows):
        if len(s) >= 2:
            groups.setdefault(s.tobytes(), []).append(p)
    for members in groups.values():
        x = s_rows[members[0]]
        y = np.stack([v_rows[p] for p in members], axis=1)  # (n_records, n_members)
        c = PchipInterpolator(x, y, axis=0).c  # (4, n_records - 1, n_members)
        for j, p in enumerate(members):
            a = rec.start[p]
            coef[a:a + len(x) - 1, :] = c[:, :, j].T
    return coef


def _fit_interp(method: str, rec: _Records, options: dict) -> Fit:
    _unused(method, options)
    coef = _interp_coefficients(rec, method)
    params = {"n_points": rec.n_points, "n_records": int(rec.steps.size),
              "first_step": float(rec.t_min), "last_step": float(rec.t_max),
              "exact_at_records": True}
    return Fit(method, params, rec, _piecewise_eval(rec, coef))


def _logit(r: np.ndarray, eps: float) -> np.ndarray:
    r = np.clip(r, eps, 1 - eps)
    return np.log(r) - np.log1p(-r)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(z)


def _hat_basis(knots: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left knot j, weight on j, weight on j+1) of piecewise-linear interpolation at t."""
    K = len(knots)
    if K == 1:
        return np.zeros(t.shape, dtype=np.int64), np.ones(t.shape), np.zeros(t.shape)
    j = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, K - 2)
    w = np.clip((t - knots[j]) / (knots[j + 1] - knots[j]), 0.0, 1.0)
    return j, 1.0 - w, w


def _fit_offset(rec: _Records, options: dict) -> Fit:
    from scipy import sparse

    opts = dict(options)
    eps = float(opts.pop("eps", 1e-6))
    n_knots = int(opts.pop("knots", 64))
    smooth = float(opts.pop("smooth", 1e-6))
    _unused("offset", opts)
    if not 0 < eps < 0.5:
        raise ValueError(f"offset: eps must be in (0, 0.5), got {eps}")
    if n_knots < 2:
        raise ValueError(f"offset: knots must be at least 2, got {n_knots}")
    if smooth < 0:
        raise ValueError(f"offset: smooth must be >= 0, got {smooth}")

    uniq = np.unique(rec.steps)
    if len(uniq) <= n_knots:
        knots = uniq
    else:
        knots = np.unique(np.quantile(uniq, np.linspace(0, 1, n_knots)))
    K, P, N = len(knots), rec.n_points, rec.steps.size
    y = _logit(rec.values, eps)
    j, w0, w1 = _hat_basis(knots, rec.steps)
    rows = np.concatenate([np.arange(N), np.arange(N)])
    B = sparse.csr_matrix((np.concatenate([w0, w1]), (rows, np.concatenate([j, np.minimum(j + 1, K - 1)]))),
                          shape=(N, K))
    E = sparse.csr_matrix((np.ones(N), (np.arange(N), rec.point)), shape=(N, P))
    n = rec.counts.astype(np.float64)
    M = (E.T @ B).tocsr()  # (P, K)
    Ety = E.T @ y
    S = (B.T @ B).toarray() - (M.T @ sparse.diags(1.0 / n) @ M).toarray()
    rhs = B.T @ y - M.T @ (Ety / n)
    if smooth > 0 and K >= 3:
        D = np.zeros((K - 2, K))
        idx = np.arange(K - 2)
        D[idx, idx], D[idx, idx + 1], D[idx, idx + 2] = 1.0, -2.0, 1.0
        S = S + smooth * (N / K) * (D.T @ D)
    f = np.linalg.lstsq(S, rhs, rcond=None)[0]
    a = (Ety - M @ f) / n
    shift = float(np.mean(a))
    f, a = f + shift, a - shift
    resid = y - (B @ f) - a[rec.point]
    params = {
        "space": "logit", "eps": eps, "smooth": smooth,
        "knots": [float(x) for x in knots], "reference": [float(x) for x in f],
        "offsets": [float(x) for x in a],
        "rmse_logit": float(np.sqrt(np.mean(resid ** 2))),
        "n_points": P, "n_records": int(N), "exact_at_records": False,
    }

    def ev(p, tc):
        jj, u0, u1 = _hat_basis(knots, tc)
        z = u0 * f[jj] + u1 * f[np.minimum(jj + 1, K - 1)] + a[p]
        return _sigmoid(z)

    return Fit("offset", params, rec, ev)


class _threads:
    """Run torch on ``n`` threads inside the block (restored after)."""

    def __init__(self, torch, n: int):
        self.torch, self.n = torch, max(1, int(n))

    def __enter__(self):
        self.saved = self.torch.get_num_threads()
        self.torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        self.torch.set_num_threads(self.saved)


def _fit_nn(rec: _Records, seed: int, options: dict) -> Fit:
    import torch
    from torch import nn

    opts = dict(options)
    hidden = int(opts.pop("hidden", 64))
    embed_dim = int(opts.pop("embed_dim", 8))
    n_fourier = int(opts.pop("n_fourier", 4))
    n_iter = int(opts.pop("n_iter", 600))
    lr = float(opts.pop("lr", 1e-2))
    batch_size = int(opts.pop("batch_size", 4096))
    weight_decay = float(opts.pop("weight_decay", 1e-5))
    threads = int(opts.pop("threads", 1))
    _unused("nn", opts)
    for name, v in (("hidden", hidden), ("embed_dim", embed_dim), ("n_iter", n_iter),
                    ("batch_size", batch_size), ("threads", threads)):
        if v < 1:
            raise ValueError(f"nn: {name} must be >= 1, got {v}")
    if n_fourier < 0 or not lr > 0 or weight_decay < 0:
        raise ValueError("nn: n_fourier must be >= 0, lr > 0, weight_decay >= 0")

    P, N = rec.n_points, rec.steps.size
    width = max(rec.t_max - rec.t_min, 1.0)
    mean_r = np.bincount(rec.point, weights=rec.values, minlength=P) / rec.counts
    mr_center, mr_scale = float(mean_r.mean()), float(mean_r.std()) or 1.0
    n_in = 2 + 2 * n_fourier + 1 + embed_dim
    base = float(_logit(np.array([rec.values.mean()]), 1e-4)[0])
    point_feat = torch.tensor((mean_r - mr_center) / mr_scale, dtype=torch.float32)

    def features(u):
        feats = [u, u * u]
        for k in range(1, n_fourier + 1):
            feats += [torch.sin(math.pi * k * u), torch.cos(math.pi * k * u)]
        return torch.stack(feats, dim=-1)

    # A tiny network: one thread is fastest, and more only contend with other work.
    with _threads(torch, threads), torch.random.fork_rng(devices=[]):
        started = time.perf_counter()
        torch.manual_seed(seed)  # the layers' default initialisation
        gen = torch.Generator().manual_seed(seed)  # embeddings and mini-batches
        emb = nn.Embedding(P, embed_dim)
        nn.init.normal_(emb.weight, std=0.1, generator=gen)
        mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                            nn.Linear(hidden, 1))
        with torch.no_grad():
            mlp[-1].bias.fill_(base)

        def forward(p, u):
            x = torch.cat([features(u), point_feat[p][:, None], emb(p)], dim=1)
            return torch.sigmoid(mlp(x)[:, 0])

        p_all = torch.as_tensor(rec.point, dtype=torch.long)
        u_all = torch.as_tensor((rec.steps - rec.t_min) / width, dtype=torch.float32)
        y_all = torch.as_tensor(rec.values, dtype=torch.float32)
        weights = list(mlp.parameters()) + list(emb.parameters())
        opt = torch.optim.Adam(weights, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_iter, eta_min=lr * 0.02)
        loss_val = float("nan")
        for _ in range(n_iter):
            if N > batch_size:
                b = torch.randint(0, N, (batch_size,), generator=gen)
                p, u, y = p_all[b], u_all[b], y_all[b]
            else:
                p, u, y = p_all, u_all, y_all
            opt.zero_grad()
            loss = torch.mean((forward(p, u) - y) ** 2)
            loss.backward()
            opt.step()
            sched.step()
            loss_val = float(loss.detach())
        seconds = time.perf_counter() - started

    # Evaluation splits the first layer: W1 x = W1_step φ(u) + W1_point ψ(p), each computed
    # once per distinct step / point of a chunk, so a dense fill costs ~ the second layer only.
    n_step_feat = 2 + 2 * n_fourier
    w1, b1 = mlp[0].weight.detach(), mlp[0].bias.detach()
    chunk = 1 << 15  # cache-sized: 4x faster than 1 << 18 on this machine

    def ev(p, tc):
        out = np.empty(p.shape)
        with _threads(torch, threads), torch.no_grad():
            for a in range(0, p.size, chunk):
                ut, t_inv = np.unique(tc[a:a + chunk], return_inverse=True)
                up, p_inv = np.unique(p[a:a + chunk], return_inverse=True)
                u = torch.as_tensor((ut - rec.t_min) / width, dtype=torch.float32)
                pp = torch.as_tensor(up, dtype=torch.long)
                step_part = features(u) @ w1[:, :n_step_feat].T
                point_part = torch.cat([point_feat[pp][:, None], emb(pp)], dim=1) @ w1[:, n_step_feat:].T + b1
                h = step_part[torch.as_tensor(t_inv.ravel())] + point_part[torch.as_tensor(p_inv.ravel())]
                z = mlp[1:](h)[:, 0]
                out[a:a + chunk] = torch.sigmoid(z).numpy()
        return out

    train_mse = float(np.mean((ev(rec.point, rec.steps) - rec.values) ** 2))
    params_out = {
        "architecture": f"MLP {n_in}-{hidden}-{hidden}-1, SiLU, sigmoid output",
        "features": ["u", "u^2"] + [f"sin/cos(pi*{k}*u)" for k in range(1, n_fourier + 1)]
        + ["mean record (standardised)", f"embedding[{embed_dim}]"],
        "step_origin": float(rec.t_min), "step_scale": float(width),
        "hidden": hidden, "embed_dim": embed_dim, "n_fourier": n_fourier, "n_iter": n_iter, "lr": lr,
        "batch_size": batch_size, "weight_decay": weight_decay, "seed": int(seed),
        "n_parameters": int(sum(t.numel() for t in weights)),
        "final_batch_loss": loss_val, "train_mse": train_mse, "train_seconds": seconds,
        "weight_norms": {name: float(t.detach().norm()) for name, t in mlp.named_parameters()},
        "embedding_norm_mean": float(emb.weight.detach().norm(dim=1).mean()),
        "n_points": P, "n_records": int(N), "exact_at_records": False,
    }
    return Fit("nn", params_out, rec, ev)


def fit(method: str, steps, values, *, seed: int = 0, **options) -> Fit:
    """Fit ``method`` to each point's records.

    ``steps``/``values``: (n_points, n_records) arrays, or lists of 1-D arrays (ragged),
    steps strictly increasing per point, values (clipped-norm ratios) in [0, 1].
    Options: ``offset`` — ``eps`` (1e-6, the logit clamp), ``knots`` (64, the most knots of
    the shared curve), ``smooth`` (1e-6, λ of the second-difference penalty); ``nn`` —
    ``hidden`` (64), ``embed_dim`` (8), ``n_fourier`` (4), ``n_iter`` (600 Adam steps),
    ``lr`` (1e-2), ``batch_size`` (4096), ``weight_decay`` (1e-5), ``threads`` (1); ``seed``
    makes ``nn`` reproducible (the other methods are deterministic). ``step``, ``linear``
    and ``pchip`` take no options. Raises ValueError on bad input, naming the point.
    """
    _check_method(method)
    rec = _records(steps, values)
    if method in ("step", "linear", "pchip"):
        return _fit_interp(method, rec, options)
    if method == "offset":
        return _fit_offset(rec, options)
    return _fit_nn(rec, int(seed), options)


# --------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=8)
def _table(q: float, noise_multiplier: float, size: int, orders: tuple) -> gridmod.RdpTable:
    """The tabulated per-step RDP, cached: :func:`compare` reuses it for every method."""
    return gridmod.tabulate(q, noise_multiplier, size, np.asarray(orders))


def _epsilons(f: Fit, n_steps: int, table: gridmod.RdpTable, delta: float) -> np.ndarray:
    """Per-point ε of the fill over steps 0..n_steps-1 (tabulated fast path)."""
    P = f.n_points
    composed = np.empty((P, len(table.orders)))
    per = max(1, _FILL_CHUNK // n_steps)
    for a in range(0, P, per):
        pts = np.arange(a, min(P, a + per))
        r = f.fill(n_steps, points=pts)
        idx = np.repeat(np.arange(len(pts)), n_steps)
        h = gridmod.histogram(idx, r.ravel(), np.ones(r.size), len(pts), table.size)
        composed[pts] = gridmod.compose(h, table)
    eps, _ = rdp.epsilon_from_rdp(composed, delta, table.orders)
    return np.atleast_1d(eps)


def point_epsilons(f: Fit, n_steps: int, *, q: float, noise_multiplier: float, delta: float, orders=None,
                   grid_size: int = gridmod.DEFAULT_GRID) -> np.ndarray:
    """Per-point ε of a fill composed over steps 0..n_steps-1: shape (n_points,).

    The warehouse's fast path: a tent histogram of each point's filled r times the RDP
    table of (q, σ) on ``grid_size`` cells (an upper bound, within ~1e-5 of exact at 1,024
    cells), converted at ``delta`` over ``orders`` (default :data:`analysis.rdp.DEFAULT_ORDERS`).
    Points are filled a few million (point, step) cells at a time, so memory stays bounded.
    """
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    if not 0 < q <= 1:
        raise ValueError(f"sample rate q={q} is outside (0, 1]")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} is outside (0, 1)")
    orders = rdp.DEFAULT_ORDERS if orders is None else orders
    table = _table(float(q), float(noise_multiplier), int(grid_size), tuple(float(o) for o in np.atleast_1d(orders)))
    return _epsilons(f, int(n_steps), table, delta)


def _errors(pred: np.ndarray, true: np.ndarray, prefix: str) -> dict:
    err = np.abs(pred - true)
    nz = true != 0
    rel = err[nz] / np.abs(true[nz])
    return {
        f"{prefix}_mae": float(err.mean()) if err.size else float("nan"),
        f"{prefix}_max_abs": float(err.max()) if err.size else float("nan"),
        f"{prefix}_mre": float(rel.mean()) if rel.size else float("nan"),
        f"{prefix}_max_rel": float(rel.max()) if rel.size else float("nan"),
    }


def held_out_mask(rec_counts: Sequence[int], k: int) -> np.ndarray:
    """Flat mask of held-out records: index i % k == k-1, never a point's first or last."""
    out = []
    for n in rec_counts:
        i = np.arange(n)
        out.append((i % k == k - 1) & (i > 0) & (i < n - 1))
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def holdout(method: str, steps, values, k: int, *, q: float, noise_multiplier: float, n_steps: int,
            delta: float, orders=None, seed: int = 0, cost_order: float = COST_ORDER,
            grid_size: int = gridmod.DEFAULT_GRID, cost_floor: float = 0.01, **options) -> dict:
    """Hold out every k-th record of every point, refit, and measure the cost and ε errors.

    ``orders`` are the RDP orders of the ε composition (default :data:`analysis.rdp.DEFAULT_ORDERS`);
    ``cost_order`` the single order of the per-step cost errors; ``options`` go to :func:`fit`.
    Besides the relative errors over all non-zero true costs (which tiny true costs, r ~ 1e-10,
    make astronomically large), ``cost_*_above_floor`` restrict them to held-out records whose
    true cost is at least ``cost_floor`` × the cost of a full-norm step (r = 1).
    Returns plain floats/ints (see the module docstring for what each number is).
    """
    _check_method(method)
    if isinstance(k, bool) or int(k) != k or k < 2:
        raise ValueError(f"k must be an integer >= 2 (every k-th record is held out), got {k}")
    k = int(k)
    if not 0 < q <= 1:
        raise ValueError(f"sample rate q={q} is outside (0, 1]")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} is outside (0, 1)")
    if not cost_order > 1:
        raise ValueError(f"cost_order must be > 1, got {cost_order}")
    if not cost_floor >= 0:
        raise ValueError(f"cost_floor must be >= 0, got {cost_floor}")
    n_steps = int(n_steps)
    orders = np.asarray(rdp.DEFAULT_ORDERS if orders is None else orders, dtype=np.float64)

    rec = _records(steps, values)
    s_rows, v_rows = rec.per_point()
    mask = held_out_mask(rec.counts, k)
    n_held = int(mask.sum())
    if n_held == 0:
        raise ValueError(f"nothing to hold out with k={k}: no point has a record with index i % k == k-1 "
                         "other than its first or last")
    keep_s = [s[~mask[a:b]] for s, a, b in zip(s_rows, rec.start[:-1], rec.start[1:])]
    keep_v = [v[~mask[a:b]] for v, a, b in zip(v_rows, rec.start[:-1], rec.start[1:])]

    t0 = time.perf_counter()
    f_train = fit(method, keep_s, keep_v, seed=seed, **options)
    fit_seconds = time.perf_counter() - t0
    pred = f_train.predict(rec.point[mask], rec.steps[mask])
    true = rec.values[mask]

    c = rdp.rdp_of_sensitivity(q, noise_multiplier, np.concatenate([pred, true]), [cost_order])[:, 0]
    c_pred, c_true = c[:n_held], c[n_held:]

    f_full = fit(method, s_rows, v_rows, seed=seed, **options)
    f_step = f_full if method == "step" else fit("step", s_rows, v_rows)
    table = _table(float(q), float(noise_multiplier), int(grid_size), tuple(float(o) for o in orders))
    eps_train = _epsilons(f_train, n_steps, table, delta)
    eps_full = _epsilons(f_full, n_steps, table, delta)
    eps_step = eps_full if method == "step" else _epsilons(f_step, n_steps, table, delta)

    out = {"method": method, "k": k, "held_out": n_held, "n_points": rec.n_points,
           "n_records": int(rec.steps.size), "cost_order": float(cost_order),
           "r_mae": float(np.mean(np.abs(pred - true)))}
    out.update(_errors(c_pred, c_true, "cost"))
    full_cost = float(rdp.rdp_of_sensitivity(q, noise_multiplier, np.array([1.0]), [cost_order])[0, 0])
    big = c_true >= cost_floor * full_cost
    floored = _errors(c_pred[big], c_true[big], "cost")
    out.update({"held_out_above_floor": int(big.sum()),
                "cost_mre_above_floor": floored["cost_mre"], "cost_max_rel_above_floor": floored["cost_max_rel"]})
    out.update(_errors(eps_train, eps_full, "eps"))
    out.update(_errors(eps_train, eps_step, "eps_step"))
    out.update({
        "eps_holdout_mean": float(np.mean(eps_train)),
        "eps_full_mean": float(np.mean(eps_full)),
        "eps_step_full_mean": float(np.mean(eps_step)),
        "fit_seconds": float(fit_seconds),
    })
    return out


def compare(steps, values, k: int, *, methods: Sequence[str] = METHODS, **kw) -> list[dict]:
    """:func:`holdout` for every method (same held-out records), one dict each."""
    for m in methods:
        _check_method(m)
    return [holdout(m, steps, values, k, **kw) for m in methods]


def format_table(rows: list[dict], columns: Sequence[str] = (
        "method", "k", "held_out", "r_mae", "cost_mae", "cost_max_abs", "cost_mre", "cost_max_rel",
        "cost_mre_above_floor",
        "eps_mae", "eps_max_abs", "eps_mre", "eps_max_rel", "eps_step_mae", "eps_step_max_abs",
        "eps_full_mean", "fit_seconds")) -> str:
    """A plain-text table of :func:`compare`'s rows."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
