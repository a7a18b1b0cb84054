"""Self-contained HTML reports of Altair charts, and PNG export.

Layer: ``analysis`` (imports no other project package). Owns the page; what goes on it
is assembled by :mod:`warehouse.report_frames`.

:func:`render_html` builds ONE HTML file that opens offline from disk: the Vega,
Vega-Lite and vega-embed JavaScript is inlined once (the bundle that ``vl_convert``
ships, the same one Altair's ``save(..., inline=True)`` uses), every chart is its
Vega-Lite JSON spec, and a small script renders each into its
``<div id="chart-N" class="chart" data-chart-title="...">`` with vega-embed (SVG
renderer, no action menu). The file has no ``<script src>``, no ``<link>`` and no
request to any network address.

In the browser, each chart div gets ``data-chart-status="rendered"`` once drawn, or
shows ``chart error: <message>`` (and ``data-chart-status="error"``) when it cannot
be drawn; script errors of the page are shown in ``<div id="page-errors">``. So a
headless browser can check a report from its DOM alone.

:func:`write_report` writes the HTML and, with ``png_dir``, one PNG per chart
(``vl_convert.vegalite_to_png``; images embedded as data URLs are kept).
"""

from __future__ import annotations

import functools
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import altair as alt
import vl_convert as vlc

__all__ = ["Section", "chart_spec", "chart_to_png", "javascript_bundle", "render_html", "slugify", "write_report"]


@dataclass
class Section:
    """One part of a report: a title, a sentence or two of plain text, a chart (``None``: text only), and
    ``items``: lines shown as a list under the text (e.g. what was left out of the report, and why)."""

    title: str
    chart: alt.TopLevelMixin | None
    description: str = ""
    items: Sequence[str] = ()


def _vl_version() -> str | None:
    """The Vega-Lite version (``"6.4"``) of the installed Altair's schema, when vl-convert has it; else None (its latest)."""
    major_minor = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return major_minor if major_minor in vlc.get_vegalite_versions() else None


@functools.lru_cache(maxsize=1)
def javascript_bundle() -> str:
    """vega-embed + Vega-Lite + Vega in one script (about 0.9 MB), defining ``window.vegaEmbed``; built once per process."""
    bundle = vlc.javascript_bundle(vl_version=_vl_version())
    # a literal "</script" would end the inline <script> element early; "<\/" means the same in JS strings and regexes
    return re.sub(r"</(script)", r"<\\/\1", bundle, flags=re.IGNORECASE)


def chart_spec(chart) -> dict:
    """The chart's Vega-Lite spec as a dict (Altair validates it); a dict is taken as a spec already."""
    if isinstance(chart, Mapping):
        return dict(chart)
    return chart.to_dict()


def _json_for_script(value) -> str:
    """JSON safe inside a <script> element: ``<``, ``>`` and ``&`` only occur in strings, where \\u escapes mean the same."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def slugify(text: str) -> str:
    """A file-name slug: lower case ASCII letters, digits and dashes (``"chart"`` when nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return slug[:80].rstrip("-") or "chart"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1000px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .4em; }
h2 { font-size: 1.25em; margin: 1.6em 0 .3em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table.summary { border-collapse: collapse; margin: .8em 0; }
table.summary th, table.summary td { border: 1px solid #ddd; padding: .25em .7em; text-align: left; vertical-align: top; }
table.summary th { background: #f5f5f5; font-weight: 600; }
ul.notes, ul.items { color: #444; }
p.description { color: #444; margin: .2em 0 .6em; }
div.chart { margin: .5em 0 1.5em; min-height: 40px; }
div.chart[data-chart-status="error"], #page-errors { color: #b00020; font-weight: 600; white-space: pre-wrap; }
footer { color: #888; font-size: .85em; margin-top: 3em; }
"""

# Runs before anything else: collects script errors of the page into #page-errors, visibly.
_ERROR_HOOK = """
(function () {
  function show(msg) {
    var box = document.getElementById("page-errors");
    if (!box) { return; }
    box.hidden = false;
    var p = document.createElement("p");
    p.textContent = "page error: " + msg;
    box.appendChild(p);
  }
  window.addEventListener("error", function (e) { show(e.message || String(e)); });
  window.addEventListener("unhandledrejection", function (e) { show(e.reason && e.reason.message ? e.reason.message : String(e.reason)); });
  window.dpledgerPageError = show;
})();
"""

_EMBED = """
(function () {
  var specs = JSON.parse(document.getElementById("dpledger-specs").textContent);
  if (typeof vegaEmbed !== "function") {
    window.dpledgerPageError("the inlined vega-embed script did not load");
    return;
  }
  specs.forEach(function (spec, i) {
    var div = document.getElementById("chart-" + i);
    var fail = function (e) {
      div.setAttribute("data-chart-status", "error");
      div.textContent = "chart error: " + (e && e.message ? e.message : String(e));
    };
    try {
      vegaEmbed(div, spec, {renderer: "svg", actions: false, mode: "vega-lite"})
        .then(function () { div.setAttribute("data-chart-status", "rendered"); })
        .catch(fail);
    } catch (e) {
      fail(e);
    }
  });
})();
"""


def _summary_rows(summary) -> list[tuple[str, str]]:
    if summary is None:
        return []
    items = summary.items() if isinstance(summary, Mapping) else summary
    return [(str(k), "" if v is None else str(v)) for k, v in items]


def render_html(title: str, summary: Sequence[tuple[str, str]] | Mapping[str, str], sections: Iterable[Section],
                notes: Iterable[str] = ()) -> str:
    """One self-contained HTML page: title, summary table, notes, then the sections in order.

    All text is escaped. The Vega/Vega-Lite/vega-embed JavaScript is inlined once; each
    chart becomes ``<div id="chart-N" class="chart" data-chart-title="...">`` rendered
    from its inlined Vega-Lite spec; ``<body data-chart-count="N">`` gives the number
    of charts.
    """
    esc = html.escape
    sections = list(sections)
    specs: list[dict] = []
    parts: list[str] = []
    for section in sections:
        parts.append("<section>")
        parts.append(f"<h2>{esc(str(section.title))}</h2>")
        if section.description:
            parts.append(f'<p class="description">{esc(str(section.description))}</p>')
        if section.items:
            parts.append('<ul class="items">' + "".join(f"<li>{esc(str(i))}</li>" for i in section.items) + "</ul>")
        if section.chart is not None:
            i = len(specs)
            specs.append(chart_spec(section.chart))
            parts.append(f'<div id="chart-{i}" class="chart" data-chart-title="{esc(str(section.title))}"></div>')
        parts.append("</section>")

    rows = _summary_rows(summary)
    summary_html = ""
    if rows:
        summary_html = '<table class="summary">\n' + "\n".join(
            f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "\n</table>"
    notes = [str(n) for n in notes if str(n)]
    notes_html = ('<ul class="notes">\n' + "\n".join(f"<li>{esc(n)}</li>" for n in notes) + "\n</ul>") if notes else ""
    versions = (f"Charts: Vega-Lite {esc(alt.SCHEMA_VERSION)}, Vega {esc(vlc.get_vega_version())}, "
                f"vega-embed {esc(vlc.get_vega_embed_version())}, inlined: this file needs no network.")
    js = javascript_bundle() if specs else ""

    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(str(title))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        f'<body data-chart-count="{len(specs)}">',
        '<div id="page-errors" hidden></div>',
        f"<script>{_ERROR_HOOK}</script>",
        f"<h1>{esc(str(title))}</h1>",
        summary_html,
        notes_html,
        *parts,
        f"<footer>{versions}</footer>",
        *([f"<script>\n{js}\n</script>",
           f'<script type="application/json" id="dpledger-specs">{_json_for_script(specs)}</script>',
           f"<script>{_EMBED}</script>"] if specs else []),
        "</body>",
        "</html>",
        "",
    ])


def chart_to_png(chart, scale: float = 2.0) -> bytes:
    """PNG bytes of a chart (or a Vega-Lite spec dict), rendered by vl-convert; data-URL images are drawn."""
    return vlc.vegalite_to_png(chart_spec(chart), vl_version=_vl_version(), scale=scale)


def write_report(path, title: str, summary, sections: Iterable[Section], notes: Iterable[str] = (),
                 png_dir=None, png_scale: float = 2.0) -> dict:
    """Write the report to ``path`` (and, with ``png_dir``, one PNG per chart named by the slug of its section title).

    Returns ``{"html": Path, "pngs": [Path, ...]}`` (PNGs in section order; a repeated
    slug gets ``-2``, ``-3``, ...). Parent folders are created.
    """
    sections = list(sections)
    path = Path(path)
    page = render_html(title, summary, sections, notes)  # before any file is written: a failure leaves none
    pngs: list[Path] = []
    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for section in sections:
            if section.chart is None:
                continue
            base = slug = slugify(section.title)
            n = 2
            while slug in used:
                slug, n = f"{base}-{n}", n + 1
            used.add(slug)
            out = png_dir / f"{slug}.png"
            out.write_bytes(chart_to_png(section.chart, scale=png_scale))
            pngs.append(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")  # last: no HTML unless every chart rendered
    return {"html": path, "pngs": pngs}
