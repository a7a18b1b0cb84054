"""The project's DuckDB Python UDFs, registered on every connection at connect time.

Layer: ``warehouse`` (the store); the math is :mod:`analysis.rdp` and :mod:`analysis.gla`.

DuckDB refuses to register a function while a result is open on the connection, so
``warehouse.connect`` and ``warehouse.engine`` call :func:`register_udfs` before
running anything else. Type names are strings (duckdb 2.0 has no ``duckdb.typing``).
All UDFs are vectorised Arrow UDFs: each call gets a batch of rows, groups it by its
distinct mechanism parameters and evaluates :mod:`analysis.rdp` once per group.

SQL surface:

* ``rdp_sgm(sample_rate, noise_multiplier, alpha)``: per-step RDP of the SGM.
* ``rdp_step_cost(sample_rate, noise_multiplier, ratio, alpha)``: per-step RDP of an
  example whose clipped norm is ``ratio`` × C (effective noise multiplier σ/ratio).
* ``gla_step_cost(sample_rate, noise_multiplier, ratio, step, alpha0, holder_p, max_order, legacy)``:
  the Hölder step term of :mod:`analysis.gla`.
* ``gla_ratio(grad_norm, max_grad_norm, batch_size, legacy)``: the ratio the gla step
  term is evaluated at (:func:`analysis.gla.sensitivity`: min(norm, C)/C, or with
  ``legacy`` the study's norm / batch size).
* ``rdp_epsilon(orders, rdp, delta)`` / ``rdp_best_order(orders, rdp, delta)``:
  RDP → (ε, δ) as Opacus's ``get_privacy_spent``, from two lists.
* ``dp_epsilon(sample_rate, noise_multiplier, steps, delta)`` / ``dp_best_order(...)``:
  the data-independent ε of ``steps`` DP-SGD steps (default orders).
* ``dp_params_valid(sample_rate, noise_multiplier, steps, delta)``: whether the four lie
  in the ranges ``dp_epsilon`` accepts (views guard with it, so one run stored with bad
  parameters shows NULL instead of failing every query over ``run_epsilon``).
* ``norm_cdf(z)``: the standard normal CDF (DuckDB has no erf), for LiRA's offline test.

Every argument is checked against the ranges of :mod:`analysis.validate` (q ∈ [1e-12, 1],
σ ∈ [1e-3, 1e6] — ``rdp_sgm`` takes an effective σ/r, any finite value >= 1e-3 —, ratio
∈ [0, 1], orders in [1.01, 1e4], δ ∈ (0, 1), steps whole in [0, 1e9], C ∈ [1e-12, 1e12]):
a value outside them fails the query with one error naming the UDF and the parameter
(``rdp_sgm: noise_multiplier 1e-160 is outside [0.001, inf)``), instead of returning
garbage or hanging. NULL arguments give NULL.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import pyarrow as pa


class _Lazy:
    """A module loaded when first used: the math imports scipy (0.2 s), which commands
    that never call a UDF (``runs``, ``--help``) should not pay for."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


rdp = _Lazy("dpledger.analysis.rdp")
gla = _Lazy("dpledger.analysis.gla")


@dataclass(frozen=True)
class Udf:
    name: str
    function: Callable
    parameters: list[str]
    return_type: str


validate = _Lazy("dpledger.analysis.validate")


class UdfError(ValueError):
    """An argument of a UDF outside its range: DuckDB reports the message as the query's error."""


def _check(udf: str, name: str, values: np.ndarray, low: float, high: float, *, low_open: bool = False,
           high_open: bool = False, whole: bool = False) -> None:
    """Raise :class:`UdfError` unless every non-NULL (non-NaN from NULL) value lies in the interval."""
    x = values[~np.isnan(values)] if not np.isnan(values).all() else values[:0]
    ok = np.isfinite(x) if not np.isinf(high) else ~np.isnan(x)
    ok &= (x > low) if low_open else (x >= low)
    ok &= (x < high) if high_open else (x <= high)
    if whole:
        ok &= np.floor(x) == x
    if not ok.all():
        bad = x[~ok][0]
        left, right = "(" if low_open else "[", ")" if high_open or np.isinf(high) else "]"
        what = "a whole number in" if whole else "outside" if np.isfinite(bad) else "not finite; expected"
        verb = "must be" if whole else "is"
        raise UdfError(f"{udf}: {name} {bad:g} {verb} {what} {left}{low:g}, {high:g}{right}")


def _nan_args(udf: str, names: list[str], cols: list[np.ndarray], masks: list[np.ndarray]) -> None:
    """Raise where a non-NULL argument is NaN (NULL reads as NaN too, so the masks tell them apart)."""
    for name, col, mask in zip(names, cols, masks):
        if np.any(np.isnan(col) & ~mask):
            raise UdfError(f"{udf}: {name} NaN is not a number")


def _nulls(col) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _q(udf, q):
    _check(udf, "sample_rate", q, *validate.SAMPLE_RATE)


def _sigma(udf, sigma):
    _check(udf, "noise_multiplier", sigma, *validate.NOISE_MULTIPLIER)


def _alpha(udf, alpha, name="alpha"):
    _check(udf, name, alpha, *validate.ORDERS)


def _np(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Float64 numpy view of an Arrow column, NaN for nulls."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False).astype(np.float64) if col.null_count == 0 else np.asarray(
        col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=np.float64
    )


def _grouped(out: np.ndarray, keys: list[np.ndarray], fn: Callable[[tuple, np.ndarray], np.ndarray]) -> None:
    """out[idx] = fn(key, idx) for each distinct key tuple among the rows (NaN keys skipped)."""
    stacked = np.stack(keys, axis=1)
    valid = ~np.isnan(stacked).any(axis=1)
    if not valid.any():
        return
    uniq, inverse = np.unique(stacked[valid], axis=0, return_inverse=True)
    rows = np.flatnonzero(valid)
    for g, key in enumerate(uniq):
        idx = rows[inverse.ravel() == g]
        out[idx] = fn(tuple(key), idx)


def _result(values: np.ndarray, *inputs: np.ndarray) -> pa.Array:
    missing = np.zeros(values.shape[0], dtype=bool)
    for x in inputs:
        missing |= np.isnan(x)
    return pa.array(values, mask=missing, type=pa.float64())


def _rdp_sgm(q, sigma, alpha):
    masks = [_nulls(c) for c in (q, sigma, alpha)]
    q, sigma, alpha = _np(q), _np(sigma), _np(alpha)
    _nan_args("rdp_sgm", ["sample_rate", "noise_multiplier", "alpha"], [q, sigma, alpha], masks)
    _q("rdp_sgm", q)
    _check("rdp_sgm", "noise_multiplier", sigma, validate.NOISE_MULTIPLIER[0], np.inf, high_open=True)
    _alpha("rdp_sgm", alpha)
    out = np.full(q.shape[0], np.nan)
    _grouped(out, [q, alpha], lambda k, idx: rdp.rdp_sgm(k[0], sigma[idx], [k[1]])[:, 0])
    return _result(out, q, sigma, alpha)


def _rdp_step_cost(q, sigma, ratio, alpha):
    masks = [_nulls(c) for c in (q, sigma, ratio, alpha)]
    q, sigma, ratio, alpha = _np(q), _np(sigma), _np(ratio), _np(alpha)
    _nan_args("rdp_step_cost", ["sample_rate", "noise_multiplier", "ratio", "alpha"], [q, sigma, ratio, alpha], masks)
    _q("rdp_step_cost", q)
    _sigma("rdp_step_cost", sigma)
    _check("rdp_step_cost", "ratio", ratio, 0.0, 1.0)
    _alpha("rdp_step_cost", alpha)
    out = np.full(q.shape[0], np.nan)
    _grouped(out, [q, sigma, alpha],
             lambda k, idx: rdp.rdp_of_sensitivity(k[0], k[1], ratio[idx], [k[2]])[:, 0])
    return _result(out, q, sigma, ratio, alpha)


@lru_cache(maxsize=64)
def _schedule(alpha0: float, p: float, max_order: int | None, length: int) -> np.ndarray:
    return gla.order_schedule(alpha0, p, length, max_order)


def _gla_step_cost(q, sigma, ratio, step, alpha0, holder_p, max_order, legacy):
    masks = [_nulls(c) for c in (q, sigma, ratio, alpha0, holder_p)]
    q, sigma, ratio, step = _np(q), _np(sigma), _np(ratio), _np(step)
    alpha0, holder_p = _np(alpha0), _np(holder_p)
    max_order = _np(max_order)
    legacy = _np(legacy.cast(pa.int8()) if hasattr(legacy, "cast") else legacy)
    u = "gla_step_cost"
    _nan_args(u, ["sample_rate", "noise_multiplier", "ratio", "alpha0", "holder_p"],
              [q, sigma, ratio, alpha0, holder_p], masks)
    _q(u, q)
    _sigma(u, sigma)
    _check(u, "ratio", ratio, 0.0, np.inf, high_open=True)  # legacy ratios (norm / batch size) may exceed 1
    _check(u, "ratio", ratio[legacy == 0], 0.0, 1.0)
    _check(u, "step", step, 0, validate.MAX_STEPS, whole=True)
    _alpha(u, alpha0, "alpha0")
    _check(u, "holder_p", holder_p, 1.0, 3.0 * validate.MAX_STEPS, low_open=True)
    _check(u, "max_order", max_order, 1, validate.MAX_ORDER, whole=True)
    out = np.full(q.shape[0], np.nan)
    cap = np.where(np.isnan(max_order), -1.0, max_order)

    def fn(k, idx):
        qq, ss, a0, p, mo, leg = k
        steps = step[idx].astype(np.int64)
        sched = _schedule(a0, p, None if mo < 0 else int(mo), int(steps.max()) + 1)
        orders = sched[steps]
        return gla.terms(qq, ss, ratio[idx], orders, p, bool(leg))

    try:
        _grouped(out, [q, sigma, alpha0, holder_p, cap, legacy], fn)
    except validate.ParameterError as exc:  # e.g. the schedule's orders grow past the largest order
        raise UdfError(f"{u}: {exc}") from None
    return _result(out, q, sigma, ratio, step, alpha0, holder_p)


def _gla_ratio(norm, max_grad_norm, batch_size, legacy):
    masks = [_nulls(c) for c in (norm, max_grad_norm, batch_size)]
    norm, c, bs = _np(norm), _np(max_grad_norm), _np(batch_size)
    legacy = _np(legacy.cast(pa.int8()) if hasattr(legacy, "cast") else legacy)
    _nan_args("gla_ratio", ["grad_norm", "max_grad_norm", "batch_size"], [norm, c, bs], masks)
    _check("gla_ratio", "grad_norm", norm, 0.0, np.inf, high_open=True)
    _check("gla_ratio", "max_grad_norm", c[legacy == 0], *validate.MAX_GRAD_NORM)
    _check("gla_ratio", "batch_size", bs[legacy == 1], 1.0, np.inf, high_open=True)
    out = np.full(norm.shape[0], np.nan)
    plain = legacy == 0
    out[plain] = gla.sensitivity(norm[plain], c[plain])
    scaled = (legacy == 1) & ~np.isnan(bs)
    out[scaled] = gla.sensitivity(norm[scaled], None, bs[scaled], legacy=True)
    return _result(out, out)


def _lists(udf: str, orders: pa.Array, values: pa.Array):
    for o, v in zip(orders.to_pylist(), values.to_pylist()):
        if o is None or v is None:
            yield None, None
            continue
        if len(o) != len(v) or len(o) == 0:
            raise UdfError(f"{udf}: orders and rdp must be non-empty lists of one length (got {len(o)} and {len(v)})")
        if any(x is None for x in o) or any(x is None for x in v):
            yield None, None
            continue
        o, v = np.asarray(o, dtype=np.float64), np.asarray(v, dtype=np.float64)
        for name, x in (("orders", o), ("rdp", v)):
            if np.isnan(x).any():
                raise UdfError(f"{udf}: {name} NaN is not a number")
        _alpha(udf, o, "orders")
        _check(udf, "rdp", v, 0.0, np.inf)
        yield o, v


def _conversion(index: int, udf: str):
    def fn(orders, values, delta):
        dmask = _nulls(delta)
        d = _np(delta)
        _nan_args(udf, ["delta"], [d], [dmask])
        _check(udf, "delta", d, 0.0, 1.0, low_open=True, high_open=True)
        out = np.full(d.shape[0], np.nan)
        for i, (o, v) in enumerate(_lists(udf, orders, values)):
            if o is None or np.isnan(d[i]):
                continue
            out[i] = rdp.epsilon_from_rdp(v, float(d[i]), o)[index]
        return pa.array(out, mask=np.isnan(out), type=pa.float64())

    return fn


@lru_cache(maxsize=256)
def dp_epsilon_of(q: float, sigma: float, steps: int, delta: float) -> tuple[float, float]:
    """``rdp.dp_epsilon`` remembered: ``dp_epsilon`` and ``dp_best_order`` of one mechanism
    are one computation, which a writer may also start ahead, on a thread (ingest steps)."""
    return rdp.dp_epsilon(q, sigma, steps, delta)


def _dp(index: int, udf: str):
    def fn(q, sigma, steps, delta):
        masks = [_nulls(c) for c in (q, sigma, steps, delta)]
        q, sigma, steps, delta = _np(q), _np(sigma), _np(steps), _np(delta)
        _nan_args(udf, ["sample_rate", "noise_multiplier", "steps", "delta"], [q, sigma, steps, delta], masks)
        _q(udf, q)
        _sigma(udf, sigma)
        _check(udf, "steps", steps, 0, validate.MAX_STEPS, whole=True)
        _check(udf, "delta", delta, 0.0, 1.0, low_open=True, high_open=True)
        out = np.full(q.shape[0], np.nan)

        def one(k, idx):
            qq, ss, tt, dd = k
            return dp_epsilon_of(float(qq), float(ss), int(tt), float(dd))[index]

        _grouped(out, [q, sigma, steps, delta], one)
        return _result(out, q, sigma, steps, delta)

    return fn


def _dp_params_valid(q, sigma, steps, delta):
    def ok(fn, col):
        try:
            fn(col)
            return True
        except UdfError:
            return False

    q, sigma, steps, delta = _np(q), _np(sigma), _np(steps), _np(delta)
    out = np.zeros(q.shape[0], dtype=bool)
    for i in range(q.shape[0]):
        row = [np.array([v]) for v in (q[i], sigma[i], steps[i], delta[i])]
        if any(np.isnan(r[0]) for r in row):
            continue
        out[i] = (ok(lambda c: _q("", c), row[0]) and ok(lambda c: _sigma("", c), row[1])
                  and ok(lambda c: _check("", "", c, 0, validate.MAX_STEPS, whole=True), row[2])
                  and ok(lambda c: _check("", "", c, 0.0, 1.0, low_open=True, high_open=True), row[3]))
    return pa.array(out, type=pa.bool_())


def _norm_cdf(z):
    from scipy.special import ndtr

    z = _np(z)
    return _result(ndtr(z), z)


def udfs() -> list[Udf]:
    """Every UDF the views and users may call."""
    d = "DOUBLE"
    return [
        Udf("rdp_sgm", _rdp_sgm, [d, d, d], d),
        Udf("rdp_step_cost", _rdp_step_cost, [d, d, d, d], d),
        Udf("gla_step_cost", _gla_step_cost, [d, d, d, "BIGINT", d, d, "INTEGER", "BOOLEAN"], d),
        Udf("gla_ratio", _gla_ratio, [d, d, d, "BOOLEAN"], d),
        Udf("rdp_epsilon", _conversion(0, "rdp_epsilon"), ["DOUBLE[]", "DOUBLE[]", d], d),
        Udf("rdp_best_order", _conversion(1, "rdp_best_order"), ["DOUBLE[]", "DOUBLE[]", d], d),
        Udf("dp_epsilon", _dp(0, "dp_epsilon"), [d, d, "BIGINT", d], d),
        Udf("dp_best_order", _dp(1, "dp_best_order"), [d, d, "BIGINT", d], d),
        Udf("dp_params_valid", _dp_params_valid, [d, d, "BIGINT", d], "BOOLEAN"),
        Udf("norm_cdf", _norm_cdf, [d], d),
    ]


def register_udfs(con) -> None:
    import duckdb

    for udf in udfs():
        try:
            con.create_function(
                udf.name,
                udf.function,
                udf.parameters,
                udf.return_type,
                type="arrow",
                null_handling="special",
                side_effects=False,
            )
        except duckdb.CatalogException as exc:
            # Connections to one file in one process share its database instance, whose
            # catalog already has the functions when another connection registered them.
            if "already exists" not in str(exc):
                raise
