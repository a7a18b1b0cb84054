"""Bad input on the ingest and training side (issue 11): each refused with one line naming
the file, row and column (or the parameter, or the resource), exit 2, nothing written.

Resource bombs are built so that only their metadata claims the size: the tests check the
refusal comes before anything is read (the readers are patched to fail if called).
"""

from __future__ import annotations

import errno
import os
import zipfile

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import query_rows, table_snapshot

RUN = ["--sample-rate", "0.01", "--noise-multiplier", "1.1", "--max-grad-norm", "1.0"]


def _one_line(r, *fragments):
    assert r.rc == 2, r
    assert "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def good_db(db, tmp_path, cli):
    """A database holding one good run, which every refusal must leave as it is."""
    pd.DataFrame({"step": [0, 0, 1], "point_id": [0, 1, 0], "grad_norm": [0.5, 1.5, 0.2]}).to_csv(
        tmp_path / "good.csv", index=False)
    assert cli("ingest", "steps", tmp_path / "good.csv", "--run", "good", *RUN, "--db", db).rc == 0
    return db


# ------------------------------------------------------------------ 1. integers beyond int64 / 2^53


def _parquet(path, step, point_id, grad_norm=(0.5,)):
    pq.write_table(pa.table({"step": step, "point_id": point_id, "grad_norm": pa.array(grad_norm)}), path)
    return path


def _big_int_cases(tmp_path):
    (tmp_path / "pid.csv").write_text("step,point_id,grad_norm\n0,0,0.1\n0,9223372036854775808,0.5\n")
    (tmp_path / "step.csv").write_text("step,point_id,grad_norm\n0,0,0.1\n9223372036854775807,0,0.5\n")
    (tmp_path / "float.csv").write_text("step,point_id,grad_norm\n0,0,0.1\n1e19,1,0.5\n")
    return {
        "csv point_id 2^63": (tmp_path / "pid.csv", ["pid.csv: row 2 (line 3), column 'point_id'",
                                                     "9223372036854775808 is above 9007199254740991"]),
        "csv step 2^63-1": (tmp_path / "step.csv", ["step.csv: row 2 (line 3), column 'step'",
                                                    "9223372036854775807 is above 999999999"]),
        "csv step 1e19": (tmp_path / "float.csv", ["float.csv: row 2 (line 3), column 'step'", "is above"]),
        "parquet uint64 step 2^63": (
            _parquet(tmp_path / "u64.parquet", pa.array([1, 2**63], pa.uint64()), pa.array([0, 0], pa.uint64()),
                     [0.1, 0.5]),
            ["u64.parquet: row 2, column 'step'", "9223372036854775808 is above"]),
        "parquet int64 point_id 2^53": (
            _parquet(tmp_path / "i64.parquet", pa.array([0], pa.int64()), pa.array([2**53], pa.int64())),
            ["i64.parquet: row 1, column 'point_id'", "9007199254740992 is above 9007199254740991"]),
    }


@pytest.mark.parametrize("case", ["csv point_id 2^63", "csv step 2^63-1", "csv step 1e19",
                                  "parquet uint64 step 2^63", "parquet int64 point_id 2^53"])
def test_integers_beyond_the_maximum_are_refused(case, good_db, tmp_path, cli):
    before = table_snapshot(good_db)
    path, fragments = _big_int_cases(tmp_path)[case]
    _one_line(cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db), *fragments)
    assert table_snapshot(good_db) == before


def test_the_largest_step_and_point_id_are_stored_exactly(db, tmp_path, cli):
    from dpledger.analysis.validate import MAX_STEPS

    top_step, top_id = MAX_STEPS - 1, 2**53 - 1
    path = _parquet(tmp_path / "top.parquet", pa.array([top_step], pa.uint64()), pa.array([top_id], pa.uint64()))
    assert cli("ingest", "steps", path, "--run", "top", *RUN, "--db", db).rc == 0
    assert query_rows(db, "SELECT step, point_id FROM point_steps") == [(top_step, top_id)]
    assert query_rows(db, "SELECT steps FROM runs") == [(MAX_STEPS,)]
    path = _parquet(tmp_path / "over.parquet", pa.array([MAX_STEPS], pa.uint64()), pa.array([0], pa.uint64()))
    _one_line(cli("ingest", "steps", path, "--run", "over", *RUN, "--db", db),
              f"over.parquet: row 1, column 'step': step {MAX_STEPS} is above {MAX_STEPS - 1}")


# ------------------------------------------------------------------ 2. sweep config values


def _sweep_cases(tmp_path):
    toml = {
        "epochs string": ('[base]\nnoise_multiplier = 1.0\nepochs = "five"\n', ["epochs = 'five' must be a number"]),
        "seed list with text": ('[base]\nnoise_multiplier = 1.0\n[grid]\nseed = [0, "x"]\n',
                                ["seed = 'x' must be a whole number"]),
        "noise multiplier bool": ("[base]\nnoise_multiplier = true\n", ["noise_multiplier = true must be a number"]),
        "switch as a number": ("[base]\nnoise_multiplier = 1.0\ndisable_dp = 1\n",
                               ["disable_dp = 1 must be true or false"]),
        "unknown key": ("[base]\nnoise_multiplier = 1.0\nnoise = 2\n", ["unknown option 'noise'"]),
        "base not a table": ("base = 5\n", ["[base] must be a table"]),
        "infinite clip": ("[base]\nnoise_multiplier = 1.0\nmax_grad_norm = inf\n",
                          ["max_grad_norm inf must be finite"]),
        "tiny sigma": ("[base]\nnoise_multiplier = 1e-160\n", ["noise_multiplier 1e-160 is outside"]),
        "nan lr": ("[base]\nnoise_multiplier = 1.0\nlr = nan\n", ["lr nan must be finite"]),
        "negative seed": ("[base]\nnoise_multiplier = 1.0\nseed = -1\n", ["seed -1 must be"]),
    }
    cases = {}
    for name, (text, fragments) in toml.items():
        path = tmp_path / (name.replace(" ", "_") + ".toml")
        path.write_text(text)
        cases[name] = (path, fragments)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[base]\nnoise_multiplier = 1.0\nrun = \"\xff\xfe\x00\"\n")
    cases["binary file"] = (binary, ["not a text (UTF-8) file: line 3"])
    return cases


SWEEP_CASES = ["epochs string", "seed list with text", "noise multiplier bool", "switch as a number", "unknown key",
               "base not a table", "infinite clip", "tiny sigma", "nan lr", "negative seed", "binary file"]


@pytest.mark.parametrize("case", SWEEP_CASES)
def test_bad_sweep_config_values(case, db, tmp_path, cli):
    path, fragments = _sweep_cases(tmp_path)[case]
    # --json: no progress line (the CLI prints "sweep (1 workers)..." before reading the config)
    line = _one_line(cli("sweep", path, "--db", db, "--json"), path.name, *fragments)
    assert "--" not in line  # a file's keys are named as the file spells them, not as flags
    assert not db.exists() and not (tmp_path / "lake").exists()  # nothing started, nothing written


# ------------------------------------------------------------------ 3. parameters of ingest steps and train


@pytest.mark.parametrize("args,fragment", [
    (["--max-grad-norm", "inf"], "--max-grad-norm inf must be finite"),
    (["--max-grad-norm", "nan"], "--max-grad-norm nan must be finite"),
    (["--noise-multiplier", "1e-160"], "--noise-multiplier 1e-160 is outside [0.001, 1e+06]"),
    (["--noise-multiplier", "inf"], "--noise-multiplier inf must be finite"),
    (["--sample-rate", "1e-300"], "--sample-rate 1e-300 is outside [1e-12, 1]"),
    (["--sample-rate", "nan"], "--sample-rate nan must be finite"),
    (["--delta", "nan"], "--delta nan must be finite"),
    (["--steps", "0"], "--steps 0 must be in [1, 1000000000]"),
    (["--max-grad-norm", "1e300"], "--max-grad-norm 1e+300 is outside [1e-12, 1e+12]"),
    (["--batch-size", "1000000000000000"], "--batch-size 1000000000000000 at --sample-rate"),
])
def test_ingest_steps_parameters_out_of_range(args, fragment, good_db, tmp_path, cli):
    (tmp_path / "ok.csv").write_text("step,point_id,grad_norm\n0,0,0.5\n")
    before = table_snapshot(good_db)
    _one_line(cli("ingest", "steps", tmp_path / "ok.csv", "--run", "new", *RUN, *args, "--db", good_db), fragment)
    assert table_snapshot(good_db) == before


@pytest.mark.parametrize("args,fragment", [
    (["--max-grad-norm", "inf"], "--max-grad-norm inf must be finite"),
    (["--noise-multiplier", "1e-160"], "--noise-multiplier 1e-160 is outside"),
    (["--lr", "inf"], "--lr inf must be finite"),
    (["--epochs", "1e300"], "--epochs 1e+300 is outside (0, 1e+06]"),
    (["--delta", "nan"], "--delta nan must be finite"),
    (["--momentum", "nan"], "--momentum nan must be finite"),
    (["--target-epsilon", "inf", "--noise-multiplier", None], "--target-epsilon inf must be finite"),
])
def test_train_parameters_out_of_range(args, fragment, db, cli):
    base = {"--noise-multiplier": "1.0"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [x for k, v in base.items() if v is not None for x in (k, v)]
    _one_line(cli("train", *flat, "--db", db), fragment)
    # the CLI opens (creates) the database before the options are checked; no run is written
    assert not db.exists() or query_rows(db, "SELECT count(*) FROM runs") == [(0,)]


def test_train_config_checks_types_and_ranges_from_python():
    from dpledger.analysis.validate import ParameterError
    from dpledger.ingest.worker import TrainConfig, validate

    with pytest.raises(ParameterError, match="^max_grad_norm inf must be finite$"):
        validate(TrainConfig(noise_multiplier=1.0, max_grad_norm=float("inf")))
    with pytest.raises(ParameterError, match="^epochs 'five' must be a number$"):
        validate(TrainConfig(noise_multiplier=1.0, epochs="five"))
    validate(TrainConfig(noise_multiplier=1.0, seed=np.int64(3), epochs=np.float64(2.0)))  # numpy numbers are fine


# ------------------------------------------------------------------ 4. the storage refuses a write


@pytest.mark.parametrize("failure", [
    duckdb.IOException('IO Error: Could not write file "w.duckdb": No space left on device'),
    OSError(errno.ENOSPC, "No space left on device"),
    # an existing database in a folder made read-only: DuckDB cannot create its write-ahead log
    duckdb.IOException('IO Error: Cannot open file "w.duckdb.wal": Permission denied'),
])
def test_a_write_the_storage_refuses_is_one_line_and_changes_nothing(failure, good_db, tmp_path, cli, monkeypatch):
    from dpledger.ingest import load

    insert = load.insert_facts

    def failing_insert(con, *args, **kwargs):
        insert(con, *args, **kwargs)  # the rows are in the transaction when the disk says no
        raise failure

    monkeypatch.setattr(load, "insert_facts", failing_insert)
    (tmp_path / "new.csv").write_text("step,point_id,grad_norm\n0,0,0.5\n1,0,0.25\n")
    before = table_snapshot(good_db)
    line = _one_line(cli("ingest", "steps", tmp_path / "new.csv", "--run", "new", *RUN, "--db", good_db),
                     f"cannot write to database {good_db}", "nothing of this file was written")
    assert str(failure).split(":")[-1].strip() in line
    monkeypatch.undo()
    assert table_snapshot(good_db) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; simulated above")
def test_a_database_in_a_read_only_folder(good_db, tmp_path, cli):
    (tmp_path / "new.csv").write_text("step,point_id,grad_norm\n0,0,0.5\n")
    before = table_snapshot(good_db)
    os.chmod(good_db.parent, 0o555)
    try:
        r = cli("ingest", "steps", tmp_path / "new.csv", "--run", "new", *RUN, "--db", good_db)
    finally:
        os.chmod(good_db.parent, 0o755)
    _one_line(r, str(good_db))
    assert table_snapshot(good_db) == before


def test_another_applications_duckdb_file_is_left_alone(tmp_path, cli):
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE runs (id INTEGER, name VARCHAR)")
    con.execute("INSERT INTO runs VALUES (1, 'theirs')")
    con.close()
    (tmp_path / "ok.csv").write_text("step,point_id,grad_norm\n0,0,0.5\n")
    r = cli("ingest", "steps", tmp_path / "ok.csv", "--run", "a", *RUN, "--db", other)
    _one_line(r, str(other), "not a dpledger database")
    con = duckdb.connect(str(other), read_only=True)
    assert con.execute("SELECT table_name FROM duckdb_tables()").fetchall() == [("runs",)]
    assert con.execute("SELECT * FROM runs").fetchall() == [(1, "theirs")]
    con.close()


# ------------------------------------------------------------------ 5. silently accepted until now


def test_boolean_norms_are_refused(good_db, tmp_path, cli):
    path = _parquet(tmp_path / "b.parquet", pa.array([0, 1]), pa.array([0, 0]), [True, False])
    before = table_snapshot(good_db)
    _one_line(cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db),
              "b.parquet: column 'grad_norm': expected numbers, found bool")
    assert table_snapshot(good_db) == before


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays,fragment", [
    ({"tr_mem": np.array([0.1 + 0.5j, 0.2])}, "tr_mem holds complex128 values; expected real numbers"),
    ({"tr_mem": np.array([True, False])}, "tr_mem holds bool values"),
    ({"tr_mem": np.array([0.1, 0.2]), "tr_labels": np.array(["cat", "dog"])},
     "tr_labels holds <U3 values; expected integer class labels"),
    ({"tr_mem": np.array([0.1, 0.2]), "tr_labels": np.array([0.5, 1.0])},
     "tr_labels holds float64 values; expected integer class labels"),
])
def test_memorization_values_of_the_wrong_kind(arrays, fragment, good_db, tmp_path, cli):
    path = _npz(tmp_path / "mem.npz", **arrays)
    before = table_snapshot(good_db)
    _one_line(cli("ingest", "memorization", path, "--dataset", "nolabels", "--db", good_db), "mem.npz", fragment)
    assert table_snapshot(good_db) == before


def test_memorization_integral_float_labels_are_labels(db, tmp_path, cli):
    path = _npz(tmp_path / "mem.npz", tr_mem=np.array([0.1, 0.2]), tr_labels=np.array([3.0, 1.0]))
    assert cli("ingest", "memorization", path, "--dataset", "d", "--db", db).rc == 0


# ------------------------------------------------------------------ 6. resource bombs


def _refuse_reading(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the file was read before its size was checked")

    monkeypatch.setattr(pq, "read_table", boom)
    monkeypatch.setattr(np, "load", boom)


def test_a_parquet_expanding_to_more_rows_than_allowed_is_refused_from_its_metadata(good_db, tmp_path, cli,
                                                                                   monkeypatch):
    from dpledger.ingest import readers

    # 21 row groups of one million constant rows: a few hundred KB on disk, 21 M rows (> MAX_ROWS)
    assert readers.MAX_ROWS == 20_000_000
    chunk = pa.table({"step": pa.array(np.zeros(1_000_000, np.int64)),
                      "point_id": pa.array(np.zeros(1_000_000, np.int64)),
                      "grad_norm": pa.array(np.zeros(1_000_000))})
    path = tmp_path / "bomb.parquet"
    with pq.ParquetWriter(path, chunk.schema, compression="zstd") as w:
        for _ in range(21):
            w.write_table(chunk)
    del chunk
    assert path.stat().st_size < 5_000_000
    before = table_snapshot(good_db)
    _refuse_reading(monkeypatch)
    _one_line(cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db),
              "bomb.parquet: more than 20,000,000 rows (21,000,000)", "split it")
    monkeypatch.undo()
    assert table_snapshot(good_db) == before


def test_a_parquet_with_an_unknown_column_is_refused_before_reading(good_db, tmp_path, cli, monkeypatch):
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"step": [0], "point_id": [0], "grad_norm": [0.5], "blob": [b"x" * 100]}), path)
    _refuse_reading(monkeypatch)
    _one_line(cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db),
              "wide.parquet: unexpected column 'blob'")


def test_a_compressed_csv_is_read_only_up_to_the_row_limit(good_db, tmp_path, cli, monkeypatch):
    import gzip

    from dpledger.ingest import readers

    monkeypatch.setattr(readers, "MAX_ROWS", 1000)
    path = tmp_path / "many.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("step,point_id,grad_norm\n")
        f.writelines(f"{i},0,0.5\n" for i in range(5000))
    before = table_snapshot(good_db)
    _one_line(cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db),
              "many.csv.gz: more than 1,000 rows")
    assert table_snapshot(good_db) == before


def _npy_header(shape, dtype="<f8") -> bytes:
    import io

    import numpy.lib.format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_an_npz_whose_array_claims_gigabytes_is_refused_before_loading(good_db, tmp_path, cli, monkeypatch):
    # the header claims 2^37 float64 (1 TiB); the zip holds a few bytes
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tr_mem.npy", _npy_header((2**37,)) + b"\0" * 64)
    before = table_snapshot(good_db)
    _refuse_reading(monkeypatch)
    _one_line(cli("ingest", "memorization", path, "--dataset", "d", "--db", good_db),
              "claims.npz: array 'tr_mem' of shape (137438953472,) is 1,099,511,627,776 bytes, more than the "
              "268,435,456 allowed")
    monkeypatch.undo()
    assert table_snapshot(good_db) == before


def test_an_npz_zip_bomb_is_refused_from_the_zip_directory(good_db, tmp_path, cli, monkeypatch):
    from dpledger.ingest import memorization

    monkeypatch.setattr(memorization, "MAX_ARRAY_BYTES", 1 << 20)
    path = tmp_path / "bomb.npz"
    n = 4 << 20  # 4 MiB of zeros, deflated to a few KB
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("tr_mem.npy", "w") as f:
            f.write(_npy_header((n // 8,)))
            f.write(bytes(n))
    assert path.stat().st_size < 100_000
    _refuse_reading(monkeypatch)
    _one_line(cli("ingest", "memorization", path, "--dataset", "d", "--db", good_db),
              "bomb.npz: array 'tr_mem' unzips to 4,194,432 bytes, more than the 1,048,576 allowed")


def test_a_dataset_npz_bomb_is_refused(tmp_path):
    from dpledger.models.datasets import DatasetError, load_dataset

    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", _npy_header((2**20, 2**20), "|u1") + b"\0" * 64)
        zf.writestr("y.npy", _npy_header((2,), "<i8") + b"\0" * 16)
    with pytest.raises(DatasetError, match=r"data.npz: array 'x' of shape \(1048576, 1048576\) is 1,099,511,627,776"):
        load_dataset("npz", path)


def test_a_dataset_with_an_absurd_label_is_refused(tmp_path):
    from dpledger.models.datasets import DatasetError, load_dataset

    path = _npz(tmp_path / "labels.npz", x=np.zeros((4, 2, 2), np.uint8), y=np.array([0, 1, 0, 10**12]))
    with pytest.raises(DatasetError, match="label 1000000000000 at index 3; labels are class numbers below 100,000"):
        load_dataset("npz", path)


def test_a_gzip_bomb_idx_file_is_refused_from_its_header(tmp_path):
    import gzip
    import struct

    from dpledger.models.datasets import DatasetError, load_dataset

    folder = tmp_path / "mnist"
    folder.mkdir()
    # the header claims 2^31 images of 64 x 64: 8 TiB; the file is a few bytes
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 2**31, 64, 64))
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, 1) + b"\0")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: its header says 8,796,093,022,224 bytes"):
        load_dataset("mnist", folder)


def test_a_huge_sweep_grid_is_counted_before_it_is_expanded(db, tmp_path, cli):
    # 10^9 runs: nine lists of ten values
    grid = "\n".join(f"lr{i} = [{', '.join(str(v) for v in range(10))}]" for i in range(9))
    path = tmp_path / "huge.toml"
    path.write_text("[base]\nnoise_multiplier = 1.0\n[grid]\n" + grid.replace("lr0", "seed") + "\n")
    _one_line(cli("sweep", path, "--db", db, "--json"), "huge.toml: the sweep has 1,000,000,000 runs, more than",
              "10,000")
    assert not db.exists()


def test_max_runs_is_a_parameter_of_expand_and_load_config(tmp_path):
    from dpledger.ingest.sweep import MAX_RUNS, expand, load_config
    from dpledger.warehouse.errors import UserError

    assert MAX_RUNS == 10_000
    doc = {"base": {"noise_multiplier": 1.0}, "grid": {"seed": [0, 1, 2]}, "runs": [{"seed": 9, "run": "x"}]}
    assert len(expand(doc, max_runs=4)) == 4
    with pytest.raises(UserError, match="the sweep has 4 runs, more than max_runs 3") as info:
        expand(doc, max_runs=3)
    assert info.value.params == ("max_runs",)
    path = tmp_path / "s.toml"
    path.write_text("[base]\nnoise_multiplier = 1.0\n[grid]\nseed = [0, 1, 2]\n")
    assert len(load_config(path)) == 3
    with pytest.raises(UserError, match="s.toml: the sweep has 3 runs, more than max_runs 2"):
        load_config(path, max_runs=2)
