"""Shared test helpers: the CLI run in-process, the shared fixtures, small databases."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPLEDGER_SHARED", REPO.parent / "shared"))
GLA_DIR = SHARED / "fixtures" / "gla-mnist"


@pytest.fixture(scope="session")
def gla_dir() -> Path:
    if not (GLA_DIR / "res1.csv").exists():
        pytest.fail(f"the shared fixtures are missing: {GLA_DIR} (CI checks out ../shared beside the repo)")
    return GLA_DIR


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "w.duckdb"


class CliResult:
    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return f"CliResult(rc={self.rc}, out={self.out[-500:]!r}, err={self.err[-500:]!r})"


@pytest.fixture
def cli(capsys):
    """Run ``dpledger ARGS`` in this process; returns exit code, stdout and stderr."""
    from dpledger.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        rc = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(rc, captured.out, captured.err)

    return run


@pytest.fixture
def gla_db(db, gla_dir, cli) -> Path:
    """A database holding the fixture run res1."""
    r = cli("ingest", "gla-csv", gla_dir / "res1.csv", "--db", db)
    assert r.rc == 0, r
    return db


def copy_as_run(src: Path, dst: Path, run: str) -> Path:
    """A copy of a GLA CSV with res_name set to ``run`` (a second run of the study)."""
    lines = src.read_text().splitlines()
    header = lines[0].split(",")
    k = header.index("res_name")
    out = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        cells[k] = run
        out.append(",".join(cells))
    dst.write_text("\n".join(out) + "\n")
    return dst


def query_rows(db: Path, sql: str, params=None) -> list[tuple]:
    """Rows of ``sql`` on a read-only connection opened and closed for this one query."""
    from dpledger import warehouse

    con = warehouse.connect(db, read_only=True)  # with the UDFs some views use
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def table_snapshot(db: Path) -> dict:
    """Row counts and a content hash of every table: proves a failed command changed nothing."""
    import duckdb

    if not db.exists():
        return {}
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' ORDER BY 1").fetchall()]
        snap = {}
        for name in names:
            snap[name] = con.execute(
                f"SELECT count(*), coalesce(sum(hash(t)), 0) FROM {name} t").fetchall()[0]
        return snap
    finally:
        con.close()


def walk(node):
    """Every dict inside a JSON-like tree (a Vega-Lite spec), depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


__all__ = ["copy_as_run", "query_rows", "table_snapshot", "walk", "shutil"]
