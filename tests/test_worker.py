"""Training workers: rows written, sampling flags, losses vs checkpoints, resume after
SIGKILL, shards and sweeps, bad options."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import query_rows as _q, table_snapshot

SMALL = ["--dataset", "digits", "--n-train", "200", "--n-test", "100", "--batch-size", "20"]




def test_short_run_writes_tracked_steps_times_tracked_points(db, cli):
    r = cli("train", *SMALL, "--model", "logreg", "--noise-multiplier", "1.0", "--epochs", "2", "--track", "30",
            "--track-every", "3", "--eval-every", "5", "--run", "r1", "--db", db, "--json")
    assert r.rc == 0, r
    summary = r.json()
    steps = summary["steps"]
    assert steps == 20  # floor(epochs / q) = floor(2 / (20 / 200))
    tracked_steps = len(range(0, steps, 3))
    assert _q(db, "SELECT count(*), count(DISTINCT point_id), count(DISTINCT step) FROM point_steps") == [
        (tracked_steps * 30, 30, tracked_steps)]
    assert _q(db, "SELECT min(point_id), max(point_id) FROM point_steps") == [(0, 29)]
    (run,) = _q(db, "SELECT sample_rate, noise_multiplier, max_grad_norm, steps, private, status, committed_step, "
                    "n_train, dataset FROM runs")
    assert run == (0.1, 1.0, 1.0, steps, True, "finished", steps - 1, 200, "digits")
    assert _q(db, "SELECT count(*) FROM steps") == [(steps,)]
    evals = _q(db, "SELECT DISTINCT step FROM evaluations ORDER BY 1")
    assert [e[0] for e in evals] == [4, 9, 14, 19]
    assert _q(db, "SELECT count(*) FROM checkpoints") == [(4,)]
    # points: every training point with its label, thumbnails for the tracked ones
    (pts,) = _q(db, "SELECT count(*), count(thumbnail), min(label), max(label) FROM points")
    assert pts == (200, 30, 0, 9)
    png = _q(db, "SELECT thumbnail FROM points WHERE point_id = 3")[0][0]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model_name", ["mlp", "lenet"])
@pytest.mark.parametrize("batch_size", [0, 1, 13])
def test_clipping_with_tracked_norms_equals_opacus_per_sample_step(model_name, batch_size):
    """One update from tracked norms (ghost-clipping optimizer) == Opacus's GradSampleModule + DPOptimizer."""
    import copy

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    from dpledger.models.dp_step import clipped_step
    from dpledger.models.grad_norms import per_example_grad_norms
    from dpledger.models.nets import build_model

    torch.manual_seed(0)
    base = build_model(model_name, (1, 8, 8), 10)
    x = torch.randn(batch_size, 1, 8, 8) * torch.linspace(0.1, 3, batch_size).view(-1, 1, 1, 1)
    y = torch.randint(0, 10, (batch_size,))
    norms = per_example_grad_norms(base, x, y).norms
    clip = float(norms.median()) if batch_size else 1.0  # about half the points clipped
    args = dict(noise_multiplier=0.7, max_grad_norm=clip, expected_batch_size=8, loss_reduction="mean")

    ref = copy.deepcopy(base)
    gsm = GradSampleModule(ref, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(ref.parameters(), lr=0.3), generator=torch.Generator().manual_seed(5), **args)
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    opt.step()

    ours = copy.deepcopy(base)
    gsm2 = GradSampleModule(ours, loss_reduction="sum")  # hooks installed, as in the worker
    opt2 = DPOptimizerFastGradientClipping(torch.optim.SGD(ours.parameters(), lr=0.3),
                                           generator=torch.Generator().manual_seed(5), **args)
    norms = per_example_grad_norms(gsm2, x, y).norms  # through the wrapper, as the worker's tracker
    if batch_size > 2:
        assert (norms > clip).any() and (norms < clip).any()
    clipped_step(ours, opt2, x, y, norms, clip)
    moved = 0.0
    for (name, p), q, b in zip(ref.named_parameters(), ours.parameters(), base.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
        moved += float((p - b).detach().abs().sum())
        assert getattr(q, "grad_sample", None) is None  # Opacus's per-sample pass never ran
    assert moved > 0  # the noise alone moves every parameter


def test_reusing_tracked_norms_trains_the_same_run(tmp_path):
    from dpledger.ingest.sinks import DuckDBSink
    from dpledger.ingest.worker import TrainConfig, train

    out = {}
    for reuse in (True, False):
        cfg = TrainConfig(run=f"r{int(reuse)}", dataset="digits", model="mlp", epochs=1, n_train=200, n_test=50,
                          batch_size=20, noise_multiplier=1.0, track="50", seed=3, reuse_norms=reuse)
        sink = DuckDBSink(tmp_path / "w.duckdb")
        try:
            train(cfg, sink, db_dir=tmp_path)
        finally:
            sink.close()
    for run in ("r0", "r1"):
        out[run] = np.array(_q(tmp_path / "w.duckdb", "SELECT step, point_id, grad_norm, loss, sampled::INT "
                                                      f"FROM point_steps WHERE run_id = '{run}' ORDER BY step, point_id"))
    assert out["r0"].shape == out["r1"].shape == (10 * 50, 5)
    np.testing.assert_array_equal(out["r0"][:, [0, 1, 4]], out["r1"][:, [0, 1, 4]])
    # the same updates up to float rounding: norms and losses agree along the whole run
    np.testing.assert_allclose(out["r1"][:, 2:4], out["r0"][:, 2:4], rtol=1e-4)
    assert not np.allclose(out["r1"][:50, 2], out["r1"][-50:, 2])  # and the model did train


def test_sampled_flags_are_the_batches_used(db, cli):
    r = cli("train", *SMALL, "--model", "logreg", "--noise-multiplier", "1.0", "--epochs", "1", "--track", "all",
            "--run", "r", "--db", db)
    assert r.rc == 0, r
    per_step = _q(db, "SELECT s.step, s.batch_size, sum(ps.sampled::INT) FROM steps s JOIN point_steps ps "
                      "USING (run_id, step) GROUP BY 1, 2 ORDER BY 1")
    assert len(per_step) == 10
    assert all(b == s for _, b, s in per_step)  # all points tracked: the sampled flags are the batch
    assert sum(b for _, b, _ in per_step) > 0
    # and they are the seeded Poisson draws: each point in with probability q = 0.1
    gen = torch.Generator().manual_seed(0)
    for step in range(10):
        mask = (torch.rand(200, generator=gen) < 0.1).numpy()
        got = np.array([x[0] for x in _q(db, "SELECT sampled FROM point_steps WHERE step = ? ORDER BY point_id", [step])])
        np.testing.assert_array_equal(got, mask)


def test_losses_and_norms_match_the_saved_checkpoint(db, cli):
    r = cli("train", *SMALL, "--model", "mlp", "--noise-multiplier", "1.0", "--epochs", "1", "--track", "8",
            "--eval-every", "4", "--run", "c", "--db", db)
    assert r.rc == 0, r
    from dpledger.models.datasets import load_dataset
    from dpledger.models.nets import build_model

    ds = load_dataset("digits", seed=0, n_train=200, n_test=100)
    step, path = _q(db, "SELECT step, path FROM checkpoints ORDER BY step LIMIT 1")[0]
    model = build_model("mlp", ds.input_shape, ds.num_classes)
    model.load_state_dict(torch.load(path))
    # the norms recorded at step + 1 are at the parameters after step's update: the checkpoint
    rows = _q(db, "SELECT point_id, loss, grad_norm FROM point_steps WHERE step = ? ORDER BY point_id", [step + 1])
    assert len(rows) == 8
    for pid, loss, norm in rows:
        model.zero_grad()
        out = F.cross_entropy(model(ds.x_train[pid:pid + 1]), ds.y_train[pid:pid + 1])
        out.backward()
        naive = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
        assert loss == pytest.approx(out.item(), rel=1e-5)
        assert norm == pytest.approx(naive, rel=1e-5)
    # evaluations at that step: loss and correctness of the checkpoint
    ev = _q(db, "SELECT point_id, loss, correct FROM evaluations WHERE step = ? ORDER BY point_id", [step])
    with torch.no_grad():
        logits = model(ds.x_train[:8])
    want = F.cross_entropy(logits, ds.y_train[:8], reduction="none")
    np.testing.assert_allclose([e[1] for e in ev], want.numpy(), rtol=1e-5)
    assert [e[2] for e in ev] == (logits.argmax(1) == ds.y_train[:8]).tolist()


def test_disable_dp_runs(db, cli):
    r = cli("train", *SMALL, "--model", "logreg", "--disable-dp", "--epochs", "1", "--track", "5", "--db", db, "--json")
    assert r.rc == 0, r
    assert r.json()["run_id"] == "digits-logreg-s0-nodp"
    assert _q(db, "SELECT private, noise_multiplier FROM runs") == [(False, None)]
    assert _q(db, "SELECT count(*) FROM point_steps") == [(5 * 10,)]
    r = cli("account", "--db", db, "--json")
    assert r.json()[0]["skipped"].startswith("not private")


def test_target_epsilon_calibrates_sigma(db, cli):
    r = cli("train", *SMALL, "--model", "logreg", "--target-epsilon", "4", "--epochs", "1", "--track", "2",
            "--db", db, "--json")
    assert r.rc == 0, r
    from dpledger.analysis.rdp import dp_epsilon

    sigma = r.json()["noise_multiplier"]
    eps = dp_epsilon(0.1, sigma, 10, 1e-5)[0]
    assert eps <= 4 and eps == pytest.approx(4, abs=0.02)


# 20 epochs of 10 steps: long enough (about a second past the kill point, a commit every
# few milliseconds) that the kill always lands mid-run, however the test is scheduled.
RESUME_STEPS = 200


def _train_cmd(db, run, extra=()):
    return [sys.executable, "-m", "dpledger", "train", *SMALL, "--model", "mlp", "--noise-multiplier", "1.0",
            "--epochs", str(RESUME_STEPS // 10), "--track", "12", "--commit-every", "3", "--eval-every", "7",
            "--run", run, "--db", str(db), *extra]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    db = tmp_path / "w.duckdb"
    proc = subprocess.Popen(_train_cmd(db, "killed"), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "runs" / "killed" / "state"
    deadline = time.time() + 120
    # Kill once a few commits are in, mid-run. The resume state of step t is written just
    # before step t's commit, so a state at step >= 23 means the commit at step 20 is done.
    while time.time() < deadline:
        states = sorted(state.glob("step-*.pt")) if state.exists() else []
        if states and int(states[-1].stem.split("-")[1]) >= 23:
            break
        assert proc.poll() is None, "the worker exited before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = _q(db, "SELECT committed_step, status FROM runs WHERE run_id = 'killed'")[0]
    assert committed[1] == "running" and 20 <= committed[0] < RESUME_STEPS - 1
    assert _q(db, "SELECT max(step) FROM point_steps") == [(committed[0],)]  # nothing past the marker
    r = subprocess.run([sys.executable, "-m", "dpledger", "train", "--resume", "killed", "--db", str(db)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {committed[0] + 1}" in r.stdout
    r = subprocess.run(_train_cmd(db, "whole"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for table, cols in (("point_steps", "step, point_id, grad_norm, loss, sampled"),
                        ("steps", "step, batch_size, loss"), ("evaluations", "step, point_id, loss, correct")):
        a = _q(db, f"SELECT {cols} FROM {table} WHERE run_id = 'killed' ORDER BY ALL")
        b = _q(db, f"SELECT {cols} FROM {table} WHERE run_id = 'whole' ORDER BY ALL")
        assert len(a) == len(b) > 0
        assert a == b, table  # bit-identical: same draws, same updates, no duplicates, no gaps
    assert _q(db, "SELECT count(*), count(DISTINCT (step, point_id)) FROM point_steps WHERE run_id = 'killed'") == [
        (RESUME_STEPS * 12, RESUME_STEPS * 12)]
    assert _q(db, "SELECT status FROM runs WHERE run_id = 'killed'") == [("finished",)]


def test_two_worker_sweep_and_idempotent_merge(tmp_path, cli):
    config = tmp_path / "sweep.toml"
    config.write_text(
        '[base]\ndataset = "digits"\nmodel = "logreg"\nepochs = 1\nn_train = 120\nbatch_size = 20\ntrack = "6"\n'
        '[grid]\nseed = [0, 1]\nnoise_multiplier = [1.0]\n')
    db = tmp_path / "s.duckdb"
    r = cli("sweep", config, "--workers", "2", "--db", db, "--json")
    assert r.rc == 0, r
    runs = _q(db, "SELECT run_id, status, committed_step FROM runs ORDER BY 1")
    assert runs == [("s0-n1", "finished", 5), ("s1-n1", "finished", 5)]
    assert _q(db, "SELECT run_id, count(*) FROM point_steps GROUP BY 1 ORDER BY 1") == [("s0-n1", 36), ("s1-n1", 36)]
    a = _q(db, "SELECT step, point_id, grad_norm FROM point_steps WHERE run_id = 's0-n1' ORDER BY ALL")
    b = _q(db, "SELECT step, point_id, grad_norm FROM point_steps WHERE run_id = 's1-n1' ORDER BY ALL")
    assert a != b  # different seeds, different runs
    before = table_snapshot(db)
    assert cli("ingest", "shards", tmp_path / "lake", "--db", db).rc == 0
    assert table_snapshot(db) == before
    # running the sweep again skips finished runs and changes nothing
    r = cli("sweep", config, "--workers", "2", "--db", db, "--json")
    assert all(x.get("skipped") for x in r.json()["runs"])
    assert table_snapshot(db) == before


@pytest.mark.parametrize("args,fragment", [
    (["--dataset", "nope", "--noise-multiplier", "1"], "--dataset nope"),
    (["--model", "vgg", "--noise-multiplier", "1"], "--model vgg"),
    (["--lr", "-0.1", "--noise-multiplier", "1"], "--lr -0.1 must be positive"),
    (["--batch-size", "5000", "--noise-multiplier", "1"], "larger than the training set"),
    (["--dataset", "mnist", "--data-path", "/nonexistent", "--noise-multiplier", "1"], "/nonexistent"),
    (["--epochs", "0", "--noise-multiplier", "1"], "--epochs 0.0 must be positive"),
    ([], "give --noise-multiplier or --target-epsilon"),
    (["--noise-multiplier", "1", "--target-epsilon", "3"], "give --noise-multiplier or --target-epsilon"),
    (["--noise-multiplier", "1", "--track", "nofile.txt"], "--track nofile.txt"),
    (["--noise-multiplier", "1", "--run", "../evil"], "run name '../evil'"),
    (["--resume", "ghost"], "--resume ghost: no such run"),
])
def test_bad_train_options(db, cli, args, fragment):
    r = cli("train", *args, "--db", db)
    assert r.rc == 2, r
    line = r.err.strip()
    assert "\n" not in line and fragment in line, line


def test_track_file(db, cli, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("point_id\n5\n17\n# a comment\n3\n")
    r = cli("train", *SMALL, "--model", "logreg", "--noise-multiplier", "1", "--epochs", "1", "--track", ids,
            "--db", db)
    assert r.rc == 0, r
    assert [x[0] for x in _q(db, "SELECT DISTINCT point_id FROM point_steps ORDER BY 1")] == [3, 5, 17]
    ids.write_text("5\n900\n")
    r = cli("train", *SMALL, "--model", "logreg", "--noise-multiplier", "1", "--epochs", "1", "--track", ids,
            "--run", "other", "--db", db)
    assert r.rc == 2 and "line 2: point id 900" in r.err


def test_subset_runs_record_membership(db, cli):
    r = cli("train", *SMALL, "--model", "logreg", "--noise-multiplier", "1", "--epochs", "1", "--subset-ratio", "0.5",
            "--track", "all", "--db", db, "--json")
    assert r.rc == 0, r
    (members, total) = _q(db, "SELECT sum(in_train::INT), count(*) FROM membership")[0]
    assert total == 200 and 70 < members < 130
    (n_train,) = _q(db, "SELECT n_train FROM runs")[0]
    assert n_train == members
    # norms only for members; evaluations for members and non-members alike
    assert _q(db, "SELECT count(DISTINCT point_id) FROM point_steps") == [(members,)]
    assert _q(db, "SELECT bool_and(m.in_train) FROM point_steps ps JOIN membership m USING (run_id, point_id)") == [(True,)]
    assert _q(db, "SELECT count(DISTINCT point_id) FROM evaluations") == [(200,)]


def test_a_killed_run_is_listed_as_incomplete(db, cli):
    """A run whose manifest still says running but whose worker process is gone (killed, out
    of memory) is listed as incomplete: train writes through the lake beside the database."""
    import json

    r = cli("train", *SMALL, "--model", "logreg", "--noise-multiplier", "1.0", "--epochs", "1", "--track", "3",
            "--run", "r", "--db", db)
    assert r.rc == 0
    run_dir = db.parent / "lake" / "run_id=r"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"]["worker"]["pid"] == os.getpid()
    run["config"]["worker"]["pid"] = 2**22 + 12345  # no such process
    (run_dir / "run.json").write_text(json.dumps(run))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert cli("runs", "--db", db, "--json").json()[0]["status"] == "incomplete"


def test_sweep_run_names_are_safe_folder_names():
    """A grid over an option without an abbreviation names runs key_value ('=' would break the
    lake's run_id=... hive folders, and the run-name rule refuses it)."""
    from dpledger.ingest.sinks import safe_run_id
    from dpledger.ingest.sweep import expand

    runs = [c.run for c in expand({"base": {"dataset": "digits", "noise_multiplier": 1.0},
                                   "grid": {"momentum": [0, 0.9], "seed": [0]}})]
    assert runs == ["momentum_0-s0", "momentum_0.9-s0"]
    assert [safe_run_id(r) for r in runs] == runs


def test_a_sweep_refuses_a_stale_run_of_the_same_name(tmp_path, cli):
    """A run's identity is its whole configuration: changing [base] and sweeping again does not
    report the old run as 'finished already' and keep it; it fails, naming what differs."""
    config = tmp_path / "s.toml"
    base = '[base]\ndataset = "digits"\nmodel = "{model}"\nepochs = 1\nn_train = 60\nbatch_size = 20\ntrack = "3"\n' \
           '[grid]\nseed = [0]\nnoise_multiplier = [0.8]\n'
    config.write_text(base.format(model="logreg"))
    db = tmp_path / "w.duckdb"
    assert cli("sweep", config, "--db", db).rc == 0
    config.write_text(base.format(model="mlp"))
    r = cli("sweep", config, "--db", db, "--json")
    assert r.rc == 2
    (run,) = r.json()["runs"]
    assert run["status"] == "failed" and "model 'logreg' -> 'mlp'" in run["error"], run
    assert _q(db, "SELECT model FROM runs") == [("logreg",)]  # the old run untouched, nothing merged into it
    config.write_text(base.format(model="logreg"))  # the same configuration again: finished already
    r = cli("sweep", config, "--db", db, "--json")
    assert r.rc == 0 and r.json()["runs"][0]["skipped"] == "finished already"
