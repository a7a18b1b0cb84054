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
  ``_compute_log_a_for_frac_alpha``), summed until the terms fall below e^-30 — but
  never before term ⌈α⌉ + 1: Opacus stops at the first small term, which for large α
  and q ≥ 1/2 is term 0 ((1-q)^α < e^-30) and returns a negative "RDP" (e.g. q = 0.5,
  σ = 3000, α = 100.5 gave -0.70). Past the binomial's bulk the terms shrink. The
  series is cut at :data:`analysis.validate.MAX_SERIES_TERMS` terms with an error (the
  most any parameters in the documented ranges need is ~90,000, at q = 1/2, σ = 1e4,
  α → 1), so no input loops for ever.

Parameters are checked at every public entry against the ranges of
:mod:`analysis.validate` (q ∈ [1e-12, 1], σ ∈ [1e-3, 1e6], effective noise multiplier
σ/r ≥ 1e-3, orders in (1, 1e4], δ ∈ (0, 1), steps ≤ 1e9): a noise multiplier whose
square underflows (below ~1e-154) used to make the series spin for ever.

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

from . import validate
from .validate import ParameterError

#: Opacus's RDPAccountant default orders (1.1 … 10.9, 12 … 63) extended with larger
#: integer orders up to 256: points whose gradients are small have their optimal
#: order far above 63, and cutting the list there would overstate their ε.
OPACUS_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
DEFAULT_ORDERS = OPACUS_ORDERS + tuple(range(64, 257, 8))


def _as_orders(orders) -> np.ndarray:
    return validate.orders(orders)


def log_a_int(q: float, sigma: np.ndarray, alpha: int) -> np.ndarray:
    """log A_α for integer α, one value per (effective) noise multiplier in ``sigma``
    (each >= 1e-3, or inf for zero sensitivity); q ∈ [1e-12, 1], α a whole number in [1, 1e4]."""
    q = validate.sample_rate(q)
    alpha = validate.whole("order", alpha, 1, int(validate.MAX_ORDER))
    sigma = validate.effective_noise(sigma)
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


def _frac_terms(i: int, j, log_coef, q: float, z0, sigma):
    """The i-th pair of log-terms (log s0, log s1) of the erfc series, for binom(α, i) of log
    magnitude ``log_coef`` and j = α - i; scalars or arrays alike (the two series below
    run it over noise multipliers or over orders, with the same operations)."""
    log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
    log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
    log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
    log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
    log_s0 = log_t0 + (i * i - i) / (2 * np.square(sigma)) + log_e0
    log_s1 = log_t1 + (j * j - j) / (2 * np.square(sigma)) + log_e1
    return log_s0, log_s1


def _log_a_frac(q: float, sigma: np.ndarray, alpha: float) -> np.ndarray:
    """log A_α for fractional α by the erfc series (Mironov et al. 2019, §3.3), bounded."""
    n = sigma.shape[0]
    log_a0 = np.full(n, -np.inf)
    log_a1 = np.full(n, -np.inf)
    active = np.ones(n, dtype=bool)
    z0 = np.square(sigma) * math.log(1 / q - 1) + 0.5
    first_stop = math.ceil(alpha) + 1  # not before the binomial's bulk: see the module docstring
    lgamma_a = math.lgamma(alpha + 1)
    for i in range(validate.MAX_SERIES_TERMS):
        # binom(α, i) by sign and log magnitude: the plain value overflows for large α
        positive = i <= alpha or (i - math.ceil(alpha)) % 2 == 0
        log_coef = lgamma_a - math.lgamma(i + 1) - math.lgamma(alpha - i + 1)  # log|Γ| below 0 too
        log_s0, log_s1 = _frac_terms(i, alpha - i, log_coef, q, z0[active], sigma[active])
        if positive:
            log_a0[active] = _log_add(log_a0[active], log_s0)
            log_a1[active] = _log_add(log_a1[active], log_s1)
        else:
            log_a0[active] = _log_sub(log_a0[active], log_s0)
            log_a1[active] = _log_sub(log_a1[active], log_s1)
        if i >= first_stop:
            done = ~(np.maximum(log_s0, log_s1) >= -30)  # NaN stops too (it cannot recover)
            idx = np.flatnonzero(active)
            active[idx[done]] = False
            if not active.any():
                return np.logaddexp(log_a0, log_a1)
    raise _not_converged(q, float(sigma[active][0]), alpha)


def _not_converged(q: float, sigma: float, alpha: float) -> ParameterError:
    return ParameterError(
        f"the fractional-order series of the sampled Gaussian did not converge within "
        f"{validate.MAX_SERIES_TERMS} terms (sample_rate {q:g}, noise_multiplier {sigma:g}, order {alpha:g})")


def _log_a_frac_orders(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """:func:`_log_a_frac` of one noise multiplier at several fractional orders at once: the
    same terms in the same operations, elementwise over the orders instead of over noise
    multipliers (so the same bits), each order stopping by its own rule. One data-independent
    ε (``dp_epsilon``) then costs a few ms instead of one series loop per order."""
    m = alphas.shape[0]
    log_a0 = np.full(m, -np.inf)
    log_a1 = np.full(m, -np.inf)
    active = np.ones(m, dtype=bool)
    s = np.float64(sigma)
    z0 = np.square(s) * math.log(1 / q - 1) + 0.5
    ceil_a = np.array([math.ceil(a) for a in alphas])
    first_stop = ceil_a + 1  # not before the binomial's bulk: see the module docstring
    lgamma_a = [math.lgamma(a + 1) for a in alphas]
    for i in range(validate.MAX_SERIES_TERMS):
        idx = np.flatnonzero(active)
        a = alphas[idx]
        positive = (i <= a) | ((i - ceil_a[idx]) % 2 == 0)
        log_coef = np.array([lgamma_a[k] - math.lgamma(i + 1) - math.lgamma(alphas[k] - i + 1) for k in idx])
        log_s0, log_s1 = _frac_terms(i, a - i, log_coef, q, z0, s)
        log_a0[idx] = np.where(positive, _log_add(log_a0[idx], log_s0), _log_sub(log_a0[idx], log_s0))
        log_a1[idx] = np.where(positive, _log_add(log_a1[idx], log_s1), _log_sub(log_a1[idx], log_s1))
        done = (i >= first_stop[idx]) & ~(np.maximum(log_s0, log_s1) >= -30)  # NaN stops too
        active[idx[done]] = False
        if not active.any():
            return np.logaddexp(log_a0, log_a1)
    raise _not_converged(q, float(sigma), float(alphas[active][0]))


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
    shape (n, len(orders)) (or (len(orders),) for a scalar). Noise multipliers are
    effective ones (σ/r), each at least 1e-3; ``inf`` noise (zero sensitivity) costs 0.
    q ∈ [1e-12, 1], orders in (1, 1e4] (:mod:`analysis.validate`); anything else raises
    :class:`analysis.validate.ParameterError`. Equals Opacus's
    ``compute_rdp(q=q, noise_multiplier=σ, steps=1, orders=orders)`` wherever Opacus's
    series converges (see the module docstring for where it does not).
    """
    orders = _as_orders(orders)
    scalar = np.ndim(noise_multiplier) == 0
    q = validate.sample_rate(q)
    sigma = validate.effective_noise(noise_multiplier)
    out = np.zeros((sigma.shape[0], orders.shape[0]))
    live = ~np.isinf(sigma)
    s = sigma[live]
    one = {}  # one noise multiplier: every fractional order's series at once
    if s.size == 1 and q != 1.0 and not s[0] > _ASYMPTOTIC_SIGMA:
        frac = np.flatnonzero([not float(a).is_integer() for a in orders])
        if frac.size:
            one = dict(zip(frac.tolist(), _log_a_frac_orders(q, float(s[0]), orders[frac]) / (orders[frac] - 1)))
    for m, alpha in enumerate(orders):
        if s.size == 0:
            break
        if q == 1.0:
            col = alpha / (2 * np.square(s))
        elif float(alpha).is_integer():
            col = log_a_int(q, s, int(alpha)) / (alpha - 1)
        elif m in one:
            col = np.array([one[m]])
        else:
            col = np.empty(s.shape)
            far = s > _ASYMPTOTIC_SIGMA
            col[far] = _rdp_frac_small(q, s[far], float(alpha))
            col[~far] = _log_a_frac(q, s[~far], float(alpha)) / (alpha - 1)
        out[live, m] = col
    return out[0] if scalar else out


def rdp_of_sensitivity(q: float, noise_multiplier: float, ratio, orders=DEFAULT_ORDERS) -> np.ndarray:
    """Per-step RDP of one example whose clipped gradient norm is ``ratio`` × C.

    The step is an SGM with sensitivity s = ratio·C and noise std σC, i.e. with
    effective noise multiplier σ / ratio; ratio 0 costs nothing. σ ∈ [1e-3, 1e6], each
    ratio in [0, 1] (:mod:`analysis.validate`).
    """
    noise_multiplier = validate.noise_multiplier(noise_multiplier)
    ratio = validate.ratios(ratio)
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
    delta = validate.delta(delta)
    if rdp.shape[-1:] != orders.shape:
        raise ParameterError(f"rdp has {rdp.shape[-1:] or 'no'} values per row, orders {orders.size}", "rdp", "orders")
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
    """Data-independent (ε, optimal order) of ``steps`` DP-SGD steps: every example at C.

    q ∈ [1e-12, 1], σ ∈ [1e-3, 1e6], steps whole in [0, 1e9], δ ∈ (0, 1).
    """
    validate.noise_multiplier(noise_multiplier)
    steps = validate.steps(steps, low=0)
    rdp = rdp_sgm(q, noise_multiplier, orders) * steps
    return epsilon_from_rdp(rdp, delta, orders)
