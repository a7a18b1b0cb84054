"""One import namespace, as installed: the wheel holds ``dpledger`` and nothing else at
its top level, and ``import dpledger`` works from a folder that has its own
``analysis/`` package and ``models.py`` (the names the project's folders carry).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys, dpledger
from pathlib import Path
con = dpledger.connect(sys.argv[1])          # creates the database: schema and views from dpledger/sql
n = con.execute("SELECT count(*) FROM duckdb_views() WHERE NOT internal").fetchall()[0][0]
con.close()
import dpledger.analysis.rdp, dpledger.warehouse.db, dpledger.models.nets, dpledger.ingest.worker
import analysis, models                      # the user's own, untouched
print(Path(dpledger.__file__).parent.parent, Path(dpledger.warehouse.db.__file__).parent.parent,
      analysis.MINE, models.MINE, n)
"""


def _users_folder(tmp_path: Path) -> Path:
    """A working directory like a researcher's: its own analysis/ package and models.py."""
    here = tmp_path / "study"
    (here / "analysis").mkdir(parents=True)
    (here / "analysis" / "__init__.py").write_text("MINE = 'analysis-of-the-user'\n")
    (here / "models.py").write_text("MINE = 'models-of-the-user'\n")
    (here / "warehouse").mkdir()
    (here / "warehouse" / "__init__.py").write_text("raise ImportError('the user folder warehouse/ was imported')\n")
    return here


def _probe(cwd: Path, env: dict, db: Path) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, str(db)], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def test_import_from_a_folder_with_its_own_analysis_and_models(tmp_path):
    """The installed (editable) package, from a folder whose names would shadow the old top-level packages."""
    here = _users_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    face, _, analysis, models, views = _probe(here, env, tmp_path / "w.duckdb")
    assert analysis == "analysis-of-the-user" and models == "models-of-the-user"
    assert int(views) > 10
    assert Path(face) != here


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TMPDIR": str(build)})
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = out.glob("dpledger-*.whl")
    return path


def test_the_wheel_installs_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"dpledger"}, sorted(top)
    # every layer, the CLI and the SQL files travel inside it
    for module in ("dpledger/__init__.py", "dpledger/cli/__init__.py", "dpledger/warehouse/db.py",
                   "dpledger/ingest/worker.py", "dpledger/models/nets.py", "dpledger/analysis/rdp.py"):
        assert module in names, module
    sql = {n for n in names if n.endswith(".sql")}
    shipped = {f"dpledger/sql/{p.relative_to(REPO / 'sql')}" for p in (REPO / "sql").rglob("*.sql")}
    assert sql == shipped
    sources = {f"dpledger/{p.relative_to(REPO / f).with_suffix('.py')}" if f == "dpledger"
               else f"dpledger/{f}/{p.relative_to(REPO / f)}"
               for f in ("warehouse", "ingest", "models", "analysis") for p in (REPO / f).rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    (info,) = {n for n in names if n.endswith(".dist-info/top_level.txt")} or {None}
    if info:
        assert zipfile.ZipFile(wheel).read(info).decode().split() == ["dpledger"]
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "dpledger = dpledger.cli:entry" in entry


def test_the_wheel_imports_from_a_folder_with_its_own_analysis(wheel, tmp_path):
    """The wheel's files, unpacked and put first on the path, serve every layer (not the source tree)."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    here = _users_folder(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    face, store, analysis, models, views = _probe(here, env, tmp_path / "w.duckdb")
    assert Path(face) == site and Path(store) == site / "dpledger"
    assert analysis == "analysis-of-the-user" and models == "models-of-the-user"
    assert int(views) == len(list((REPO / "sql" / "views").glob("*.sql")))
