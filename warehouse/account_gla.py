"""The ``gla`` rule over the warehouse: per-instance composition over the runs of one configuration.

Layer: ``warehouse`` (a derived-table job). The rule of Thudi et al. (USENIX Security
2024) bounds the per-instance guarantee in expectation over training runs; its numbers
(order schedule, Hölder weights, step terms, legacy scaling, log-mean-exp) are
:mod:`analysis.gla`. This module reads the records of a configuration's runs, fills
each point's steps hold-last, and writes ``accountings`` and ``point_epsilon`` per run
(:mod:`warehouse.epsilon_tables`) plus the ε of the expectation for ``config_epsilon``.

Why a point's gla ε can exceed the run's data-independent ε (on the GLA fixture every
point's gla ε, 12.1–20.5, is above the run's 11.25; on a digits run the median 4.29
against 3.14): the rule does not compose the per-step RDP at one order, as the
data-independent accountant does. Hölder's inequality with exponent p splits the
expectation of the whole run's privacy loss at every step, bounding the rest of the
run at a larger order (α_{i+1} ≈ α_i · p/(p-1)); each step's term is taken at its
own, growing order and weighted ((p-1)/p)^i / p, and the expectation over runs is a
log-mean-exp (dominated by the runs where the point's norm was large). Each of these
is an inequality that costs something, so with few runs, or norms near the clip C at
most steps, the bound is looser than simply charging every step at C. The
data-independent ε of the run still holds for every point — it is a worst case over
all points and all runs — so a point's privacy is at most the smaller of the two. The
summary says so (:data:`GLA_ABOVE_RUN`) whenever points exceed it, and, as the rdp rule
does, notes points whose optimal α_0 sits at the edge of the α_0 list.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpledger.analysis import composition, gla

from .coverage import FILL

#: The note when gla's per-point ε exceeds the run's data-independent ε (format: n, points, run_epsilon).
GLA_ABOVE_RUN = ("{n} of {points} points have a gla epsilon above the run's data-independent epsilon "
                 "{run_epsilon:.4g}: the Hoelder/expectation bound of the gla rule can be looser than the "
                 "data-independent one, which still holds for every point (a point's epsilon is at most the smaller)")
from .epsilon_tables import check_delta, summary, write_accounting, write_point_epsilon
from .errors import UserError
from .runs import RunInfo
from .sqlutil import transaction


def _ratios(norm: np.ndarray, ridx: np.ndarray, runs: list[RunInfo], legacy: bool) -> np.ndarray:
    """Each row's sensitivity ratio (:func:`analysis.gla.sensitivity`); ``ridx`` is the row's run in ``runs``."""
    c = np.array([r.max_grad_norm for r in runs], dtype=np.float64)[ridx]
    bs = np.array([r.batch_size or np.nan for r in runs], dtype=np.float64)[ridx]
    return gla.sensitivity(norm, c, bs, legacy)


def account_gla_config(con, runs: list[RunInfo], delta_override: float | None,
                       legacy: bool) -> tuple[list[dict], dict]:
    """gla over the runs of one configuration: per-run summaries and the ε of the expectation."""
    if legacy:  # the study's own costs come from its norms as written, not rescaled ones
        rescaled = [r[0] for r in con.execute(
            "SELECT run_id FROM runs WHERE run_id IN (SELECT unnest(?)) AND "
            "coalesce(TRY_CAST(json_extract(config, '$.points_per_query') AS INTEGER), 1) > 1",
            [[r.run_id for r in runs]]).fetchall()]
        if rescaled:
            raise UserError(f"run '{rescaled[0]}' was ingested with points_per_query > 1 (per-example norms); "
                            "legacy_scaling reproduces the study's costs only from its norms as written", "legacy_scaling")
    base = runs[0]
    steps = int(base.steps)
    q, sigma = base.sample_rate, base.noise_multiplier
    rows = con.sql(
        "SELECT run_id, point_id, step, grad_norm FROM point_steps WHERE run_id IN (SELECT unnest($runs)) "
        "ORDER BY point_id, run_id, step",
        params={"runs": [r.run_id for r in runs]},
    ).to_arrow_table()
    ridx = pc.index_in(rows.column("run_id"), value_set=pa.array([r.run_id for r in runs])).to_numpy()
    ratio = _ratios(rows.column("grad_norm").to_numpy(), ridx, runs, legacy)
    point = rows.column("point_id").to_numpy()
    step = rows.column("step").to_numpy()
    last_step = int(step.max())
    p = gla.holder_p(last_step)
    alpha0s = np.asarray(gla.LEGACY_ALPHA0 if legacy else gla.DEFAULT_ALPHA0, dtype=np.float64)
    cap = gla.LEGACY_MAX_ORDER if legacy else None
    schedules = np.stack([gla.order_schedule(a, p, steps, cap) for a in alpha0s])  # (n_a0, T)
    needed = np.unique(schedules)
    pos = np.searchsorted(needed, schedules)
    weights = gla.holder_weights(p, steps)
    pids, pstart = np.unique(point, return_index=True)
    pend = np.append(pstart[1:], len(point))
    n_runs = len(runs)
    per_run = np.zeros((n_runs, len(pids), len(alpha0s)))
    expected = np.zeros((len(pids), len(alpha0s)))
    covered = np.zeros((n_runs, len(pids)))
    present = np.zeros((n_runs, len(pids)), dtype=bool)
    grid_steps = np.arange(steps)
    for k, (a, b) in enumerate(zip(pstart, pend)):
        filled = np.full((n_runs, steps), np.nan)
        for r in range(n_runs):
            sel = slice(a, b)
            mine = ridx[sel] == r
            if not mine.any():
                continue
            s_steps = step[sel][mine]
            s_ratio = ratio[sel][mine]
            at = np.searchsorted(s_steps, grid_steps, side="right") - 1
            ok = at >= 0
            filled[r, ok] = s_ratio[at[ok]]
            covered[r, k] = ok.sum()
            present[r, k] = True
        uniq, inv = np.unique(np.nan_to_num(filled, nan=-1.0), return_inverse=True)
        inv = inv.reshape(filled.shape)
        u = np.where(uniq < 0, 0.0, uniq)
        table = np.stack([gla.terms(q, sigma, u, np.full(u.shape, a_), p, legacy) for a_ in needed])
        missing = np.isnan(filled)
        for m in range(len(alpha0s)):
            terms = table[pos[m][None, :], inv]  # (runs, T)
            terms[missing] = np.nan
            per_run[:, k, m] = gla.compose(terms, weights, alpha0s[m])
            lme = gla.log_mean_exp(terms, axis=0)
            expected[k, m] = gla.compose(lme[None, :], weights, alpha0s[m])[0]
    summaries = []
    for r, run in enumerate(runs):
        delta = delta_override or run.delta
        check_delta(delta, "run delta")
        keep = present[r]
        with transaction(con):
            write_accounting(con, run.run_id, "gla", delta, True, None, alpha0s, holder_p=p, max_order=cap,
                             legacy=legacy)
            eps, edge = write_point_epsilon(con, run.run_id, "gla", pids[keep], per_run[r][keep], covered[r][keep],
                                            delta, True, alpha0s)
        notes = [FILL, f"Hoelder exponent p = {p:g} (3 x last recorded step), alpha_0 in {list(map(int, alpha0s))}"
                       + (", legacy scaling (clipped norm / batch size, orders capped at 50)" if legacy else "")]
        if edge:
            notes.append(f"{edge} points have their optimal alpha_0 at the edge of the alpha_0 list "
                         f"({alpha0s[0]:g} or {alpha0s[-1]:g}); their epsilon is an upper bound that more "
                         "alpha_0 values could tighten")
        out = summary(run, "gla", eps, covered[r][keep], True, delta, notes)
        above = out["points_above_run_epsilon"]
        if above:
            notes.append(GLA_ABOVE_RUN.format(n=above, points=len(eps), run_epsilon=out["run_epsilon"]))
        summaries.append(out)
    delta = delta_override or base.delta
    eps_exp, best_exp = composition.epsilon(expected, delta, alpha0s)
    results = {"point_ids": pids, "epsilon_expected": eps_exp, "best_order_expected": best_exp, "delta": delta}
    return summaries, results
