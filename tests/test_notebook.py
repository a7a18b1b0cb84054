"""notebooks/explore.ipynb executes top to bottom against a database built from the fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpledger.cli import main

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def test_explore_notebook_executes(tmp_path, gla_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    db = tmp_path / "w.duckdb"
    assert main(["ingest", "gla-csv", str(gla_dir / "res1.csv"), "--db", str(db)]) == 0
    assert main(["account", "--db", str(db)]) == 0
    assert main(["account", "--accountant", "pld", "--db", str(db)]) == 0
    monkeypatch.setenv("DPLEDGER_DB", str(db))
    monkeypatch.setenv("DPLEDGER_RUN", "res1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    charts = [o for o in outputs if "application/vnd.vegalite.v6+json" in o.get("data", {})
              or "text/html" in o.get("data", {}) and "vega" in o["data"]["text/html"]]
    assert len(charts) >= 5  # distribution, bands, gallery, training curves (res1 has no labels), RDP vs PLD
    pld = [o for o in outputs if "PLD vs RDP per point (10 points)" in json.dumps(o.get("data", {}))]
    assert pld, "the RDP vs PLD chart of the run's 10 points is missing"
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "res1" in text
