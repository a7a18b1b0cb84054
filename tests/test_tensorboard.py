"""``dpledger export tensorboard``: the event files read back with TensorBoard's own reader."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

import dpledger.cli.export  # noqa: F401 - registers `export` (until dpledger.cli imports it)
import dpledger.cli.watch  # noqa: F401
from dpledger.analysis.rdp import dp_epsilon

from conftest import query_rows

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    HISTOGRAMS, SCALARS, EventAccumulator)

RUN = "digits-logreg-s0-n1"
QUANTILE_TAGS = [f"privacy/epsilon_example_{k}" for k in ("min", "p05", "median", "p95", "max")]
SCALAR_TAGS = {"train/loss", "eval/test_accuracy", "privacy/epsilon", "clipping/clipped_fraction",
               "privacy/points_at_cap", *QUANTILE_TAGS}
STEPS = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from dpledger.cli import main

    db = tmp_path_factory.mktemp("tb") / "w.duckdb"
    assert main(["train", "--dataset", "digits", "--model", "logreg", "--n-train", "100", "--batch-size", "10",
                 "--epochs", "1", "--eval-every", "4", "--track", "all", "--noise-multiplier", "1.0",
                 "--max-grad-norm", "7.5", "--db", str(db), "--json"]) == 0
    return db


def _read(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0, HISTOGRAMS: 0})
    acc.Reload()
    return acc


def _hashes(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_reads_back(trained, tmp_path, cli):
    before = _hashes(trained.parent)
    r = cli("export", "tensorboard", RUN, "--logdir", tmp_path / "tb", "--db", trained, "--json")
    assert r.rc == 0, r
    assert _hashes(trained.parent) == before  # the warehouse is only read
    out = r.json()
    assert Path(out["logdir"]) == tmp_path / "tb" / RUN and out["steps"] == STEPS
    acc = _read(tmp_path / "tb" / RUN)
    tags = acc.Tags()
    assert set(tags["scalars"]) == SCALAR_TAGS
    assert set(tags["histograms"]) == {"clipping/grad_norm", "privacy/epsilon_example"}

    def series(tag):
        events = acc.Scalars(tag)
        return [e.step for e in events], np.array([e.value for e in events])

    # loss: every step, the steps table's values (TensorBoard keeps float32)
    steps, loss = series("train/loss")
    table = query_rows(trained, "SELECT step, loss FROM steps ORDER BY step")
    assert steps == [s for s, _ in table] == list(range(STEPS))
    np.testing.assert_allclose(loss, [v for _, v in table], rtol=1e-6)
    steps, accuracy = series("eval/test_accuracy")
    table = query_rows(trained, "SELECT step, test_accuracy FROM steps WHERE NOT isnan(test_accuracy) ORDER BY step")
    assert steps == [s for s, _ in table] and len(steps) >= 2
    np.testing.assert_allclose(accuracy, [v for _, v in table], rtol=1e-6)
    # data-independent ε: every step, of the steps so far; the last one the run's
    q, sigma, delta = query_rows(trained, "SELECT sample_rate, noise_multiplier, delta FROM runs")[0]
    steps, eps = series("privacy/epsilon")
    assert steps == list(range(STEPS))
    np.testing.assert_allclose(eps, [dp_epsilon(q, sigma, t + 1, delta)[0] for t in steps], rtol=1e-6)
    # fraction of sampled points clipped, every step
    steps, clipped = series("clipping/clipped_fraction")
    table = query_rows(trained, "SELECT step, avg((grad_norm >= 7.5)::INT) FROM point_steps WHERE sampled "
                                "GROUP BY 1 ORDER BY 1")
    assert steps == [s for s, _ in table]
    np.testing.assert_allclose(clipped, [v for _, v in table], rtol=1e-6)
    assert 0 < clipped.mean() < 1
    # per-example ε quantiles: ordered, non-decreasing in step, under the run's ε, ending at watch's numbers
    quantiles = [series(tag) for tag in QUANTILE_TAGS]
    assert all(s == list(range(STEPS)) for s, _ in quantiles)  # 10 steps: all of them (at most 200)
    values = np.array([v for _, v in quantiles])
    assert np.all(np.diff(values, axis=0) >= -1e-6 * values[1:])
    assert np.all(np.diff(values, axis=1) >= -1e-6 * values[:, 1:])
    assert np.all(values[-1] <= eps * (1 + 1e-6)) and values[0, -1] < values[-1, -1]
    r = cli("watch", RUN, "--json", "--count", "1", "--db", trained)
    (row,) = r.json()
    np.testing.assert_allclose(values[:, -1], [row[f"epsilon_{k}"] for k in ("min", "p05", "median", "p95", "max")],
                               rtol=1e-6)
    assert acc.Scalars("privacy/points_at_cap")[-1].value == row["points_at_cap"]
    # histograms at the checkpoints, one value per point
    checkpoints = [s for (s,) in query_rows(trained, "SELECT step FROM checkpoints ORDER BY 1")]
    assert len(checkpoints) >= 2
    for tag in ("clipping/grad_norm", "privacy/epsilon_example"):
        events = acc.Histograms(tag)
        assert [e.step for e in events] == checkpoints
        assert all(e.histogram_value.num == 100 for e in events)
    norms = query_rows(trained, "SELECT min(grad_norm), max(grad_norm) FROM point_steps WHERE step = ?",
                       [checkpoints[-1]])[0]
    last = acc.Histograms("clipping/grad_norm")[-1].histogram_value
    assert (last.min, last.max) == pytest.approx(norms, rel=1e-6)
    assert acc.Histograms("privacy/epsilon_example")[-1].histogram_value.max == pytest.approx(row["epsilon_max"],
                                                                                              rel=1e-6)

    # a second export of the run: refused, or replaced with --overwrite (one event file)
    r = cli("export", "tensorboard", RUN, "--logdir", tmp_path / "tb", "--db", trained)
    assert r.rc == 2 and "--overwrite" in r.err
    r = cli("export", "tensorboard", RUN, "--logdir", tmp_path / "tb", "--db", trained, "--overwrite")
    assert r.rc == 0 and f"tensorboard --logdir {tmp_path / 'tb'}" in r.out
    assert len(list((tmp_path / "tb" / RUN).glob("events.out.tfevents.*"))) == 1


def test_export_bounds_the_quantile_steps(trained, tmp_path, cli):
    r = cli("export", "tensorboard", RUN, "--logdir", tmp_path, "--max-points", "3", "--db", trained)
    assert r.rc == 0, r
    acc = _read(tmp_path / RUN)
    checkpoints = {s for (s,) in query_rows(trained, "SELECT step FROM checkpoints")}
    for tag in QUANTILE_TAGS:
        steps = [e.step for e in acc.Scalars(tag)]
        assert set(steps) == {0, 4, 9} | checkpoints  # 3 evenly spaced, the last one in, and the checkpoints
    assert len(acc.Scalars("train/loss")) == STEPS
    r = cli("export", "tensorboard", RUN, "--logdir", tmp_path / "x", "--max-points", "0", "--db", trained)
    assert r.rc == 2 and "--max-points 0" in r.err
    r = cli("export", "tensorboard", "nope", "--logdir", tmp_path / "y", "--db", trained)
    assert r.rc == 2 and "unknown run 'nope'" in r.err and not (tmp_path / "y").exists()


def test_export_without_tensorboard_says_how_to_install(trained, tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    r = cli("export", "tensorboard", RUN, "--logdir", tmp_path / "tb", "--db", trained)
    assert r.rc == 2 and "pip install 'dpledger[tensorboard]'" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "tb").exists()
