"""The records a fill is fitted to, and the fitted fill itself (:class:`Fit`).

Layer: ``analysis`` (pure numeric code). Owns the validation and flat layout of
each point's recorded (step, ratio) pairs and the :class:`Fit` every method of
:mod:`analysis.fits` returns; the methods themselves live in ``fill_interp``,
``fill_offset`` and ``fill_nn``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Records:
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


def records(steps, values) -> Records:
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
    return Records(s_all, v_all, point.astype(np.int64), start.astype(np.int64),
                    float(s_all.min()), float(s_all.max()))


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown fill method {method!r}; choose one of {', '.join(METHODS)}")


def no_options(method: str, options: dict) -> None:
    """Raise on options a method does not take."""
    if options:
        raise ValueError(f"method {method!r} takes no option(s) {', '.join(sorted(options))}")



@dataclass
class Fit:
    """A fitted fill: ``predict`` r at (point, step) pairs, ``fill`` dense steps 0..n-1."""

    method: str
    params: dict
    _rec: Records = field(repr=False)
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



def logit(r: np.ndarray, eps: float) -> np.ndarray:
    r = np.clip(r, eps, 1 - eps)
    return np.log(r) - np.log1p(-r)
