"""`dpledger report` on a real (small) warehouse: sections, summary, PNGs, offline
rendering in headless Chromium."""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from conftest import query_rows, walk

from dpledger.cli import main

SMALL = ["--dataset", "digits", "--n-train", "200", "--n-test", "100", "--batch-size", "20", "--model", "logreg",
         "--epochs", "2", "--track", "all"]


@pytest.fixture(scope="module")
def warehouse_db(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    db = d / "w.duckdb"
    # C = 3: some points' gradients fall below the clip (a spread of epsilon), 72 of run a's stay above it (ties)
    for args in (["--noise-multiplier", "1.0", "--max-grad-norm", "3", "--seed", "0", "--run", "a"],
                 ["--noise-multiplier", "1.0", "--max-grad-norm", "3", "--seed", "1", "--run", "b"],
                 ["--disable-dp", "--run", "base"]):
        assert main(["train", *SMALL, *args, "--db", str(db)]) == 0
    assert main(["account", "--db", str(db)]) == 0
    return db


def page_specs(html_path) -> dict[str, dict]:
    """The Vega-Lite spec of each chart of a written report, by its section title."""
    text = Path(html_path).read_text()
    specs = json.loads(re.search(r'<script type="application/json" id="dpledger-specs">(.*?)</script>', text, re.S).group(1))
    titles = [html.unescape(t) for t in re.findall(r'<div id="chart-\d+" class="chart" data-chart-title="([^"]*)"', text)]
    assert len(titles) == len(specs)
    return dict(zip(titles, specs))


def rows(spec: dict, unit: dict) -> list[dict]:
    data = unit.get("data") or spec.get("data")
    return data["values"] if "values" in data else spec["datasets"][data["name"]]


def marks(spec: dict, kind: str) -> list[dict]:
    return [u for u in walk(spec) if "mark" in u and (u["mark"] if isinstance(u["mark"], str) else u["mark"]["type"]) == kind]


def epsilons(db, run: str) -> pd.DataFrame:
    return pd.DataFrame(query_rows(db, "SELECT point_id, epsilon FROM point_epsilon WHERE run_id = ? AND rule = 'rdp'",
                                   [run]), columns=["point_id", "epsilon"])


def mean_norms(db, run: str) -> dict[int, float]:
    return dict(query_rows(db, "SELECT point_id, avg(grad_norm) FROM point_steps WHERE run_id = ? GROUP BY 1", [run]))


def test_report_sections_summary_and_pngs(warehouse_db, tmp_path, capsys):
    out, png = tmp_path / "r.html", tmp_path / "png"
    assert main(["report", "--run", "a", "--db", str(warehouse_db), "--out", str(out), "--png", str(png),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sections"] == [
        "Distribution of per-example ε", "Privacy spent over training",
        "The 10 lowest- and 10 highest-ε points", "ε per class", "Rank stability: a vs b",
        "Rank correlation across runs", "Training curves"]
    text = out.read_text()
    assert not re.search(r"<script[^>]+src=", text) and "<link" not in text
    assert text.count('class="chart"') == 7
    for key in ("data-independent ε", "per-example ε: min / 5% / 25% / median", "sample rate q"):
        assert key in text
    assert len(result["pngs"]) == 7
    for p in result["pngs"]:
        im = Image.open(p)
        assert im.size[0] > 200 and len(set(im.convert("L").getdata())) > 10


def test_report_json_summary_has_field_names_and_numbers(warehouse_db, tmp_path):
    """report() returns machine fields: names as keys, numbers as numbers (was: display labels, strings)."""
    import dpledger

    result = dpledger.report(warehouse_db, "a", tmp_path / "r.html")
    s = result["summary"]
    eps = epsilons(warehouse_db, "a").epsilon.to_numpy()
    assert s["run_id"] == "a" and s["private"] is True and s["rule"] == "rdp"
    assert s["sample_rate"] == 0.1 and isinstance(s["steps"], int) and s["noise_multiplier"] == 1.0
    assert s["points_accounted"] == len(eps) == 200
    for key, q in (("epsilon_min", 0), ("epsilon_p05", .05), ("epsilon_median", .5), ("epsilon_p95", .95),
                   ("epsilon_max", 1)):
        assert isinstance(s[key], float) and s[key] == pytest.approx(np.quantile(eps, q), rel=1e-12)
    assert s["points_at_max"] == int((eps == eps.max()).sum())
    assert isinstance(s["run_epsilon"], float) and isinstance(s["test_accuracy"], float)
    json.dumps(result, allow_nan=False)  # plain JSON
    # the page shows the same numbers under display labels
    assert f"<th>points accounted</th><td>{len(eps)}</td>" in Path(result["html"]).read_text()


def test_cumulative_epsilon_shows_the_spread_of_all_points_and_distinct_labelled_points(warehouse_db, tmp_path):
    import dpledger

    out = tmp_path / "r.html"
    dpledger.report(warehouse_db, "a", out)
    spec = page_specs(out)["Privacy spent over training"]
    eps = epsilons(warehouse_db, "a").epsilon.to_numpy()
    (area,) = marks(spec, "area")
    bands = pd.DataFrame(rows(spec, area))
    assert set(bands.band) == {"5%–95% of points", "25%–75% of points"}
    last = bands[bands.step == bands.step.max()].set_index("band")
    # the bands cover every point: at the last step they are the quantiles of the accounted per-example epsilon
    assert last.loc["5%–95% of points", "lo"] == pytest.approx(np.quantile(eps, 0.05), rel=1e-6)
    assert last.loc["5%–95% of points", "hi"] == pytest.approx(np.quantile(eps, 0.95), rel=1e-6)
    assert last.loc["25%–75% of points", "lo"] == pytest.approx(np.quantile(eps, 0.25), rel=1e-6)
    assert last.loc["25%–75% of points", "hi"] == pytest.approx(np.quantile(eps, 0.75), rel=1e-6)
    assert bands.groupby("band").lo.is_monotonic_increasing.all()  # cumulative
    lines = [u for u in marks(spec, "line") if u["encoding"].get("stroke", {}).get("field") == "label"]
    (line,) = lines
    curves = pd.DataFrame(rows(spec, line))
    final = curves.sort_values("step").groupby("label").cumulative_cost.last()
    assert len(final) >= 3 and final.nunique() == len(final)  # a few points, none on top of another
    assert final.max() == pytest.approx(eps.max(), rel=1e-6) and final.min() == pytest.approx(eps.min(), rel=1e-6)
    legend = line["encoding"]["stroke"]["sort"]
    assert legend == final.sort_values(ascending=False).index.tolist()  # dearest first, by value
    assert legend[0].startswith("dearest: point ") and legend[-1].startswith("cheapest: point ")


def test_training_curves_highlight_the_reported_run(warehouse_db, tmp_path):
    import dpledger

    out = tmp_path / "r.html"
    dpledger.report(warehouse_db, "b", out)
    spec = page_specs(out)["Training curves"]
    assert spec["title"]["text"] == "Training curves: DP-SGD vs non-private runs"  # a, b and base are there
    for panel in spec["concat"]:
        top = panel["layer"][-1]  # drawn last: on top
        assert {r["run_id"] for r in rows(spec, top)} == {"b"}
        assert top["mark"]["strokeWidth"] > panel["layer"][0]["mark"]["strokeWidth"]
        assert top["encoding"]["color"]["sort"][0] == "b (this report)"


def test_report_of_a_non_dp_run_shows_what_it_can(warehouse_db, tmp_path, capsys):
    out = tmp_path / "base.html"
    assert main(["report", "--run", "base", "--db", str(warehouse_db), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sections"] == ["Training curves", "Per-point training loss"]
    assert result["summary"]["private"] is False and "epsilon_min" not in result["summary"]
    assert "noise_multiplier" not in result["summary"] and "delta" not in result["summary"]  # no DP, no σ or δ
    assert "nothing to account" in result["left_out"][0]["reason"]
    text = out.read_text()
    assert "trained without differential privacy" in text and "account it first" not in text
    losses = page_specs(out)["Per-point training loss"]
    (bar,) = marks(losses, "bar")
    assert sum(r["count"] for r in rows(losses, bar)) == 200  # every point's loss


@pytest.fixture(scope="module")
def fairface_db(tmp_path_factory):
    """A DP run on a tiny FairFace-style folder: 60 training images with age, gender and race attributes."""
    d = tmp_path_factory.mktemp("fairface")
    rng = np.random.default_rng(0)
    races, genders, ages = ["White", "Black", "East Asian", "Indian"], ["Male", "Female"], ["3-9", "20-29", "50-59"]
    (d / "train").mkdir()
    (d / "val").mkdir()
    for split, n, csv_name, extra in (("train", 60, "fairface_label_train.csv", []),
                                      ("val", 12, "fairface_label_val.csv", ["service_test"])):
        with open(d / csv_name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "age", "gender", "race", *extra])
            for i in range(n):
                name = f"{split}/{i}.png"
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(d / name)
                w.writerow([name, ages[i % 3], genders[i % 2], races[i % 4], *(["True"] if extra else [])])
    db = d / "w.duckdb"
    assert main(["train", "--dataset", "fairface", "--data-path", str(d), "--model", "logreg", "--epochs", "1",
                 "--batch-size", "10", "--noise-multiplier", "1", "--track", "all", "--run", "ff", "--db", str(db)]) == 0
    assert main(["account", "--db", str(db)]) == 0
    return db


def test_fairface_report_draws_epsilon_per_attribute(fairface_db, tmp_path, capsys):
    """Points with attributes: the report no longer crashes, and draws ε per age, gender and race."""
    out = tmp_path / "ff.html"
    assert main(["report", "--run", "ff", "--db", str(fairface_db), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"ε per age", "ε per gender", "ε per race"} <= set(result["sections"])
    specs = page_specs(out)
    for key, groups in (("race", {"White", "Black", "East Asian", "Indian"}), ("gender", {"Male", "Female"}),
                        ("age", {"3-9", "20-29", "50-59"})):
        spec = specs[f"ε per {key}"]
        bar = marks(spec, "bar")[0]
        got = {r["group"]: r["count"] for r in rows(spec, bar)}
        assert set(got) == groups and sum(got.values()) == 60
        assert bar["encoding"]["y"]["title"] == key


def test_gallery_ties_share_a_rank_dearest_first_and_are_broken_by_mean_norm(fairface_db, tmp_path):
    import dpledger

    out = tmp_path / "ff.html"
    dpledger.report(fairface_db, "ff", out)
    eps = epsilons(fairface_db, "ff")
    n_top = int((eps.epsilon == eps.epsilon.max()).sum())
    assert n_top > 10, "the fixture should have more points tied at the top than the gallery shows"
    spec = page_specs(out)["The 10 lowest- and 10 highest-ε points"]
    low_block, high_block = spec["vconcat"]
    high = rows(spec, high_block)
    assert [r["rank"] for r in high] == [1] * 10  # tied: the same rank, as SQL's rank()
    norms = mean_norms(fairface_db, "ff")
    top = eps[eps.epsilon == eps.epsilon.max()].point_id.tolist()
    expect = sorted(top, key=lambda p: (-norms[p], p))[:10]  # the stated second key: largest mean norm first
    assert [int(r["point_id"]) for r in high] == expect
    assert all(r["caption"].startswith(f"point {r['point_id']}\n") for r in high)
    assert f"{n_top} points tie at" in high_block["title"]["subtitle"]
    assert "mean recorded gradient norm" in high_block["title"]["subtitle"]
    low = rows(spec, low_block)
    ranks = [r["rank"] for r in low]
    assert ranks == sorted(ranks) and ranks[0] == 1
    assert "mean recorded gradient norm" in out.read_text()


def test_gla_csv_report_leaves_out_the_gallery_and_says_what_else_is_missing(gla_db, tmp_path, cli):
    assert cli("account", "--db", gla_db).rc == 0
    out = tmp_path / "gla.html"
    r = cli("report", "--run", "res1", "--db", gla_db, "--out", out, "--json")
    assert r.rc == 0, r
    result = r.json()
    assert not any("lowest- and" in s for s in result["sections"])
    left = {x["section"]: x["reason"] for x in result["left_out"]}
    assert "no images" in left["Gallery of the lowest- and highest-ε points"]
    for section in ("Rank stability across runs", "ε vs memorization", "ε vs membership inference (LiRA)",
                    "ε vs input-loss curvature", "ε per class"):
        assert section in left
    text = out.read_text()
    assert "<h2>Not in this report</h2>" in text
    for section, why in left.items():
        assert html.escape(f"{section}: {why}.") in text  # one line each
    specs = page_specs(out)
    assert not any("gallery" in t.lower() or "lowest- and" in t for t in specs)


def test_report_errors(warehouse_db, tmp_path, capsys):
    assert main(["report", "--run", "nope", "--db", str(warehouse_db), "--out", str(tmp_path / "x.html")]) == 2
    assert "unknown run 'nope'" in capsys.readouterr().err
    assert main(["report", "--run", "a", "--rule", "gla", "--db", str(warehouse_db),
                 "--out", str(tmp_path / "x.html")]) == 2
    assert "dpledger account --run a --rule gla" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_report_renders_offline_in_chromium(warehouse_db, tmp_path):
    from test_report_browser import CHROMIUM, run_chromium

    if CHROMIUM is None:
        pytest.skip("chromium is not installed: apt-get install chromium")
    out = tmp_path / "r.html"
    assert main(["report", "--run", "a", "--db", str(warehouse_db), "--out", str(out)]) == 0
    dom = run_chromium(out.as_uri(), "--dump-dom")
    assert re.search(r'data-chart-count="(\d+)"', dom).group(1) == "7"
    assert len(re.findall(r'<div id="chart-\d+"', dom)) == 7
    assert len(re.findall(r'data-chart-status="rendered"', dom)) == 7
    assert re.search(r'<div id="page-errors" hidden(="")?></div>', dom), "the page reported a script error"
    for m in re.finditer(r'<div id="(chart-\d+)"[^>]*>(.*?)</section>', dom, re.S):
        assert "<svg" in m.group(2) and len(re.findall(r"<(path|rect|image|line)\b", m.group(2))) > 0, m.group(1)
