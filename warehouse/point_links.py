"""``dpledger links``: per-example ε next to curvature, memorization and MIA scores,
with the summary statistics the privacy–memorization–curvature papers report.

Layer: ``warehouse`` (a job over the view ``point_links``); the statistics are
:mod:`analysis.correlations`.
"""

from __future__ import annotations

import json

import pandas as pd

from dpledger.analysis import correlations

from .epsilon_tables import NotAccounted
from .errors import UserError
from .runs import require_runs

SCORES = ["epsilon", "curvature", "memorization", "mia_advantage", "cumulative_loss"]


def _select(con, run_ids: list[str] | None, config: str | None, rule: str) -> pd.DataFrame:
    if bool(run_ids) == bool(config):
        raise UserError("give run_ids RUN (repeatable) or config KEY", "run_ids", "config")
    if run_ids:
        require_runs(con, run_ids)
        df = con.sql("SELECT * FROM point_links WHERE rule = $rule AND run_id IN (SELECT unnest($runs))",
                     params={"rule": rule, "runs": list(run_ids)}).df()
    else:
        df = con.sql("SELECT * FROM point_links WHERE rule = $rule AND (config_key = $key OR study_key = $key)",
                     params={"rule": rule, "key": config}).df()
        if df.empty and not con.execute("SELECT count(*) FROM runs WHERE config_key = ? OR run_id IN "
                                        "(SELECT run_id FROM run_study WHERE study_key = ?)",
                                        [config, config]).fetchall()[0][0]:
            raise UserError(f"config {config}: no runs with that config_key or study_key", "config")
    if df.empty:
        which = ", ".join(run_ids) if run_ids else config
        raise NotAccounted(None, rule, which)
    return df


def _group_column(df: pd.DataFrame, by: str) -> pd.Series:
    if by == "label":
        return df["label"].astype("Int64").astype(str)
    attrs = df["attrs"].map(lambda a: json.loads(a) if isinstance(a, str) else (a or {}))
    values = attrs.map(lambda d: d.get(by))
    if values.isna().all():
        keys = sorted({k for d in attrs for k in d})
        raise UserError(f"by {by}: the points have no such attribute (attributes: "
                        f"{', '.join(['label'] + keys)})", "by")
    return values.astype(str)


def links(con, run_ids: list[str] | None = None, config: str | None = None, rule: str = "rdp", k: int = 10,
          by: str | None = None) -> dict:
    """Per-point scores of the selected runs and their link statistics."""
    if k < 1:
        raise UserError(f"k {k} must be at least 1", "k")
    df = _select(con, run_ids, config, rule)
    present = [c for c in SCORES if c in df and df[c].notna().any()]
    pairs = correlations.pair_stats(df, present, k) if len(present) >= 2 else pd.DataFrame()
    deltas = dict(con.execute("SELECT run_id, delta FROM runs WHERE run_id IN (SELECT unnest(?))",
                              [sorted(df.run_id.unique().tolist())]).fetchall())
    bound = []
    if "memorization" in present:
        for run_id, part in df.groupby("run_id"):
            res = correlations.bound_check(part.memorization, part.epsilon, deltas.get(run_id) or 0.0)
            bound.append({"run_id": run_id, **res})
    per_eps = pd.DataFrame()
    eps_key = df.target_epsilon.where(df.target_epsilon.notna())
    if eps_key.nunique() > 1:
        cols = [c for c in ("curvature", "memorization", "epsilon") if c in present]
        per_eps = (df.assign(target_epsilon=eps_key).groupby("target_epsilon")[cols].mean()
                   .reset_index().rename(columns={c: f"mean_{c}" for c in cols}))
    groups = pd.DataFrame()
    if by is not None:
        groups = correlations.group_summary(df.assign(_group=_group_column(df, by)), "_group", present)
    points = df[["run_id", "point_id", "label", *present]].sort_values(["run_id", "epsilon"], ascending=[True, False])
    return {"runs": sorted(df.run_id.unique().tolist()), "rule": rule, "scores": present, "k": k,
            "points": points, "pairs": pairs, "bound": pd.DataFrame(bound), "per_target_epsilon": per_eps,
            "groups": groups, "by": by}
