"""The ingest ledger's file identity: a tagged BLAKE3 digest, and SHA-256 rows of older ledgers.

* :func:`file_digest` is BLAKE3-256 of the bytes (published test vectors), tagged
  ``blake3:``; :func:`legacy_digest` is SHA-256 (FIPS 180-2 vector), tagged ``sha256:``.
* Migration 007 rebuilds ``ingests`` keyed by ``digest``: every row an older dpledger
  recorded is kept, its SHA-256 tagged ``sha256:``, and the key still refuses a repeat.
* A file an older dpledger ingested (its ledger row a SHA-256) is still a no-op for every
  importer, with nothing written; a different file of as many rows is not mistaken for it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from conftest import query_rows as _q, table_snapshot
from dpledger import warehouse
from dpledger.ingest.digest import file_digest, legacy_digest

RUN = ["--sample-rate", "0.01", "--noise-multiplier", "1.1", "--max-grad-norm", "1.0"]


def test_digests_are_blake3_and_sha256_of_the_bytes(tmp_path):
    """Against published vectors, not the library that computes them."""
    empty, abc = tmp_path / "empty", tmp_path / "abc"
    empty.write_bytes(b"")
    abc.write_bytes(b"abc")
    # the BLAKE3 specification's test vector for the empty input; "abc" as b3sum prints it
    assert file_digest(empty) == "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert file_digest(abc) == "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    # FIPS 180-2, appendix B.1
    assert legacy_digest(abc) == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _version_6_database(path: Path) -> None:
    """A database as dpledger wrote it before migration 007 (its migrations 1-6 applied)."""
    from dpledger.warehouse import schema

    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name VARCHAR, "
                "applied_at TIMESTAMP DEFAULT current_timestamp)")
    for m in schema.migrations():
        if m.version <= 6:
            con.execute(m.sql)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [m.version, m.name])
    con.close()


def test_migration_007_keeps_every_ledger_row(db):
    _version_6_database(db)
    rows = [("a" * 64, "steps", "r", "/data/a.parquet", 12, ["r"], "2026-01-02 03:04:05"),
            ("b" * 64, "gla-csv", "", "/data/res1.csv", 700, ["res1", "res2"], "2026-02-03 04:05:06")]
    con = duckdb.connect(str(db))
    con.executemany("INSERT INTO ingests VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    con.close()
    summary = warehouse.init(db)
    assert summary["schema_version_before"] == 6 and "applied 007_ingest_digest.sql" in summary["actions"]
    got = _q(db, "SELECT digest, kind, target, path, rows, run_ids, strftime(ingested_at, '%Y-%m-%d %H:%M:%S') "
                 "FROM ingests ORDER BY kind DESC")
    assert got == [("sha256:" + r[0], *r[1:]) for r in rows]
    con = warehouse.connect(db)
    try:
        with pytest.raises(duckdb.ConstraintException):  # the key is (digest, kind, target)
            con.execute("INSERT INTO ingests (digest, kind, target, path, rows) VALUES (?, 'steps', 'r', '/x', 1)",
                        ["sha256:" + "a" * 64])
    finally:
        con.close()


def _as_an_older_ledger(db: Path) -> list[str]:
    """Rewrite the ledger as migration 007 leaves an older dpledger's: each row's digest the
    SHA-256 of its file (hashlib's, not dpledger's), tagged. Returns those digests."""
    con = warehouse.connect(db)
    try:
        rows = con.execute("SELECT digest, kind, target, path FROM ingests").fetchall()
        assert rows and all(d.startswith("blake3:") for d, *_ in rows)
        con.execute("BEGIN")
        for digest, kind, target, path in rows:
            legacy = "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
            con.execute("UPDATE ingests SET digest = ? WHERE digest = ? AND kind = ? AND target = ?",
                        [legacy, digest, kind, target])
        con.execute("COMMIT")
        return sorted(d for (d,) in con.execute("SELECT digest FROM ingests").fetchall())
    finally:
        con.close()


def _steps_frame(seed: int, first_step: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    steps, points = np.meshgrid(np.arange(first_step, first_step + 4), np.arange(5), indexing="ij")
    return pd.DataFrame({"step": steps.ravel(), "point_id": points.ravel(),
                         "grad_norm": rng.gamma(2.0, 0.5, steps.size), "loss": rng.random(steps.size)})


def _reingest(cli, args: list) -> str:
    """The status of ``dpledger ARGS --json`` for its one file."""
    r = cli(*args, "--json")
    assert r.rc == 0, r
    (result,) = r.json()
    return result["status"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_steps_file_an_older_ledger_holds_is_still_a_noop(db, tmp_path, cli, fmt):
    path = tmp_path / f"a.{fmt}"
    frame = _steps_frame(0)
    frame.to_parquet(path, index=False) if fmt == "parquet" else frame.to_csv(path, index=False)
    args = ["ingest", "steps", path, "--run", "r", *RUN, "--db", db]
    assert cli(*args).rc == 0
    legacy = _as_an_older_ledger(db)
    before = table_snapshot(db)
    assert _reingest(cli, args) == "skipped"
    assert table_snapshot(db) == before
    # a different file of as many rows, for the same run, is ingested (found by neither digest)
    other = tmp_path / f"b.{fmt}"
    later = _steps_frame(1, first_step=4)
    later.to_parquet(other, index=False) if fmt == "parquet" else later.to_csv(other, index=False)
    assert _reingest(cli, ["ingest", "steps", other, "--run", "r", *RUN, "--db", db]) == "ingested"
    assert _q(db, "SELECT count(*) FROM point_steps WHERE run_id = 'r'") == [(40,)]
    assert sorted(d for (d,) in _q(db, "SELECT digest FROM ingests")) == sorted(legacy + [file_digest(other)])


def test_a_gla_csv_an_older_ledger_holds_is_still_a_noop(gla_db, gla_dir, cli):
    _as_an_older_ledger(gla_db)
    before = table_snapshot(gla_db)
    assert _reingest(cli, ["ingest", "gla-csv", gla_dir / "res1.csv", "--db", gla_db]) == "skipped"
    assert table_snapshot(gla_db) == before


def test_a_memorization_file_an_older_ledger_holds_is_still_a_noop(db, tmp_path, cli):
    f = tmp_path / "scores.npz"
    np.savez(f, tr_mem=np.random.default_rng(3).random(20))
    assert cli("ingest", "memorization", f, "--dataset", "toy", "--db", db).rc == 0
    _as_an_older_ledger(db)
    before = table_snapshot(db)
    r = cli("ingest", "memorization", f, "--dataset", "toy", "--db", db, "--json")
    assert r.rc == 0 and r.json()["status"] == "skipped", r
    assert table_snapshot(db) == before


def test_shards_an_older_ledger_holds_are_not_merged_again(tmp_path, cli):
    from dpledger.ingest.sinks import ShardSink
    from dpledger.ingest.worker import TrainConfig, train

    lake, db = tmp_path / "L", tmp_path / "w.duckdb"
    sink = ShardSink(lake)
    try:
        train(TrainConfig(run="r", run_dir=str(lake / "run_id=r"), dataset="digits", model="logreg", epochs=1,
                          n_train=60, n_test=20, batch_size=20, noise_multiplier=1.0, track="6",
                          commit_every=1), sink)
    finally:
        sink.close()
    assert cli("ingest", "shards", lake, "--db", db).rc == 0
    merged = _q(db, "SELECT count(*) FROM point_steps")
    assert merged[0][0] > 0
    legacy = _as_an_older_ledger(db)
    assert len(legacy) >= 3  # a shard a committed step, each its own ledger row
    before = table_snapshot(db)
    assert cli("ingest", "shards", lake, "--db", db).rc == 0
    assert table_snapshot(db) == before
    assert _q(db, "SELECT count(*) FROM point_steps") == merged
