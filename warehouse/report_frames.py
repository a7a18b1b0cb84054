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

import numpy as np
import pandas as pd

from dpledger.analysis import charts, composition, fits, grid, rdp
from dpledger.analysis.html_report import Section, write_report

from .coverage import coverage, stream
from .db import connect
from .epsilon_tables import NotAccounted
from .errors import UserError
from .fit_table import run_records
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


def report_frames(con, run_id: str, rule: str = "rdp", k: int = 10) -> RunFrames:
    """Everything the report draws for one run, as data frames."""
    require_run(con, run_id)
    run = _df(con, "SELECT * FROM runs WHERE run_id = $run", {"run": run_id}).iloc[0].to_dict()
    eps = _df(con, "SELECT point_id, epsilon, best_order FROM point_epsilon WHERE run_id = $run AND rule = $rule",
              {"run": run_id, "rule": rule})
    if eps.empty:
        raise NotAccounted(run_id, rule)
    run_eps = _df(con, "SELECT epsilon FROM run_epsilon WHERE run_id = $run", {"run": run_id}).epsilon.iloc[0]
    run_eps = None if pd.isna(run_eps) else float(run_eps)
    ranks = _df(con, "SELECT point_id, label, epsilon, rank_lowest, rank_highest FROM point_rank "
                     "WHERE run_id = $run AND rule = $rule", {"run": run_id, "rule": rule})
    low = ranks.nsmallest(k, "rank_lowest").assign(group="lowest", rank=lambda d: d.rank_lowest)
    high = ranks.nsmallest(k, "rank_highest").assign(group="highest", rank=lambda d: d.rank_highest)
    picked = pd.concat([low, high], ignore_index=True)
    thumbs = _df(con, "SELECT point_id, thumbnail FROM points WHERE dataset = $ds AND point_id IN "
                      "(SELECT unnest($ids))", {"ds": run["dataset"], "ids": picked.point_id.astype(int).tolist()})
    gallery = picked.merge(thumbs, on="point_id", how="left")[["point_id", "label", "epsilon", "rank", "group",
                                                               "thumbnail"]]
    curves = pd.DataFrame(columns=["point_id", "step", "cumulative_cost", "group", "kind"])
    if run.get("noise_multiplier") is not None and run.get("max_grad_norm") is not None:
        groups = {"lowest": low.point_id.astype(int).tolist()[:5], "highest": high.point_id.astype(int).tolist()[:5]}
        info = load_run(con, run_id)
        parts = [cumulative_epsilon(con, info, ids).assign(group=g, kind="recorded") for g, ids in groups.items()]
        if coverage(con, info).recorded_steps < int(run["steps"]):  # norms at checkpoints only: overlay fills
            parts.append(fitted_curves(con, info, groups))
        curves = pd.concat(parts, ignore_index=True)
    by_label = _df(con, "SELECT CAST(p.label AS VARCHAR) AS \"group\", pe.epsilon FROM point_epsilon pe "
                        "JOIN points p ON p.dataset = $ds AND p.point_id = pe.point_id "
                        "WHERE pe.run_id = $run AND pe.rule = $rule AND p.label IS NOT NULL",
                   {"ds": run["dataset"], "run": run_id, "rule": rule})
    attrs = _df(con, "SELECT pe.epsilon, p.attrs FROM point_epsilon pe JOIN points p "
                     "ON p.dataset = $ds AND p.point_id = pe.point_id "
                     "WHERE pe.run_id = $run AND pe.rule = $rule AND p.attrs IS NOT NULL",
                {"ds": run["dataset"], "run": run_id, "rule": rule})
    by_attr: dict[str, pd.DataFrame] = {}
    if not attrs.empty:
        parsed = attrs.attrs.map(lambda a: json.loads(a) if isinstance(a, str) else (a or {}))
        for key in sorted({k for d in parsed for k in d}):
            by_attr[key] = pd.DataFrame({"group": parsed.map(lambda d: str(d.get(key))), "epsilon": attrs.epsilon})
    frames = RunFrames(run, eps, run_eps, ranks, curves, gallery, by_label, by_attr)
    siblings = _df(con, "SELECT DISTINCT pe.run_id FROM point_epsilon pe JOIN runs r USING (run_id) "
                        "WHERE r.config_key = $key AND pe.rule = $rule ORDER BY 1",
                   {"key": run["config_key"], "rule": rule}).run_id.tolist()
    if len(siblings) > 1:
        rk = _df(con, "SELECT run_id, point_id, rank_lowest FROM point_rank WHERE rule = $rule AND run_id IN "
                      "(SELECT unnest($runs))", {"rule": rule, "runs": siblings})
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
    linked = _df(con, "SELECT point_id, epsilon, curvature, memorization FROM point_links "
                      "WHERE run_id = $run AND rule = $rule", {"run": run_id, "rule": rule})
    if linked.curvature.notna().any():
        frames.curvature = linked.dropna(subset=["curvature"])[["point_id", "epsilon", "curvature"]]
    if linked.memorization.notna().any():
        frames.memorization = linked.dropna(subset=["memorization"])[["point_id", "epsilon", "memorization"]]
    train = _df(con, "SELECT s.run_id, s.step, r.private, s.loss, s.test_accuracy, s.wall_s, s.peak_mem_bytes "
                     "FROM steps s JOIN runs r USING (run_id) WHERE r.dataset = $ds AND "
                     "r.run_id IN (SELECT run_id FROM runs WHERE dataset = $ds ORDER BY run_id = $run DESC, run_id "
                     "LIMIT 8)", {"ds": run["dataset"], "run": run_id})
    if not train.empty:
        long = train.melt(id_vars=["run_id", "step", "private"],
                          value_vars=["loss", "test_accuracy", "wall_s", "peak_mem_bytes"],
                          var_name="metric", value_name="value").dropna(subset=["value"])
        frames.training = long
    return frames


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4g}" if isinstance(x, float) else str(x)


def build_report(con, run_id: str, out: str | os.PathLike, png_dir: str | os.PathLike | None = None,
                 rule: str = "rdp", k: int = 10) -> dict:
    """Write the HTML report of one run (and PNGs); returns paths and the summary shown."""
    f = report_frames(con, run_id, rule, k)
    run = f.run
    q = np.quantile(f.epsilon.epsilon.dropna(), [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    acc = con.execute("SELECT test_accuracy FROM steps WHERE run_id = ? AND test_accuracy IS NOT NULL "
                      "AND NOT isnan(test_accuracy) ORDER BY step DESC LIMIT 1", [run_id]).fetchall()
    summary = [
        ("run", run_id), ("dataset", run.get("dataset")), ("model", run.get("model")),
        ("sample rate q", _fmt(run.get("sample_rate"))), ("noise multiplier σ", _fmt(run.get("noise_multiplier"))),
        ("clipping norm C", _fmt(run.get("max_grad_norm"))), ("steps", _fmt(run.get("steps"))),
        ("δ", _fmt(run.get("delta"))), ("data-independent ε", _fmt(f.run_epsilon)),
        ("composition rule", rule), ("points accounted", str(len(f.epsilon))),
        ("per-example ε: min / 5% / 25% / median", " / ".join(f"{v:.3f}" for v in q[:4])),
        ("per-example ε: 75% / 95% / max", " / ".join(f"{v:.3f}" for v in q[4:])),
        ("test accuracy (last evaluation)", _fmt(acc[0][0]) if acc else "not recorded"),
    ]
    sections = [
        Section("Distribution of per-example ε", charts.epsilon_distribution(f.epsilon, f.run_epsilon, rule),
                "How much privacy each training example pays, against the run's data-independent ε (the red line)."),
        Section("Privacy spent over training by the cheapest and dearest points",
                charts.cost_curves(f.curves, 5, cost_title="cumulative ε (RDP composition)"),
                "ε after each step for the 5 lowest- and 5 highest-ε points: where along training the cost is paid. "
                "Where norms were recorded at checkpoints only, dashed lines show linear and monotone-cubic "
                "(pchip) fills between them next to the recorded hold-last curve."),
        Section(f"The {k} lowest- and {k} highest-ε points", charts.gallery(f.gallery),
                "What the cheapest and dearest examples look like, with their label, ε and rank."),
    ]
    if not f.by_label.empty:
        sections.append(Section("ε per class", charts.group_epsilon(f.by_label, "label"),
                                "Mean per-example ε of each class with its interquartile range."))
    for key, frame in f.by_attr.items():
        sections.append(Section(f"ε per {key}", charts.group_epsilon(frame, key),
                                f"Mean per-example ε by the points' {key} attribute."))
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
    if f.training is not None:
        sections.append(Section("Training curves", charts.training_curves(f.training),
                                "Loss, test accuracy, step time and peak memory per step; DP and non-DP runs of "
                                "this dataset side by side."))
    notes = list(MEANING)
    partial = int((con.execute("SELECT count(*) FROM point_epsilon WHERE run_id = ? AND rule = ? AND steps_covered < ?",
                               [run_id, rule, int(run.get("steps") or 0)]).fetchall()[0][0]))
    if partial:
        notes.append(f"{partial} points have norms for only part of the run's steps; their ε covers that part.")
    paths = write_report(out, f"dpledger report: {run_id}", summary, sections, notes, png_dir=png_dir)
    return {"html": str(paths["html"]), "pngs": [str(p) for p in paths["pngs"]], "summary": dict(summary),
            "sections": [s.title for s in sections]}


def report(db, run_id: str, out, png_dir=None, rule: str = "rdp", k: int = 10) -> dict:
    """Open the warehouse read-only and write the report of ``run_id``."""
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
