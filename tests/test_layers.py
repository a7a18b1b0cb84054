"""The house rules of ../shared/DESIGN.md, enforced by walking every module's imports.

- one import namespace: nothing imports the top-level folders by their folder names
  (``import warehouse``); everything is ``dpledger.…``;
- imports go down the layer table, never up or sideways;
- no import circle between modules (function-local imports included);
- no private (``_name``) import across modules.

The checker is a plain function of a source tree, so the test also runs it on a
synthetic tree that breaks each rule and checks that it says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# folder -> its package under the dpledger namespace
PACKAGES = {"dpledger": "dpledger", "warehouse": "dpledger.warehouse", "ingest": "dpledger.ingest",
            "models": "dpledger.models", "analysis": "dpledger.analysis"}
LAYER_OF = {"dpledger": "face", "dpledger.warehouse": "warehouse", "dpledger.ingest": "ingest",
            "dpledger.models": "models", "dpledger.analysis": "analysis", "dpledger.sql": "sql"}
# who may import whom (DESIGN.md's layout table); a layer may always import itself
MAY_IMPORT = {
    "face": {"warehouse", "ingest", "models", "analysis", "sql"},
    "ingest": {"models", "analysis", "warehouse"},
    "warehouse": {"analysis", "sql"},
    "models": set(),
    "analysis": set(),
    "sql": set(),
}
# ingest may use the warehouse's store, not the jobs computed from it
STORE = {"dpledger.warehouse", "dpledger.warehouse.errors", "dpledger.warehouse.sqlutil", "dpledger.warehouse.runs",
         "dpledger.warehouse.db", "dpledger.warehouse.connection", "dpledger.warehouse.schema",
         "dpledger.warehouse.tables", "dpledger.warehouse.lake", "dpledger.warehouse.engine"}
BARE = {"warehouse", "ingest", "models", "analysis", "sql"}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the project's folders in ``root``."""
    found = {}
    for folder, package in PACKAGES.items():
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def layer(module: str) -> str | None:
    best = None
    for package, name in LAYER_OF.items():
        if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(best[0])):
            best = (package, name)
    return best[1] if best else None


def check(root: Path) -> list[str]:
    """Every breach of the house rules in the tree at ``root``, one line each."""
    mods = modules(root)
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        mine = layer(name)
        where = f"{path.relative_to(root)}"
        for target, names, line in imports(name, path):
            top = target.split(".")[0]
            if top in BARE:
                problems.append(f"{where}:{line}: bare import of '{target}' (use dpledger.{target})")
                continue
            theirs = layer(target)
            if theirs is None:
                continue
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                problems.append(f"{where}:{line}: {mine} may not import {theirs} ({target})")
            if mine == "ingest" and theirs == "warehouse" and target not in STORE:
                problems.append(f"{where}:{line}: ingest may use the warehouse's store only, not {target}")
            # resolve "from pkg import module" to the module itself
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods] or [target]
            for t in targets:
                if t in mods and t != name:
                    graph[name].add(t)
            private = [n for n in names if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in mods]
            if private and target != name:
                problems.append(f"{where}:{line}: private name(s) {', '.join(private)} imported from {target}")
    problems += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a closed path."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_project_keeps_the_house_rules():
    problems = check(REPO)
    assert not problems, "\n".join(problems)


def test_nothing_imports_the_folders_by_their_bare_names():
    """Tests, benchmarks, notebooks and examples import dpledger.… too."""
    bad = []
    for folder in ("tests", "bench", "examples", "notebooks"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in (".py", ".ipynb"):
                continue
            for n, text in enumerate(path.read_text().splitlines(), 1):
                words = text.strip().strip('"').split()
                if len(words) >= 2 and words[0] in ("import", "from") and words[1].split(".")[0] in BARE:
                    bad.append(f"{path.relative_to(REPO)}:{n}: {text.strip()}")
    assert not bad, "\n".join(bad)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("rel, text, expected", [
    ("analysis/bad.py", "from dpledger.warehouse import db\n", "analysis may not import warehouse"),
    ("models/bad.py", "import dpledger.analysis.rdp\n", "models may not import analysis"),
    ("warehouse/bad.py", "from dpledger.ingest import worker\n", "warehouse may not import ingest"),
    ("ingest/bad.py", "from dpledger.warehouse.accounting import account\n", "store only"),
    ("analysis/bad.py", "from dpledger import cli\n", "analysis may not import face"),
    ("analysis/bad.py", "import warehouse\n", "bare import"),
    ("analysis/bad.py", "from .rdp import _log_a\n", "private name(s) _log_a"),
    ("analysis/bad.py", "def f():\n    from .other import g\n", "import circle"),
])
def test_the_checker_catches_each_breach(tmp_path, rel, text, expected):
    """A synthetic tree that keeps the rules passes; adding one breach makes the checker say so."""
    _write(tmp_path, "analysis/__init__.py", "")
    _write(tmp_path, "analysis/rdp.py", "import numpy\n")
    _write(tmp_path, "analysis/other.py", "from .rdp import numpy\nfrom . import bad\n")
    _write(tmp_path, "warehouse/__init__.py", "")
    _write(tmp_path, "warehouse/db.py", "from dpledger.analysis import rdp\n")
    _write(tmp_path, "dpledger/__init__.py", "from dpledger.warehouse import db\n")
    assert check(tmp_path) == []
    _write(tmp_path, rel, text)
    problems = check(tmp_path)
    assert any(expected in p for p in problems), problems
