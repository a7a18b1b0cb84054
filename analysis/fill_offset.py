"""The ``offset`` fill: a shared curve plus a per-point offset in logit space (see :mod:`analysis.fits`).

Layer: ``analysis`` (pure numeric code; scipy).
"""

from __future__ import annotations

import numpy as np

from .fill_records import Fit, Records, logit, no_options


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


def fit_offset(rec: Records, options: dict) -> Fit:
    from scipy import sparse

    opts = dict(options)
    eps = float(opts.pop("eps", 1e-6))
    n_knots = int(opts.pop("knots", 64))
    smooth = float(opts.pop("smooth", 1e-6))
    no_options("offset", opts)
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
    y = logit(rec.values, eps)
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
