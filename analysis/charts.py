"""Altair charts of per-example privacy costs: what the ledger's query results look like.

Layer: ``analysis`` (draws query results; imports no other project package).

Every function takes a pandas DataFrame (a query result: the SQL side selects and
aggregates, these functions only draw) and returns an Altair chart that works in a
notebook as it is and in :mod:`analysis.html_report` (self-contained HTML, PNG).

Common behaviour:

* an empty frame (or ``None``) gives a chart holding a "no data" text mark, never an
  exception; a non-empty frame that lacks a required column raises ``ValueError``;
* every chart has a title, tooltips and axis titles, and is about 600 px wide;
* large inputs are reduced in pandas before they reach the spec, so that no spec
  carries more than :data:`MAX_ROWS` rows per dataset (Altair's own default limit):

  - :func:`epsilon_distribution` bins in pandas (numpy histogram) and plots the bins;
  - :func:`group_epsilon` and :func:`rank_correlation_matrix` aggregate in pandas;
  - line charts (:func:`cost_curves`, :func:`training_curves`) are *thinned*: when a
    frame has more than ``MAX_ROWS`` rows, each series (one line) keeps
    ``max(2, MAX_ROWS // n_series)`` rows at evenly spaced positions along its steps,
    always including its first and last row; at most ``MAX_ROWS // 2`` series are
    drawn (the first ones in sort order), so the total never exceeds ``MAX_ROWS``;
  - scatter plots (:func:`rank_stability`, :func:`scatter_vs`) draw a uniform random
    sample of ``MAX_ROWS`` rows taken with a fixed seed (:data:`SAMPLE_SEED`), so the
    same input gives the same chart; the Spearman ρ in their titles is computed on
    all rows, and the subtitle says how many points are drawn.

Only numpy, pandas, altair, PIL and the standard library are used: charts take query
results and import no other package of the project.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Iterable

import altair as alt
import numpy as np
import pandas as pd

__all__ = [
    "MAX_ROWS",
    "SAMPLE_SEED",
    "WIDTH",
    "cost_curves",
    "epsilon_distribution",
    "gallery",
    "group_epsilon",
    "no_data_chart",
    "rank_correlation_matrix",
    "rank_stability",
    "scatter_vs",
    "binned_median",
    "cost_spread",
    "histogram",
    "spearman",
    "thin_series",
    "sample_rows",
    "thumbnail_url",
    "training_curves",
]

#: The most rows any dataset of a chart's spec holds (Altair's default limit too).
MAX_ROWS = 5000
#: Seed of the random sample that scatter plots draw above ``MAX_ROWS`` rows.
SAMPLE_SEED = 0
#: Width in pixels of a single-panel chart.
WIDTH = 600
HEIGHT = 320

_EPS = "ε"
_RULE_MEANING = {
    "rdp": "rdp rule: the output-specific individual ε of this run's trajectory (Yu et al.)",
    "gla": "gla rule: the per-instance ε in expectation over training runs (Thudi et al.)",
}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


def no_data_chart(title: str, message: str = "no data", width: int = WIDTH, height: int = 120) -> alt.Chart:
    """A chart with one grey "no data" text mark: what every chart function returns for an empty frame."""
    return (
        alt.Chart(pd.DataFrame({"message": [message]}))
        .mark_text(fontSize=16, color="#888888")
        .encode(text=alt.Text("message:N"), tooltip=[alt.Tooltip("message:N", title="note")])
        .properties(title=title, width=width, height=height)
    )


def _missing(v) -> bool:
    """None, NaN, NaT or pd.NA (a scalar)."""
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _training_kind(private) -> str:
    if _missing(private):
        return "unknown"
    try:
        return "DP-SGD" if bool(private) else "non-private"
    except (TypeError, ValueError):
        return "unknown"


def _is_empty(df) -> bool:
    return df is None or len(df) == 0


def _require(df: pd.DataFrame, columns: Iterable[str], chart: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{chart}: the frame lacks column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})")


def _columns(df: pd.DataFrame, columns: list[str], chart: str, text: Iterable[str] = ()) -> pd.DataFrame:
    """A copy of ``columns`` of ``df`` (each required), with the ``text`` ones as strings."""
    _require(df, columns, chart)
    d = df[columns].copy()
    for c in text:
        d[c] = d[c].astype(str)
    return d


def _fmt(x, spec: str = ".4g") -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(x) else format(x, spec)


def spearman(x, y) -> float:
    """Spearman's rank correlation of two vectors (pairs with a NaN or inf dropped).

    Average ranks for ties, then Pearson's r of the ranks: the same number as
    ``scipy.stats.spearmanr``. NaN when fewer than two pairs remain or a vector is constant.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    rx = pd.Series(x[ok]).rank(method="average").to_numpy()
    ry = pd.Series(y[ok]).rank(method="average").to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def thin_series(df: pd.DataFrame, keys: list[str], order: str, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """Reduce a frame of line series to at most ``max_rows`` rows (the documented rule).

    Unchanged when it already has at most ``max_rows`` rows. Otherwise each series
    (rows sharing ``keys``, sorted by ``order``) keeps ``max(2, max_rows // n_series)``
    rows at evenly spaced positions, its first and last row included, and at most
    ``max_rows // 2`` series are kept (the first in sort order of ``keys``).
    """
    if len(df) <= max_rows:
        return df
    df = df.sort_values([*keys, order], kind="stable").reset_index(drop=True)
    groups = df.groupby(keys, sort=True, dropna=False).indices
    names = sorted(groups, key=lambda k: tuple(map(str, k)) if isinstance(k, tuple) else (str(k),))
    names = names[: max(1, max_rows // 2)]
    per = max(2, max_rows // len(names))
    keep = []
    for name in names:
        idx = np.sort(groups[name])
        if len(idx) > per:
            pos = np.unique(np.round(np.linspace(0, len(idx) - 1, per)).astype(np.int64))
            idx = idx[pos]
        keep.append(idx)
    return df.iloc[np.concatenate(keep)].reset_index(drop=True)


def sample_rows(df: pd.DataFrame, max_rows: int = MAX_ROWS, seed: int = SAMPLE_SEED) -> pd.DataFrame:
    """A uniform random sample of ``max_rows`` rows (fixed seed); the frame itself when it is small enough."""
    if len(df) <= max_rows:
        return df
    return df.sample(n=max_rows, random_state=seed).sort_index()


def thumbnail_url(thumbnail) -> str | None:
    """A ``data:image/png;base64,...`` URL for an image's bytes (PNG as is; other formats PIL can read re-encoded as PNG).

    ``None``, NaN, empty or unreadable input gives ``None`` (the gallery then draws a
    placeholder). A string that already is a ``data:image/`` URL is returned unchanged.
    """
    if thumbnail is None:
        return None
    if isinstance(thumbnail, str):
        return thumbnail if thumbnail.startswith("data:image/") else None
    if not isinstance(thumbnail, (bytes, bytearray, memoryview, np.ndarray)) and _missing(thumbnail):
        return None
    if isinstance(thumbnail, np.ndarray) and thumbnail.dtype == np.uint8 and thumbnail.ndim == 1:
        thumbnail = thumbnail.tobytes()
    try:
        data = bytes(thumbnail)
    except (TypeError, ValueError):
        return None
    if not data:
        return None
    if not data.startswith(_PNG_MAGIC):
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                data = buf.getvalue()
        except Exception:
            return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _natural_order(values) -> list[str]:
    """Distinct values as strings, numbers in numeric order (``2 < 11 < 1084``), then the rest as text."""
    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)
    return sorted({str(v) for v in values}, key=key)


def _count_axis(counts) -> alt.Axis:
    """An axis of whole numbers: every integer when the largest count is small, else integer ticks."""
    top = int(np.max(counts)) if len(counts) else 0
    if top <= 10:
        return alt.Axis(values=list(range(top + 1)), format="d")
    return alt.Axis(tickMinStep=1, format="d")


def _title(text: str, subtitle: str | list[str] | None = None) -> alt.TitleParams:
    if subtitle:
        return alt.TitleParams(text=text, subtitle=subtitle, anchor="start")
    return alt.TitleParams(text=text, anchor="start")


# --------------------------------------------------------------------------- 1. distribution


def epsilon_distribution(df: pd.DataFrame, run_epsilon: float | None, rule: str = "rdp", bins: int = 40) -> alt.LayerChart | alt.Chart:
    """Histogram of per-example ε with the run's data-independent ε as a vertical rule.

    Shows how the privacy actually paid is spread over the training examples, next to
    the one number DP-SGD guarantees for all of them: points far left of the rule pay
    much less than the worst case; a mass at the rule means clipped gradients all along.
    df: ``point_id, epsilon``. The histogram is binned in pandas (``bins`` equal-width
    bins over the finite values; non-finite values are left out and counted in the
    subtitle) and drawn from the bins, so the spec has ``bins`` rows whatever the size
    of the input. The x scale always includes ``run_epsilon``.
    """
    title = f"Per-example {_EPS} ({rule} rule)"
    if _is_empty(df):
        return no_data_chart(title)
    _require(df, ["epsilon"], "epsilon_distribution")
    eps = pd.to_numeric(df["epsilon"], errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(eps)
    dropped = int((~finite).sum())
    eps = eps[finite]
    if eps.size == 0:
        return no_data_chart(title, "no finite ε values")
    counts, edges = np.histogram(eps, bins=max(1, int(bins)))
    hist = pd.DataFrame({"epsilon": edges[:-1], "epsilon_end": edges[1:], "count": counts.astype(np.int64)})

    subtitle = [_RULE_MEANING.get(rule, f"{rule} rule")]
    subtitle.append(f"{eps.size} points, median {_EPS} = {_fmt(np.median(eps))}, max = {_fmt(eps.max())}")
    if dropped:
        subtitle.append(f"{dropped} non-finite value(s) left out")
    lo, hi = float(edges[0]), float(edges[-1])
    have_rule = run_epsilon is not None and math.isfinite(float(run_epsilon))
    if have_rule:
        run_epsilon = float(run_epsilon)
        lo, hi = min(lo, run_epsilon), max(hi, run_epsilon)
    else:
        subtitle.append("data-independent ε of the run not given")
    pad = 0.02 * (hi - lo) if hi > lo else 0.5
    domain = [lo - pad, hi + pad]

    bars = (
        alt.Chart(hist)
        .mark_bar(color="#4c78a8", binSpacing=1)
        .encode(
            x=alt.X("epsilon:Q", bin="binned", title=f"per-example {_EPS}", scale=alt.Scale(domain=domain, zero=False, nice=False)),
            x2=alt.X2("epsilon_end:Q"),
            y=alt.Y("count:Q", title="number of points", axis=_count_axis(counts)),
            tooltip=[
                alt.Tooltip("epsilon:Q", title=f"{_EPS} from", format=".4g"),
                alt.Tooltip("epsilon_end:Q", title=f"{_EPS} to", format=".4g"),
                alt.Tooltip("count:Q", title="points"),
            ],
        )
    )
    layers = [bars]
    if have_rule:
        label = f"data-independent {_EPS} = {run_epsilon:.4g}"
        right_half = run_epsilon >= (domain[0] + domain[1]) / 2
        rule_chart = alt.Chart(pd.DataFrame({"run_epsilon": [run_epsilon], "label": [label]}))
        layers.append(
            rule_chart.mark_rule(color="#d62728", strokeWidth=2, strokeDash=[6, 3]).encode(
                x=alt.datum(run_epsilon),
                tooltip=[alt.Tooltip("label:N", title="run")],
            )
        )
        layers.append(
            rule_chart.mark_text(
                color="#d62728", align="right" if right_half else "left", dx=-5 if right_half else 5, baseline="top", fontSize=12
            ).encode(x=alt.datum(run_epsilon), y=alt.value(4), text=alt.Text("label:N"), tooltip=[alt.Tooltip("label:N", title="run")])
        )
    return alt.layer(*layers).properties(title=_title(title, subtitle), width=WIDTH, height=HEIGHT)


# --------------------------------------------------------------------------- 2. cost curves


def cost_curves(df: pd.DataFrame, k: int, cost_title: str = "cumulative privacy cost") -> alt.FacetChart | alt.Chart:
    """Cumulative privacy cost over training steps of the k cheapest and k dearest points.

    Shows *when* a point pays: the dearest points keep paying at every step (their
    gradients stay at the clip norm), the cheapest stop early (once the model fits them).
    Recorded costs are solid lines, approximation fits (``kind`` = "linear", "pchip",
    ...) dashed lines over them, so a fit can be judged against the record; one panel
    per group ("lowest", "highest"), one colour per point.
    df: ``point_id, step, cumulative_cost, group, kind``. When a group holds more than
    ``k`` points, the ``k`` with the lowest (group "lowest") or highest (other groups)
    final recorded cost are kept. Lines are thinned above ``MAX_ROWS`` rows (module doc).
    """
    title = f"Cumulative privacy cost of the {k} lowest- and {k} highest-{_EPS} points"
    if _is_empty(df):
        return no_data_chart(title)
    d = _columns(df, ["point_id", "step", "cumulative_cost", "group", "kind"], "cost_curves",
                 text=["point_id", "group", "kind"])
    d = d[np.isfinite(pd.to_numeric(d["cumulative_cost"], errors="coerce").astype(np.float64))]
    if d.empty:
        return no_data_chart(title, "no finite costs")

    # keep k points per group, chosen by the final recorded cost (any kind when none is recorded)
    if k is not None and k > 0:
        kept = []
        for group, g in d.groupby("group", sort=False):
            ref = g[g["kind"] == "recorded"]
            ref = ref if not ref.empty else g
            final = ref.sort_values("step").groupby("point_id")["cumulative_cost"].last()
            final = final.sort_values(ascending=(group == "lowest"), kind="stable")
            kept.append(g[g["point_id"].isin(final.index[:k])])
        d = pd.concat(kept, ignore_index=True)
    d = thin_series(d, ["group", "point_id", "kind"], "step")

    kinds = ["recorded"] + sorted(set(d["kind"]) - {"recorded"})
    dashes = [[1, 0]] + [[6, 4], [2, 2], [8, 3, 2, 3], [1, 3]] * len(kinds)
    groups = [g for g in ("lowest", "highest") if g in set(d["group"])] + sorted(set(d["group"]) - {"lowest", "highest"})
    fits = [x for x in kinds if x != "recorded"]
    subtitle = "solid: recorded" + (f"; dashed: fits ({', '.join(fits)})" if fits else "") + "; one colour per point"

    base = (
        alt.Chart(d)
        .mark_line(strokeWidth=1.8)
        .encode(
            x=alt.X("step:Q", title="training step"),
            y=alt.Y("cumulative_cost:Q", title=cost_title),
            color=alt.Color("point_id:N", title="point", sort=_natural_order(d["point_id"]),
                            scale=alt.Scale(scheme="tableau10" if d["point_id"].nunique() <= 10 else "tableau20")),
            strokeDash=alt.StrokeDash("kind:N", title="curve", scale=alt.Scale(domain=kinds, range=dashes[: len(kinds)])),
            detail=alt.Detail("kind:N"),
            tooltip=[
                alt.Tooltip("point_id:N", title="point"),
                alt.Tooltip("group:N"),
                alt.Tooltip("kind:N", title="curve"),
                alt.Tooltip("step:Q"),
                alt.Tooltip("cumulative_cost:Q", title=cost_title, format=".4g"),
            ],
        )
        .properties(width=(WIDTH - 40) // max(1, len(groups)), height=HEIGHT - 40)
    )
    return base.facet(
        column=alt.Column("group:N", sort=groups, title=None, header=alt.Header(labelExpr="datum.value + ' ε'", labelFontSize=13)),
    ).properties(title=_title(title, subtitle))


#: Greys of the quantile bands of :func:`cost_spread`, outermost first.
_BAND_FILLS = ["#e3e3e3", "#c4c4c4", "#a3a3a3", "#828282"]
#: Colours of the few labelled points of :func:`cost_spread` (distinct from the grey bands and from each other).
_POINT_COLOURS = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#1f77b4", "#8c564b", "#e377c2", "#17becf"]


def _pct(q: float) -> str:
    return f"{100 * float(q):g}%"


def cost_spread(bands: pd.DataFrame | None, curves: pd.DataFrame | None = None,
                cost_title: str = "cumulative privacy cost", note: str | None = None) -> alt.LayerChart | alt.Chart:
    """Cumulative privacy cost over training of *all* points as quantile bands, a few labelled points on top.

    Shows how the whole training set spends its budget: at each step the grey bands
    span the given quantiles of the points' cumulative cost (outer pair lightest: e.g.
    5-95%, then 25-75%), a dark dashed line is the median; coloured lines are a few
    named points (e.g. the cheapest, the median and the dearest point), solid where
    recorded and dashed for approximation fits (``kind`` other than "recorded").
    bands: ``step, quantile, cumulative_cost`` (quantiles in [0, 1]; a quantile and
    its mirror 1 - q make a band, 0.5 the median line). curves: ``point_id, step,
    cumulative_cost, kind`` and optionally ``label`` (legend text; default "point
    <id>"); the legend lists the points by final recorded cost, dearest first.
    ``note``: one more subtitle line (e.g. how many points the bands cover).
    """
    title = f"Cumulative {_EPS} over training: the spread over all points"
    if _is_empty(bands) and _is_empty(curves):
        return no_data_chart(title)
    layers = []
    subtitle = []
    if not _is_empty(bands):
        b = _columns(bands, ["step", "quantile", "cumulative_cost"], "cost_spread")
        b["cumulative_cost"] = pd.to_numeric(b["cumulative_cost"], errors="coerce").astype(np.float64)
        b["quantile"] = pd.to_numeric(b["quantile"], errors="coerce").astype(np.float64).round(6)
        b = b[np.isfinite(b["cumulative_cost"]) & np.isfinite(b["quantile"])]
        wide = b.pivot_table(index="step", columns="quantile", values="cumulative_cost", aggfunc="mean").sort_index()
        qs = sorted(wide.columns)
        pairs = [(lo, hi) for lo in qs for hi in qs if lo < 0.5 and abs(hi - (1 - lo)) < 1e-9]
        pairs.sort(key=lambda p: p[0])  # outermost first
        names = [f"{_pct(lo)}–{_pct(hi)} of points" for lo, hi in pairs]
        if pairs:
            rows = pd.concat([pd.DataFrame({"step": wide.index, "lo": wide[lo].to_numpy(), "hi": wide[hi].to_numpy(),
                                            "band": name}) for (lo, hi), name in zip(pairs, names)], ignore_index=True)
            layers.append(
                alt.Chart(rows).mark_area(opacity=0.9, interpolate="monotone").encode(
                    x=alt.X("step:Q", title="training step"),
                    y=alt.Y("lo:Q", title=cost_title),
                    y2=alt.Y2("hi:Q"),
                    fill=alt.Fill("band:N", title="spread", sort=names,
                                  scale=alt.Scale(domain=names, range=(_BAND_FILLS * len(names))[: len(names)])),
                    tooltip=[alt.Tooltip("band:N"), alt.Tooltip("step:Q"),
                             alt.Tooltip("lo:Q", title="from", format=".4g"), alt.Tooltip("hi:Q", title="to", format=".4g")],
                )
            )
            subtitle.append("grey bands: " + ", ".join(f"{_pct(lo)} to {_pct(hi)}" for lo, hi in pairs)
                            + " of the points' cumulative cost at each step")
        if any(abs(q - 0.5) < 1e-9 for q in qs):
            med = pd.DataFrame({"step": wide.index, "median": wide[[q for q in qs if abs(q - 0.5) < 1e-9][0]].to_numpy()})
            layers.append(
                alt.Chart(med).mark_line(color="#404040", strokeDash=[4, 3], strokeWidth=1.5).encode(
                    x=alt.X("step:Q", title="training step"), y=alt.Y("median:Q", title=cost_title),
                    tooltip=[alt.Tooltip("step:Q"), alt.Tooltip("median:Q", title="median over points", format=".4g")],
                )
            )
            subtitle.append("dark dashed line: the median point at each step")
    if not _is_empty(curves):
        d = _columns(curves, ["point_id", "step", "cumulative_cost", "kind"], "cost_spread", text=["point_id", "kind"])
        d["label"] = curves["label"].astype(str).to_numpy() if "label" in curves.columns else "point " + d["point_id"]
        d["cumulative_cost"] = pd.to_numeric(d["cumulative_cost"], errors="coerce").astype(np.float64)
        d = d[np.isfinite(d["cumulative_cost"])]
        if not d.empty:
            ref = d[d["kind"] == "recorded"] if (d["kind"] == "recorded").any() else d
            final = ref.sort_values("step", kind="stable").groupby("label")["cumulative_cost"].last()
            labels = final.sort_values(ascending=False, kind="stable").index.tolist()
            labels += sorted(set(d["label"]) - set(labels))
            d = thin_series(d, ["label", "kind"], "step")
            kinds = ["recorded"] + sorted(set(d["kind"]) - {"recorded"})
            dashes = ([[1, 0]] + [[6, 4], [2, 2], [8, 3, 2, 3], [1, 3]] * len(kinds))[: len(kinds)]
            layers.append(
                alt.Chart(d).mark_line(strokeWidth=2.2).encode(
                    x=alt.X("step:Q", title="training step"),
                    y=alt.Y("cumulative_cost:Q", title=cost_title),
                    stroke=alt.Stroke("label:N", title="points", sort=labels,
                                      scale=alt.Scale(domain=labels, range=(_POINT_COLOURS * len(labels))[: len(labels)]),
                                      legend=alt.Legend(symbolType="stroke", labelLimit=320)),
                    strokeDash=alt.StrokeDash("kind:N", title="curve", sort=kinds,
                                              scale=alt.Scale(domain=kinds, range=dashes),
                                              legend=alt.Legend(symbolType="stroke", symbolStrokeColor="#333333")
                                              if len(kinds) > 1 else None),
                    detail=alt.Detail("kind:N"),
                    tooltip=[alt.Tooltip("label:N", title="point"), alt.Tooltip("kind:N", title="curve"),
                             alt.Tooltip("step:Q"), alt.Tooltip("cumulative_cost:Q", title=cost_title, format=".4g")],
                )
            )
            fits = [k for k in kinds if k != "recorded"]
            subtitle.append(f"coloured lines: {len(labels)} single points, named in the legend (dearest first)"
                            + (f"; solid: recorded, dashed: fits ({', '.join(fits)})" if fits else ""))
    if not layers:
        return no_data_chart(title, "no finite costs")
    if note:
        subtitle.append(note)
    return alt.layer(*layers).properties(title=_title(title, subtitle), width=WIDTH, height=HEIGHT)


# --------------------------------------------------------------------------- 3. gallery

_CELL_W, _CELL_H, _IMG = 84, 100, 48


def gallery(df: pd.DataFrame, columns: int = 10, max_images: int = 100,
            notes: dict[str, str] | None = None) -> alt.VConcatChart | alt.Chart:
    """A grid of the points' images with point id, label, ε and rank under each: what the cheapest and dearest points look like.

    One block per group ("lowest" first, then "highest"), ``columns`` images a row;
    the "lowest" block is ordered by ε ascending, the others by ε descending (the
    dearest first), then by rank ascending; within equal ε and rank (ties) the
    frame's own row order is kept, so the caller decides and states the second key.
    ``notes``: a line under a group's heading (e.g. how its ties were broken). Images are embedded as ``data:image/png;base64,...`` URLs (Altair
    image marks), so the chart needs no file next to it; a point without a thumbnail
    gets a "no image" placeholder. At most ``max_images`` points a group are drawn.
    df: ``point_id, label, epsilon, rank, group, thumbnail`` (thumbnail: PNG bytes or None).
    """
    title = f"What the lowest- and highest-{_EPS} points look like"
    if _is_empty(df):
        return no_data_chart(title)
    _require(df, ["point_id", "label", "epsilon", "rank", "group", "thumbnail"], "gallery")
    columns = max(1, int(columns))
    d = df[["point_id", "label", "epsilon", "rank", "group"]].copy()
    d["url"] = [thumbnail_url(t) for t in df["thumbnail"]]
    d["group"] = d["group"].astype(str)
    d["point_id"] = d["point_id"].astype(str)
    d["label"] = d["label"].map(lambda v: "?" if _missing(v) else str(v))
    d["epsilon"] = pd.to_numeric(d["epsilon"], errors="coerce")
    groups = [g for g in ("lowest", "highest") if g in set(d["group"])] + sorted(set(d["group"]) - {"lowest", "highest"})

    blocks = []
    for group in groups:
        g = d[d["group"] == group].sort_values(["epsilon", "rank"], ascending=[group == "lowest", True], kind="stable",
                                               na_position="last")
        g = g.head(max(1, int(max_images))).reset_index(drop=True)
        i = np.arange(len(g))
        col, row = i % columns, i // columns
        g["x"] = col * _CELL_W + _CELL_W / 2
        g["x0"], g["x1"] = col * _CELL_W + 2, (col + 1) * _CELL_W - 2
        g["y0"], g["y1"] = row * _CELL_H + 2, (row + 1) * _CELL_H - 2
        g["y_img"] = row * _CELL_H + 5
        g["y_text"] = row * _CELL_H + 5 + _IMG + 3
        g["caption"] = [f"point {pid}\nlabel {lab}\n{_EPS} {_fmt(e, '.4g')} · #{_fmt(r, 'g')}"
                        for pid, lab, e, r in zip(g["point_id"], g["label"], g["epsilon"], g["rank"])]
        g["missing"] = g["url"].isna()
        nrows = int(row.max()) + 1
        tooltip = [
            alt.Tooltip("point_id:N", title="point"),
            alt.Tooltip("label:N"),
            alt.Tooltip("epsilon:Q", title=_EPS, format=".4g"),
            alt.Tooltip("rank:Q"),
            alt.Tooltip("group:N"),
        ]
        px = dict(scale=None, axis=None)
        base = alt.Chart(g)
        frame = base.mark_rect(fill="#fafafa", stroke="#dddddd").encode(
            x=alt.X("x0:Q", **px), x2="x1:Q", y=alt.Y("y0:Q", **px), y2="y1:Q", tooltip=tooltip
        )
        images = (
            base.transform_filter("datum.url != null")
            .mark_image(width=_IMG, height=_IMG, align="center", baseline="top", smooth=False)
            .encode(x=alt.X("x:Q", **px), y=alt.Y("y_img:Q", **px), url=alt.Url("url:N"), tooltip=tooltip)
        )
        placeholder = (
            base.transform_filter("datum.missing")
            .mark_text(text="no image", fontSize=9, color="#999999", baseline="middle")
            .encode(x=alt.X("x:Q", **px), y=alt.Y("y_img:Q", **px), yOffset=alt.value(_IMG / 2), tooltip=tooltip)
        )
        captions = base.mark_text(fontSize=9, baseline="top", lineBreak="\n", color="#333333").encode(
            x=alt.X("x:Q", **px), y=alt.Y("y_text:Q", **px), text=alt.Text("caption:N"), tooltip=tooltip
        )
        what = {"lowest": f"lowest {_EPS} (cheapest first)", "highest": f"highest {_EPS} (dearest first)"}.get(group, f"group {group}")
        blocks.append(
            alt.layer(frame, images, placeholder, captions).properties(
                title=alt.TitleParams(f"{what}: {len(g)} points", anchor="start", fontSize=12,
                                      **({"subtitle": notes[group], "subtitleFontSize": 11} if notes and notes.get(group) else {})),
                width=columns * _CELL_W,
                height=nrows * _CELL_H,
            )
        )
    return alt.vconcat(*blocks, spacing=18).properties(
        title=_title(title, f"under each image: point id, label, per-example {_EPS} and rank (#; tied points share a rank)")
    )


# --------------------------------------------------------------------------- 4. groups


def group_epsilon(df: pd.DataFrame, by: str) -> alt.LayerChart | alt.Chart:
    """Mean per-example ε per group (class label or attribute such as FairFace race), with its spread.

    Answers "which kinds of examples pay more": a bar per group at the mean ε, a line
    over the interquartile range (25th to 75th percentile) and a tick at the median,
    groups sorted by mean ε (dearest on top), and a dashed rule at the mean over all
    points. The tooltip gives count, mean, std, median and quartiles. Aggregated in
    pandas: the spec has one row per group. df: ``group, epsilon``; ``by`` names the
    grouping (axis title).
    """
    title = f"Per-example {_EPS} by {by}"
    if _is_empty(df):
        return no_data_chart(title)
    _require(df, ["group", "epsilon"], "group_epsilon")
    d = pd.DataFrame({"group": df["group"], "epsilon": pd.to_numeric(df["epsilon"], errors="coerce")})
    d = d[np.isfinite(d["epsilon"].astype(np.float64))]
    if d.empty:
        return no_data_chart(title, "no finite ε values")
    d["group"] = d["group"].map(lambda v: "(missing)" if _missing(v) else str(v))
    agg = d.groupby("group")["epsilon"].agg(
        count="count", mean="mean", std="std", median="median",
        q1=lambda s: s.quantile(0.25), q3=lambda s: s.quantile(0.75),
    ).reset_index()
    agg = agg.sort_values("mean", ascending=False, kind="stable").reset_index(drop=True)
    order = agg["group"].tolist()
    overall = float(d["epsilon"].mean())
    tooltip = [
        alt.Tooltip("group:N", title=by),
        alt.Tooltip("count:Q", title="points"),
        alt.Tooltip("mean:Q", title=f"mean {_EPS}", format=".4g"),
        alt.Tooltip("std:Q", title="std", format=".3g"),
        alt.Tooltip("median:Q", title="median", format=".4g"),
        alt.Tooltip("q1:Q", title="25th pct", format=".4g"),
        alt.Tooltip("q3:Q", title="75th pct", format=".4g"),
    ]
    y = alt.Y("group:N", sort=order, title=by)
    base = alt.Chart(agg)
    bars = base.mark_bar(color="#4c78a8", opacity=0.85).encode(
        x=alt.X("mean:Q", title=f"per-example {_EPS}", scale=alt.Scale(zero=True)), y=y, tooltip=tooltip
    )
    x_title = f"per-example {_EPS}"
    iqr = base.mark_rule(color="#222222", strokeWidth=1.5).encode(x=alt.X("q1:Q", title=x_title), x2="q3:Q", y=y, tooltip=tooltip)
    med = base.mark_tick(color="#222222", thickness=2, size=12).encode(x=alt.X("median:Q", title=x_title), y=y, tooltip=tooltip)
    mean_rule = (
        alt.Chart(pd.DataFrame({"label": [f"mean over all {len(d)} points = {overall:.4g}"]}))
        .mark_rule(color="#d62728", strokeDash=[5, 3])
        .encode(x=alt.datum(overall), tooltip=[alt.Tooltip("label:N", title="all points")])
    )
    return alt.layer(bars, iqr, med, mean_rule).properties(
        title=_title(title, f"bar: mean; line: interquartile range; tick: median; dashed: mean over all points ({len(d)} points, {len(agg)} groups)"),
        width=WIDTH - 100,
        height=alt.Step(22),
    )


# --------------------------------------------------------------------------- 5. rank stability


def rank_stability(df: pd.DataFrame, run_a: str, run_b: str) -> alt.LayerChart | alt.Chart:
    """Each point's ε rank in run A against its rank in run B, with the y = x line and Spearman ρ in the title.

    Tells whether "which points pay the most" is a property of the data or of one
    training run (seed, noise): points on the diagonal keep their rank; a cloud means
    the ranking does not transfer. df: ``point_id, rank_a, rank_b``. ρ uses all rows;
    above ``MAX_ROWS`` rows a fixed-seed random sample is drawn.
    """
    if _is_empty(df):
        return no_data_chart(f"Rank stability: {run_a} vs {run_b}")
    _require(df, ["point_id", "rank_a", "rank_b"], "rank_stability")
    d = df[["point_id", "rank_a", "rank_b"]].copy()
    d["rank_a"] = pd.to_numeric(d["rank_a"], errors="coerce")
    d["rank_b"] = pd.to_numeric(d["rank_b"], errors="coerce")
    d = d.dropna(subset=["rank_a", "rank_b"])
    if d.empty:
        return no_data_chart(f"Rank stability: {run_a} vs {run_b}", "no ranked points")
    rho = spearman(d["rank_a"], d["rank_b"])
    n = len(d)
    title = f"Rank stability of per-example {_EPS}: {run_a} vs {run_b} (Spearman ρ = {_fmt(rho, '.3f')})"
    shown = sample_rows(d)
    subtitle = f"{n} points" + (f", {len(shown)} drawn (random sample, seed {SAMPLE_SEED})" if len(shown) < n else "") + "; dashed: y = x (same rank in both runs)"
    shown = shown.assign(point_id=shown["point_id"].astype(str))
    lo = float(min(d["rank_a"].min(), d["rank_b"].min()))
    hi = float(max(d["rank_a"].max(), d["rank_b"].max()))
    xt, yt = f"rank in {run_a}", f"rank in {run_b}"
    points = (
        alt.Chart(shown)
        .mark_circle(size=28, opacity=0.6, color="#4c78a8")
        .encode(
            x=alt.X("rank_a:Q", title=xt, scale=alt.Scale(domain=[lo, hi])),
            y=alt.Y("rank_b:Q", title=yt, scale=alt.Scale(domain=[lo, hi])),
            tooltip=[alt.Tooltip("point_id:N", title="point"), alt.Tooltip("rank_a:Q", title=xt), alt.Tooltip("rank_b:Q", title=yt)],
        )
    )
    diagonal = (
        alt.Chart(pd.DataFrame({"rank": [lo, hi], "line": ["y = x", "y = x"]}))
        .mark_line(color="#d62728", strokeDash=[6, 4])
        .encode(x=alt.X("rank:Q", title=xt), y=alt.Y("rank:Q", title=yt), tooltip=[alt.Tooltip("line:N")])
    )
    return alt.layer(points, diagonal).properties(title=_title(title, subtitle), width=WIDTH - 100, height=WIDTH - 100)


# --------------------------------------------------------------------------- 6. correlation matrix


def rank_correlation_matrix(df: pd.DataFrame) -> alt.LayerChart | alt.Chart:
    """Heatmap of the Spearman rank correlation of per-example ε between every two runs, the value written in each cell.

    The overview behind :func:`rank_stability`: which runs (seeds, noise multipliers)
    agree on which points are dear. df: ``run_a, run_b, spearman`` (repeated pairs are
    averaged; a pair given one way only is mirrored; a missing diagonal is 1).
    """
    title = f"Rank correlation of per-example {_EPS} between runs (Spearman ρ)"
    if _is_empty(df):
        return no_data_chart(title)
    _require(df, ["run_a", "run_b", "spearman"], "rank_correlation_matrix")
    d = pd.DataFrame({"run_a": df["run_a"].astype(str), "run_b": df["run_b"].astype(str),
                      "spearman": pd.to_numeric(df["spearman"], errors="coerce")})
    d = d.groupby(["run_a", "run_b"], as_index=False)["spearman"].mean()
    have = set(zip(d["run_a"], d["run_b"]))
    mirror = d[[(b, a) not in have for a, b in zip(d["run_a"], d["run_b"])]].rename(columns={"run_a": "run_b", "run_b": "run_a"})
    runs = sorted(set(d["run_a"]) | set(d["run_b"]))
    diag = pd.DataFrame({"run_a": runs, "run_b": runs, "spearman": 1.0})
    diag = diag[[(r, r) not in have for r in runs]]
    d = pd.concat([d, mirror, diag], ignore_index=True)
    n = len(runs)
    step = max(14, min(60, (WIDTH - 100) // max(1, n)))
    base = alt.Chart(d).encode(
        x=alt.X("run_a:N", sort=runs, title="run", axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("run_b:N", sort=runs, title="run"),
        tooltip=[alt.Tooltip("run_a:N", title="run A"), alt.Tooltip("run_b:N", title="run B"),
                 alt.Tooltip("spearman:Q", title="Spearman ρ", format=".3f")],
    )
    heat = base.mark_rect(stroke="white").encode(
        color=alt.Color("spearman:Q", title="ρ", scale=alt.Scale(domain=[-1, 1], scheme="redblue")),
    )
    layers = [heat]
    if step >= 28:
        layers.append(
            base.mark_text(fontSize=11 if step >= 40 else 9).encode(
                text=alt.Text("spearman:Q", format=".2f"),
                color=alt.condition("abs(datum.spearman) > 0.6", alt.value("white"), alt.value("black")),
            )
        )
    return alt.layer(*layers).properties(
        title=_title(title, f"{n} runs" + ("" if len(layers) > 1 else "; values in the tooltip")),
        width=alt.Step(step), height=alt.Step(step),
    )


# --------------------------------------------------------------------------- 7. scatter


def binned_median(x, y, bins: int = 20, min_per_bin: int = 8) -> pd.DataFrame:
    """The trend of y over x as medians in equal-count bins of x: ``x, median, q1, q3, count`` per bin.

    Each bin holds about ``len(x) / bins`` points (fewer bins when that would leave
    fewer than ``min_per_bin`` a bin; none below ``2 * min_per_bin`` points); its x is
    the median x of the bin. So the trend lies within the data in both x and y: it never
    leaves the points' x range, and its y is a median of observed values (a loess line
    can overshoot where points are sparse). Empty frame when there is too little data.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n_bins = min(int(bins), len(x) // max(1, int(min_per_bin)))
    if n_bins < 2 or np.unique(x).size < 2:
        return pd.DataFrame(columns=["x", "median", "q1", "q3", "count"])
    order = np.argsort(x, kind="stable")
    parts = np.array_split(order, n_bins)
    rows = [(float(np.median(x[i])), float(np.median(y[i])), float(np.quantile(y[i], 0.25)),
             float(np.quantile(y[i], 0.75)), int(len(i))) for i in parts if len(i)]
    return pd.DataFrame(rows, columns=["x", "median", "q1", "q3", "count"])


def scatter_vs(df: pd.DataFrame, other: str, log_x: bool = False, bins: int = 20,
               x_title: str | None = None) -> alt.LayerChart | alt.Chart:
    """Per-example ε (y) against another per-point quantity (x), e.g. input-loss curvature or memorization.

    Tests the "why": points of high curvature / high memorization are expected to pay
    more privacy. The trend is :func:`binned_median` over all points (a line through
    the median ε of ``bins`` equal-count bins of x, with a band over their interquartile
    range), drawn only over the data's range; the title gives Spearman's ρ over all
    points. ``log_x`` puts x on a log scale (non-positive x are left out). ``x_title``:
    the axis title (default ``other``). df: ``point_id, epsilon, <other>``. Above
    ``MAX_ROWS`` rows a fixed-seed random sample is drawn; ρ and the trend use every row.
    """
    name = x_title or other
    if _is_empty(df):
        return no_data_chart(f"Per-example {_EPS} vs {name}")
    _require(df, ["point_id", "epsilon", other], "scatter_vs")
    d = pd.DataFrame({
        "point_id": df["point_id"].astype(str),
        "epsilon": pd.to_numeric(df["epsilon"], errors="coerce"),
        other: pd.to_numeric(df[other], errors="coerce"),
    })
    d = d[np.isfinite(d["epsilon"].astype(np.float64)) & np.isfinite(d[other].astype(np.float64))]
    if log_x:
        d = d[d[other] > 0]
    if d.empty:
        return no_data_chart(f"Per-example {_EPS} vs {name}", "no finite pairs")
    rho = spearman(d[other], d["epsilon"])
    n = len(d)
    title = f"Per-example {_EPS} vs {name} (Spearman ρ = {_fmt(rho, '.3f')}, n = {n})"
    shown = sample_rows(d).rename(columns={other: "x"})
    trend = binned_median(d[other], d["epsilon"], bins)
    subtitle = ("" if len(shown) == n else f"{len(shown)} of {n} points drawn (random sample, seed {SAMPLE_SEED}); ")
    if not trend.empty:
        subtitle += (f"line: median {_EPS} in {len(trend)} bins of about {n // len(trend)} points by {name}, "
                     "band: their interquartile range")
    xt = name + (" (log scale)" if log_x else "")
    x_scale = alt.Scale(type="log") if log_x else alt.Scale(zero=False)
    y_scale = alt.Scale(zero=False)
    tooltip = [alt.Tooltip("point_id:N", title="point"), alt.Tooltip("x:Q", title=name, format=".4g"),
               alt.Tooltip("epsilon:Q", title=_EPS, format=".4g")]
    base = alt.Chart(shown)
    points = base.mark_circle(size=24, opacity=0.5, color="#4c78a8").encode(
        x=alt.X("x:Q", title=xt, scale=x_scale), y=alt.Y("epsilon:Q", title=f"per-example {_EPS}", scale=y_scale),
        tooltip=tooltip,
    )
    layers = [points]
    if not trend.empty:
        t_tip = [alt.Tooltip("x:Q", title=f"{name} (bin median)", format=".4g"),
                 alt.Tooltip("median:Q", title=f"median {_EPS}", format=".4g"),
                 alt.Tooltip("q1:Q", title="25th pct", format=".4g"), alt.Tooltip("q3:Q", title="75th pct", format=".4g"),
                 alt.Tooltip("count:Q", title="points in bin")]
        t = alt.Chart(trend)
        layers.insert(0, t.mark_area(color="#d62728", opacity=0.15).encode(
            x=alt.X("x:Q", title=xt, scale=x_scale), y=alt.Y("q1:Q", title=f"per-example {_EPS}", scale=y_scale),
            y2="q3:Q", tooltip=t_tip))
        layers.append(t.mark_line(color="#d62728", strokeWidth=2.5, point=alt.OverlayMarkDef(color="#d62728", size=20)).encode(
            x=alt.X("x:Q", title=xt, scale=x_scale), y=alt.Y("median:Q", title=f"per-example {_EPS}", scale=y_scale),
            tooltip=t_tip))
    return alt.layer(*layers).properties(title=_title(title, subtitle or None), width=WIDTH, height=HEIGHT)


# --------------------------------------------------------------------------- 8. training curves

_METRICS = {
    "loss": ("training loss", 1.0),
    "test_accuracy": ("test accuracy", 1.0),
    "wall_s": ("wall-clock time (s)", 1.0),
    "peak_mem_bytes": ("peak memory (MiB)", 1.0 / 2**20),
}


def training_curves(df: pd.DataFrame, highlight: str | None = None) -> alt.ConcatChart | alt.Chart:
    """Training loss, test accuracy, wall time and peak memory over steps, one small panel per metric.

    The price of privacy in utility and cost: DP-SGD runs (solid) beside non-private
    runs (dashed), one colour per run, so accuracy lost and time/memory spent on
    per-example gradients are read off directly. The title names the comparison only
    when both kinds are there, and the dash legend appears only then. ``highlight``:
    a run drawn thick, opaque and on top of the others (thin, faded), first in the
    legend as "<run> (this report)". Panels appear for the metrics present, in the
    order loss, test_accuracy, wall_s, peak_mem_bytes, then any other metric; bytes are
    shown in MiB. df: ``run_id, step, metric, value, private``. Series are thinned above
    ``MAX_ROWS`` rows (module doc).
    """
    title = "Training curves"
    if _is_empty(df):
        return no_data_chart(title)
    d = _columns(df, ["run_id", "step", "metric", "value", "private"], "training_curves", text=["run_id", "metric"])
    d["value"] = pd.to_numeric(d["value"], errors="coerce").astype(np.float64)
    d = d[np.isfinite(d["value"])]
    if d.empty:
        return no_data_chart(title, "no finite values")
    d["training"] = d["private"].map(_training_kind)
    d = d.drop(columns=["private"])
    d = thin_series(d, ["metric", "run_id"], "step")
    present = list(dict.fromkeys(d["metric"]))
    metrics = [m for m in _METRICS if m in present] + sorted(m for m in present if m not in _METRICS)
    trainings = [t for t in ("DP-SGD", "non-private", "unknown") if t in set(d["training"])]
    highlight = str(highlight) if highlight is not None and str(highlight) in set(d["run_id"]) else None
    d["run"] = d["run_id"].where(d["run_id"] != highlight, f"{highlight} (this report)")
    runs = ([f"{highlight} (this report)"] if highlight else []) + sorted(set(d["run_id"]) - {highlight})
    if {"DP-SGD", "non-private"} <= set(trainings):
        title = "Training curves: DP-SGD vs non-private runs"
    kinds_text = {"DP-SGD": "DP-SGD", "non-private": "non-private", "unknown": "training of unknown kind"}
    if len(trainings) > 1:
        subtitle = [f"{kinds_text[t]}: {w}" for t, w in zip(trainings, ("solid", "dashed", "dotted"))]
        subtitle = ["; ".join(subtitle) + "; one colour per run"]
    else:
        subtitle = [f"{len(runs)} {kinds_text[trainings[0]]} run{'s' if len(runs) != 1 else ''}; one colour per run"]
    if highlight and len(runs) > 1:
        subtitle.append(f"thick line on top: {highlight}, the run of this report")
    dash_legend = alt.Legend(symbolType="stroke", symbolStrokeColor="#333333") if len(trainings) > 1 else None
    panels = []
    for m in metrics:
        label, factor = _METRICS.get(m, (m, 1.0))
        g = d[d["metric"] == m].assign(value=lambda x: x["value"] * factor)
        sparse = g.groupby("run_id").size().max() <= 30
        enc = dict(
            x=alt.X("step:Q", title="training step"),
            y=alt.Y("value:Q", title=label, scale=alt.Scale(zero=False)),
            color=alt.Color("run:N", title="run", sort=runs, scale=alt.Scale(domain=runs),
                            legend=alt.Legend(symbolType="stroke", labelLimit=300)),
            strokeDash=alt.StrokeDash("training:N", title="training", sort=trainings, legend=dash_legend,
                                      scale=alt.Scale(domain=trainings, range=[[1, 0], [6, 4], [2, 2]][: len(trainings)])),
            tooltip=[alt.Tooltip("run_id:N", title="run"), alt.Tooltip("training:N"), alt.Tooltip("step:Q"),
                     alt.Tooltip("value:Q", title=label, format=".4g")],
        )
        others, mine = g[g["run_id"] != highlight], g[g["run_id"] == highlight]
        layers = []
        if not others.empty:
            faded = highlight is not None
            layers.append(alt.Chart(others).mark_line(point=bool(sparse), strokeWidth=1.2 if faded else 1.8,
                                                      opacity=0.45 if faded else 1.0).encode(**enc))
        if not mine.empty:
            layers.append(alt.Chart(mine).mark_line(point=bool(sparse), strokeWidth=3.0).encode(**enc))
        panel = layers[0] if len(layers) == 1 else alt.layer(*layers)
        panels.append(panel.properties(title=label, width=WIDTH // 2 - 40, height=170))
    return alt.concat(*panels, columns=2).properties(title=_title(title, subtitle))


# --------------------------------------------------------------------------- 9. histogram


def histogram(df: pd.DataFrame, column: str, title: str, x_title: str | None = None, bins: int = 40,
              subtitle: str | None = None) -> alt.Chart:
    """How many points have each value of ``column`` (e.g. a per-point loss): bars binned in pandas.

    ``bins`` equal-width bins over the finite values (non-finite ones left out and
    counted in the subtitle), so the spec has ``bins`` rows whatever the input size.
    """
    if _is_empty(df):
        return no_data_chart(title)
    _require(df, [column], "histogram")
    v = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(v)
    dropped, v = int((~finite).sum()), v[finite]
    if v.size == 0:
        return no_data_chart(title, "no finite values")
    counts, edges = np.histogram(v, bins=max(1, int(bins)))
    hist = pd.DataFrame({"start": edges[:-1], "end": edges[1:], "count": counts.astype(np.int64)})
    lines = [subtitle] if subtitle else []
    lines.append(f"{v.size} points, median {_fmt(np.median(v))}, max {_fmt(v.max())}"
                 + (f"; {dropped} non-finite value(s) left out" if dropped else ""))
    xt = x_title or column
    return (
        alt.Chart(hist).mark_bar(color="#4c78a8", binSpacing=1).encode(
            x=alt.X("start:Q", bin="binned", title=xt, scale=alt.Scale(zero=False)),
            x2=alt.X2("end:Q"),
            y=alt.Y("count:Q", title="number of points", axis=_count_axis(counts)),
            tooltip=[alt.Tooltip("start:Q", title="from", format=".4g"), alt.Tooltip("end:Q", title="to", format=".4g"),
                     alt.Tooltip("count:Q", title="points")],
        ).properties(title=_title(title, lines), width=WIDTH, height=HEIGHT - 80)
    )
