"""`ingest steps` on Parquet: the fast path (one DuckDB scan with the row checks as SQL,
the keys and the file's sha256 checked alongside) must keep every guarantee of the
careful path: a bad row anywhere (here often in the last of 3 row groups) is one line
naming file, row and column, exit 2, and nothing is written; a repeated key (within the
file or against stored rows) is refused; re-ingesting a file is a no-op."""

from __future__ import annotations

import errno
import re

import blake3
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import query_rows as _q, table_snapshot

RUN = ["--sample-rate", "0.01", "--noise-multiplier", "1.1", "--max-grad-norm", "1.0"]
N_STEPS, N_POINTS = 3, 4  # 12 rows, written as 3 row groups of 4


def _columns(n_steps=N_STEPS, n_points=N_POINTS, first_step=0, seed=0):
    rng = np.random.default_rng(seed)
    step = np.repeat(np.arange(first_step, first_step + n_steps, dtype=np.int64), n_points)
    point = np.tile(np.arange(n_points, dtype=np.int64), n_steps)
    return {
        "step": step,
        "point_id": point,
        "grad_norm": rng.gamma(2.0, 0.5, step.size),
        "loss": rng.random(step.size),
        "sampled": rng.random(step.size) < 0.5,
    }


def _write(path, cols, types=None):
    types = types or {}
    table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})
    pq.write_table(table, path, row_group_size=N_POINTS)
    assert pq.ParquetFile(path).num_row_groups == -(-len(table) // N_POINTS)
    return path


@pytest.fixture
def fast_only(monkeypatch):
    """Fail if the careful (Arrow) path is used: a good plain Parquet file takes the fast path."""
    from dpledger.ingest import steps_file

    def careful(*args, **kwargs):
        raise AssertionError("the careful path was used")

    monkeypatch.setattr(steps_file, "_ingest_arrow", careful)


@pytest.fixture
def good_db(db, tmp_path, cli):
    path = _write(tmp_path / "good.parquet", _columns(seed=1))
    assert cli("ingest", "steps", path, "--run", "good", *RUN, "--db", db).rc == 0
    return db


def _stored(db, run):
    return _q(db, "SELECT step, point_id, grad_norm, loss, sampled, norm_clipped FROM point_steps "
                  f"WHERE run_id = '{run}' ORDER BY step, point_id")


def _expected(cols, clipped=False):
    keys = list(zip(cols["step"].tolist(), cols["point_id"].tolist()))
    rows = [(int(s), int(p), float(g), None if lo is None else float(lo), None if sa is None else bool(sa), clipped)
            for s, p, g, lo, sa in zip(cols["step"], cols["point_id"], cols["grad_norm"],
                                       cols.get("loss", [None] * len(keys)), cols.get("sampled", [None] * len(keys)))]
    return sorted(rows)


# ------------------------------------------------------------------ good files, fast path


def test_a_parquet_file_lands_row_for_row_on_the_fast_path(fast_only, good_db, tmp_path, cli):
    cols = _columns(seed=2)
    path = _write(tmp_path / "new.parquet", cols)
    r = cli("ingest", "steps", path, "--run", "new", *RUN, "--dataset", "toy", "--db", good_db, "--json")
    assert r.rc == 0, r
    assert r.json() == [{"path": str(path), "status": "ingested", "rows": 12, "runs": ["new"]}]
    assert _stored(good_db, "new") == _expected(cols)
    assert _q(good_db, "SELECT sample_rate, noise_multiplier, max_grad_norm, delta, steps, dataset, source "
                       "FROM runs WHERE run_id = 'new'") == [(0.01, 1.1, 1.0, 1e-5, N_STEPS, "toy", "steps")]
    assert _q(good_db, "SELECT list(point_id ORDER BY point_id) FROM points WHERE dataset = 'toy'") == [
        ([0, 1, 2, 3],)]
    digest = "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()
    assert _q(good_db, "SELECT digest, kind, target, path, rows, run_ids FROM ingests WHERE target = 'new'") == [
        (digest, "steps", "new", str(path), 12, ["new"])]


def test_narrow_types_and_optional_columns(fast_only, db, tmp_path, cli):
    cols = _columns()
    del cols["loss"], cols["sampled"]
    path = _write(tmp_path / "narrow.parquet", cols,
                  {"step": pa.uint16(), "point_id": pa.uint32(), "grad_norm": pa.float32()})
    assert cli("ingest", "steps", path, "--run", "r", *RUN, "--db", db).rc == 0
    want = [(s, p, float(np.float32(g)), None, None, False) for s, p, g, *_ in _expected(cols)]
    assert _stored(db, "r") == want


def test_reingest_is_a_noop_and_a_new_run_is_not(fast_only, good_db, tmp_path, cli):
    path = _write(tmp_path / "a.parquet", _columns(seed=3))
    assert cli("ingest", "steps", path, "--run", "x", *RUN, "--db", good_db).rc == 0
    before = table_snapshot(good_db)
    r = cli("ingest", "steps", path, "--run", "x", *RUN, "--db", good_db, "--json")
    assert r.rc == 0 and r.json()[0]["status"] == "skipped", r
    assert table_snapshot(good_db) == before
    # another file of as many rows for the same run: hashed first, found new, loaded
    other = _write(tmp_path / "b.parquet", _columns(first_step=N_STEPS, seed=4))
    r = cli("ingest", "steps", other, "--run", "x", "--db", good_db, "--json")
    assert r.rc == 0 and r.json()[0]["status"] == "ingested", r
    assert _q(good_db, "SELECT count(*), max(step) FROM point_steps WHERE run_id = 'x'") == [(24, 2 * N_STEPS - 1)]
    assert _q(good_db, "SELECT steps FROM runs WHERE run_id = 'x'") == [(2 * N_STEPS,)]


def test_later_steps_of_an_existing_run_are_appended(fast_only, good_db, tmp_path, cli):
    cols = _columns(n_steps=2, first_step=5, seed=5)
    path = _write(tmp_path / "later.parquet", cols)
    assert cli("ingest", "steps", path, "--run", "good", "--db", good_db).rc == 0
    assert _q(good_db, "SELECT count(*) FROM point_steps WHERE run_id = 'good'") == [(12 + 8,)]
    assert [row for row in _stored(good_db, "good") if row[0] >= 5] == _expected(cols)
    assert _q(good_db, "SELECT steps FROM runs WHERE run_id = 'good'") == [(7,)]


def test_interleaved_steps_overlapping_the_stored_range_are_joined_and_loaded(fast_only, db, tmp_path, cli):
    even, odd = _columns(n_steps=6), _columns(n_steps=6, seed=9)
    keep_even, keep_odd = even["step"] % 2 == 0, odd["step"] % 2 == 1
    first = _write(tmp_path / "even.parquet", {k: v[keep_even] for k, v in even.items()})
    second = _write(tmp_path / "odd.parquet", {k: v[keep_odd] for k, v in odd.items()})
    assert cli("ingest", "steps", first, "--run", "r", *RUN, "--db", db).rc == 0
    assert cli("ingest", "steps", second, "--run", "r", "--db", db).rc == 0
    assert _q(db, "SELECT count(*), count(DISTINCT (step, point_id)), max(step) FROM point_steps") == [(24, 24, 5)]


def test_rows_out_of_key_order_without_repeats_load(fast_only, db, tmp_path, cli):
    cols = _columns()
    order = np.random.default_rng(0).permutation(len(cols["step"]))
    path = _write(tmp_path / "shuffled.parquet", {k: v[order] for k, v in cols.items()})
    assert cli("ingest", "steps", path, "--run", "r", *RUN, "--db", db).rc == 0
    assert _stored(db, "r") == _expected(cols)


@pytest.fixture
def keys_reads(monkeypatch):
    """The files whose keys were read on a thread (not proven distinct by the load's grid check)."""
    from dpledger.ingest import steps_file

    reads = []
    keys = steps_file._file_keys

    def counted(path, want_ids):
        reads.append(path)
        return keys(path, want_ids)

    monkeypatch.setattr(steps_file, "_file_keys", counted)
    return reads


def test_a_grid_file_is_proven_free_of_repeats_by_the_load(fast_only, keys_reads, db, tmp_path, cli):
    cols = _columns(n_steps=5, first_step=7, seed=21)
    cols["point_id"] = cols["point_id"] + 100
    path = _write(tmp_path / "grid.parquet", cols)
    assert cli("ingest", "steps", path, "--run", "r", *RUN, "--dataset", "toy", "--db", db).rc == 0
    assert keys_reads == []
    assert _stored(db, "r") == _expected(cols)
    assert _q(db, "SELECT steps FROM runs") == [(12,)]
    assert _q(db, "SELECT list(point_id ORDER BY point_id) FROM points") == [([100, 101, 102, 103],)]


@pytest.mark.parametrize("layout", ["point-major", "no statistics", "sparse"])
def test_files_that_are_no_row_major_grid_have_their_keys_read(layout, fast_only, keys_reads, db, tmp_path, cli):
    cols = _columns(n_steps=4, seed=22)
    path = tmp_path / f"{layout}.parquet"
    if layout == "point-major":  # every key once, but point by point: the grid check fails, then the keys pass
        order = np.lexsort((cols["step"], cols["point_id"]))
        _write(path, {k: v[order] for k, v in cols.items()})
    elif layout == "no statistics":
        pq.write_table(pa.table(cols), path, row_group_size=N_POINTS, write_statistics=False)
    else:  # a point missing at one step: fewer rows than steps x points
        keep = np.arange(len(cols["step"])) != 6
        cols = {k: v[keep] for k, v in cols.items()}
        _write(path, cols)
    assert cli("ingest", "steps", path, "--run", "r", *RUN, "--dataset", "toy", "--db", db).rc == 0
    assert keys_reads == [path]
    assert _stored(db, "r") == _expected(cols)
    assert _q(db, "SELECT steps FROM runs") == [(4,)]
    assert _q(db, "SELECT list(point_id ORDER BY point_id) FROM points") == [([0, 1, 2, 3],)]


def test_a_name_with_a_quote_takes_the_fast_path(fast_only, db, tmp_path, cli):
    cols = _columns()
    path = _write(tmp_path / "it's here.parquet", cols)
    assert cli("ingest", "steps", path, "--run", "r", *RUN, "--db", db).rc == 0, path
    assert _stored(db, "r") == _expected(cols)


def test_a_name_duckdb_would_glob_is_read_as_itself(db, tmp_path, cli):
    cols = _columns()
    path = _write(tmp_path / "norms[1].parquet", cols)
    _write(tmp_path / "norms1.parquet", _columns(seed=7))  # what the pattern would match
    assert cli("ingest", "steps", path, "--run", "r", *RUN, "--db", db).rc == 0
    assert _stored(db, "r") == _expected(cols)


# ------------------------------------------------------------------ bad files: one line, nothing written


def _last(value, column="grad_norm", cast=None):
    """The columns with the last row (row 12, in the third row group) of ``column`` replaced."""
    def edit(cols, types):
        values = cols[column].astype(object)
        values[-1] = value
        cols[column] = values
        if cast is not None:
            types[column] = cast
    return edit


BAD = {
    "nan norm": (_last(float("nan")), ["row 12", "column 'grad_norm'", "NaN"]),
    "negative norm": (_last(-0.5), ["row 12", "column 'grad_norm'", "negative"]),
    "infinite norm": (_last(float("inf")), ["row 12", "column 'grad_norm'", "infinite"]),
    "missing norm": (_last(None, cast=pa.float64()), ["row 12", "column 'grad_norm'", "missing gradient norm"]),
    "infinite loss": (_last(float("-inf"), "loss"), ["row 12", "column 'loss'", "infinite"]),
    "nan loss": (_last(float("nan"), "loss"), ["row 12", "column 'loss'", "NaN"]),
    "negative step": (_last(-1, "step", pa.int64()), ["row 12", "column 'step'", "below 0"]),
    "step too large": (_last(10**9, "step", pa.int64()), ["row 12", "column 'step'", "step 1000000000 is above"]),
    "missing step": (_last(None, "step", pa.int64()), ["row 12", "column 'step'", "missing step"]),
    "negative point": (_last(-3, "point_id", pa.int64()), ["row 12", "column 'point_id'", "below 0"]),
    "point id beyond int64": (_last(2**63 + 5, "point_id", pa.uint64()),
                              ["row 12", "column 'point_id'", f"point id {2**63 + 5} is above {2**53 - 1}"]),
    "repeated key, last row group": (_last(2, "point_id", pa.int64()),
                                     ["row 12", "duplicate row", "step 2, point_id 2", "row 11"]),
}


@pytest.fixture
def fast_tries(monkeypatch):
    """Count the fast path's attempts (each bad file below is one it must refuse itself)."""
    from dpledger.ingest import steps_file

    calls = []
    fast = steps_file._ingest_parquet

    def counted(*args, **kwargs):
        calls.append(args[1].path)
        return fast(*args, **kwargs)

    monkeypatch.setattr(steps_file, "_ingest_parquet", counted)
    return calls


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_row_is_named_and_nothing_is_written(case, good_db, tmp_path, cli, fast_tries):
    edit, fragments = BAD[case]
    cols, types = _columns(seed=11), {}
    edit(cols, types)
    path = _write(tmp_path / "bad.parquet", cols, types)
    before = table_snapshot(good_db)
    r = cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db)
    assert r.rc == 2, r
    assert r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), r.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert table_snapshot(good_db) == before
    # the fast path read it (a second time without the grid proof where the footer suggested a grid),
    # refused it, and left the naming to the careful one
    assert fast_tries and set(fast_tries) == {path}


def test_a_repeated_key_in_a_shuffled_file(good_db, tmp_path, cli, fast_tries):
    cols = _columns()
    order = np.r_[np.random.default_rng(1).permutation(12), 5]  # row 13 repeats the key of row 7's origin
    path = _write(tmp_path / "dup.parquet", {k: v[order] for k, v in cols.items()})
    first = int(np.flatnonzero(order == 5)[0]) + 1
    before = table_snapshot(good_db)
    r = cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db)
    assert r.rc == 2 and f"row 13: duplicate row (run_id new, step 1, point_id 1); it first appears at " in r.err, r
    assert f"row {first}" in r.err
    assert table_snapshot(good_db) == before
    assert fast_tries and set(fast_tries) == {path}


def test_a_key_stored_already_is_refused(good_db, tmp_path, cli, fast_tries):
    cols = _columns(n_steps=2, first_step=N_STEPS - 1, seed=12)  # steps 2 and 3: step 2 is stored
    path = _write(tmp_path / "again.parquet", cols)
    before = table_snapshot(good_db)
    r = cli("ingest", "steps", path, "--run", "good", "--db", good_db)
    assert r.rc == 2, r
    m = re.search(r"again\.parquet: row (\d+): row \(run_id good, step (\d+), point_id (\d+)\) "
                  r"is already in the warehouse", r.err)
    assert m, r.err
    row, step, point = (int(g) for g in m.groups())
    assert step == N_STEPS - 1 and (cols["step"][row - 1], cols["point_id"][row - 1]) == (step, point)
    assert table_snapshot(good_db) == before
    assert fast_tries and set(fast_tries) == {path}


def test_steps_beyond_the_run_and_norms_above_the_clip(good_db, tmp_path, cli):
    cols = _columns(seed=13)
    path = _write(tmp_path / "c.parquet", cols)
    before = table_snapshot(good_db)
    r = cli("ingest", "steps", path, "--run", "new", *RUN, "--steps", "2", "--db", good_db)
    assert r.rc == 2 and "c.parquet: row 9, column 'step': step 2 is beyond --steps 2" in r.err, r
    r = cli("ingest", "steps", path, "--run", "new", *RUN, "--max-grad-norm", "0.0001", "--norms-clipped",
            "--db", good_db)
    assert r.rc == 2 and "c.parquet: row 1, column 'grad_norm'" in r.err and "exceeds" in r.err, r
    assert table_snapshot(good_db) == before
    # the same file, ingested before, is still checked against a smaller --steps
    assert cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db).rc == 0
    r = cli("ingest", "steps", path, "--run", "new", "--steps", "2", "--db", good_db)
    assert r.rc == 2 and "step 2 is beyond --steps 2" in r.err, r


@pytest.mark.parametrize("missing", ["grad_norm", "point_id"])
def test_a_missing_column(missing, good_db, tmp_path, cli):
    cols = _columns()
    del cols[missing]
    path = _write(tmp_path / "m.parquet", cols)
    r = cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db)
    assert r.rc == 2 and f"m.parquet: missing column '{missing}'" in r.err, r


def test_string_norms_take_the_careful_path(good_db, tmp_path, cli):
    cols = _columns()
    cols["grad_norm"] = np.array([str(v) for v in cols["grad_norm"]][:-1] + ["oops"], dtype=object)
    path = _write(tmp_path / "s.parquet", cols)
    before = table_snapshot(good_db)
    r = cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db)
    assert r.rc == 2 and "s.parquet: row 12, column 'grad_norm': 'oops' is not a number" in r.err, r
    assert table_snapshot(good_db) == before


@pytest.mark.parametrize("failure", [
    duckdb.IOException('IO Error: Could not write file "w.duckdb": No space left on device'),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_write_refused_after_the_rows_is_one_line_and_changes_nothing(failure, good_db, tmp_path, cli,
                                                                           monkeypatch):
    from dpledger.ingest import load

    record = load.record_ingest

    def failing_record(con, *args, **kwargs):
        record(con, *args, **kwargs)  # every row of the file is in the transaction when the disk says no
        assert con.execute("SELECT count(*) FROM point_steps WHERE run_id = 'new'").fetchall() == [(12,)]
        raise failure

    monkeypatch.setattr(load, "record_ingest", failing_record)
    path = _write(tmp_path / "new.parquet", _columns(seed=14))
    before = table_snapshot(good_db)
    r = cli("ingest", "steps", path, "--run", "new", *RUN, "--db", good_db)
    assert r.rc == 2 and f"cannot write to database {good_db}" in r.err and "nothing of this file" in r.err, r
    monkeypatch.undo()
    assert table_snapshot(good_db) == before


def test_an_interrupt_during_the_load_leaves_nothing(good_db, tmp_path, monkeypatch):
    from dpledger import warehouse
    from dpledger.ingest import load, steps_file

    def interrupted(con, *args, **kwargs):
        assert con.execute("SELECT count(*) FROM point_steps WHERE run_id = 'new'").fetchall() == [(12,)]
        raise KeyboardInterrupt

    monkeypatch.setattr(load, "record_ingest", interrupted)
    path = _write(tmp_path / "new.parquet", _columns(seed=15))
    before = table_snapshot(good_db)
    con = warehouse.connect(good_db)
    try:
        with pytest.raises(KeyboardInterrupt):
            steps_file.ingest_steps(con, path, "new", sample_rate=0.01, noise_multiplier=1.1, max_grad_norm=1.0)
    finally:
        con.close()
    assert table_snapshot(good_db) == before


# ------------------------------------------------------------- the hash beside the load, the early flush


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, 5 * (1 << 20) + 17])
def test_background_digest_equals_blake3(tmp_path, size):
    """The low-priority hash, whatever the point where result() takes it over, is the file's BLAKE3."""
    from dpledger.ingest import digest

    path = tmp_path / "blob"
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    want = "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()
    assert digest.BackgroundDigest(path).result() == want           # taken over at once
    hasher = digest.BackgroundDigest(path)
    hasher._thread.join()                                           # hashed wholly on the thread
    assert hasher.result() == want
    assert digest.file_digest(path) == want


def test_background_digest_stops_and_hands_over(tmp_path, monkeypatch):
    """result() stops the thread at a block boundary and hashes the rest itself: a thread that
    never gets the CPU (here: one held at its first read) cannot hold the ingest up."""
    import builtins
    import threading

    from dpledger.ingest import digest

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 40_000)  # ~10 blocks of 1 MiB
    gate, thread_reads = threading.Event(), []

    class HeldFile:
        def __init__(self, f):
            self.f = f

        def read(self, n):
            if threading.current_thread().name == "dpledger-digest":
                thread_reads.append(n)
                gate.wait(10)
            return self.f.read(n)

        def close(self):
            self.f.close()

    monkeypatch.setattr(digest, "open", lambda p, mode: HeldFile(builtins.open(p, mode)), raising=False)
    hasher = digest.BackgroundDigest(path)
    threading.Timer(0.2, gate.set).start()
    assert hasher.result() == "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()
    assert len(thread_reads) == 1  # the thread read one block, then stopped: the caller hashed the rest


def test_background_digest_thread_priority(tmp_path, monkeypatch):
    """On Linux the hashing thread lowers its own priority, and only its own."""
    import os
    import sys
    import threading

    from dpledger.ingest import digest

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are Linux's")
    seen = {}
    real_run = digest.BackgroundDigest._run

    def spy(self):
        real_run(self)
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, 0)
    monkeypatch.setattr(digest.BackgroundDigest, "_run", spy)
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 1000)
    digest.BackgroundDigest(path).result()
    assert seen["thread"] == max(before, digest.HASH_THREAD_NICE)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the calling thread is untouched


def test_hash_read_error_falls_back_to_the_careful_path(tmp_path, db, cli, monkeypatch):
    """A read error of the hashing thread rolls the fast path back; the careful path hashes
    the file itself and ingests it once, completely."""
    from dpledger.ingest import digest, steps_file

    def broken(self):
        self._error = OSError(errno.EIO, "Input/output error")

    careful = []
    real_arrow = steps_file._ingest_arrow
    monkeypatch.setattr(digest.BackgroundDigest, "_run", broken)
    monkeypatch.setattr(steps_file, "_ingest_arrow", lambda *a, **k: careful.append(1) or real_arrow(*a, **k))
    path = _write(tmp_path / "f.parquet", _columns())
    res = cli("ingest", "steps", path, "--run", "r", *RUN, "--db", db)
    assert res.rc == 0, res.output
    assert careful == [1]
    assert _q(db, "SELECT count(*) FROM point_steps") == [(N_STEPS * N_POINTS,)]
    assert _q(db, "SELECT digest FROM ingests") == [("blake3:" + blake3.blake3(path.read_bytes()).hexdigest(),)]


def test_database_file_flushed_before_commit(tmp_path, db, cli, monkeypatch, fast_only):
    """The fast path flushes the database file itself (found by its inode) before the commit;
    a flush that fails changes nothing: every row is stored, once."""
    import os

    flushed = []

    def fsync(fd):
        flushed.append(os.fstat(fd).st_ino)
        raise OSError(errno.EIO, "flush failed")

    monkeypatch.setattr(os, "fsync", fsync)
    path = _write(tmp_path / "f.parquet", _columns())
    assert cli("ingest", "steps", path, "--run", "r", *RUN, "--db", db).rc == 0
    assert flushed == [os.stat(db).st_ino]
    assert _q(db, "SELECT count(*) FROM point_steps") == [(N_STEPS * N_POINTS,)]
    assert _q(db, "SELECT count(*) FROM ingests") == [(1,)]


def test_flush_database_file_is_best_effort(tmp_path):
    from dpledger.ingest import load

    load.flush_database_file(str(tmp_path / "missing.duckdb"))  # no such file: nothing happens
    f = tmp_path / "x.duckdb"
    f.write_bytes(b"abc")
    load.flush_database_file(str(f))
    assert f.read_bytes() == b"abc"
