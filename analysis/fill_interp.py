"""The interpolating fills ``step``, ``linear`` and ``pchip`` (see :mod:`analysis.fits`).

Layer: ``analysis`` (pure numeric code; scipy for pchip). Every interval of every
point is one cubic in a flat coefficient array; a query finds its interval by one
binary search.
"""

from __future__ import annotations

import numpy as np

from .fill_records import Fit, Records, no_options


def _locate(rec: Records, p: np.ndarray, tc: np.ndarray) -> np.ndarray:
    """Index of the last record of point p at or before step tc (tc within the point's range)."""
    keys = rec.keys
    q = p * rec.span + (tc - rec.t_min)
    idx = np.searchsorted(keys, q, side="right") - 1
    return np.clip(idx, rec.start[p], rec.start[p + 1] - 1)


def _piecewise_eval(rec: Records, coef: np.ndarray):
    """Evaluator of per-interval cubics: coef[i] = (c0, c1, c2, c3) on [t_i, t_{i+1}]."""

    def ev(p, tc):
        idx = _locate(rec, p, tc)
        dt = tc - rec.steps[idx]
        c = coef[idx]
        return ((c[:, 0] * dt + c[:, 1]) * dt + c[:, 2]) * dt + c[:, 3]

    return ev


def _interp_coefficients(rec: Records, method: str) -> np.ndarray:
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


def fit_interp(method: str, rec: Records, options: dict) -> Fit:
    no_options(method, options)
    coef = _interp_coefficients(rec, method)
    params = {"n_points": rec.n_points, "n_records": int(rec.steps.size),
              "first_step": float(rec.t_min), "last_step": float(rec.t_max),
              "exact_at_records": True}
    return Fit(method, params, rec, _piecewise_eval(rec, coef))
