"""The training loop's fast paths (issue #15): the clipped sum taken from the norm tracker's
own pass, and the recorder's background writer. Each must give exactly what the plain path
gives."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message="Full backward hook")


def _dpsgd(model_name: str, seed: int = 0, clip: float = 1.0):
    from dpledger.models.dp_step import DPSGD
    from dpledger.models.nets import build_model

    model = build_model(model_name, (1, 8, 8), 10, seed=seed)
    return DPSGD.build(model, lr=0.5, momentum=0.0, private=True, noise_multiplier=1.0, max_grad_norm=clip,
                       expected_batch_size=16, noise=torch.Generator().manual_seed(5), reuse_norms=True)


@pytest.mark.parametrize("model_name", ["mlp", "logreg"])
def test_captured_clipped_sum_equals_the_weighted_backward(model_name):
    from dpledger.ingest.worker import _captured_step, _LinearCapture
    from dpledger.models.grad_norms import GradNormTracker, per_example_grad_norms

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=gen) * torch.rand(40, 1, 1, 1, generator=gen) * 3
    y = torch.randint(0, 10, (40,), generator=gen)
    rows = torch.tensor([3, 7, 8, 20, 33, 39, 0])     # the batch: rows of the tracked input
    clip = float(per_example_grad_norms(_dpsgd(model_name).model, x, y).norms[rows].median())  # some above C
    ours, ref = _dpsgd(model_name, clip=clip), _dpsgd(model_name, clip=clip)
    capture = _LinearCapture(ours.model)
    assert capture.usable
    with GradNormTracker(ours.model) as tracker:
        capture.start()
        res = tracker(x, y)
        capture.stop()
    norms = res.norms[rows]
    assert (norms > clip).any() and (norms < clip).any()
    grads = capture.grads(rows, norms, clip, len(x))
    assert grads is not None  # the capture agreed with the tracker's norms: the fast path is taken
    loss = _captured_step(ours, grads, len(rows), res.losses[rows].sum())
    ref_loss = ref.step(x[rows], y[rows], norms)  # the weighted backward over the batch
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for (name, p), q in zip(ref.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_capture_falls_back_when_it_saw_nothing_or_the_model_does_not_fit():
    from dpledger.ingest.worker import _LinearCapture
    from dpledger.models.grad_norms import GradNormTracker

    dp = _dpsgd("mlp")
    capture = _LinearCapture(dp.model)
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    with GradNormTracker(dp.model) as tracker:
        res = tracker(x, y)  # capture not started
    assert capture.grads(torch.arange(3), res.norms[:3], 1.0, 10) is None
    with GradNormTracker(dp.model) as tracker:
        capture.start()
        res = tracker(x, y)
        capture.stop()
    assert capture.grads(torch.arange(3), res.norms[:3] * 1.5, 1.0, 10) is None  # norms that do not agree
    assert not _LinearCapture(_dpsgd("lenet").model).usable  # convolutions: the weighted backward


def test_tracked_run_uses_the_fast_path_and_matches_the_per_sample_run(tmp_path, monkeypatch):
    """A whole tracked run through the captured clipped sums equals the run clipped by Opacus's
    per-sample pass (norms, losses and sampled flags of every row), and it did take that path."""
    import dpledger.ingest.worker as worker
    from dpledger.ingest.sinks import ShardSink

    taken = []
    grads = worker._LinearCapture.grads
    monkeypatch.setattr(worker._LinearCapture, "grads",
                        lambda self, *a, **k: taken.append(grads(self, *a, **k)) or taken[-1])
    out = {}
    for reuse in (True, False):
        cfg = worker.TrainConfig(run=f"r{int(reuse)}", dataset="digits", model="mlp", epochs=1, n_train=200,
                                 n_test=50, batch_size=20, noise_multiplier=1.0, track="all", seed=3,
                                 reuse_norms=reuse, commit_every=3)
        sink = ShardSink(tmp_path / "lake")
        try:
            worker.train(cfg, sink, db_dir=tmp_path)
        finally:
            sink.close()
        import pyarrow.parquet as pq

        d = tmp_path / "lake" / f"run_id=r{int(reuse)}"
        t = pq.read_table(sorted((d / "point_steps").glob("part-*.parquet"))).to_pandas()
        out[reuse] = t.sort_values(["step", "point_id"])[["step", "point_id", "grad_norm", "loss", "sampled"]]
    assert len(taken) == 10 and all(g is not None for g in taken)
    a, b = out[True].to_numpy(float), out[False].to_numpy(float)
    assert a.shape == (10 * 200, 5)
    np.testing.assert_array_equal(a[:, [0, 1, 4]], b[:, [0, 1, 4]])
    np.testing.assert_allclose(a[:, 2:4], b[:, 2:4], rtol=1e-4)


@pytest.mark.parametrize("n_train, threads, want", [(600, None, "process"), (200, None, 1), (600, 1, 1)])
def test_tracker_threads(tmp_path, monkeypatch, n_train, threads, want):
    """An mlp steps on one thread; the norm tracker takes the process's threads when it tracks
    PARALLEL_TRACKED_POINTS or more points (unless --threads says otherwise), and the run's
    config records it. The threads are the run's own: the caller's are restored."""
    import json

    import dpledger.ingest.worker as worker
    from dpledger.ingest.sinks import ShardSink
    from dpledger.models.grad_norms import GradNormTracker

    assert worker.PARALLEL_TRACKED_POINTS == 512
    process = 2
    before = torch.get_num_threads()
    torch.set_num_threads(process)
    seen, stepping = [], []
    call = GradNormTracker.__call__
    monkeypatch.setattr(GradNormTracker, "__call__",
                        lambda self, *a, **k: seen.append(torch.get_num_threads()) or call(self, *a, **k))
    captured = worker._captured_step
    monkeypatch.setattr(worker, "_captured_step",
                        lambda *a, **k: stepping.append(torch.get_num_threads()) or captured(*a, **k))
    try:
        cfg = worker.TrainConfig(run="t", dataset="digits", model="mlp", epochs=0.2, n_train=n_train, n_test=50,
                                 batch_size=20, noise_multiplier=1.0, track="all", seed=3, threads=threads)
        sink = ShardSink(tmp_path / "lake")
        try:
            worker.train(cfg, sink, db_dir=tmp_path)
        finally:
            sink.close()
        assert torch.get_num_threads() == process  # the caller's threads, restored
    finally:
        torch.set_num_threads(before)
    expect = process if want == "process" else want
    assert seen and set(seen) == {expect}
    assert stepping and set(stepping) == {1}  # the DP-SGD steps of an mlp stay single-threaded
    run = json.loads((tmp_path / "lake" / "run_id=t" / "run.json").read_text())
    config = run["config"] if isinstance(run.get("config"), dict) else json.loads(run["config"])
    assert config["tracker_threads"] == expect and config["torch_threads"] == 1


# -- the background writer -----------------------------------------------------------------------

def _cfg(run: str, **kw):
    from dpledger.ingest.worker import TrainConfig

    opts = dict(dataset="digits", model="mlp", epochs=1, n_train=200, n_test=50, batch_size=20, noise_multiplier=1.0,
                track="all", seed=3, commit_every=3)
    return TrainConfig(run=run, **{**opts, **kw})


def _rows(lake, run: str):
    """The committed point_steps rows of a run in a lake, sorted, as the manifest lists them."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    d = lake / f"run_id={run}"
    manifest = json.loads((d / "manifest.json").read_text())
    files = [d / s["files"]["point_steps"]["path"] for s in manifest["shards"] if "point_steps" in s["files"]]
    t = pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()
    return manifest, t.sort_values(["step", "point_id"])[["step", "point_id", "grad_norm", "loss", "sampled"]]


def _train_in_thread(cfg, sink, tmp_path, **kw):
    """train() on a thread: a hang fails the test instead of stopping the suite."""
    import threading

    from dpledger.ingest.worker import train

    out = {}

    def run():
        try:
            out["summary"] = train(cfg, sink, db_dir=tmp_path, **kw)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(300)
    assert not th.is_alive(), "train() hung"
    return out


@pytest.mark.parametrize("where", ["commit", "stage"])
def test_a_writer_error_is_one_clear_error_and_the_run_resumes_whole(tmp_path, monkeypatch, where):
    import dpledger.ingest.recorder as recorder
    from dpledger.ingest.sinks import ShardSink
    from dpledger.warehouse.errors import UserError

    monkeypatch.setattr(recorder, "STAGE_ROWS", 400)  # stage every 2 steps

    class Failing(ShardSink):
        calls = 0

        def commit(self, run_id, step, tables):
            if where == "commit" and step >= 5:
                raise UserError(f"cannot write shards to {self.lake}: No space left on device")
            return super().commit(run_id, step, tables)

        def stage(self, run_id, tables):
            Failing.calls += 1
            if where == "stage" and Failing.calls == 2:  # stages: steps 0-1, then (after step 2's commit) 3-4
                raise UserError(f"cannot write shards to {self.lake}: No space left on device")
            return super().stage(run_id, tables)

    lake = tmp_path / "lake"
    sink = Failing(lake)
    out = _train_in_thread(_cfg("r"), sink, tmp_path)
    sink.close()
    assert isinstance(out.get("error"), UserError) and "No space left on device" in str(out["error"])
    manifest, rows = _rows(lake, "r")
    assert manifest["status"] == "failed" and manifest["committed_step"] == 2
    assert len(rows) == 3 * 200 and rows["step"].max() == 2  # what was committed, nothing past it
    assert not list((lake / "run_id=r" / "point_steps").glob("*.tmp"))  # staged rows dropped
    sink = ShardSink(lake)
    out = _train_in_thread(_cfg("r"), sink, tmp_path, resume=True)
    sink.close()
    assert out["summary"]["resumed_from"] == 3
    sink = ShardSink(lake)
    _train_in_thread(_cfg("whole"), sink, tmp_path)
    sink.close()
    (_, a), (_, b) = _rows(lake, "r"), _rows(lake, "whole")
    assert len(a) == len(b) == 10 * 200 and not a.duplicated(["step", "point_id"]).any()
    np.testing.assert_array_equal(a.to_numpy(float), b.to_numpy(float))  # no gap, no duplicate, same run


def test_staged_rows_are_committed_whole_and_counted(tmp_path, monkeypatch):
    import dpledger.ingest.recorder as recorder
    from dpledger.ingest.sinks import ShardSink

    monkeypatch.setattr(recorder, "STAGE_ROWS", 500)  # a stage every 3 steps, commits every 4
    lake = tmp_path / "lake"
    sink = ShardSink(lake)
    out = _train_in_thread(_cfg("s", commit_every=4), sink, tmp_path)
    sink.close()
    manifest, rows = _rows(lake, "s")
    assert out["summary"]["rows"] == len(rows) == 10 * 200
    assert manifest["status"] == "finished" and manifest["committed_step"] == 9
    assert sum(s["files"]["point_steps"]["rows"] for s in manifest["shards"]) == 2000
    assert not rows.duplicated(["step", "point_id"]).any()
    assert not list((lake / "run_id=s").rglob("*.tmp"))


_KILLED = """
import sys, warnings
warnings.filterwarnings("ignore")
import dpledger.ingest.recorder as recorder
from dpledger.ingest.sinks import ShardSink
from dpledger.ingest.worker import TrainConfig, train
recorder.STAGE_ROWS = 400
cfg = TrainConfig(run=sys.argv[2], dataset="digits", model="mlp", epochs=30, n_train=200, n_test=50, batch_size=20,
                  noise_multiplier=1.0, track="all", seed=3, commit_every=25)
sink = ShardSink(sys.argv[1])
train(cfg, sink, resume=len(sys.argv) > 3)
sink.close()
"""


def test_sigkill_with_staged_rows_then_resume_neither_duplicates_nor_skips(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(_KILLED)
    lake = tmp_path / "lake"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(script), str(lake), "k"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = lake / "run_id=k"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a commit is in and rows of the next are staged
        try:
            step = json.loads((d / "manifest.json").read_text()).get("committed_step")
        except (OSError, ValueError):
            step = None
        if step is not None and step >= 49 and list((d / "point_steps").glob(".stage-*.tmp")):
            break
        assert proc.poll() is None, "the worker exited before it could be killed"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest, rows = _rows(lake, "k")
    c = manifest["committed_step"]
    assert manifest["status"] == "running" and 49 <= c < 299
    assert len(rows) == (c + 1) * 200 and rows["step"].max() == c  # nothing past the marker is listed
    r = subprocess.run([sys.executable, str(script), str(lake), "k", "resume"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(d.rglob("*.tmp"))  # the killed writer's staged file is gone
    r = subprocess.run([sys.executable, str(script), str(lake), "whole"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (m, a), (_, b) = _rows(lake, "k"), _rows(lake, "whole")
    assert m["status"] == "finished" and len(a) == len(b) == 300 * 200
    assert not a.duplicated(["step", "point_id"]).any()
    np.testing.assert_array_equal(a.to_numpy(float), b.to_numpy(float))  # bit-identical: no gap, no duplicate
