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
* ``norm_cdf(z)``: the standard normal CDF (DuckDB has no erf), for LiRA's offline test.
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
    q, sigma, alpha = _np(q), _np(sigma), _np(alpha)
    out = np.full(q.shape[0], np.nan)
    _grouped(out, [q, alpha], lambda k, idx: rdp.rdp_sgm(k[0], sigma[idx], [k[1]])[:, 0])
    return _result(out, q, sigma, alpha)


def _rdp_step_cost(q, sigma, ratio, alpha):
    q, sigma, ratio, alpha = _np(q), _np(sigma), _np(ratio), _np(alpha)
    out = np.full(q.shape[0], np.nan)
    _grouped(out, [q, sigma, alpha],
             lambda k, idx: rdp.rdp_of_sensitivity(k[0], k[1], ratio[idx], [k[2]])[:, 0])
    return _result(out, q, sigma, ratio, alpha)


@lru_cache(maxsize=64)
def _schedule(alpha0: float, p: float, max_order: int | None, length: int) -> np.ndarray:
    return gla.order_schedule(alpha0, p, length, max_order)


def _gla_step_cost(q, sigma, ratio, step, alpha0, holder_p, max_order, legacy):
    q, sigma, ratio, step = _np(q), _np(sigma), _np(ratio), _np(step)
    alpha0, holder_p = _np(alpha0), _np(holder_p)
    max_order = _np(max_order)
    legacy = _np(legacy.cast(pa.int8()) if hasattr(legacy, "cast") else legacy)
    out = np.full(q.shape[0], np.nan)
    cap = np.where(np.isnan(max_order), -1.0, max_order)

    def fn(k, idx):
        qq, ss, a0, p, mo, leg = k
        steps = step[idx].astype(np.int64)
        sched = _schedule(a0, p, None if mo < 0 else int(mo), int(steps.max()) + 1)
        orders = sched[steps]
        return gla.terms(qq, ss, ratio[idx], orders, p, bool(leg))

    _grouped(out, [q, sigma, alpha0, holder_p, cap, legacy], fn)
    return _result(out, q, sigma, ratio, step, alpha0, holder_p)


def _gla_ratio(norm, max_grad_norm, batch_size, legacy):
    norm, c, bs = _np(norm), _np(max_grad_norm), _np(batch_size)
    legacy = _np(legacy.cast(pa.int8()) if hasattr(legacy, "cast") else legacy)
    out = np.full(norm.shape[0], np.nan)
    plain = legacy == 0
    out[plain] = gla.sensitivity(norm[plain], c[plain])
    scaled = (legacy == 1) & ~np.isnan(bs)
    out[scaled] = gla.sensitivity(norm[scaled], None, bs[scaled], legacy=True)
    return _result(out, out)


def _lists(orders: pa.Array, values: pa.Array):
    for o, v in zip(orders.to_pylist(), values.to_pylist()):
        if o is None or v is None or len(o) != len(v) or len(o) == 0:
            yield None, None
        else:
            yield np.asarray(o, dtype=np.float64), np.asarray(v, dtype=np.float64)


def _conversion(index: int):
    def fn(orders, values, delta):
        d = _np(delta)
        out = np.full(d.shape[0], np.nan)
        for i, (o, v) in enumerate(_lists(orders, values)):
            if o is None or np.isnan(d[i]) or not 0 < d[i] < 1:
                continue
            out[i] = rdp.epsilon_from_rdp(v, float(d[i]), o)[index]
        return pa.array(out, mask=np.isnan(out), type=pa.float64())

    return fn


def _dp(index: int):
    def fn(q, sigma, steps, delta):
        q, sigma, steps, delta = _np(q), _np(sigma), _np(steps), _np(delta)
        out = np.full(q.shape[0], np.nan)

        def one(k, idx):
            qq, ss, tt, dd = k
            if not (0 < qq <= 1 and ss > 0 and tt >= 0 and 0 < dd < 1):
                return np.nan
            return rdp.dp_epsilon(qq, ss, int(tt), dd)[index]

        _grouped(out, [q, sigma, steps, delta], one)
        return _result(out, q, sigma, steps, delta)

    return fn


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
        Udf("rdp_epsilon", _conversion(0), ["DOUBLE[]", "DOUBLE[]", d], d),
        Udf("rdp_best_order", _conversion(1), ["DOUBLE[]", "DOUBLE[]", d], d),
        Udf("dp_epsilon", _dp(0), [d, d, "BIGINT", d], d),
        Udf("dp_best_order", _dp(1), [d, d, "BIGINT", d], d),
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
