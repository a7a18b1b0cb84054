"""Charts (analysis.charts) and the HTML/PNG report (analysis.html_report), from small synthetic frames.

Each chart's Vega-Lite spec is validated against Altair's Vega-Lite JSON schema and
checked for the fields it must encode; the report is checked as text (self-contained,
escaped, one div per chart) and its PNGs with PIL. The browser rendering is checked in
test_report_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter

import altair as alt
import jsonschema
import numpy as np
import pandas as pd
import pytest
from conftest import walk
from PIL import Image
from scipy import stats

from dpledger.analysis import charts as C
from dpledger.analysis.html_report import Section, javascript_bundle, render_html, slugify, write_report


# --------------------------------------------------------------------------- helpers


def png_bytes(color=(255, 0, 0), size=(28, 28), noise_seed=None) -> bytes:
    if noise_seed is None:
        im = Image.new("RGB", size, color)
    else:
        a = (np.random.default_rng(noise_seed).random((size[1], size[0])) * 255).astype(np.uint8)
        im = Image.fromarray(a)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def frames(n: int = 200, seed: int = 1) -> dict[str, pd.DataFrame]:
    """One small synthetic frame per chart function, with the contract's columns."""
    rng = np.random.default_rng(seed)
    eps = pd.DataFrame({"point_id": np.arange(n), "epsilon": rng.gamma(5.0, 1.5, n)})
    rows = []
    for group, pts in (("lowest", [1, 2, 3]), ("highest", [7, 8, 9])):
        for p in pts:
            slope = (0.2 if group == "lowest" else 1.5) * (1 + p / 10)
            for s in range(0, 100, 5):
                rows.append((p, s, slope * s ** 0.8, group, "recorded"))
                rows.append((p, s, slope * s ** 0.8 * 1.05, group, "pchip"))
    curves = pd.DataFrame(rows, columns=["point_id", "step", "cumulative_cost", "group", "kind"])
    gallery = pd.DataFrame({
        "point_id": np.arange(8),
        "label": [i % 10 for i in range(8)],
        "epsilon": np.linspace(1.0, 10.0, 8),
        "rank": np.arange(1, 9),
        "group": ["lowest"] * 4 + ["highest"] * 4,
        "thumbnail": [png_bytes(noise_seed=i) for i in range(8)],
    })
    groups = pd.DataFrame({"group": rng.choice(["East Asian", "White", "Black", "Indian"], n),
                           "epsilon": rng.gamma(5.0, 1.5, n)})
    ra = rng.permutation(n) + 1
    rb = np.clip(ra + rng.integers(-30, 30, n), 1, n)
    ranks = pd.DataFrame({"point_id": np.arange(n), "rank_a": ra, "rank_b": rb})
    runs = ["s0", "s1", "s2"]
    matrix = pd.DataFrame([(a, b, 1.0 if a == b else 0.5 + 0.1 * (i + j))
                           for i, a in enumerate(runs) for j, b in enumerate(runs)], columns=["run_a", "run_b", "spearman"])
    scatter = pd.DataFrame({"point_id": np.arange(n), "epsilon": eps["epsilon"],
                            "curvature": eps["epsilon"] * 2 + rng.normal(0, 2, n)})
    tr = []
    for run, private in (("dp", True), ("nodp", False)):
        for s in range(0, 200, 10):
            tr += [(run, s, "loss", 2 / (1 + s / 50) + (0.3 if private else 0), private),
                   (run, s, "wall_s", s * 0.1 * (3 if private else 1), private),
                   (run, s, "peak_mem_bytes", 2 ** 30 * (2 if private else 1), private)]
            if s % 50 == 0:
                tr.append((run, s, "test_accuracy", 0.5 + s / (500 if private else 400), private))
    training = pd.DataFrame(tr, columns=["run_id", "step", "metric", "value", "private"])
    return {"eps": eps, "curves": curves, "gallery": gallery, "groups": groups, "ranks": ranks,
            "matrix": matrix, "scatter": scatter, "training": training}


def all_charts(f: dict[str, pd.DataFrame]) -> dict[str, alt.TopLevelMixin]:
    return {
        "epsilon_distribution": C.epsilon_distribution(f["eps"], 11.25),
        "cost_curves": C.cost_curves(f["curves"], 3),
        "gallery": C.gallery(f["gallery"], columns=4),
        "group_epsilon": C.group_epsilon(f["groups"], "race"),
        "rank_stability": C.rank_stability(f["ranks"], "s0", "s1"),
        "rank_correlation_matrix": C.rank_correlation_matrix(f["matrix"]),
        "scatter_vs": C.scatter_vs(f["scatter"], "curvature"),
        "training_curves": C.training_curves(f["training"]),
    }


@pytest.fixture(scope="module")
def F():
    return frames()


@pytest.fixture(scope="module")
def validator():
    from altair.vegalite.v6.schema import load_schema

    return jsonschema.Draft7Validator(load_schema())


def units(spec: dict) -> list[dict]:
    """The unit specs (those with a mark) of a spec."""
    return [d for d in walk(spec) if "mark" in d]


def mark_type(unit: dict) -> str:
    m = unit["mark"]
    return m if isinstance(m, str) else m["type"]


def rows_of(spec: dict, unit: dict) -> list[dict]:
    """The inline data rows a unit spec draws (Altair moves them to the top-level ``datasets``)."""
    data = unit.get("data") or spec.get("data")
    if data is None:
        return []
    if "values" in data:
        return data["values"]
    return spec["datasets"][data["name"]]


def title_text(spec: dict) -> str:
    t = spec.get("title")
    if isinstance(t, dict):
        t = t.get("text")
    if isinstance(t, list):
        t = " ".join(t)
    return t or ""


def spec_datasets_sizes(spec: dict) -> list[int]:
    return [len(v) for v in spec.get("datasets", {}).values()]


# --------------------------------------------------------------------------- every chart


def test_every_chart_is_a_valid_vega_lite_spec_with_title_and_tooltips(F, validator):
    charts = all_charts(F)
    assert len(charts) == 8
    for name, chart in charts.items():
        spec = chart.to_dict()  # altair validates here
        validator.validate(spec)  # and again, explicitly, against the Vega-Lite schema
        assert spec["$schema"] == alt.SCHEMA_URL, name
        assert re.search(r"/vega-lite/v6\.", spec["$schema"]), name
        assert title_text(spec), f"{name} has no title"
        assert any("tooltip" in d.get("encoding", {}) for d in walk(spec)), f"{name} has no tooltip"
        # every x/y axis that is drawn is titled
        for d in walk(spec):
            for ch in ("x", "y"):
                enc = d.get("encoding", {}).get(ch)
                if isinstance(enc, dict) and "field" in enc and enc.get("axis", {}) is not None and enc.get("scale", {}) is not None:
                    assert enc.get("title"), f"{name}: {ch} encoding of {enc['field']} has no title"


@pytest.mark.parametrize("name", ["epsilon_distribution", "cost_curves", "gallery", "group_epsilon", "rank_stability",
                                  "rank_correlation_matrix", "scatter_vs", "training_curves"])
@pytest.mark.parametrize("empty", ["no columns", "columns", "none"])
def test_empty_frame_gives_a_no_data_chart(name, empty, validator):
    cols = {
        "epsilon_distribution": ["point_id", "epsilon"],
        "cost_curves": ["point_id", "step", "cumulative_cost", "group", "kind"],
        "gallery": ["point_id", "label", "epsilon", "rank", "group", "thumbnail"],
        "group_epsilon": ["group", "epsilon"],
        "rank_stability": ["point_id", "rank_a", "rank_b"],
        "rank_correlation_matrix": ["run_a", "run_b", "spearman"],
        "scatter_vs": ["point_id", "epsilon", "curvature"],
        "training_curves": ["run_id", "step", "metric", "value", "private"],
    }[name]
    df = None if empty == "none" else pd.DataFrame(columns=cols if empty == "columns" else [])
    fn = getattr(C, name)
    extra = {"epsilon_distribution": (11.25,), "cost_curves": (5,), "group_epsilon": ("race",),
             "rank_stability": ("a", "b"), "scatter_vs": ("curvature",)}.get(name, ())
    spec = fn(df, *extra).to_dict()
    validator.validate(spec)
    assert mark_type(spec) == "text"
    assert rows_of(spec, spec) == [{"message": "no data"}]
    assert title_text(spec)


def test_missing_column_is_a_clear_error(F):
    with pytest.raises(ValueError, match="epsilon"):
        C.epsilon_distribution(F["eps"].drop(columns=["epsilon"]), 1.0)
    with pytest.raises(ValueError, match="rank_b"):
        C.rank_stability(F["ranks"].drop(columns=["rank_b"]), "a", "b")


# --------------------------------------------------------------------------- 1. distribution


def test_epsilon_distribution_is_binned_in_pandas_with_the_run_epsilon_rule(F):
    spec = C.epsilon_distribution(F["eps"], 11.25, bins=30).to_dict()
    bars = [u for u in units(spec) if mark_type(u) == "bar"]
    assert len(bars) == 1
    x = bars[0]["encoding"]["x"]
    assert x["field"] == "epsilon" and x["bin"] == "binned" and bars[0]["encoding"]["x2"]["field"] == "epsilon_end"
    hist = rows_of(spec, bars[0])
    assert len(hist) == 30
    counts, edges = np.histogram(F["eps"]["epsilon"], bins=30)
    assert [h["count"] for h in hist] == counts.tolist()
    np.testing.assert_allclose([h["epsilon"] for h in hist], edges[:-1])
    rules = [u for u in units(spec) if mark_type(u) == "rule"]
    assert len(rules) == 1 and rules[0]["encoding"]["x"]["datum"] == 11.25
    texts = [u for u in units(spec) if mark_type(u) == "text"]
    assert texts[0]["encoding"]["x"]["datum"] == 11.25
    assert rows_of(spec, texts[0])[0]["label"] == "data-independent ε = 11.25"
    assert "rdp" in json.dumps(spec["title"], ensure_ascii=False)


def test_epsilon_distribution_domain_reaches_the_run_epsilon_and_drops_non_finite():
    df = pd.DataFrame({"point_id": range(6), "epsilon": [1.0, 2.0, 3.0, np.nan, np.inf, 2.5]})
    spec = C.epsilon_distribution(df, 40.0, rule="gla").to_dict()
    bars = [u for u in units(spec) if mark_type(u) == "bar"][0]
    assert sum(h["count"] for h in rows_of(spec, bars)) == 4
    lo, hi = bars["encoding"]["x"]["scale"]["domain"]
    assert lo <= 1.0 and hi >= 40.0
    assert "2 non-finite" in json.dumps(spec["title"]) and "gla" in json.dumps(spec["title"])
    # no run epsilon: no rule
    spec = C.epsilon_distribution(df, None).to_dict()
    assert not [u for u in units(spec) if mark_type(u) == "rule"]


def test_epsilon_distribution_of_a_million_points_is_a_small_spec():
    df = pd.DataFrame({"point_id": np.arange(1_000_000), "epsilon": np.random.default_rng(0).gamma(4, 2, 1_000_000)})
    spec = C.epsilon_distribution(df, 12.0, bins=50).to_dict()
    assert max(spec_datasets_sizes(spec)) == 50
    assert len(json.dumps(spec)) < 20_000


# --------------------------------------------------------------------------- 2. cost curves


def test_cost_curves_split_by_group_colour_by_point_dash_by_kind(F):
    spec = C.cost_curves(F["curves"], 3).to_dict()
    assert spec["facet"]["column"]["field"] == "group"
    assert spec["facet"]["column"]["sort"] == ["lowest", "highest"]
    enc = spec["spec"]["encoding"]
    assert mark_type(spec["spec"]) == "line"
    assert enc["x"]["field"] == "step" and enc["y"]["field"] == "cumulative_cost" and enc["color"]["field"] == "point_id"
    assert enc["strokeDash"]["field"] == "kind"
    dash = dict(zip(enc["strokeDash"]["scale"]["domain"], enc["strokeDash"]["scale"]["range"]))
    assert dash["recorded"] == [1, 0] and dash["pchip"] != [1, 0]  # recorded solid, fit dashed
    rows = rows_of(spec, spec)
    assert len(rows) == len(F["curves"])
    assert "3 lowest" in title_text(spec) and "3 highest" in title_text(spec)


def test_cost_curves_keep_k_points_per_group_by_final_recorded_cost():
    rows = []
    for group in ("lowest", "highest"):
        for p in range(5):
            pid = f"{group}-{p}"
            for s in range(10):
                rows.append((pid, s, (p + 1) * s, group, "recorded"))
                rows.append((pid, s, (5 - p) * s, group, "linear"))  # fits rank the other way: must not be used
    spec = C.cost_curves(pd.DataFrame(rows, columns=["point_id", "step", "cumulative_cost", "group", "kind"]), 2).to_dict()
    kept = {(r["group"], r["point_id"]) for r in rows_of(spec, spec)}
    assert kept == {("lowest", "lowest-0"), ("lowest", "lowest-1"), ("highest", "highest-4"), ("highest", "highest-3")}


def test_cost_curves_are_thinned_to_max_rows_keeping_first_and_last_steps():
    n_pts, n_steps = 8, 2000
    rows = [(p, s, float(s) * (p + 1), "lowest" if p < 4 else "highest", kind)
            for p in range(n_pts) for kind in ("recorded", "linear") for s in range(n_steps)]
    df = pd.DataFrame(rows, columns=["point_id", "step", "cumulative_cost", "group", "kind"])
    assert len(df) > C.MAX_ROWS
    spec = C.cost_curves(df, 4).to_dict()
    kept = pd.DataFrame(rows_of(spec, spec))
    assert len(kept) <= C.MAX_ROWS
    per = kept.groupby(["point_id", "kind"])["step"]
    assert per.ngroups == 2 * n_pts
    assert (per.min() == 0).all() and (per.max() == n_steps - 1).all()
    assert (per.size() == C.MAX_ROWS // (2 * n_pts)).all()


def test_thin_series_bound_holds_with_many_series():
    df = pd.DataFrame({"s": np.repeat(np.arange(3000), 4), "step": np.tile(np.arange(4), 3000)})
    out = C.thin_series(df, ["s"], "step", max_rows=5000)
    assert len(out) <= 5000
    small = df.head(100)
    assert C.thin_series(small, ["s"], "step") is small


def test_cost_curves_legend_is_sorted_numerically():
    rows = [(p, s, float(s), "highest", "recorded") for p in (1084, 11, 13, 131, 7) for s in range(3)]
    spec = C.cost_curves(pd.DataFrame(rows, columns=["point_id", "step", "cumulative_cost", "group", "kind"]), 5).to_dict()
    assert spec["spec"]["encoding"]["color"]["sort"] == ["7", "11", "13", "131", "1084"]  # was 1084, 11, 13, ...


def spread_frames():
    steps = np.arange(0, 101, 10)
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    bands = pd.DataFrame([(s, q, s * (0.5 + q)) for q in qs for s in steps], columns=["step", "quantile", "cumulative_cost"])
    curves = pd.DataFrame([(p, s, s * f, kind, label)
                           for p, f, label in ((1084, 1.5, "dearest: point 1084"), (11, 1.0, "median: point 11"),
                                               (13, 0.5, "cheapest: point 13"))
                           for kind in ("recorded", "pchip") for s in steps],
                          columns=["point_id", "step", "cumulative_cost", "kind", "label"])
    return bands, curves


def test_cost_spread_bands_of_all_points_and_labelled_points_on_top():
    bands, curves = spread_frames()
    spec = C.cost_spread(bands, curves, note="1437 points").to_dict()
    layers = spec["layer"]
    assert [mark_type(u) for u in layers] == ["area", "line", "line"]  # bands under, points on top
    area = pd.DataFrame(rows_of(spec, layers[0]))
    assert list(dict.fromkeys(area["band"])) == ["5%–95% of points", "25%–75% of points"]  # outer band first
    outer = area[area["band"] == "5%–95% of points"].set_index("step")
    assert outer.loc[100, "lo"] == pytest.approx(55) and outer.loc[100, "hi"] == pytest.approx(145)
    assert layers[0]["encoding"]["fill"]["scale"]["range"][0] != layers[0]["encoding"]["fill"]["scale"]["range"][1]
    median = pd.DataFrame(rows_of(spec, layers[1]))
    assert median.set_index("step").loc[100, "median"] == pytest.approx(100)
    enc = layers[2]["encoding"]
    assert enc["stroke"]["sort"] == ["dearest: point 1084", "median: point 11", "cheapest: point 13"]  # by final cost
    assert len(set(enc["stroke"]["scale"]["range"])) == 3  # distinct colours
    dash = dict(zip(enc["strokeDash"]["scale"]["domain"], enc["strokeDash"]["scale"]["range"]))
    assert dash["recorded"] == [1, 0] and dash["pchip"] != [1, 0]
    assert "1437 points" in json.dumps(spec["title"])


def test_cost_spread_without_points_or_bands():
    bands, curves = spread_frames()
    only_bands = C.cost_spread(bands, None).to_dict()
    assert [mark_type(u) for u in only_bands["layer"]] == ["area", "line"]
    only_points = C.cost_spread(None, curves[curves["kind"] == "recorded"]).to_dict()
    assert [mark_type(u) for u in units(only_points)] == ["line"]
    assert "no data" in json.dumps(C.cost_spread(None, None).to_dict())


# --------------------------------------------------------------------------- 3. gallery


def test_gallery_draws_the_passed_pngs_as_data_urls(F):
    spec = C.gallery(F["gallery"], columns=4).to_dict()
    assert len(spec["vconcat"]) == 2  # one block for lowest, one for highest
    images = [u for u in units(spec) if mark_type(u) == "image"]
    assert len(images) == 2
    urls = {}
    for block, img in zip(spec["vconcat"], images):
        assert img["encoding"]["url"]["field"] == "url"
        for r in rows_of(spec, block):
            assert r["url"].startswith("data:image/png;base64,")
            urls[r["point_id"]] = base64.b64decode(r["url"].split(",", 1)[1])
    assert urls == {str(p): t for p, t in zip(F["gallery"]["point_id"], F["gallery"]["thumbnail"])}
    # lowest block first, cheapest first; highest block dearest first; captions carry label, epsilon and rank
    low = rows_of(spec, spec["vconcat"][0])
    high = rows_of(spec, spec["vconcat"][1])
    assert [r["point_id"] for r in low] == ["0", "1", "2", "3"]
    assert [r["point_id"] for r in high] == ["7", "6", "5", "4"]
    assert low[0]["caption"] == "point 0\nlabel 0\nε 1 · #1"  # the point id first
    texts = [u for u in units(spec) if mark_type(u) == "text" and u["encoding"].get("text", {}).get("field") == "caption"]
    assert len(texts) == 2


def test_gallery_placeholder_for_missing_thumbnail_and_jpeg_reencoded():
    jpeg = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 128, 0)).save(jpeg, format="JPEG")
    df = pd.DataFrame({"point_id": [1, 2, 3], "label": ["cat", None, "dog"], "epsilon": [1.0, 2.0, 3.0], "rank": [1, 2, 3],
                       "group": ["lowest"] * 3, "thumbnail": [None, jpeg.getvalue(), png_bytes()]})
    spec = C.gallery(df).to_dict()
    rows = rows_of(spec, spec["vconcat"][0])
    assert rows[0]["url"] is None and rows[0]["missing"] is True
    assert rows[1]["label"] == "?"
    reencoded = Image.open(io.BytesIO(base64.b64decode(rows[1]["url"].split(",", 1)[1])))
    assert reencoded.format == "PNG" and reencoded.size == (20, 20)
    placeholder = [u for u in units(spec) if mark_type(u) == "text" and u["mark"].get("text") == "no image"]
    assert placeholder and placeholder[0]["transform"] == [{"filter": "datum.missing"}]


def test_gallery_dearest_first_keeps_ranks_ascending_and_input_order_within_ties():
    """Tied points (same ε, same rank): the highest block ran #10 -> #1; now #1 first, ties in the caller's order."""
    df = pd.DataFrame({"point_id": [50, 40, 30, 20, 10], "label": [1, 2, 3, 4, 5],
                       "epsilon": [4.5, 4.5, 4.5, 4.0, 3.0], "rank": [1, 1, 1, 4, 5],
                       "group": ["highest"] * 5, "thumbnail": [png_bytes()] * 5})
    spec = C.gallery(df, notes={"highest": "3 points tie at ε = 4.5; shown by mean norm"}).to_dict()
    (block,) = spec["vconcat"]
    got = rows_of(spec, block)
    assert [r["point_id"] for r in got] == ["50", "40", "30", "20", "10"]
    assert [r["rank"] for r in got] == [1, 1, 1, 4, 5]
    assert got[0]["caption"].split("\n")[0] == "point 50"
    assert block["title"]["subtitle"] == "3 points tie at ε = 4.5; shown by mean norm"


# --------------------------------------------------------------------------- 4. groups


def test_group_epsilon_mean_spread_and_count(F):
    spec = C.group_epsilon(F["groups"], "race").to_dict()
    bar = [u for u in units(spec) if mark_type(u) == "bar"][0]
    rows = {r["group"]: r for r in rows_of(spec, bar)}
    g = F["groups"].groupby("group")["epsilon"]
    for name, s in g:
        assert rows[name]["count"] == len(s)
        assert rows[name]["mean"] == pytest.approx(s.mean())
        assert rows[name]["q1"] == pytest.approx(s.quantile(0.25)) and rows[name]["q3"] == pytest.approx(s.quantile(0.75))
    assert bar["encoding"]["x"]["field"] == "mean" and bar["encoding"]["y"]["title"] == "race"
    assert bar["encoding"]["y"]["sort"] == g.mean().sort_values(ascending=False).index.tolist()
    assert "count" in [t["field"] for t in bar["encoding"]["tooltip"]]
    iqr = [u for u in units(spec) if mark_type(u) == "rule" and "x2" in u["encoding"]][0]
    assert (iqr["encoding"]["x"]["field"], iqr["encoding"]["x2"]["field"]) == ("q1", "q3")


# --------------------------------------------------------------------------- 5. rank stability


def test_rank_stability_title_has_scipy_spearman_and_a_diagonal(F):
    spec = C.rank_stability(F["ranks"], "s0", "s1").to_dict()
    rho = stats.spearmanr(F["ranks"]["rank_a"], F["ranks"]["rank_b"]).statistic
    assert f"ρ = {rho:.3f}" in title_text(spec)
    assert "s0" in title_text(spec) and "s1" in title_text(spec)
    line = [u for u in units(spec) if mark_type(u) == "line"][0]
    assert line["encoding"]["x"]["field"] == line["encoding"]["y"]["field"]  # y = x
    diag = rows_of(spec, line)
    assert [d["rank"] for d in diag] == [1, len(F["ranks"])]
    pts = [u for u in units(spec) if mark_type(u) == "circle"][0]
    assert (pts["encoding"]["x"]["field"], pts["encoding"]["y"]["field"]) == ("rank_a", "rank_b")


def test_rank_stability_samples_above_max_rows_but_rho_uses_all():
    n = 12_000
    rng = np.random.default_rng(3)
    a = rng.permutation(n) + 1
    b = np.clip(a + rng.integers(-2000, 2000, n), 1, n)
    df = pd.DataFrame({"point_id": np.arange(n), "rank_a": a, "rank_b": b})
    spec = C.rank_stability(df, "a", "b").to_dict()
    pts = [u for u in units(spec) if mark_type(u) == "circle"][0]
    drawn = rows_of(spec, pts)
    assert len(drawn) == C.MAX_ROWS
    assert f"{stats.spearmanr(a, b).statistic:.3f}" in title_text(spec)
    assert spec == C.rank_stability(df, "a", "b").to_dict()  # fixed seed: same chart


def test_spearman_matches_scipy_with_ties_and_nans():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 10, 300).astype(float)
    y = x + rng.integers(0, 5, 300)
    x[[3, 17]] = np.nan
    ok = ~np.isnan(x)
    assert C.spearman(x, y) == pytest.approx(stats.spearmanr(x[ok], y[ok]).statistic, abs=1e-12)
    assert np.isnan(C.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- 6. matrix


def test_rank_correlation_matrix_heatmap_with_values_and_mirrored_pairs():
    df = pd.DataFrame({"run_a": ["a", "a", "b"], "run_b": ["b", "c", "c"], "spearman": [0.9, -0.2, 0.5]})
    spec = C.rank_correlation_matrix(df).to_dict()
    layer_enc = spec["layer"]
    assert layer_enc[0]["mark"]["type"] == "rect" and layer_enc[0]["encoding"]["color"]["field"] == "spearman"
    assert layer_enc[0]["encoding"]["color"]["scale"]["domain"] == [-1, 1]
    assert layer_enc[1]["mark"]["type"] == "text" and layer_enc[1]["encoding"]["text"]["field"] == "spearman"
    cells = {(r["run_a"], r["run_b"]): r["spearman"] for r in rows_of(spec, spec)}
    assert len(cells) == 9
    assert cells[("b", "a")] == 0.9 and cells[("c", "a")] == -0.2 and cells[("a", "a")] == 1.0


# --------------------------------------------------------------------------- 7. scatter


def test_scatter_vs_has_a_binned_median_trend_and_scipy_spearman(F):
    spec = C.scatter_vs(F["scatter"], "curvature").to_dict()
    rho = stats.spearmanr(F["scatter"]["curvature"], F["scatter"]["epsilon"]).statistic
    assert f"ρ = {rho:.3f}" in title_text(spec) and "curvature" in title_text(spec)
    pts = [u for u in units(spec) if mark_type(u) == "circle"][0]
    assert pts["encoding"]["y"]["field"] == "epsilon" and pts["encoding"]["x"]["title"] == "curvature"
    line = [u for u in units(spec) if mark_type(u) == "line"][0]
    trend = pd.DataFrame(rows_of(spec, line))
    assert trend["count"].sum() == len(F["scatter"])  # every point is in a bin
    assert not any("loess" in t for u in units(spec) for t in u.get("transform", []))


def test_scatter_vs_trend_stays_within_the_data():
    """A loess line dived to ε ≈ 1.45 where all points are ≥ 2.5 (sparse ends): the trend stays in the data's box."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 1, 300), [8.0, 9.0, 30.0]])  # a few far, sparse points
    eps = np.concatenate([2.5 + rng.uniform(0, 2, 300), [2.5, 4.5, 2.5]])
    df = pd.DataFrame({"point_id": np.arange(len(x)), "epsilon": eps, "curvature": x})
    spec = C.scatter_vs(df, "curvature").to_dict()
    trend = pd.DataFrame(rows_of(spec, [u for u in units(spec) if mark_type(u) == "line"][0]))
    assert trend["x"].min() >= x.min() and trend["x"].max() <= x.max()
    assert trend["median"].min() >= eps.min() and trend["median"].max() <= eps.max()
    band = [u for u in units(spec) if mark_type(u) == "area"][0]
    b = pd.DataFrame(rows_of(spec, band))
    assert b["q1"].min() >= eps.min() and b["q3"].max() <= eps.max()
    # too few points for a trend: the scatter alone
    small = C.scatter_vs(df.head(10), "curvature").to_dict()
    assert [mark_type(u) for u in units(small)] == ["circle"]


def test_scatter_vs_log_x_and_downsampling():
    n = 9000
    rng = np.random.default_rng(2)
    mem = 10 ** rng.uniform(-3, 2, n)
    df = pd.DataFrame({"point_id": np.arange(n), "epsilon": np.log(mem) + rng.normal(0, 1, n), "memorization": mem})
    df.loc[0, "memorization"] = -1.0  # left out on a log axis
    spec = C.scatter_vs(df, "memorization", log_x=True).to_dict()
    pts = [u for u in units(spec) if mark_type(u) == "circle"][0]
    assert pts["encoding"]["x"]["scale"]["type"] == "log"
    assert len(rows_of(spec, pts)) == C.MAX_ROWS
    ok = df["memorization"] > 0
    rho = stats.spearmanr(df.loc[ok, "memorization"], df.loc[ok, "epsilon"]).statistic
    assert f"{rho:.3f}" in title_text(spec) and f"n = {n - 1}" in title_text(spec)


# --------------------------------------------------------------------------- 8. training curves


def test_training_curves_one_panel_per_metric_dp_vs_non_dp(F):
    spec = C.training_curves(F["training"]).to_dict()
    assert title_text(spec) == "Training curves: DP-SGD vs non-private runs"
    assert [p["title"] for p in spec["concat"]] == ["training loss", "test accuracy", "wall-clock time (s)", "peak memory (MiB)"]
    for panel in spec["concat"]:
        enc = panel["encoding"]
        assert enc["color"]["field"] == "run" and enc["strokeDash"]["field"] == "training"
        assert enc["strokeDash"]["legend"]["symbolStrokeColor"]  # the dash legend's symbols are visible
        assert set(enc["strokeDash"]["scale"]["domain"]) == {"DP-SGD", "non-private"}
    mem = rows_of(spec, spec["concat"][3])
    assert {r["value"] for r in mem} == {1024.0, 2048.0}  # bytes shown in MiB
    # only the metrics present get a panel
    two = C.training_curves(F["training"][F["training"]["metric"].isin(["loss", "wall_s"])]).to_dict()
    assert [p["title"] for p in two["concat"]] == ["training loss", "wall-clock time (s)"]


def test_training_curves_of_dp_runs_only_do_not_claim_a_comparison(F):
    dp = F["training"][F["training"]["private"]]
    spec = C.training_curves(dp).to_dict()
    assert title_text(spec) == "Training curves"  # was "DP-SGD vs non-private runs" with no non-private run
    assert "non-private" not in json.dumps(spec["title"])
    for panel in spec["concat"]:
        assert panel["encoding"]["strokeDash"]["legend"] is None  # no legend entry for a single kind


def test_training_curves_highlight_one_run_on_top():
    rows = [(run, s, "loss", 1.0 / (1 + s) + i, True) for i, run in enumerate(["r1", "r2", "r3"]) for s in range(10)]
    df = pd.DataFrame(rows, columns=["run_id", "step", "metric", "value", "private"])
    spec = C.training_curves(df, highlight="r2").to_dict()
    (panel,) = spec["concat"]
    under, top = panel["layer"]
    assert {r["run_id"] for r in rows_of(spec, top)} == {"r2"}
    assert {r["run_id"] for r in rows_of(spec, under)} == {"r1", "r3"}
    assert top["mark"]["strokeWidth"] > under["mark"]["strokeWidth"] and under["mark"]["opacity"] < 1
    assert top["encoding"]["color"]["sort"] == ["r2 (this report)", "r1", "r3"]
    assert "r2" in json.dumps(spec["title"])
    # an unknown run to highlight is ignored
    assert "layer" not in C.training_curves(df, highlight="nope").to_dict()["concat"][0]


def test_training_curves_thinned_above_max_rows():
    steps = np.arange(3000)
    df = pd.concat([pd.DataFrame({"run_id": r, "step": steps, "metric": m, "value": steps * 1.0, "private": r == "dp"})
                    for r in ("dp", "nodp") for m in ("loss", "wall_s")], ignore_index=True)
    spec = C.training_curves(df).to_dict()
    total = sum(len(rows_of(spec, p)) for p in spec["concat"])
    assert total <= C.MAX_ROWS
    for p in spec["concat"]:
        rows = pd.DataFrame(rows_of(spec, p))
        assert (rows.groupby("run_id")["step"].max() == 2999).all() and (rows.groupby("run_id")["step"].min() == 0).all()


# --------------------------------------------------------------------------- report


def _report_html(F, extra_sections=()):
    charts = all_charts(F)
    sections = [Section(f"{k} chart", c, f"what {k} shows") for k, c in charts.items()]
    sections.insert(1, Section("A text-only section", None, "no chart <here>"))
    sections += list(extra_sections)
    summary = [("run <id>", "s0 & \"seed\" 0"), ("data-independent ε", "11.25"), ("median ε", "8.6")]
    return render_html("Report <dpledger>", summary, sections, notes=["ε is <per-example> & output-specific"]), charts


def test_render_html_is_self_contained_escaped_and_has_one_div_per_chart(F):
    evil = "</script><script>alert(1)</script>"
    evil_chart = C.epsilon_distribution(F["eps"], 11.25).properties(title=evil)
    page, charts = _report_html(F, [Section("evil " + evil, evil_chart, evil)])
    n = len(charts) + 1
    # nothing loaded from anywhere: no script src, no link, no src/href with a URL, no CDN host
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link\b", page, re.I)
    assert not re.search(r"""\b(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    for host in ("cdn.jsdelivr.net", "unpkg.com", "cdnjs", "googleapis.com"):
        assert host not in page
    # the JS bundle is inlined exactly once
    assert page.count(javascript_bundle()) == 1
    assert page.count("window.vegaEmbed=") == 1
    # one div per chart, counted on the body, titles attached
    divs = re.findall(r'<div id="chart-(\d+)" class="chart" data-chart-title="([^"]*)"></div>', page)
    assert [int(i) for i, _ in divs] == list(range(n))
    assert f'<body data-chart-count="{n}">' in page
    assert divs[0][1] == "epsilon_distribution chart"
    assert "<h2>A text-only section</h2>" in page and "no chart &lt;here&gt;" in page
    # summary, notes and title escaped
    assert "<th>run &lt;id&gt;</th><td>s0 &amp; &quot;seed&quot; 0</td>" in page
    assert "<th>data-independent ε</th><td>11.25</td>" in page
    assert "<li>ε is &lt;per-example&gt; &amp; output-specific</li>" in page
    assert "<title>Report &lt;dpledger&gt;</title>" in page and "<h1>Report &lt;dpledger&gt;</h1>" in page
    assert evil not in page and "alert(1)" in page  # present, but only escaped
    # sections in order
    positions = [page.index(f"<h2>{k} chart</h2>") for k in charts]
    assert positions == sorted(positions)
    # the inlined specs are the charts' specs, in order
    m = re.search(r'<script type="application/json" id="dpledger-specs">(.*?)</script>', page, re.S)
    specs = json.loads(m.group(1))
    assert len(specs) == n
    assert specs[0] == charts["epsilon_distribution"].to_dict()
    assert specs[-1]["title"] == evil


def test_render_html_without_charts_has_no_script_bundle():
    page = render_html("t", {"a": "b"}, [Section("only text", None, "x")])
    assert 'data-chart-count="0"' in page and "window.vegaEmbed=" not in page and 'class="chart"' not in page


def _colour_stats(png_path):
    """The image and a Counter of its RGB colours."""
    im = Image.open(png_path)
    im.load()
    px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours, n = np.unique(px, axis=0, return_counts=True)
    return im, Counter({tuple(int(v) for v in c): int(k) for c, k in zip(colours, n)})


def test_write_report_writes_valid_pngs_and_gallery_images_survive(F, tmp_path):
    red = png_bytes((255, 0, 0), (28, 28))
    gal = pd.DataFrame({"point_id": [1, 2], "label": [3, 4], "epsilon": [1.0, 9.0], "rank": [1, 2],
                        "group": ["lowest", "highest"], "thumbnail": [red, red]})
    sections = [
        Section("Per-example ε distribution", C.epsilon_distribution(F["eps"], 11.25)),
        Section("Text", None, "no chart"),
        Section("Gallery", C.gallery(gal)),
        Section("Gallery", C.training_curves(F["training"])),
    ]
    out = write_report(tmp_path / "sub" / "report.html", "R", {"k": "v"}, sections, png_dir=tmp_path / "png", png_scale=1)
    assert out["html"] == tmp_path / "sub" / "report.html" and out["html"].read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out["pngs"]] == ["per-example-distribution.png", "gallery.png", "gallery-2.png"]
    for p in out["pngs"]:
        im, counts = _colour_stats(p)
        assert im.format == "PNG" and im.width >= 300 and im.height >= 150
        top = counts.most_common(1)[0][1]
        assert 1 - top / (im.width * im.height) > 0.02, f"{p.name} is nearly one colour"
    # the gallery's thumbnails (pure red, 48x48 px each at scale 1) are drawn
    _, counts = _colour_stats(out["pngs"][1])
    assert counts[(255, 0, 0)] >= 2 * 40 * 40


def test_histogram_bins_in_pandas_with_integer_counts():
    df = pd.DataFrame({"mean_loss": np.r_[np.linspace(0, 2, 99), np.nan]})
    spec = C.histogram(df, "mean_loss", "Mean loss per point", "mean loss", bins=10).to_dict()
    got = rows_of(spec, spec)
    assert len(got) == 10 and sum(r["count"] for r in got) == 99
    assert spec["encoding"]["y"]["axis"]["format"] == "d"  # whole numbers of points
    assert "1 non-finite" in json.dumps(spec["title"])


def test_epsilon_distribution_of_few_points_has_whole_number_ticks():
    """10 points in 40 bins: the count axis showed 0, 1, 1, 2 (fractional ticks rounded); now 0, 1, 2."""
    df = pd.DataFrame({"point_id": range(10), "epsilon": [5.8, 6.3, 6.4, 7.5, 8.6, 8.6, 8.7, 9.0, 9.1, 10.3]})
    spec = C.epsilon_distribution(df, 11.25).to_dict()
    bars = [u for u in units(spec) if mark_type(u) == "bar"][0]
    assert bars["encoding"]["y"]["axis"]["values"] == [0, 1, 2]


def test_section_items_are_listed_escaped():
    page = render_html("t", {}, [Section("Not in this report", None, "left out:", items=["a <b>", "c"])])
    assert '<ul class="items"><li>a &lt;b&gt;</li><li>c</li></ul>' in page


def test_write_report_writes_no_html_when_a_chart_fails(tmp_path):
    broken = {"$schema": "https://vega.github.io/schema/vega-lite/v6.json", "data": {"values": [{"a": 1}]},
              "mark": "no-such-mark", "encoding": {"x": {"field": "a", "type": "quantitative"}}}
    out = tmp_path / "r.html"
    with pytest.raises(Exception):
        write_report(out, "R", {}, [Section("bad", broken)], png_dir=tmp_path / "png")
    assert not out.exists()  # nothing partially written


def test_slugify():
    assert slugify("Per-example ε: <lowest> 20!") == "per-example-lowest-20"
    assert slugify("ε") == "chart"
