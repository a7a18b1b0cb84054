"""No code from a run folder: a pickle planted as a resume state (or a checkpoint) is refused.

Resume states (``state/step-*.pt``) and checkpoints are loaded with
``torch.load(weights_only=True)``: tensors and plain types only. A planted file whose
unpickling would call ``os.system`` must not run, through ``dpledger train --resume``
(a DuckDB run) nor ``dpledger sweep`` (which resumes an incomplete run of its lake by
itself): the command fails with one line naming the file, and the marker the pickle
would create never appears. Tiny runs: digits, logreg, 60 points, 3 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from conftest import REPO

TRAIN = ["--dataset", "digits", "--model", "logreg", "--n-train", "60", "--n-test", "20", "--epochs", "1",
         "--batch-size", "20", "--noise-multiplier", "1.0", "--track", "6", "--commit-every", "1"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


class _Planted:
    """Unpickling this calls os.system: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _plant(path: Path, marker: Path) -> None:
    """A torch file at ``path`` shaped like a resume state, with the planted object inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    torch.save({"step": 1, "model": {}, "optimizer": {}, "sampler": _Planted(marker),
                "noise": torch.zeros(1), "torch": torch.zeros(1)}, path)


def _dpledger(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpledger", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def _error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if not line.endswith("...")]  # progress lines
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_the_planted_pickle_would_run_if_loaded_unsafely(tmp_path):
    """The test's own premise: the planted file does run code under weights_only=False."""
    marker = tmp_path / "marker"
    _plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def test_train_resume_refuses_a_planted_resume_state(tmp_path, cli):
    db, marker = tmp_path / "w.duckdb", tmp_path / "marker"
    r = cli("train", *TRAIN, "--run", "r", "--sink", "database", "--db", db)  # made here; attacked below
    assert r.rc == 0, r
    # make it an incomplete run, committed up to step 1, whose saved state is the planted file
    con = duckdb.connect(str(db))
    con.execute("DELETE FROM point_steps WHERE step > 1")
    con.execute("DELETE FROM steps WHERE step > 1")
    con.execute("UPDATE runs SET committed_step = 1, status = 'running'")
    run_dir = Path(con.execute("SELECT run_dir FROM runs").fetchall()[0][0])
    con.close()
    state = run_dir / "state" / "step-00000001.pt"
    _plant(state, marker)

    r = _dpledger("train", "--resume", "r", "--db", db, cwd=tmp_path)
    assert not marker.exists(), "the planted pickle ran"
    line = _error_line(r)
    assert str(state) in line and "refused" in line and "posix.system" in line, line
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT committed_step, max(step) FROM runs JOIN point_steps USING (run_id) "
                       "GROUP BY 1").fetchall() == [(1, 1)]  # nothing trained past the refusal
    con.close()


def test_a_sweep_refuses_a_planted_resume_state_of_an_incomplete_run(tmp_path, cli):
    lake, db, marker = tmp_path / "lake", tmp_path / "w.duckdb", tmp_path / "marker"
    config = tmp_path / "s.toml"
    config.write_text('[base]\ndataset = "digits"\nmodel = "logreg"\nepochs = 1\nn_train = 60\nn_test = 20\n'
                      'batch_size = 20\nnoise_multiplier = 1.0\ntrack = "6"\ncommit_every = 1\nrun = "p"\n'
                      '[grid]\nseed = [0]\n')
    r = cli("sweep", config, "--lake", lake, "--db", tmp_path / "first.duckdb")
    assert r.rc == 0, r
    # the run as a writer killed after its commit of step 1 leaves it: manifest at step 1, running
    run_dir = lake / "run_id=p-s0"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["committed_step"] <= 1]
    manifest.update(committed_step=1, status="running")
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    state = run_dir / "state" / "step-00000001.pt"
    _plant(state, marker)

    r = _dpledger("sweep", config, "--lake", lake, "--db", db, cwd=tmp_path)
    assert not marker.exists(), "the planted pickle ran"
    line = _error_line(r)
    assert "p-s0" in line and str(state) in line and "refused" in line, line
    assert json.loads((run_dir / "manifest.json").read_text())["committed_step"] == 1
    assert not (run_dir / "writer.lock").exists()  # the failed writer let go of the run


def test_checkpoint_loading_refuses_code(tmp_path):
    """The checkpoint scorers' loader, the same rule."""
    from dpledger.ingest.recorder import load_torch
    from dpledger.warehouse.errors import UserError

    marker = tmp_path / "marker"
    _plant(tmp_path / "step-00000002.pt", marker)
    with pytest.raises(UserError, match="refused") as info:
        load_torch(tmp_path / "step-00000002.pt", "cpu", "checkpoint")
    assert "\n" not in str(info.value) and not marker.exists()
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="garbage.pt"):
        load_torch(tmp_path / "garbage.pt", "cpu", "checkpoint")
