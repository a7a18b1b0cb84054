"""`dpledger norms`: checkpoint norm scoring split by point ranges, locally and on Ray."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import query_rows as _q

SMALL = ["--dataset", "digits", "--n-train", "120", "--n-test", "60", "--batch-size", "20", "--model", "mlp",
         "--epochs", "2", "--noise-multiplier", "1.0", "--eval-every", "4", "--track", "none"]


@pytest.fixture
def untracked(db, cli):
    assert cli("train", *SMALL, "--run", "u", "--db", db).rc == 0
    return db


def test_norms_at_checkpoints_equal_a_naive_backward(untracked, cli):
    db = untracked
    r = cli("norms", "--run", "u", "--chunk", "50", "--db", db, "--json")
    assert r.rc == 0, r
    out = r.json()
    assert out["ranges"] == 3 and out["points"] == 120
    ckpts = [c[0] for c in _q(db, "SELECT step FROM checkpoints ORDER BY step")]
    assert out["checkpoints"] == [s for s in ckpts if s + 1 < 12] and out["steps"] == [s + 1 for s in out["checkpoints"]]
    assert _q(db, "SELECT count(*), count(DISTINCT point_id) FROM point_steps") == [(120 * len(out["steps"]), 120)]
    from dpledger.models.datasets import load_dataset
    from dpledger.models.nets import build_model

    ds = load_dataset("digits", n_train=120, n_test=60)
    step, path = _q(db, "SELECT step, path FROM checkpoints ORDER BY step LIMIT 1")[0]
    model = build_model("mlp", ds.input_shape, ds.num_classes)
    model.load_state_dict(torch.load(path))
    for pid in (0, 57, 119):
        model.zero_grad()
        loss = F.cross_entropy(model(ds.x_train[pid:pid + 1]), ds.y_train[pid:pid + 1])
        loss.backward()
        naive = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
        (norm, got_loss), = _q(db, "SELECT grad_norm, loss FROM point_steps WHERE step = ? AND point_id = ?",
                               [step + 1, pid])
        assert norm == pytest.approx(naive, rel=1e-5) and got_loss == pytest.approx(loss.item(), rel=1e-5)
    assert cli("account", "--db", db).rc == 0  # checkpoint norms compose, each held to the next checkpoint
    assert _q(db, "SELECT count(*), min(steps_covered) FROM point_epsilon") == [(120, 12 - out["steps"][0])]
    r = cli("norms", "--run", "u", "--db", db)
    assert r.rc == 2 and "already has norms" in r.err


def test_ray_ranges_equal_local(untracked, tmp_path, cli):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'dpledger[distributed]'")
    import shutil

    other = tmp_path / "copy.duckdb"
    shutil.copy(untracked, other)
    assert cli("norms", "--run", "u", "--points", "40", "--chunk", "20", "--db", untracked).rc == 0
    r = cli("norms", "--run", "u", "--points", "40", "--chunk", "20", "--executor", "ray", "--db", other)
    assert r.rc == 0, r
    q = "SELECT step, point_id, grad_norm, loss FROM point_steps ORDER BY ALL"
    assert _q(untracked, q) == _q(other, q) and len(_q(other, q)) > 0


def test_norms_bad_input(untracked, cli):
    for args, fragment in ((["--run", "nope"], "unknown run 'nope'"), (["--run", "u", "--chunk", "0"], "--chunk 0"),
                           (["--run", "u", "--executor", "spark"], "--executor spark"),
                           (["--run", "u", "--checkpoints", "999"], "no checkpoint at step 999")):
        r = cli("norms", *args, "--db", untracked)
        assert r.rc == 2 and fragment in r.err, (args, r)


def test_norms_of_the_last_checkpoint(untracked, cli):
    """--checkpoints last scores the last checkpoint that has a step after it (one saved at the
    run's last step has nothing left to score; it used to make 'last' always fail)."""
    db = untracked
    ckpts = [c[0] for c in _q(db, "SELECT step FROM checkpoints ORDER BY step")]
    assert ckpts[-1] == 11  # the run's last step (12 steps) has a checkpoint: the old 'last'
    r = cli("norms", "--run", "u", "--checkpoints", "last", "--db", db, "--json")
    assert r.rc == 0, r
    last = max(s for s in ckpts if s + 1 < 12)
    assert r.json()["checkpoints"] == [last] and r.json()["steps"] == [last + 1]
    assert _q(db, "SELECT DISTINCT step FROM point_steps") == [(last + 1,)]
