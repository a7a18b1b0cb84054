"""``dpledger report``: what the warehouse knows about a run, as one offline HTML file.

Layer: ``warehouse`` (a job that reads). Owns the report's data frames
(:func:`report_frames`) and their assembly into a page (:func:`build_report`); the
charts are :mod:`analysis.charts`, the page :mod:`analysis.html_report`, and the
cumulative ε curves compose through :mod:`analysis.composition`.

Every number is read on a read-only connection and aggregated in SQL or per point
before it reaches a chart (:mod:`analysis.charts`); the page is assembled by
:mod:`analysis.html_report`. The frames are also returned by :func:`report_frames` so a
notebook can draw the same charts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from dpledger.analysis import charts, composition, fits, grid, rdp
from dpledger.analysis.html_report import Section, write_report

from .account_pld import PLD_MEANING
from .account_rdp import ensure_grid
from .coverage import coverage, stream
from .db import connect
from .epsilon_tables import NotAccounted
from .errors import UserError
from .fit_table import run_records
from .rank import reference_epsilon
from .runs import RunInfo, load_run, require_run

MEANING = [
    "Per-example epsilon (rule rdp) composes each example's per-step Rényi DP, with sensitivity its own clipped "
    "gradient norm, over the run's recorded steps: the output-specific individual privacy of Yu et al. (TMLR 2023), "
    "a statement about this training trajectory, on which the norms depend.",
    "Rule gla (Thudi et al., USENIX Security 2024) bounds the per-instance guarantee in expectation over the "
    "training runs of one configuration.",
    "Neither replaces the data-independent epsilon of the run, the guarantee DP-SGD gives every example; it is "
    "shown beside every per-example number.",
]


#: Quantiles of the points' cumulative ε drawn as bands over training (pairs q, 1 - q; 0.5 the median line).
BAND_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: The most points the bands are computed over (a fixed-seed sample above it, said in the chart).
BAND_MAX_POINTS = 5000
#: What orders points of equal ε (ties): the gallery and the labelled curves say so.
TIE_KEY = "mean recorded gradient norm"


@dataclass
class RunFrames:
    run: dict
    epsilon: pd.DataFrame
    run_epsilon: float | None
    ranks: pd.DataFrame
    curves: pd.DataFrame
    gallery: pd.DataFrame
    by_label: pd.DataFrame
    by_attr: dict[str, pd.DataFrame] = field(default_factory=dict)
    rank_pairs: pd.DataFrame | None = None
    rank_matrix: pd.DataFrame | None = None
    curvature: pd.DataFrame | None = None
    memorization: pd.DataFrame | None = None
    training: pd.DataFrame | None = None
    #: step, quantile, cumulative_cost: the spread of all points' cumulative ε over training
    bands: pd.DataFrame | None = None
    #: points the bands cover, and points accounted (more when the bands use a sample)
    band_points: int = 0
    points_total: int = 0
    #: per gallery group, a line on how ties were broken (only where a tie is split)
    gallery_notes: dict[str, str] = field(default_factory=dict)
    mia: pd.DataFrame | None = None
    #: per-point mean recorded training loss (shown for runs without DP)
    losses: pd.DataFrame | None = None
    #: (section, why it is not in the report)
    left_out: list[tuple[str, str]] = field(default_factory=list)


def _df(con, sql: str, params: dict | None = None) -> pd.DataFrame:
    return con.sql(sql, params=params or None).df()


def _cumulative_frame(point_id, step, composed_running, delta: float, orders) -> pd.DataFrame:
    eps, _ = composition.epsilon(composed_running, delta, orders)
    return pd.DataFrame({"point_id": point_id, "step": step, "cumulative_cost": eps})


def cumulative_epsilon(con, run: RunInfo, point_ids: list[int]) -> pd.DataFrame:
    """ε spent by each point after each recorded step (rdp composition, exact, hold-last)."""
    if not point_ids:
        return pd.DataFrame(columns=["point_id", "step", "cumulative_cost"])
    cov = coverage(con, run)
    parts = [(idx, step, ratio, np.ones(len(idx)) if covers is None else covers)
             for idx, step, ratio, covers in stream(con, run, cov, only=point_ids)]
    idx, step, ratio, covers = (np.concatenate(c) for c in zip(*parts)) if parts else [np.empty(0)] * 4
    order = np.lexsort((step, idx))
    idx, step, ratio, covers = idx[order], step[order], ratio[order], covers[order]
    orders = np.asarray(rdp.DEFAULT_ORDERS)
    per_step = composition.step_rdp(run.sample_rate, run.noise_multiplier, ratio, orders)
    out = []
    for i in np.unique(idx):
        rows = idx == i
        curve = composition.cumulative(per_step[rows], covers[rows])
        out.append(_cumulative_frame(cov.point_ids[i], step[rows] + covers[rows], curve, run.delta, orders))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["point_id", "step", "cumulative_cost"])


def _cumulative_from_dense(run: RunInfo, ratios: np.ndarray, point_ids, every: int, table) -> pd.DataFrame:
    out = []
    for pid, r in zip(point_ids, ratios):
        per_step = grid.interpolate(table, r)  # the fast path's chords: a dense fill has a new ratio every step
        curve = composition.cumulative(per_step)[every - 1::every]
        out.append(_cumulative_frame(pid, np.arange(every, len(r) + 1, every), curve, run.delta, table.orders))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["point_id", "step", "cumulative_cost"])


def fitted_curves(con, run: RunInfo, groups: dict[str, list[int]], methods=("linear", "pchip")) -> pd.DataFrame:
    """Cumulative ε of the plotted points under fills between checkpoints (analysis.fits)."""
    pids, steps, values = run_records(con, run)
    index = {int(p): i for i, p in enumerate(pids)}
    n_steps = int(run.steps)
    every = max(1, n_steps // 400)  # ~400 points per curve
    table = grid.tabulate(run.sample_rate, run.noise_multiplier)
    parts = []
    for method in methods:
        f = fits.fit(method, steps, values)
        for group, ids in groups.items():
            rows = [index[p] for p in ids if p in index]
            dense = f.fill(n_steps, points=np.asarray(rows, dtype=np.int64))
            parts.append(_cumulative_from_dense(run, dense, [int(pids[i]) for i in rows], every, table)
                         .assign(group=group, kind=method))
    return pd.concat(parts, ignore_index=True)


def _grid_table(con, run: RunInfo) -> grid.RdpTable:
    """The fast path's table of the run: the one ``account`` stored in rdp_grid (same grid size), else tabulated."""
    size = con.execute("SELECT grid_size FROM accountings WHERE run_id = ? AND rule = 'rdp' AND NOT exact",
                       [run.run_id]).fetchall()
    size = int(size[0][0]) if size and size[0][0] else grid.DEFAULT_GRID
    try:  # reads the stored table; on a read-only connection it cannot store a missing one
        return ensure_grid(con, run.sample_rate, run.noise_multiplier, size)
    except duckdb.Error:
        return grid.tabulate(run.sample_rate, run.noise_multiplier, size)


def cumulative_bands(con, run: RunInfo, quantiles=BAND_QUANTILES, n_eval: int = 80,
                     max_points: int = BAND_MAX_POINTS, chunk: int = 400, seed: int = 0) -> tuple[pd.DataFrame, int]:
    """Quantiles over points of the cumulative ε after each of ~``n_eval`` evenly spaced steps: (frame, points used).

    The frame has ``step, quantile, cumulative_cost``. Each point's per-step RDP is the
    fast path's chord (:func:`analysis.grid.interpolate`, an upper bound, as ``account``
    computes it) at its recorded ratio, held until its next record (the coverage rule);
    its composed RDP after step e is converted to ε at the run's δ. Above ``max_points``
    points a fixed-seed sample of ``max_points`` is used. Works in chunks of points, so
    memory stays at chunk × n_eval × orders whatever the run's size.
    """
    cov = coverage(con, run)
    pids = cov.point_ids
    if len(pids) == 0:
        return pd.DataFrame(columns=["step", "quantile", "cumulative_cost"]), 0
    if len(pids) > max_points:
        pids = np.sort(np.random.default_rng(seed).choice(pids, max_points, replace=False))
    evals = np.unique(np.clip(np.round(np.linspace(0, cov.run_steps, n_eval + 1)[1:]), 1, None).astype(np.int64))
    table = _grid_table(con, run)
    n_orders, n_e = len(table.orders), len(evals)
    finals = []
    for start in range(0, len(pids), chunk):
        ids = pids[start:start + chunk]
        local = np.searchsorted(ids, cov.point_ids)  # cov index -> row of this chunk (checked below)
        full = np.zeros(((len(ids)) * (n_e + 1), n_orders))
        part = np.zeros((len(ids) * n_e, n_orders))
        for idx, step, ratio, covers in stream(con, run, cov, batch_rows=1 << 16, only=ids.tolist()):
            rows = local[idx]
            covers = np.ones(len(idx)) if covers is None else np.asarray(covers, dtype=np.float64)
            rho = grid.interpolate(table, ratio)
            end = step + covers
            b = np.searchsorted(evals, end, side="left")  # first evaluation at or after the covered span's end
            np.add.at(full, rows * (n_e + 1) + b, rho * covers[:, None])
            lo = np.searchsorted(evals, step, side="right")  # evaluations strictly inside (step, end)
            inside = b - lo
            if inside.any():
                r = np.repeat(np.arange(len(idx)), inside)
                e = np.concatenate([np.arange(a, c) for a, c in zip(lo[inside > 0], b[inside > 0])])
                np.add.at(part, rows[r] * n_e + e, rho[r] * (evals[e] - step[r])[:, None])
        composed = np.cumsum(full.reshape(len(ids), n_e + 1, n_orders), axis=1)[:, :n_e, :]
        composed = composed + part.reshape(len(ids), n_e, n_orders)
        eps, _ = composition.epsilon(composed.reshape(-1, n_orders), run.delta, table.orders)
        finals.append(eps.reshape(len(ids), n_e))
    eps = np.concatenate(finals, axis=0)
    qs = np.asarray(quantiles, dtype=np.float64)
    values = np.quantile(eps, qs, axis=0)  # (quantiles, evals)
    frame = pd.DataFrame({"step": np.tile(evals, len(qs)), "quantile": np.repeat(qs, n_e),
                          "cumulative_cost": values.reshape(-1)})
    return frame, len(pids)


def _mean_norms(con, run_id: str) -> pd.DataFrame:
    return _df(con, "SELECT point_id, avg(grad_norm) AS mean_norm FROM point_steps WHERE run_id = $run "
                    "GROUP BY point_id", {"run": run_id})


def order_points(eps: pd.DataFrame, norms: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The points cheapest first and dearest first, ties ordered by :data:`TIE_KEY`, then point id.

    Both frames have ``point_id, epsilon, mean_norm, rank`` where ``rank`` is SQL's
    ``rank()`` (equal ε, equal rank; the next rank skips) from the cheapest resp. the
    dearest end. Among equal ε the cheapest end puts the smallest mean norm first, the
    dearest end the largest (the point closest to the clip at every step).
    """
    d = eps[["point_id", "epsilon"]].merge(norms, on="point_id", how="left") if not norms.empty else \
        eps[["point_id", "epsilon"]].assign(mean_norm=np.nan)
    d = d.dropna(subset=["epsilon"])
    low = d.sort_values(["epsilon", "mean_norm", "point_id"], ascending=[True, True, True], kind="stable",
                        na_position="last").assign(rank=lambda x: x.epsilon.rank(method="min").astype(int))
    high = d.sort_values(["epsilon", "mean_norm", "point_id"], ascending=[False, False, True], kind="stable",
                         na_position="last").assign(rank=lambda x: x.epsilon.rank(method="min", ascending=False).astype(int))
    return low.reset_index(drop=True), high.reset_index(drop=True)


def _tie_note(ordered: pd.DataFrame, k: int, end: str, run_eps: float | None) -> str:
    """One line when the k shown of one end split a tie (more points share the k-th ε than are shown)."""
    if len(ordered) <= k:
        return ""
    last = ordered.epsilon.iloc[k - 1]
    tied = int((ordered.epsilon == last).sum())
    shown = int((ordered.epsilon.iloc[:k] == last).sum())
    if tied <= shown:
        return ""
    at_run = run_eps is not None and np.isclose(last, run_eps, rtol=1e-9, atol=0)
    what = f"ε = {last:.4g}" + (" (the run's data-independent ε: clipped at every step)" if at_run else "")
    key = "largest" if end == "highest" else "smallest"
    return f"{tied} points tie at {what}; shown: the {shown} of them with the {key} {TIE_KEY}, then lowest point id"


def _picked_points(low: pd.DataFrame, high: pd.DataFrame, few: bool = False) -> list[tuple[str, int, float]]:
    """A few points of distinct ε along the distribution, dearest first: (label, point id, ε).

    The dearest and the cheapest (ties broken as in :func:`order_points`) and the points
    nearest the 75th, 50th and 25th percentile of ε (``few``: the median only); a point
    whose ε equals one already picked is skipped, so no two lines coincide at the end.
    """
    if low.empty:
        return []
    eps = low.epsilon.to_numpy()
    picks = [("dearest", high.iloc[0])]
    middle = (("median", 0.5),) if few else (("75th percentile", 0.75), ("median", 0.5), ("25th percentile", 0.25))
    for name, q in middle:
        target = np.quantile(eps, q, method="nearest")
        picks.append((name, low.iloc[int(np.argmin(np.abs(eps - target)))]))
    picks.append(("cheapest", low.iloc[0]))
    out, seen = [], []
    for name, row in picks:
        e = float(row.epsilon)
        if any(np.isclose(e, s, rtol=1e-9, atol=1e-12) for s in seen):
            continue
        seen.append(e)
        out.append((f"{name}: point {int(row.point_id)} (ε {e:.4g})", int(row.point_id), e))
    return out


def _thumbnails(con, dataset, ids: list[int]) -> pd.DataFrame:
    return _df(con, "SELECT point_id, thumbnail FROM points WHERE dataset = $ds AND point_id IN (SELECT unnest($ids))",
               {"ds": dataset, "ids": ids})


def _training(con, run: dict, run_id: str) -> pd.DataFrame | None:
    train = _df(con, "SELECT s.run_id, s.step, r.private, s.loss, s.test_accuracy, s.wall_s, s.peak_mem_bytes "
                     "FROM steps s JOIN runs r USING (run_id) WHERE r.dataset = $ds AND "
                     "r.run_id IN (SELECT run_id FROM runs WHERE dataset = $ds ORDER BY run_id = $run DESC, run_id "
                     "LIMIT 8)", {"ds": run["dataset"], "run": run_id})
    if train.empty:
        return None
    return train.melt(id_vars=["run_id", "step", "private"], value_vars=["loss", "test_accuracy", "wall_s", "peak_mem_bytes"],
                      var_name="metric", value_name="value").dropna(subset=["value"])


def _by_attr(con, run: dict, run_id: str, rule: str) -> dict[str, pd.DataFrame]:
    attrs = _df(con, "SELECT pe.epsilon, p.attrs FROM point_epsilon pe JOIN points p "
                     "ON p.dataset = $ds AND p.point_id = pe.point_id "
                     "WHERE pe.run_id = $run AND pe.rule = $rule AND p.attrs IS NOT NULL",
                {"ds": run["dataset"], "run": run_id, "rule": rule})
    out: dict[str, pd.DataFrame] = {}
    if attrs.empty:
        return out
    # attrs["attrs"], not attrs.attrs: DataFrame.attrs is pandas' own metadata dict
    parsed = attrs["attrs"].map(lambda a: json.loads(a) if isinstance(a, str) else (a if isinstance(a, dict) else {}))
    parsed = parsed.map(lambda d: d if isinstance(d, dict) else {})
    for key in sorted({k for d in parsed for k in d}):
        out[key] = pd.DataFrame({"group": parsed.map(lambda d: d.get(key)), "epsilon": attrs["epsilon"]})
    return out


def _private_frames(con, run_id: str, run: dict) -> RunFrames:
    """A run trained without DP: no per-example ε; training curves and per-point losses."""
    empty = pd.DataFrame(columns=["point_id", "epsilon", "best_order"])
    losses = _df(con, "SELECT point_id, mean_loss, cumulative_loss, n_steps FROM point_cumulative_loss "
                      "WHERE run_id = $run", {"run": run_id})
    f = RunFrames(run, empty, None, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(),
                  training=_training(con, run, run_id), losses=None if losses.empty else losses)
    return f


def report_frames(con, run_id: str, rule: str = "rdp", k: int = 10) -> RunFrames:
    """Everything the report draws for one run, as data frames (a non-private run: training and losses only)."""
    require_run(con, run_id)
    run = _df(con, "SELECT * FROM runs WHERE run_id = $run", {"run": run_id}).iloc[0].to_dict()
    if run.get("private") is not None and not pd.isna(run.get("private")) and not bool(run["private"]):
        return _private_frames(con, run_id, run)
    eps = _df(con, "SELECT point_id, epsilon, best_order FROM point_epsilon WHERE run_id = $run AND rule = $rule",
              {"run": run_id, "rule": rule})
    if eps.empty:
        raise NotAccounted(run_id, rule)
    run_eps = _df(con, "SELECT epsilon FROM run_epsilon WHERE run_id = $run", {"run": run_id}).epsilon.iloc[0]
    run_eps = None if pd.isna(run_eps) else float(run_eps)
    if rule == "pld":  # the PLD per-example ε compares to the run's data-independent PLD ε
        run_eps = reference_epsilon(con, run_id, rule)
    ranks = _df(con, "SELECT point_id, label, epsilon, rank_lowest, rank_highest FROM point_rank "
                     "WHERE run_id = $run AND rule = $rule", {"run": run_id, "rule": rule})
    labels = _df(con, "SELECT point_id, label FROM points WHERE dataset = $ds AND point_id IN "
                      "(SELECT point_id FROM point_epsilon WHERE run_id = $run AND rule = $rule)",
                 {"ds": run["dataset"], "run": run_id, "rule": rule})
    low, high = order_points(eps, _mean_norms(con, run_id))
    n = len(low)
    k_shown = max(1, min(k, n // 2)) if n > 1 else 1  # never the same point in both blocks
    groups = [("lowest", low.head(k_shown))] + ([("highest", high.head(k_shown))] if n > 1 else [])
    picked = pd.concat([g.assign(group=name) for name, g in groups], ignore_index=True)
    notes = {name: _tie_note(o, k_shown, name, run_eps) for name, o in (("lowest", low), ("highest", high))}
    left_out: list[tuple[str, str]] = []
    thumbs = _thumbnails(con, run["dataset"], picked.point_id.astype(int).tolist())
    gallery = pd.DataFrame(columns=["point_id", "label", "epsilon", "rank", "group", "thumbnail"])
    if thumbs.thumbnail.notna().any():
        gallery = (picked.merge(labels, on="point_id", how="left").merge(thumbs, on="point_id", how="left")
                   [["point_id", "label", "epsilon", "rank", "group", "thumbnail"]])
    else:
        left_out.append(("Gallery of the lowest- and highest-ε points",
                         f"the points of dataset {run['dataset']} have no images in the warehouse "
                         "(e.g. imported norms such as GLA-CSV files carry none)"))
    curves = pd.DataFrame(columns=["point_id", "step", "cumulative_cost", "kind", "label", "group"])
    bands, band_points = None, 0
    if run.get("noise_multiplier") is not None and run.get("max_grad_norm") is not None:
        info = load_run(con, run_id)
        checkpoints = coverage(con, info).checkpoints_only
        chosen = _picked_points(low, high, few=checkpoints)  # with fits, 3 curves a point: fewer points
        label_of = {pid: label for label, pid, _ in chosen}
        recorded = cumulative_epsilon(con, info, list(label_of))
        parts = [recorded.assign(kind="recorded", label=recorded.point_id.map(label_of))] if chosen else []
        if checkpoints:  # norms at checkpoints only: overlay fills
            fitted = fitted_curves(con, info, {label: [pid] for label, pid, _ in chosen})
            parts.append(fitted.rename(columns={"group": "label"}))
        if parts:
            curves = pd.concat(parts, ignore_index=True)[["point_id", "step", "cumulative_cost", "kind", "label"]]
            median = float(np.median(low.epsilon))  # group: for charts.cost_curves (two panels), as before
            side = {pid: ("highest" if e >= median else "lowest") for _, pid, e in chosen}
            curves["group"] = curves.point_id.map(side)
        bands, band_points = cumulative_bands(con, info)
    by_label = _df(con, "SELECT CAST(p.label AS VARCHAR) AS \"group\", pe.epsilon FROM point_epsilon pe "
                        "JOIN points p ON p.dataset = $ds AND p.point_id = pe.point_id "
                        "WHERE pe.run_id = $run AND pe.rule = $rule AND p.label IS NOT NULL",
                   {"ds": run["dataset"], "run": run_id, "rule": rule})
    if by_label.empty:
        left_out.append(("ε per class", f"the points of dataset {run['dataset']} have no labels in the warehouse"))
    frames = RunFrames(run, eps, run_eps, ranks, curves, gallery, by_label, _by_attr(con, run, run_id, rule),
                       bands=bands, band_points=band_points, points_total=n, gallery_notes=notes)
    siblings = _df(con, "SELECT DISTINCT pe.run_id FROM point_epsilon pe JOIN runs r USING (run_id) "
                        "WHERE r.config_key = $key AND pe.rule = $rule ORDER BY 1",
                   {"key": run["config_key"], "rule": rule}).run_id.tolist()
    if len(siblings) > 1:
        rk = _df(con, "SELECT run_id, point_id, epsilon FROM point_epsilon WHERE rule = $rule AND run_id IN "
                      "(SELECT unnest($runs))", {"rule": rule, "runs": siblings})
        rk["rank_lowest"] = rk.groupby("run_id").epsilon.rank(method="min")
        wide = rk.pivot(index="point_id", columns="run_id", values="rank_lowest")
        other = next(r for r in siblings if r != run_id)
        pair = wide[[run_id, other]].dropna()
        frames.rank_pairs = pd.DataFrame({"point_id": pair.index, "rank_a": pair[run_id].to_numpy(),
                                          "rank_b": pair[other].to_numpy()}).assign(run_b=other)
        cells = []
        for a in wide.columns:
            for b in wide.columns:
                both = wide[[a, b]].dropna()
                cells.append({"run_a": a, "run_b": b, "spearman": charts.spearman(both[a], both[b])})
        frames.rank_matrix = pd.DataFrame(cells)
    else:
        left_out.append(("Rank stability across runs",
                         f"no other run of this configuration is accounted under rule {rule} "
                         "(train more seeds with the same parameters, then account them)"))
    linked = _df(con, "SELECT point_id, epsilon, curvature, memorization, mia_advantage FROM point_links "
                      "WHERE run_id = $run AND rule = $rule", {"run": run_id, "rule": rule})
    if linked.curvature.notna().any():
        frames.curvature = linked.dropna(subset=["curvature"])[["point_id", "epsilon", "curvature"]]
    else:
        left_out.append(("ε vs input-loss curvature", "no curvature scored for this run yet (the curvature command scores it)"))
    if linked.memorization.notna().any():
        frames.memorization = linked.dropna(subset=["memorization"])[["point_id", "epsilon", "memorization"]]
    else:
        left_out.append(("ε vs memorization", "no memorization scores: neither subset-trained runs of this run's study "
                                              "nor imported scores for its dataset"))
    if linked.mia_advantage.notna().any():
        frames.mia = linked.dropna(subset=["mia_advantage"])[["point_id", "epsilon", "mia_advantage"]]
    else:
        left_out.append(("ε vs membership inference (LiRA)",
                         "this run's study has no subset-trained runs to score membership inference on"))
    frames.training = _training(con, run, run_id)
    if frames.training is None:
        left_out.append(("Training curves", "no per-step training statistics recorded for this run's dataset"))
    frames.left_out = left_out
    return frames



def _num(x):
    """A JSON number (int or float) or None for missing/NaN/inf; anything else unchanged."""
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    try:
        if pd.isna(x):
            return None
    except (TypeError, ValueError):
        pass
    return x


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


#: The summary's fields, in the order of the HTML table, with their display labels.
SUMMARY_LABELS = {
    "run_id": "run", "dataset": "dataset", "model": "model", "private": "trained with DP-SGD",
    "sample_rate": "sample rate q", "noise_multiplier": "noise multiplier σ", "max_grad_norm": "clipping norm C",
    "steps": "steps", "delta": "δ", "run_epsilon": "data-independent ε",
    "run_epsilon_pld": "data-independent ε (PLD accountant)", "rule": "composition rule",
    "points_accounted": "points accounted", "points_at_max": "points at the highest ε (tied)",
    "points_partial": "points with norms for part of the steps",
    "test_accuracy": "test accuracy (last evaluation)",
}
_QUANTILES = (("epsilon_min", 0.0), ("epsilon_p05", 0.05), ("epsilon_p25", 0.25), ("epsilon_median", 0.5),
              ("epsilon_p75", 0.75), ("epsilon_p95", 0.95), ("epsilon_max", 1.0))


def _summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The HTML table: display labels and formatted values (ε quantiles on two lines)."""
    rows = []
    for key, label in SUMMARY_LABELS.items():
        if key not in summary:
            continue
        value = summary[key]
        rows.append((label, "not recorded" if value is None and key == "test_accuracy" else _fmt(value)))
        if key == "points_accounted" and "epsilon_min" in summary:
            q = [summary[k] for k, _ in _QUANTILES]
            rows.append(("per-example ε: min / 5% / 25% / median", " / ".join(f"{v:.3f}" for v in q[:4])))
            rows.append(("per-example ε: 75% / 95% / max", " / ".join(f"{v:.3f}" for v in q[4:])))
        if key == "points_accounted":
            for acct in ACCOUNTANTS:
                if f"{acct}_epsilon_min" in summary:
                    q = [summary[f"{acct}_{k}"] for k, _ in _QUANTILES]
                    rows.append((f"per-example ε ({acct.upper()} accountant): min / 5% / 25% / median / 75% / 95% / max",
                                 " / ".join(f"{v:.3f}" for v in q)))
    return rows


#: The two accountants of the per-step sum composition, as ``point_epsilon`` labels.
ACCOUNTANTS = ("rdp", "pld")
#: What the difference between the two accountants' per-example ε means (the report's line).
ACCOUNTANT_DIFFERENCE = (
    "Per-example ε under both accountants of the same per-step composition: RDP's conversion to (ε, δ) is loose, the "
    "PLD accountant is tight (10-20% lower for DP-SGD), so the difference is slack of the RDP bound, not privacy the "
    "points pay more or less. " + PLD_MEANING
)


def _accountant_quantiles(con, run_id: str) -> dict:
    """``rdp_epsilon_min`` ... and ``pld_epsilon_min`` ... (quantiles of :data:`_QUANTILES`) and
    ``run_epsilon_pld``, when the run is accounted under both accountants; else {}."""
    got = {}
    for acct in ACCOUNTANTS:
        eps = con.execute("SELECT epsilon FROM point_epsilon WHERE run_id = ? AND rule = ? AND isfinite(epsilon)",
                          [run_id, acct]).fetchnumpy()["epsilon"]
        if len(eps) == 0:
            return {}
        got.update({f"{acct}_{key}": float(v)
                    for (key, _), v in zip(_QUANTILES, np.quantile(np.asarray(eps, dtype=np.float64),
                                                                    [p for _, p in _QUANTILES]))})
    got["run_epsilon_pld"] = _num(reference_epsilon(con, run_id, "pld"))
    return got


def _training_text(training: pd.DataFrame, run_id: str) -> str:
    others = training.loc[training.run_id != run_id, "run_id"].nunique()
    text = "Loss, test accuracy, step time and peak memory per step"
    if not others:
        return text + " of this run (the only run of its dataset with per-step statistics)."
    return text + (f"; this run (thick, on top) beside {others} other run{'s' if others > 1 else ''} of its dataset "
                   "(at most 7 shown), DP-SGD solid and non-private dashed.")


def _left_out_section(left_out: list[tuple[str, str]]) -> list[Section]:
    if not left_out:
        return []
    return [Section("Not in this report", None, "Sections left out for lack of data, one line each:",
                    items=[f"{title}: {why}." for title, why in left_out])]


def build_report(con, run_id: str, out: str | os.PathLike, png_dir: str | os.PathLike | None = None,
                 rule: str = "rdp", k: int = 10) -> dict:
    """Write the HTML report of one run (and PNGs).

    Returns ``{"html", "pngs", "summary", "sections", "left_out"}``: ``summary`` maps
    field names (``run_id``, ``sample_rate``, ``run_epsilon``, ``epsilon_min``,
    ``epsilon_median``, ...) to numbers (None when unknown), ``sections`` lists the
    titles drawn, ``left_out`` the sections missing for lack of data as
    ``{"section", "reason"}``. The HTML shows the same summary with display labels.
    """
    f = report_frames(con, run_id, rule, k)
    run = f.run
    acc = con.execute("SELECT test_accuracy FROM steps WHERE run_id = ? AND test_accuracy IS NOT NULL "
                      "AND NOT isnan(test_accuracy) ORDER BY step DESC LIMIT 1", [run_id]).fetchall()
    private = run.get("private")
    private = True if private is None or pd.isna(private) else bool(private)
    summary = {"run_id": run_id, "dataset": run.get("dataset"), "model": run.get("model"), "private": private}
    mechanism = ("sample_rate", "noise_multiplier", "max_grad_norm", "steps", "delta") if private else \
        ("sample_rate", "steps")  # without DP there is no noise, clipping or δ to show
    summary.update({key: _num(run.get(key)) for key in mechanism})
    if not private:
        summary["test_accuracy"] = _num(acc[0][0]) if acc else None
        notes = ["This run was trained without differential privacy (private = false): it has no per-example ε and no "
                 "data-independent ε. Shown: what the warehouse holds for it, its training curves and the training "
                 "loss of each point; compare with the DP-SGD runs of its dataset."]
        sections = []
        if f.training is not None:
            sections.append(Section("Training curves", charts.training_curves(f.training, highlight=run_id),
                                    _training_text(f.training, run_id)))
        if f.losses is not None:
            sections.append(Section("Per-point training loss",
                                    charts.histogram(f.losses, "mean_loss", "Mean recorded training loss per point",
                                                     "mean training loss of the point"),
                                    "Each point's training loss averaged over the steps where it was recorded: "
                                    "points the model fits late or never have a high mean loss."))
        left = [("Per-example ε and everything drawn from it (distribution, cumulative ε, gallery, ε per class, "
                 "rank stability, curvature, memorization and membership inference)",
                 "the run was trained without DP, so there is nothing to account")]
        if f.training is None:
            left.append(("Training curves", "no per-step training statistics recorded"))
        if f.losses is None:
            left.append(("Per-point training loss", "no per-point losses recorded for this run"))
        sections += _left_out_section(left)
        return _write(out, png_dir, run_id, summary, sections, notes, left)

    eps = f.epsilon.epsilon.dropna().to_numpy(dtype=np.float64)
    q = np.quantile(eps, [p for _, p in _QUANTILES])
    partial = int(con.execute("SELECT count(*) FROM point_epsilon WHERE run_id = ? AND rule = ? AND steps_covered < ?",
                              [run_id, rule, int(run.get("steps") or 0)]).fetchall()[0][0])
    summary.update({"run_epsilon": _num(f.run_epsilon), "rule": rule, "points_accounted": len(f.epsilon)})
    summary.update({key: float(v) for (key, _), v in zip(_QUANTILES, q)})
    summary["points_at_max"] = int((eps == eps.max()).sum())
    summary["points_partial"] = partial
    both = _accountant_quantiles(con, run_id) if rule in ACCOUNTANTS else {}
    summary.update(both)
    summary["test_accuracy"] = _num(acc[0][0]) if acc else None
    band_note = (f"bands over a random sample of {f.band_points} of the {f.points_total} points (seed 0)"
                 if f.band_points < f.points_total else f"bands over all {f.band_points} points")
    shown_k = int((f.gallery.group == "lowest").sum()) if not f.gallery.empty else min(k, max(1, len(eps) // 2))
    sections = [
        Section("Distribution of per-example ε", charts.epsilon_distribution(f.epsilon, f.run_epsilon, rule),
                "How much privacy each training example pays, against the run's data-independent ε (the red line)."),
        Section("Privacy spent over training",
                charts.cost_spread(f.bands, f.curves, cost_title="cumulative ε (RDP composition)",
                                   note=band_note if f.bands is not None else None),
                "ε after each step: the grey bands hold 90% and 50% of the points, the dashed line is the median "
                "point; coloured lines follow a few points (the cheapest, the dearest and some in between, ties "
                f"broken by the {TIE_KEY}). Where norms were recorded at checkpoints only, dashed coloured lines show "
                "linear and monotone-cubic (pchip) fills between them next to the recorded hold-last curve."),
    ]
    if not f.gallery.empty:
        sections.append(Section(
            f"The {shown_k} lowest- and {shown_k} highest-ε points", charts.gallery(f.gallery, notes=f.gallery_notes),
            f"What the cheapest and dearest examples look like, with their point id, label, ε and rank. Among points "
            f"of equal ε (tied, same rank) the order is by {TIE_KEY}: smallest first among the cheapest, largest first "
            "among the dearest, then lowest point id."))
    if not f.by_label.empty:
        sections.append(Section("ε per class", charts.group_epsilon(f.by_label, "label"),
                                "Mean per-example ε of each class with its interquartile range."))
    for key, frame in f.by_attr.items():
        sections.append(Section(f"ε per {key}", charts.group_epsilon(frame, key),
                                f"Mean per-example ε by the points' {key} attribute, with its interquartile range."))
    if f.rank_pairs is not None:
        other = f.rank_pairs.run_b.iloc[0]
        sections.append(Section(f"Rank stability: {run_id} vs {other}",
                                charts.rank_stability(f.rank_pairs, run_id, other),
                                "Do the same points pay the most in another run of the same configuration?"))
        sections.append(Section("Rank correlation across runs", charts.rank_correlation_matrix(f.rank_matrix),
                                "Spearman correlation of the per-example ε ranks between runs of the configuration."))
    if f.curvature is not None:
        sections.append(Section("ε vs input-loss curvature", charts.scatter_vs(f.curvature, "curvature"),
                                "Curvature averaged over the run's checkpoints (Garg et al.; Ravikumar et al.)."))
    if f.memorization is not None:
        sections.append(Section("ε vs memorization", charts.scatter_vs(f.memorization, "memorization"),
                                "Feldman–Zhang memorization: estimated from the run's subset-trained study "
                                "(P[correct | in] − P[correct | out]), else imported for the dataset."))
    if f.mia is not None:
        sections.append(Section("ε vs membership inference (LiRA)",
                                charts.scatter_vs(f.mia, "mia_advantage", x_title="LiRA advantage"),
                                "Per point, how much better than chance LiRA tells its membership over the run's "
                                "subset-trained study (mean offline score in minus out)."))
    if f.training is not None:
        sections.append(Section("Training curves", charts.training_curves(f.training, highlight=run_id),
                                _training_text(f.training, run_id)))
    sections += _left_out_section(f.left_out)
    notes = list(MEANING)
    if rule == "pld":
        notes.append("Rule pld is the tight privacy-loss-distribution accountant of the same per-step sum as rule rdp, "
                     "shown beside the run's data-independent PLD ε. " + PLD_MEANING)
    if both:
        notes.append(ACCOUNTANT_DIFFERENCE)
    if partial:
        notes.append(f"{partial} points have norms for only part of the run's steps; their ε covers that part.")
    return _write(out, png_dir, run_id, summary, sections, notes, f.left_out)


def _write(out, png_dir, run_id, summary, sections, notes, left_out) -> dict:
    paths = write_report(out, f"dpledger report: {run_id}", _summary_rows(summary), sections, notes, png_dir=png_dir)
    return {"html": str(paths["html"]), "pngs": [str(p) for p in paths["pngs"]], "summary": summary,
            "sections": [s.title for s in sections if s.chart is not None],
            "left_out": [{"section": t, "reason": why} for t, why in left_out]}


def report(db, run_id: str, out, png_dir=None, rule: str = "rdp", k: int = 10) -> dict:
    """Open the warehouse read-only and write the report of ``run_id`` (see :func:`build_report`)."""
    if k < 1:
        raise UserError(f"k {k} must be at least 1", "k")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"out {out} is a folder; give a file name such as report.html", "out")
    con = connect(db, read_only=True)
    try:
        return build_report(con, run_id, out, png_dir, rule, k)
    finally:
        con.close()
