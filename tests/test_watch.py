"""``dpledger watch`` and the live frames (dpledger.warehouse.live): the fields and their values on a
finished run, a run another process is writing, the incremental hold-last composition against a
direct sum, and that watching writes nothing."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dpledger.cli.watch  # noqa: F401 - registers `watch` (until dpledger.cli imports it)
from dpledger.analysis import composition, grid as gridmod
from dpledger.analysis.rdp import dp_epsilon

from conftest import query_rows

RUN = "digits-logreg-s0-n1"
TRAIN = ["train", "--dataset", "digits", "--model", "logreg", "--n-train", "100", "--batch-size", "10",
         "--epochs", "1", "--track", "all", "--noise-multiplier", "1.0", "--max-grad-norm", "7.5"]  # C inside the norms: ε spread
QUANTILE_KEYS = ["epsilon_min", "epsilon_p05", "epsilon_median", "epsilon_p95", "epsilon_max"]
FIELDS = {"run_id", "status", "step", "steps", "steps_per_s", "loss", "loss_step", "test_accuracy",
          "test_accuracy_step", "delta", "epsilon", "epsilon_planned", "points", *QUANTILE_KEYS, "points_at_cap", "grid"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    from dpledger.cli import main

    db = tmp_path_factory.mktemp("watch") / "w.duckdb"
    assert main([*TRAIN, "--db", str(db), "--json"]) == 0
    return db


def _lines(out: str) -> list:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_watch_json_on_a_finished_run(finished, cli):
    r = cli("watch", RUN, "--json", "--count", "1", "--db", finished)
    assert r.rc == 0, r
    (frame,) = _lines(r.out)  # one line: one refresh, then it stops (nothing is running)
    (row,) = frame
    assert set(row) == FIELDS
    q, sigma, delta, steps = query_rows(finished, "SELECT sample_rate, noise_multiplier, delta, steps FROM runs")[0]
    assert row["status"] == "finished" and row["step"] == steps == 10 and row["steps"] == 10
    assert row["epsilon"] == pytest.approx(dp_epsilon(q, sigma, 10, delta)[0], rel=1e-12)
    assert row["epsilon_planned"] == pytest.approx(row["epsilon"], rel=1e-12)
    loss, = query_rows(finished, "SELECT loss FROM steps WHERE step = 9")[0]
    acc, = query_rows(finished, "SELECT test_accuracy FROM steps WHERE NOT isnan(test_accuracy) ORDER BY step DESC")[0]
    assert row["loss"] == loss and row["loss_step"] == 9 and row["test_accuracy"] == acc
    assert row["points"] == 100 and row["grid"] == 256 and row["steps_per_s"] > 0
    eps = [row[k] for k in QUANTILE_KEYS]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] <= row["epsilon"] * (1 + 1e-9)  # no example pays more than the run
    # points at the cap: recorded at the clip at every step, so their ε is the run's
    capped = query_rows(finished, "SELECT count(*) FROM (SELECT point_id FROM point_steps GROUP BY 1 "
                                  "HAVING min(grad_norm) >= 7.5 AND count(*) = 10)")[0][0]
    assert row["points_at_cap"] == capped
    assert 0 < capped < 100 and row["epsilon_max"] == pytest.approx(row["epsilon"], rel=1e-9)

    # what `dpledger account` then stores, exact: watch's coarse grid is an upper bound of it, and close
    assert cli("account", "--exact", "--db", finished).rc == 0
    stored = np.array([e for (e,) in query_rows(finished, "SELECT epsilon FROM point_epsilon WHERE run_id = ?", [RUN])])
    exact = np.quantile(stored, [0, 0.05, 0.5, 0.95, 1])
    assert np.all(np.array(eps) >= exact * (1 - 1e-12))
    np.testing.assert_allclose(eps, exact, rtol=1e-3)
    # the accounting's tabulated composition on the watch's grid gives the incremental sum's numbers
    from dpledger import warehouse
    from dpledger.warehouse.account_rdp import compose_recorded
    from dpledger.warehouse.runs import load_run

    con = warehouse.connect(finished, read_only=True)
    try:
        run = load_run(con, RUN)
        _, composed, covered = compose_recorded(con, run, gridmod.tabulate(q, sigma, 256))[:3]  # no delta: no refining
    finally:
        con.close()
    assert np.all(covered == 10)
    tabulated, _ = composition.epsilon(composed, delta)
    np.testing.assert_allclose(eps, np.quantile(tabulated, [0, 0.05, 0.5, 0.95, 1]), rtol=1e-9)


def test_watch_plain_table_and_bad_options(finished, cli):
    r = cli("watch", RUN, "--db", finished)
    assert r.rc == 0, r
    header, row = [line for line in r.out.splitlines() if line.strip()][1:3]
    assert header.split()[:3] == ["run", "status", "step"] and row.split()[:3] == [RUN, "finished", "10/10"]
    # nothing running and no names: says so, exits 0 (JSON: an empty frame)
    r = cli("watch", "--db", finished, "--json")
    assert r.rc == 0 and _lines(r.out) == [[]] and "no running runs" in r.err
    for args, fragment in ((["--interval", "0"], "--interval 0"), (["--interval", "nan"], "--interval nan"),
                           (["--interval", "4000"], "0.1 to 3600"), (["--count", "0"], "--count 0")):
        r = cli("watch", RUN, *args, "--db", finished)
        assert r.rc == 2 and fragment in r.err and len(r.err.strip().splitlines()) == 1, r
    r = cli("watch", "nope", "--db", finished)
    assert r.rc == 2 and "unknown run 'nope'" in r.err


def test_running_rdp_matches_a_direct_hold_last_sum():
    """Records fed in chunks of steps (ragged: each point at random steps) give the sum over each
    record of (steps it stands for) × the grid's chord, read as of any later step."""
    from dpledger.warehouse.live import RunningRdp

    rng = np.random.default_rng(0)
    table = gridmod.tabulate(0.05, 1.0, 64)
    n, steps = 25, 40
    rows = [(p, s, rng.uniform(0, 2.0)) for p in range(100, 100 + n) for s in range(steps) if rng.random() < 0.3]
    pid, step, norm = (np.array(c) for c in zip(*rows))
    acc = RunningRdp(table, 1.0)
    cuts = [0, 1, 7, 8, 20, 33, 35]
    for a, b in zip(cuts[:-1], cuts[1:]):
        m = (step >= a) & (step < b)
        acc.add(pid[m], step[m], norm[m])
    for as_of in (35, 50):
        ids, composed, covered = acc.composed(as_of)
        for k, p in enumerate(ids):
            m = (pid == p) & (step < 35)
            s, x = step[m], norm[m]
            ends = np.append(s[1:], as_of)
            ref = sum(gridmod.interpolate(table, composition.clipped_ratio([xi], 1.0))[0] * (e - si)
                      for si, xi, e in zip(s, x, ends))
            np.testing.assert_allclose(composed[k], ref, rtol=1e-10)
            assert covered[k] == as_of - s[0]
    with pytest.raises(ValueError):
        acc.add([100], [3], [1.0])  # a step already composed


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_watch_a_run_another_process_writes(tmp_path, cli):
    config = tmp_path / "sweep.toml"
    config.write_text('[base]\ndataset = "digits"\nmodel = "logreg"\nepochs = 60\nn_train = 300\nbatch_size = 10\n'
                      'track = "all"\nnoise_multiplier = 1.0\nmax_grad_norm = 7.5\ncommit_every = 10\n'
                      '[grid]\nseed = [0]\n')
    db = tmp_path / "s.duckdb"
    proc = subprocess.Popen([sys.executable, "-m", "dpledger", "sweep", str(config), "--db", str(db), "--json"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "lake").glob("run_id=*/manifest.json")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the sweep never committed"
            time.sleep(0.2)
        r = cli("watch", "--json", "--interval", "0.3", "--db", db)  # every running run, until none runs
        assert r.rc == 0, r
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    frames = _lines(r.out)
    rows = [f[0] for f in frames]
    assert all(len(f) == 1 and f[0]["run_id"] == "s0" for f in frames)
    running = [x for x in rows if x["status"] == "running"]
    # seen running, then moving on from refresh to refresh (on a quiet machine the run may
    # finish one refresh after the first): the running frames' steps strictly increase. The last
    # commit can hold step 1800 a refresh before the run is marked finished: then the finished
    # frame repeats that step, and only its status moves on.
    assert len(running) >= 1, [(x["status"], x["step"]) for x in rows]
    steps = [x["step"] for x in running]
    assert all(a < b for a, b in zip(steps, steps[1:])), [(x["status"], x["step"]) for x in rows]
    assert rows[-1]["status"] == "finished" and rows[-1]["step"] == rows[-1]["steps"] == 1800
    assert rows[-1]["step"] > steps[-1] or steps[-1] == 1800, [(x["status"], x["step"]) for x in rows]
    assert all(x["status"] == "running" for x in rows[:-1])  # stopped right after the run finished
    for x in running:
        assert 0 < x["step"] <= 1800 and x["steps"] == 1800
        assert x["epsilon"] == pytest.approx(dp_epsilon(1 / 30, 1.0, x["step"], 1e-5)[0], rel=1e-12)
        assert x["epsilon_max"] <= x["epsilon"] * (1 + 1e-9) and x["points"] == 300
    for a, b in zip(rows, rows[1:]):  # ε so far never decreases
        assert b["epsilon"] >= a["epsilon"] and b["epsilon_median"] >= a["epsilon_median"] - 1e-12

    # watching writes nothing: every file of the database, the lake and the runs' folders unchanged
    before = _hashes(tmp_path)
    r = cli("watch", "s0", "--json", "--count", "3", "--interval", "0.1", "--db", db)
    assert r.rc == 0 and len(_lines(r.out)) == 1  # finished: one refresh
    r = cli("watch", "s0", "--db", db)
    assert r.rc == 0 and "s0" in r.out
    assert _hashes(tmp_path) == before
    assert math.isfinite(rows[-1]["epsilon_median"])
