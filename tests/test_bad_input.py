"""Bad input: one clear line naming file/row/column, exit code 2, the database unchanged."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import table_snapshot

RUN = ["--sample-rate", "0.01", "--noise-multiplier", "1.1", "--max-grad-norm", "1.0"]


def _good():
    return pd.DataFrame({"step": [0, 0, 1, 1], "point_id": [0, 1, 0, 1], "grad_norm": [0.5, 1.5, 0.2, 3.0]})


def _write_csv(path, text):
    path.write_text(text)
    return path


def _bad_steps_cases(tmp_path):
    """name -> (file, extra args, expected fragments of the message)."""
    g = "step,point_id,grad_norm\n0,0,0.5\n0,1,1.5\n"
    cases = {
        "missing file": (tmp_path / "nope.csv", [], ["nope.csv", "no such file"]),
        "missing column": (_write_csv(tmp_path / "mc.csv", "step,point_id\n0,0\n"), [],
                           ["mc.csv", "missing column 'grad_norm'"]),
        "not a number": (_write_csv(tmp_path / "nn.csv", g + "1,0,abc\n"), [],
                         ["nn.csv", "row 3 (line 4)", "column 'grad_norm'", "'abc' is not a number"]),
        "nan norm": (_write_csv(tmp_path / "nan.csv", g + "1,0,nan\n"), [],
                     ["nan.csv", "row 3", "column 'grad_norm'", "NaN"]),
        "negative norm": (_write_csv(tmp_path / "neg.csv", g + "1,0,-0.25\n"), [],
                          ["neg.csv", "row 3", "column 'grad_norm'", "negative"]),
        "infinite norm": (_write_csv(tmp_path / "inf.csv", g + "1,0,inf\n"), [],
                          ["inf.csv", "row 3", "column 'grad_norm'", "infinite"]),
        "empty norm": (_write_csv(tmp_path / "empty.csv", g + "1,0,\n"), [],
                       ["empty.csv", "row 3", "column 'grad_norm'", "missing"]),
        "step below 0": (_write_csv(tmp_path / "step.csv", g + "-1,0,0.3\n"), [],
                         ["step.csv", "row 3", "column 'step'", "below 0"]),
        "fractional step": (_write_csv(tmp_path / "fs.csv", g + "1.5,0,0.3\n"), [],
                            ["fs.csv", "row 3", "column 'step'", "not an integer"]),
        "duplicate row": (_write_csv(tmp_path / "dup.csv", g + "0,1,0.9\n"), [],
                          ["dup.csv", "row 3", "duplicate", "row 2"]),
        "unknown column": (_write_csv(tmp_path / "uc.csv", "step,point_id,grad_norm,samplde\n0,0,1,1\n"), [],
                           ["uc.csv", "unexpected column 'samplde'"]),
        "not csv or parquet": (tmp_path / "x.bin", [], ["x.bin", "not a CSV or Parquet file"]),
        "corrupt parquet": (tmp_path / "bad.parquet", [], ["bad.parquet", "not a readable Parquet file"]),
        "bad boolean": (_write_csv(tmp_path / "bb.csv", "step,point_id,grad_norm,sampled\n0,0,1,maybe\n"), [],
                        ["bb.csv", "row 1", "column 'sampled'", "not a boolean"]),
        "bad sample rate": (_write_csv(tmp_path / "ok1.csv", g), ["--sample-rate", "1.5"],
                            ["--sample-rate 1.5 is outside [1e-12, 1]"]),
        "bad noise": (_write_csv(tmp_path / "ok2.csv", g), ["--noise-multiplier", "-1"],
                      ["--noise-multiplier", "must be positive"]),
        "bad delta": (_write_csv(tmp_path / "ok3.csv", g), ["--delta", "1"], ["--delta", "outside (0, 1)"]),
        "step beyond --steps": (_write_csv(tmp_path / "ok4.csv", g + "5,0,0.1\n"), ["--steps", "3"],
                                ["ok4.csv", "row 3", "step 5 is beyond --steps 3"]),
    }
    (tmp_path / "x.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 10)
    return cases


CASES = [
    "missing file", "missing column", "not a number", "nan norm", "negative norm", "infinite norm",
    "empty norm", "step below 0", "fractional step", "duplicate row", "unknown column",
    "not csv or parquet", "corrupt parquet", "bad boolean", "bad sample rate", "bad noise", "bad delta",
    "step beyond --steps",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_steps_file(case, db, tmp_path, cli):
    # a database with one good run already in it, which must come through unchanged
    _good().to_csv(tmp_path / "good.csv", index=False)
    assert cli("ingest", "steps", tmp_path / "good.csv", "--run", "good", *RUN, "--db", db).rc == 0
    before = table_snapshot(db)
    path, extra, fragments = _bad_steps_cases(tmp_path)[case]
    args = ["ingest", "steps", path, "--run", "new", *RUN, *extra, "--db", db]
    # later flags win in typer, so the bad value given after RUN is the one used
    r = cli(*args)
    assert r.rc == 2, r
    assert r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in r.err
    assert table_snapshot(db) == before


def test_duplicate_against_stored_rows(db, tmp_path, cli):
    _good().to_csv(tmp_path / "a.csv", index=False)
    assert cli("ingest", "steps", tmp_path / "a.csv", "--run", "r", *RUN, "--db", db).rc == 0
    before = table_snapshot(db)
    pd.DataFrame({"step": [2, 1], "point_id": [0, 1], "grad_norm": [0.1, 0.2]}).to_csv(tmp_path / "b.csv", index=False)
    r = cli("ingest", "steps", tmp_path / "b.csv", "--run", "r", "--db", db)
    assert r.rc == 2
    assert "b.csv: row 2" in r.err and "step 1, point_id 1" in r.err and "already in the warehouse" in r.err
    assert table_snapshot(db) == before


def _gla_variant(gla_dir, tmp_path, name, edit):
    lines = (gla_dir / "res1.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    edit(header, rows)
    path = tmp_path / name
    path.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n")
    return path


def _set(col, row, value):
    def edit(header, rows):
        rows[row][header.index(col)] = value
    return edit


def _drop(col):
    def edit(header, rows):
        k = header.index(col)
        del header[k]
        for r in rows:
            del r[k]
    return edit


def _set_all(col, value):
    def edit(header, rows):
        for r in rows:
            r[header.index(col)] = value
    return edit


GLA_CASES = {
    "negative distance": (_set("distance (sum)", 4, "-0.001"), ["row 5 (line 6)", "'distance (sum)'", "negative"]),
    "nan distance": (_set("distance (sum)", 9, "nan"), ["row 10", "'distance (sum)'", "NaN"]),
    "text distance": (_set("distance (sum)", 9, "n/a"), ["row 10", "'distance (sum)'", "'n/a' is not a number"]),
    "norm above C": (_set("distance (sum)", 2, "0.01"), ["row 3", "exceeds the clipping norm"]),
    "conflicting sigma": (_set("sigma", 30, "0.9"), ["row 31", "column 'sigma'", "conflicting"]),
    "negative step": (_set("step", 3, "-200"), ["row 4", "column 'step'", "below 0"]),
    "missing point column": (_drop("point"), ["missing column 'point'"]),
    "sample rate above 1": (_set("p", 0, "1.5"), ["row 1", "column 'p'", "outside (0, 1]"]),
    # the run's parameters in analysis.validate's ranges, named by the file's column
    "tiny sigma": (_set_all("sigma", "1e-160"), ["row 1", "column 'sigma'", "noise_multiplier 1e-160 is outside"]),
    "tiny sample rate": (_set_all("p", "1e-300"), ["row 1", "column 'p'", "sample_rate 1e-300 is outside [1e-12, 1]"]),
}


@pytest.mark.parametrize("case", sorted(GLA_CASES))
def test_bad_gla_file(case, gla_db, gla_dir, tmp_path, cli):
    edit, fragments = GLA_CASES[case]
    path = _gla_variant(gla_dir, tmp_path, "bad.csv", edit)
    before = table_snapshot(gla_db)
    r = cli("ingest", "gla-csv", path, "--run", "other", "--db", gla_db)
    assert r.rc == 2, r
    line = r.err.strip()
    assert "\n" not in line and "bad.csv" in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert table_snapshot(gla_db) == before


def test_a_bad_file_among_good_ones_writes_nothing(db, gla_dir, tmp_path, cli):
    good = gla_dir / "res1.csv"
    bad = _gla_variant(gla_dir, tmp_path, "bad.csv", _set("distance (sum)", 0, "-1"))
    r = cli("ingest", "gla-csv", good, bad, "--db", db)
    assert r.rc == 2
    assert table_snapshot(db).get("point_steps", (0, 0))[0] == 0


def test_same_run_with_conflicting_parameters_across_files(gla_db, gla_dir, tmp_path, cli):
    # the same run name, another noise multiplier on every row: a conflict with the stored run
    def edit(header, rows):
        for r in rows:
            r[header.index("sigma")] = "0.75"
            r[header.index("step")] = str(int(r[header.index("step")]) + 1)
    path = _gla_variant(gla_dir, tmp_path, "clash.csv", edit)
    before = table_snapshot(gla_db)
    r = cli("ingest", "gla-csv", path, "--db", gla_db)
    assert r.rc == 2
    assert "run 'res1' already exists with noise_multiplier = 0.57891845703125" in r.err
    assert table_snapshot(gla_db) == before


def test_bad_flags_are_one_line_exit_2(cli, db):
    for args in (["ingest", "steps"], ["query"], ["runs", "--nope"], ["nonsense"],
                 ["query", "select 1", "--format", "xml", "--db", db]):
        r = cli(*args)
        assert r.rc == 2, (args, r)
        assert len(r.err.strip().splitlines()) == 1, (args, r.err)
        assert r.err.startswith("error: ")
