"""The HTML report renders in a real browser, offline: headless Chromium, DOM and screenshot.

Builds a report with all 10 charts from synthetic data, opens it from disk with headless
Chromium and checks the rendered DOM (every chart div holds an SVG with marks, no
"chart error", no page error), that the page asked for nothing over the network
(Chromium's net log), and that a screenshot is not blank.

Needs Chromium: ``apt-get install -y chromium`` (Debian). Skipped, with that reason,
when neither ``chromium`` nor ``chromium-browser`` is on PATH.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dpledger.analysis import charts as C
from dpledger.analysis.html_report import Section, write_report

TIMEOUT_S = 60

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: apt-get install chromium")


def run_chromium(url: str, *extra: str) -> str:
    """Run headless Chromium on ``url`` with a fresh profile; stdout. Killed (whole process group) after TIMEOUT_S."""
    with tempfile.TemporaryDirectory(prefix="dpledger-chromium-") as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=15000", *extra, url]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(cmd)}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
        return out.decode("utf-8", errors="replace")


def page_requests(net_log: Path) -> list[str]:
    """URLs the *page* requested (Chromium's own background requests have initiator 'not an origin')."""
    log = json.loads(net_log.read_text())
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    urls = []
    for e in log["events"]:
        p = e.get("params") or {}
        if types.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in p and p.get("initiator") != "not an origin":
            urls.append(p["url"])
    return urls


def thumbnail(seed: int) -> bytes:
    a = (np.random.default_rng(seed).random((28, 28)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def sections() -> list[Section]:
    rng = np.random.default_rng(7)
    n = 400
    eps = pd.DataFrame({"point_id": np.arange(n), "epsilon": rng.gamma(5.0, 1.5, n)})
    curves = pd.DataFrame(
        [(p, s, slope * s ** 0.8 * (1.05 if kind == "pchip" else 1), group, kind)
         for group, pts in (("lowest", [1, 2, 3]), ("highest", [7, 8, 9])) for p in pts
         for slope in [(0.2 if group == "lowest" else 1.5) * (1 + p / 10)]
         for kind in ("recorded", "pchip") for s in range(0, 100, 5)],
        columns=["point_id", "step", "cumulative_cost", "group", "kind"])
    gal = pd.DataFrame({"point_id": np.arange(10), "label": np.arange(10) % 10, "epsilon": np.linspace(1, 10, 10),
                        "rank": np.arange(1, 11), "group": ["lowest"] * 5 + ["highest"] * 5,
                        "thumbnail": [thumbnail(i) for i in range(10)]})
    groups = pd.DataFrame({"group": rng.choice(["East Asian", "White", "Black", "Indian"], n), "epsilon": rng.gamma(5.0, 1.5, n)})
    ra = rng.permutation(n) + 1
    ranks = pd.DataFrame({"point_id": np.arange(n), "rank_a": ra, "rank_b": np.clip(ra + rng.integers(-40, 40, n), 1, n)})
    runs = ["s0", "s1", "s2", "s3"]
    matrix = pd.DataFrame([(a, b, 1.0 if a == b else 0.6) for a in runs for b in runs], columns=["run_a", "run_b", "spearman"])
    scatter = pd.DataFrame({"point_id": np.arange(n), "epsilon": eps["epsilon"], "memorization": eps["epsilon"] / 20 + rng.normal(0, 0.1, n)})
    training = pd.DataFrame(
        [(run, s, metric, value, private)
         for run, private in (("dp", True), ("nodp", False)) for s in range(0, 200, 10)
         for metric, value in (("loss", 2 / (1 + s / 50) + 0.3 * private), ("test_accuracy", 0.5 + s / (500 if private else 400)),
                               ("wall_s", s * 0.1 * (3 if private else 1)), ("peak_mem_bytes", 2 ** 30 * (1 + private)))],
        columns=["run_id", "step", "metric", "value", "private"])
    bands = pd.DataFrame([(s, q, s * (0.5 + q) / 10) for q in (0.05, 0.25, 0.5, 0.75, 0.95) for s in range(0, 101, 10)],
                         columns=["step", "quantile", "cumulative_cost"])
    return [
        Section("Distribution of per-example ε", C.epsilon_distribution(eps, 11.25), "How privacy cost is spread."),
        Section("Cost curves", C.cost_curves(curves, 3), "When points pay."),
        Section("Gallery", C.gallery(gal, columns=5), "What they look like."),
        Section("A note", None, "Text only <b>escaped</b>."),
        Section("ε by race", C.group_epsilon(groups, "race")),
        Section("Rank stability", C.rank_stability(ranks, "s0", "s1")),
        Section("Rank correlations", C.rank_correlation_matrix(matrix)),
        Section("ε vs memorization", C.scatter_vs(scatter, "memorization")),
        Section("Training curves", C.training_curves(training, highlight="dp")),
        Section("Cumulative ε: spread of all points", C.cost_spread(bands, curves, note="400 points")),
        Section("Per-point loss", C.histogram(eps.assign(loss=eps["epsilon"] / 3), "loss", "Per-point loss")),
        Section("Not in this report", None, "Left out:", items=["Rank stability: only one run."]),
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    write_report(out, "dpledger browser test", {"run": "s0", "data-independent ε": "11.25"}, sections(),
                 notes=["per-example ε is output-specific"])
    return out


def chart_divs(dom: str) -> dict[str, str]:
    """Each chart div's inner HTML, from the dumped DOM (a chart div is the last element of its section)."""
    divs = {}
    for m in re.finditer(r'<div id="(chart-\d+)"[^>]*>(.*?)</section>', dom, re.S):
        divs[m.group(1)] = m.group(2)
    return divs


def visible_text(dom: str) -> str:
    return re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S | re.I)


def test_every_chart_renders_as_svg_offline(report, tmp_path):
    net_log = tmp_path / "net.json"
    dom = run_chromium(report.as_uri(), f"--log-net-log={net_log}", "--dump-dom")
    expected = int(re.search(r'data-chart-count="(\d+)"', dom).group(1))
    assert expected == 10
    divs = chart_divs(dom)
    assert sorted(divs) == sorted(f"chart-{i}" for i in range(10))
    for name, inner in divs.items():
        assert "<svg" in inner, f"{name} has no svg: {inner[:300]}"
        marks = len(re.findall(r"<(path|rect|image|line)\b", inner))
        assert marks > 0, f"{name}: svg without marks"
        assert "chart error" not in inner
    assert len(re.findall(r'data-chart-status="rendered"', dom)) == 10
    # the gallery's thumbnails are in the page as images with data URLs
    gallery = divs["chart-2"]
    hrefs = re.findall(r'<image\b[^>]*href="([^"]*)"', gallery)
    assert len(hrefs) == 10 and all(h.startswith("data:image/png;base64,") for h in hrefs)
    text = visible_text(dom)
    assert "chart error" not in text and "page error" not in text
    assert re.search(r'<div id="page-errors" hidden(="")?></div>', dom), "the page reported a script error"
    assert "Text only &lt;b&gt;escaped&lt;/b&gt;." in dom
    # offline: the page requested nothing over the network
    requests = page_requests(net_log)
    assert not [u for u in requests if not u.startswith(("file:", "data:"))], requests


def test_net_log_check_sees_a_page_request(tmp_path):
    """Control for the offline check above: a page that loads a remote image is caught by it."""
    page = tmp_path / "remote.html"
    page.write_text('<html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    net_log = tmp_path / "net.json"
    run_chromium(page.as_uri(), f"--log-net-log={net_log}", "--dump-dom")
    assert "http://127.0.0.1:9/x.png" in page_requests(net_log)


def test_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    run_chromium(report.as_uri(), f"--screenshot={shot}", "--window-size=1200,2400")
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2400)
    colours, n = np.unique(np.asarray(im).reshape(-1, 3), axis=0, return_counts=True)
    counts = Counter({tuple(int(v) for v in c): int(k) for c, k in zip(colours, n)})
    background = counts.most_common(1)[0][1]
    assert 1 - background / (im.width * im.height) > 0.02, "the screenshot is (nearly) blank"
    # the bars of the first chart (Vega's default blue #4c78a8) are drawn
    assert sum(c for px, c in counts.items() if abs(px[0] - 0x4C) < 12 and abs(px[1] - 0x78) < 12 and abs(px[2] - 0xA8) < 12) > 2000


def test_broken_chart_shows_its_error_in_its_div(tmp_path):
    """A spec that cannot render shows "chart error: ..." visibly in its div (what the test above relies on)."""
    broken = {"$schema": "https://vega.github.io/schema/vega-lite/v6.json", "data": {"values": [{"a": 1}]},
              "mark": "no-such-mark", "encoding": {"x": {"field": "a", "type": "quantitative"}}}
    out = tmp_path / "broken.html"
    write_report(out, "broken", {}, [Section("bad", broken), Section("good", C.group_epsilon(
        pd.DataFrame({"group": ["a", "b"], "epsilon": [1.0, 2.0]}), "g"))])
    dom = run_chromium(out.as_uri(), "--dump-dom")
    divs = chart_divs(dom)
    assert "chart error: " in divs["chart-0"] and "<svg" not in divs["chart-0"]
    assert 'data-chart-status="error"' in dom
    assert "<svg" in divs["chart-1"]
