"""`dpledger report` on a real (small) warehouse: sections, summary, PNGs, offline
rendering in headless Chromium."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from dpledger.cli import main

SMALL = ["--dataset", "digits", "--n-train", "200", "--n-test", "100", "--batch-size", "20", "--model", "logreg",
         "--epochs", "2", "--track", "all"]


@pytest.fixture(scope="module")
def warehouse_db(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    db = d / "w.duckdb"
    for args in (["--noise-multiplier", "1.0", "--seed", "0", "--run", "a"],
                 ["--noise-multiplier", "1.0", "--seed", "1", "--run", "b"],
                 ["--disable-dp", "--run", "base"]):
        assert main(["train", *SMALL, *args, "--db", str(db)]) == 0
    assert main(["account", "--db", str(db)]) == 0
    return db


def test_report_sections_summary_and_pngs(warehouse_db, tmp_path, capsys):
    out, png = tmp_path / "r.html", tmp_path / "png"
    assert main(["report", "--run", "a", "--db", str(warehouse_db), "--out", str(out), "--png", str(png),
                 "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["sections"] == [
        "Distribution of per-example ε", "Privacy spent over training by the cheapest and dearest points",
        "The 10 lowest- and 10 highest-ε points", "ε per class", "Rank stability: a vs b",
        "Rank correlation across runs", "Training curves"]
    text = out.read_text()
    assert not re.search(r"<script[^>]+src=", text) and "<link" not in text
    assert text.count('class="chart"') == 7
    for key in ("data-independent ε", "per-example ε: min / 5% / 25% / median", "sample rate q"):
        assert key in text
    assert result["summary"]["sample rate q"] == "0.1"
    assert len(result["pngs"]) == 7
    for p in result["pngs"]:
        im = Image.open(p)
        assert im.size[0] > 200 and len(set(im.convert("L").getdata())) > 10


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
