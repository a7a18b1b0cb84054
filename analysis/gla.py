r"""Layer: ``analysis`` (pure numeric code). Owns the ``gla`` rule's numbers: the order
schedule, the Hölder weights, the step terms, the legacy scaling, log-mean-exp over runs.

Per-instance composition of Thudi et al., "Gradients Look Alike: Sensitivity is
Often Overestimated in DP-SGD" (USENIX Security 2024, arXiv:2307.00310), for the
*sum* update rule, as the paper's published code computes it.

The paper bounds the Rényi divergence of the whole training run for one example x,
in expectation over the training randomness, by applying Hölder's inequality with
exponent p at every step: the step-i term is raised to the power p and the rest of
the run is bounded at a larger order. With α_0 the target order:

* order schedule:  g_0 = α_0,  g_{i+1} = g_i · p/(p-1) - 1/p,  α_i = ⌈g_i⌉
  (the code's ``gpi_alpha``; capped at 50 in the study's script, uncapped here by default);
* step-i term of one run θ:  T_i(θ, x) = p · log A_{α_i}(q, σ / r_i(θ, x)),
  A_α the SGM moment of :mod:`analysis.rdp` and r_i = s_i / C the clipped-norm ratio;
  equivalently p (α_i - 1) RDP_SGM(q, σ/r_i, α_i);
* expectation over runs of one configuration:  c_i(x) = log mean_θ exp T_i(θ, x)
  (log-mean-exp; the code's ``logsumexp(grp) - log(count)``);
* composition:  R(x, α_0) = 1/(α_0 - 1) · Σ_{i=0}^{T-1} ((p-1)/p)^i · (1/p) · c_i(x)
  (the code's ``scale``), an RDP bound at order α_0, converted to (ε, δ) as any RDP;
  dpledger takes the minimum over a set of α_0.

The study sets p = 3 × (last recorded step), which keeps (p/(p-1))^T ≤ e^{1/3}, so
orders grow by at most 40% over the run. We compose every step 0..T-1, each recorded
norm standing for the steps until the next record (the study summed checkpoints).

``legacy=True`` reproduces the study's fork exactly: it fed ``distance (sum)`` (the
clipped norm divided by the batch size) in place of the clipped norm, capped α_i at
50, and evaluated log A as ``logsumexp_k log(C(α,k)(1-q)^{α-k} q^k + 1e-40) + s² k(k-1)/(2σ²)``
with factorial binomials. The default uses the clipped norm itself: the sum update
adds each example's clipped gradient (norm s ≤ C) to noise of std σC, so the
sensitivity relative to the noise is s/C, not s/(C·batch size).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from .composition import clipped_ratio
from .rdp import log_a_int
from . import validate
from .validate import ParameterError

#: α_0 candidates of the default rule (ε is minimised over them).
DEFAULT_ALPHA0 = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)
LEGACY_ALPHA0 = (8,)
LEGACY_MAX_ORDER = 50


def holder_p(last_step: int) -> float:
    """The study's Hölder exponent: 3 × the last recorded step."""
    return 3.0 * max(int(last_step), 1)


def order_schedule(alpha0: float, p: float, steps: int, max_order: int | None = None) -> np.ndarray:
    """α_i for i = 0..steps-1 by the code's recursion (iterated, as it was, for equal rounding).
    α_0 ∈ [1.01, 1e4], p > 1, steps whole in [0, 1e9] (:mod:`analysis.validate`)."""
    validate.order(alpha0, "alpha0")
    validate.in_range("holder_p", p, 1.0, np.inf)
    steps = validate.steps(steps, low=0)
    g = np.empty(steps)
    value = float(alpha0)
    for i in range(steps):
        g[i] = value
        value = value * p / (p - 1) - 1 / p
    orders = np.ceil(g).astype(np.int64)
    if max_order is not None:
        orders = np.minimum(orders, max_order)
    return orders


def holder_weights(p: float, steps: int) -> np.ndarray:
    """((p-1)/p)^i / p for i = 0..steps-1, computed in log space as the code's ``scale``."""
    validate.in_range("holder_p", p, 1.0, np.inf)
    steps = validate.steps(steps, low=0)
    i = np.arange(steps, dtype=np.float64)
    return np.exp(i * math.log(p - 1) - (i + 1) * math.log(p))


def step_terms(q: float, noise_multiplier: float, ratio: np.ndarray, orders: np.ndarray, p: float) -> np.ndarray:
    """T = p · log A_α(q, σ/r) per (ratio, order) pair (arrays of one shape)."""
    ratio = np.asarray(ratio, dtype=np.float64)
    orders = np.asarray(orders)
    out = np.zeros(ratio.shape)
    flat_r, flat_a, flat_out = ratio.ravel(), orders.ravel(), out.ravel()
    for alpha in np.unique(flat_a):
        sel = flat_a == alpha
        r = flat_r[sel]
        live = r > 0
        vals = np.zeros(r.shape)
        if np.any(live):
            vals[live] = log_a_int(q, noise_multiplier / r[live], int(alpha))
        flat_out[sel] = p * vals
    return out


def _legacy_log_a(q: float, sigma: float, s: float, alpha: int) -> float:
    """log A as the study's ``stepi_compo`` evaluates it (kept for exact reproduction)."""
    res = []
    for k in range(alpha + 1):
        binom = math.factorial(alpha) / math.factorial(k) / math.factorial(alpha - k)
        term = binom * math.pow(1 - q, alpha - k) * math.pow(q, k)
        coeff = np.log(term + 1e-40)
        expect = math.pow(s, 2) * k * (k - 1) / (2 * math.pow(sigma, 2))
        res.append(coeff + expect)
    return float(special.logsumexp(res))


def legacy_step_terms(q: float, noise_multiplier: float, s: np.ndarray, orders: np.ndarray, p: float) -> np.ndarray:
    """The study's per-step cost ``(logsumexp / (α-1)) · p · (α-1)``, value for value."""
    s = np.asarray(s, dtype=np.float64)
    orders = np.asarray(orders)
    out = np.empty(s.shape)
    cache: dict[tuple[float, int], float] = {}
    for idx in np.ndindex(s.shape):
        key = (float(s[idx]), int(orders[idx]))
        if key not in cache:
            alpha = key[1]
            cache[key] = _legacy_log_a(q, noise_multiplier, key[0], alpha) / (alpha - 1) * p * (alpha - 1)
        out[idx] = cache[key]
    return out


def sensitivity(grad_norm, max_grad_norm, batch_size=None, legacy: bool = False) -> np.ndarray:
    """The ratio each step term is evaluated at: r = min(norm, C)/C, or with ``legacy`` the
    study's s = norm / batch size (not clipped, not divided by C). The one definition of
    the legacy scaling (the SQL view ``point_step_cost`` calls it through ``gla_ratio``).
    """
    if not legacy:
        return clipped_ratio(grad_norm, max_grad_norm)
    bs = np.asarray(batch_size if batch_size is not None else np.nan, dtype=np.float64)
    if np.any(np.isnan(bs)):
        raise ParameterError("legacy_scaling needs the runs' batch_size", "legacy_scaling")
    return np.asarray(grad_norm, dtype=np.float64) / bs


def terms(q: float, noise_multiplier: float, ratio: np.ndarray, orders: np.ndarray, p: float,
          legacy: bool = False) -> np.ndarray:
    """The step terms of the rule: :func:`step_terms`, or the study's own :func:`legacy_step_terms`."""
    if legacy:
        return legacy_step_terms(q, noise_multiplier, ratio, orders, p)
    return step_terms(q, noise_multiplier, ratio, orders, p)


def log_mean_exp(terms: np.ndarray, axis: int = 0) -> np.ndarray:
    """log of the mean of exp(terms) over runs (NaN entries, steps a run did not cover, skipped)."""
    terms = np.asarray(terms, dtype=np.float64)
    present = ~np.isnan(terms)
    n = present.sum(axis=axis)
    filled = np.where(present, terms, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = special.logsumexp(filled, axis=axis) - np.log(n)
    return np.where(n > 0, out, np.nan)


def compose(costs: np.ndarray, weights: np.ndarray, alpha0: float) -> np.ndarray:
    """R(α_0) = Σ_i w_i c_i / (α_0 - 1) over the last axis (steps); NaN steps are skipped."""
    c = np.where(np.isnan(costs), 0.0, costs)
    return (c @ weights) / (alpha0 - 1)
