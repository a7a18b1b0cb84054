r"""Summary statistics linking per-example privacy, memorization and input curvature,
as reported by Ravikumar et al., "Unveiling Privacy, Memorization, and Input
Curvature Links" (ICML 2024) and Garg et al., "Memorization Through the Lens of
Curvature of Loss Function Around Samples" (ICML 2024).

* rank (Spearman) and linear (Pearson) correlation and cosine similarity between
  each pair of per-example scores, over the points that have both;
* top-k overlap: |top_k(a) ∩ top_k(b)| / k, the share of the k highest-scoring
  points two scores agree on. When ties straddle the k-th place (18% of a demo run's
  points pay exactly the run's ε: clipped at every step) "the top k" is not one set, and
  breaking ties by position gave an arbitrary number (often 0). So ties are broken at
  random, in expectation: a point above a score's k-th value is in its top k for sure, a
  point tied with it with probability (places left)/(points tied), and the overlap is
  Σ_i P_a(i) P_b(i) / k (the two tie-breaks independent). Without ties this is the plain
  overlap; ``topk_tied`` says when ties made it an expectation;
* the bound check of Ravikumar et al.: for an (ε, δ)-DP learner, P[correct | in] ≤
  e^ε P[correct | out] + δ, so mem = P_in − P_out ≤ 1 − e^{−ε} + δ e^{−ε}; the fraction of
  points whose estimated memorization respects it at their per-example ε;
* per-group summaries (mean / median / max) by class or attribute.

Layer: ``analysis`` (pure numeric code; imports no other project package). The
warehouse job that feeds it is :mod:`warehouse.point_links`.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy import stats


def _both(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def cosine(a, b) -> float:
    a, b = _both(a, b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _top_probability(x: np.ndarray, k: int) -> np.ndarray:
    """P(point i is among the k highest of x) when ties are broken uniformly at random."""
    kth = np.sort(x)[::-1][k - 1]
    above = x > kth
    tied = x == kth
    return np.where(above, 1.0, np.where(tied, (k - above.sum()) / tied.sum(), 0.0))


def topk_ties(a, b, k: int) -> bool:
    """True when ties straddle the k-th place of ``a`` or ``b`` (over the points with both)."""
    a, b = _both(a, b)
    if k < 1 or a.size == 0:
        return False
    k = min(k, a.size)
    return any(0 < p < 1 for x in (a, b) for p in np.unique(_top_probability(x, k)))


def topk_overlap(a, b, k: int) -> float:
    """Expected share of the k highest points of ``a`` that are among the k highest of ``b``,
    ties broken at random (points missing either score are left out first); without ties,
    |top_k(a) ∩ top_k(b)| / k."""
    a, b = _both(a, b)
    if k < 1 or a.size == 0:
        return float("nan")
    k = min(k, a.size)
    return float(_top_probability(a, k) @ _top_probability(b, k) / k)


def pair_stats(df: pd.DataFrame, columns: list[str], k: int = 10) -> pd.DataFrame:
    """One row per pair of score columns: n, Spearman, Pearson, cosine, top-k overlap (expected
    over random tie-breaks) and ``topk_tied`` (ties straddled the k-th place, so it is an expectation)."""
    rows = []
    for x, y in itertools.combinations(columns, 2):
        a, b = _both(df[x], df[y])
        n = len(a)
        enough = n >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0
        rows.append({
            "a": x, "b": y, "n": n,
            "spearman": float(stats.spearmanr(a, b).statistic) if enough else float("nan"),
            "pearson": float(stats.pearsonr(a, b).statistic) if enough else float("nan"),
            "cosine": cosine(a, b),
            "topk_overlap": topk_overlap(df[x], df[y], k),
            "topk_tied": topk_ties(df[x], df[y], k),
            "k": min(k, n),
        })
    return pd.DataFrame(rows, columns=["a", "b", "n", "spearman", "pearson", "cosine", "topk_overlap", "topk_tied",
                                       "k"])


def bound_check(memorization, epsilon, delta: float = 0.0) -> dict:
    """Fraction of points with mem <= 1 - exp(-eps) + delta exp(-eps) (Ravikumar et al.)."""
    mem, eps = _both(memorization, epsilon)
    if mem.size == 0:
        return {"n": 0, "fraction_within_bound": float("nan"), "max_excess": float("nan")}
    bound = -np.expm1(-eps) + delta * np.exp(-eps)
    return {"n": int(mem.size), "fraction_within_bound": float(np.mean(mem <= bound + 1e-12)),
            "max_excess": float(np.max(mem - bound))}


def group_summary(df: pd.DataFrame, by: str, columns: list[str]) -> pd.DataFrame:
    """Mean, median and max of each score per group (class label or attribute value)."""
    present = [c for c in columns if c in df and df[c].notna().any()]
    g = df.groupby(by, dropna=True)[present]
    out = g.agg(["mean", "median", "max"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    out.insert(0, "n", g.size())
    return out.reset_index().rename(columns={by: "group"})
