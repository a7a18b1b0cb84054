r"""Rényi DP of the Poisson-subsampled Gaussian mechanism, vectorised, and RDP → (ε, δ).

Layer: ``analysis`` (pure numeric code; imports no other project package). Owns the
per-step RDP of the sampled Gaussian and the RDP → (ε, δ) conversion; composition over
steps is :mod:`analysis.composition`.

For DP-SGD step with sample rate ``q`` and (effective) noise multiplier ``σ`` the
mechanism is the sampled Gaussian mechanism (SGM) of Mironov, Talwar and Zhang,
"Rényi Differential Privacy of the Sampled Gaussian Mechanism" (2019, arXiv:1908.10530),
whose RDP at order α is ``log(A_α) / (α - 1)`` with (their Section 3.3):

* integer α:  A_α = Σ_{k=0..α} C(α,k) (1-q)^{α-k} q^k exp((k² - k) / (2σ²))
* fractional α: the two erfc series of their Section 3.3 (Opacus's
  ``_compute_log_a_for_frac_alpha``), summed until the terms fall below e^-30.

These are the functions of ``opacus.accountants.analysis.rdp.compute_rdp``, here
vectorised over many noise multipliers at once (one per training example: the
per-example effective noise multiplier is σ·C/s for clipped norm s). For integer
orders and small sensitivities we evaluate ``log A = log1p(Σ_k w_k expm1(c_k))``
(the weights w_k sum to 1), which keeps the tiny RDP of small-gradient points
accurate where the plain log-sum-exp cancels to zero.

The conversion to (ε, δ) is Theorem 21 of Balle et al., "Hypothesis Testing
Interpretations and Renyi Differential Privacy" (AISTATS 2020), as Opacus's
``get_privacy_spent``: ε = min_α [ RDP(α) - (log δ + log α)/(α-1) + log((α-1)/α) ].
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import special

#: Opacus's RDPAccountant default orders (1.1 … 10.9, 12 … 63) extended with larger
#: integer orders up to 256: points whose gradients are small have their optimal
#: order far above 63, and cutting the list there would overstate their ε.
OPACUS_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
DEFAULT_ORDERS = OPACUS_ORDERS + tuple(range(64, 257, 8))


def _as_orders(orders) -> np.ndarray:
    orders = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if np.any(orders <= 1):
        raise ValueError("RDP orders must be > 1")
    return orders


def log_a_int(q: float, sigma: np.ndarray, alpha: int) -> np.ndarray:
    """log A_α for integer α, one value per noise multiplier in ``sigma``."""
    k = np.arange(alpha + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_w = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
        log_w = log_w + k * math.log(q) + (alpha - k) * math.log1p(-q)
    inv2s2 = 0.5 / np.square(sigma)  # 0 where sigma is inf (zero sensitivity)
    exponent = inv2s2[:, None] * (k * k - k)[None, :]
    out = np.empty(sigma.shape[0])
    small = exponent[:, -1] < 30.0
    if np.any(small):
        # log1p(Σ w_k expm1(c_k)): exact for tiny sensitivities, no cancellation
        s = np.expm1(exponent[small]) @ np.exp(log_w)
        out[small] = np.log1p(s)
    if np.any(~small):
        out[~small] = special.logsumexp(log_w[None, :] + exponent[~small], axis=1)
    return out


def _log_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.logaddexp(a, b)


def _log_sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log(exp(a) - exp(b)) elementwise; -inf where a <= b (the terms cancel to rounding)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = a + np.log(-np.expm1(b - a))
    out = np.where(np.isneginf(b), a, out)
    return np.where(a <= b, -np.inf, out)


def _log_erfc(x: np.ndarray) -> np.ndarray:
    return math.log(2) + special.log_ndtr(-x * 2**0.5)


def _log_a_frac(q: float, sigma: np.ndarray, alpha: float) -> np.ndarray:
    """log A_α for fractional α by the erfc series (Mironov et al. 2019, §3.3)."""
    n = sigma.shape[0]
    log_a0 = np.full(n, -np.inf)
    log_a1 = np.full(n, -np.inf)
    active = np.ones(n, dtype=bool)
    z0 = np.square(sigma) * math.log(1 / q - 1) + 0.5
    i = 0
    while np.any(active):
        coef = special.binom(alpha, i)
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        s = sigma[active]
        log_e0 = math.log(0.5) + _log_erfc((i - z0[active]) / (math.sqrt(2) * s))
        log_e1 = math.log(0.5) + _log_erfc((z0[active] - j) / (math.sqrt(2) * s))
        log_s0 = log_t0 + (i * i - i) / (2 * np.square(s)) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * np.square(s)) + log_e1
        if coef > 0:
            log_a0[active] = _log_add(log_a0[active], log_s0)
            log_a1[active] = _log_add(log_a1[active], log_s1)
        else:
            log_a0[active] = _log_sub(log_a0[active], log_s0)
            log_a1[active] = _log_sub(log_a1[active], log_s1)
        done = np.maximum(log_s0, log_s1) < -30
        idx = np.flatnonzero(active)
        active[idx[done]] = False
        i += 1
    return np.logaddexp(log_a0, log_a1)


# Above this effective noise multiplier the fractional-order series loses its digits to
# cancellation (checked against 50-digit quadrature), while the small-noise expansion
# RDP = α q² / (2σ²) (1 + O(σ⁻²)) is accurate to ~1e-8; it is used there, raised by
# 10/σ² to stay above the true value (the observed correction is under 1/σ²).
_ASYMPTOTIC_SIGMA = 1e4


def _rdp_frac_small(q: float, sigma: np.ndarray, alpha: float) -> np.ndarray:
    return alpha * q * q / (2 * np.square(sigma)) * (1 + 10 / np.square(sigma))


def rdp_sgm(q: float, noise_multiplier, orders=DEFAULT_ORDERS) -> np.ndarray:
    """Per-step RDP of the sampled Gaussian mechanism.

    ``noise_multiplier`` is a scalar or an array of shape (n,); returns an array of
    shape (n, len(orders)) (or (len(orders),) for a scalar). ``inf`` noise (zero
    sensitivity) costs 0; zero noise costs ``inf``. Equals Opacus's
    ``compute_rdp(q=q, noise_multiplier=σ, steps=1, orders=orders)`` for every σ.
    """
    orders = _as_orders(orders)
    scalar = np.ndim(noise_multiplier) == 0
    sigma = np.atleast_1d(np.asarray(noise_multiplier, dtype=np.float64))
    if not 0 <= q <= 1:
        raise ValueError(f"sample rate {q} is outside [0, 1]")
    out = np.zeros((sigma.shape[0], orders.shape[0]))
    if q == 0:
        return out[0] if scalar else out
    zero_cost = np.isinf(sigma)
    infinite = sigma == 0
    live = ~(zero_cost | infinite)
    s = sigma[live]
    for m, alpha in enumerate(orders):
        if s.size == 0:
            break
        if q == 1.0:
            col = alpha / (2 * np.square(s))
        elif float(alpha).is_integer():
            col = log_a_int(q, s, int(alpha)) / (alpha - 1)
        else:
            col = np.empty(s.shape)
            far = s > _ASYMPTOTIC_SIGMA
            col[far] = _rdp_frac_small(q, s[far], float(alpha))
            col[~far] = _log_a_frac(q, s[~far], float(alpha)) / (alpha - 1)
        out[live, m] = col
    out[infinite, :] = np.inf
    return out[0] if scalar else out


def rdp_of_sensitivity(q: float, noise_multiplier: float, ratio, orders=DEFAULT_ORDERS) -> np.ndarray:
    """Per-step RDP of one example whose clipped gradient norm is ``ratio`` × C.

    The step is an SGM with sensitivity s = ratio·C and noise std σC, i.e. with
    effective noise multiplier σ / ratio; ratio 0 costs nothing.
    """
    ratio = np.asarray(ratio, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sigma_eff = np.where(ratio > 0, noise_multiplier / np.where(ratio > 0, ratio, 1.0), np.inf)
    return rdp_sgm(q, sigma_eff, orders)


def epsilon_from_rdp(rdp, delta: float, orders=DEFAULT_ORDERS, *, warn: bool = False):
    """(ε, optimal order) from RDP values, as Opacus's ``get_privacy_spent``.

    ``rdp`` has shape (len(orders),) or (n, len(orders)); returns scalars or arrays
    of shape (n,). With ``warn`` an optimal order at the edge of the list warns, as
    Opacus does (the bound may tighten with more orders).
    """
    orders = _as_orders(orders)
    rdp = np.asarray(rdp, dtype=np.float64)
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} is outside (0, 1)")
    eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    single = eps.ndim == 1
    eps2 = np.atleast_2d(eps)
    all_nan = np.all(np.isnan(eps2), axis=1)
    safe = np.where(np.isnan(eps2), np.inf, eps2)
    idx = np.argmin(safe, axis=1)
    best = safe[np.arange(eps2.shape[0]), idx]
    best = np.where(all_nan, np.inf, best)
    order = np.where(all_nan, np.nan, orders[idx])
    if warn:
        edge = (~all_nan) & ((idx == 0) | (idx == len(orders) - 1))
        if np.any(edge):
            which = "largest" if np.any(idx[edge] == len(orders) - 1) else "smallest"
            warnings.warn(
                f"Optimal order is the {which} alpha for {int(edge.sum())} of {eps2.shape[0]} rows; "
                "more orders could tighten the bound",
                stacklevel=2,
            )
    if single:
        return float(best[0]), float(order[0])
    return best, order


def order_at_edge(order, orders=DEFAULT_ORDERS) -> np.ndarray:
    """True where the optimal order is the smallest or largest of ``orders``."""
    orders = _as_orders(orders)
    order = np.asarray(order)
    return (order == orders[0]) | (order == orders[-1])


def dp_epsilon(q: float, noise_multiplier: float, steps: int, delta: float, orders=DEFAULT_ORDERS):
    """Data-independent (ε, optimal order) of ``steps`` DP-SGD steps: every example at C."""
    rdp = rdp_sgm(q, noise_multiplier, orders) * steps
    return epsilon_from_rdp(rdp, delta, orders)
